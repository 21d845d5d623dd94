"""Score-first test-time training (core/ttt.py): the chunk plan, the score-first property (no target's loss
depends on a token after it, so nothing is scored after the model trained on it), lr = 0 as the sliding eval,
torch vs MLX, two gloo ranks as one, and the config and CLI errors."""

import json

import numpy as np
import pytest

from core.config import EvalConfig, config_from_dict
from core.errors import UserError
from core.sliding import plan_windows, sliding_sums
from core.tolerances import TOLERANCES
from core.ttt import TTTSettings, chunk_lr, epoch_steps, plan_ttt, score_chunk, train_chunk, ttt_eval
from tests.test_sliding import VOCAB, build, byte_luts

# ---- the plan -------------------------------------------------------------------------------------------


def test_the_records_chunks_are_its_32768_token_blocks():
    """Window 2048, stride 64, chunks of 32,768 (record #1493): chunk c scores exactly the targets
    [c * 32768, (c + 1) * 32768) and trains on its 16 sequences of 2048."""
    C, n = 32768, 6 * 32768 + 1000
    plan = plan_ttt(n, 2048, 64, C)
    assert plan.n_chunks == 7
    assert plan.chunk_targets.tolist() == [c * C for c in range(7)] + [n]
    for c in range(plan.n_chunks):
        w = plan.chunk_plan(c)
        first = w.starts + w.score_from
        assert np.all(first // C == c) and (c == 0 or first[0] == c * C)
        assert int(w.starts[-1]) + w.window_len == plan.chunk_targets[c + 1]  # the last window ends the chunk
    assert plan.train_starts(2).tolist() == [2 * C + 2048 * i for i in range(16)]
    assert len(plan.train_starts(6)) == 0  # the last 1,000 targets: shorter than one sequence


@pytest.mark.parametrize("n, window, stride, chunk", [(400, 16, 5, 40), (1000, 48, 7, 48), (97, 8, 8, 9),
                                                      (5000, 64, 64, 1000), (30, 64, 8, 64)])
def test_chunks_split_the_scored_targets_and_train_only_on_their_own(n, window, stride, chunk):
    plan = plan_ttt(n, window, stride, chunk)
    windows = plan_windows(n, window, stride)
    assert plan.chunk_windows[0] == 0 and plan.chunk_windows[-1] == len(windows)
    L = windows.window_len
    for c in range(plan.n_chunks):
        w = plan.chunk_plan(c)
        lo, hi = plan.chunk_targets[c], plan.chunk_targets[c + 1]
        scored = np.concatenate([np.arange(s + f, s + L) for s, f in zip(w.starts, w.score_from)])
        assert scored.tolist() == list(range(lo, hi))  # contiguous, in order, the chunk's own
        assert np.all((w.starts + w.score_from) // chunk == c)  # by its first scored target, as the record
        for s in plan.train_starts(c):  # sequence s predicts targets s .. s + L - 1: scored in this chunk
            assert lo <= s and s + L <= hi
        assert len(plan.train_starts(c)) == (hi - lo) // L


def test_ranks_split_each_step_and_take_the_same_number_of_steps():
    starts = np.arange(10) * 16
    per_rank = [epoch_steps(starts, 16, r, 3, batch_seqs=2) for r in range(3)]
    assert [len(s) for s in per_rank] == [2, 2, 2]  # 3, 3 and 4 sequences: two steps of at most two each
    for i in range(2):
        assert len({steps[i].step_tokens for steps in per_rank}) == 1  # one mean over the step's tokens
        assert per_rank[0][i].step_tokens == 16 * sum(len(steps[i].starts) for steps in per_rank)
    taken = np.concatenate([s.starts for steps in per_rank for s in steps])
    assert sorted(taken.tolist()) == starts.tolist()
    lonely = [epoch_steps(starts[:1], 16, r, 2, 4) for r in range(2)]  # one sequence, two ranks
    assert [s[0].starts.size for s in lonely] == [0, 1]  # the rank with none still steps (the all-reduce)
    assert lonely[0][0].step_tokens == lonely[1][0].step_tokens == 16


def test_learning_rate_is_cosine_over_chunks():
    assert chunk_lr(0.005, 0, 1238) == 0.005
    assert chunk_lr(0.005, 1237, 1238) == pytest.approx(0.0, abs=1e-18)
    assert chunk_lr(0.005, 1237 / 2, 1238) == pytest.approx(0.0025)
    assert chunk_lr(0.005, 0, 1) == 0.005


def test_config_keys_are_checked_once():
    assert EvalConfig(ttt=True, stride=64).ttt_lr == 0.005  # the record's settings are the defaults
    bad = [({"ttt": True}, "eval.ttt = true needs eval.stride > 0"),
           ({"ttt_momentum": 1.0}, "eval.ttt_momentum = 1.0: expected a number in"),
           ({"ttt_epochs": 0}, "eval.ttt_epochs = 0: expected a positive integer"),
           ({"ttt_lr": -1.0}, "eval.ttt_lr = -1.0: expected 0 or more"),
           ({"ttt_chunk_tokens": 0}, "eval.ttt_chunk_tokens = 0"), ({"ttt_grad_clip": -0.5}, "eval.ttt_grad_clip")]
    for kwargs, message in bad:
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            EvalConfig(**kwargs)
    with pytest.raises(UserError, match=r"eval\.ttt_chunk_tokens = 128 is shorter than the sliding window"):
        config_from_dict({"train": {"seq_len": 256}, "eval": {"stride": 64, "ttt": True, "ttt_chunk_tokens": 128}})
    with pytest.raises(UserError, match=r"eval\.ttt_lr"):
        config_from_dict({"eval": {"ttt_lr": "fast"}})


# ---- the score-first property, on a numpy stand-in that learns --------------------------------------------

class LearningStandIn:
    """Per-token losses that depend on every token of the window before the target (test_sliding's stand-in)
    plus learned weights that a TTT step moves by the targets it trains on: a bias per target token, and a
    gain on (target mod 7) that every trained target moves."""

    rank, world_size = 0, 1

    def __init__(self):
        self.bias, self.gain = np.zeros(VOCAB), 0.0

    def eval_token_losses(self, x, y):
        context = np.cumsum(x * 31 + 7, axis=1)
        return (0.5 + ((context + 13 * y) % 97) / 25.0 + self.bias[y] + self.gain * (y % 7)).astype(np.float32)

    def all_reduce_sum(self, values):
        return values

    def get_weights(self):
        return {"bias": self.bias.copy(), "gain": self.gain}

    def set_weights(self, weights):
        self.bias, self.gain = weights["bias"].copy(), weights["gain"]

    def ttt_optimizer(self, momentum, grad_clip):
        return StandInSGD(self, momentum)


class StandInSGD:
    def __init__(self, model, momentum):
        self.model, self.momentum, self.buffer = model, momentum, np.zeros(VOCAB + 1)

    def step(self, x, y, loss_scale, lr):
        # d(loss_scale * the summed losses) / d(bias, gain)
        grad = np.append(np.bincount(y.ravel(), minlength=VOCAB), np.sum(y % 7)) * loss_scale
        self.buffer = self.momentum * self.buffer + grad
        self.model.bias = self.model.bias - lr * self.buffer[:VOCAB]
        self.model.gain = self.model.gain - lr * self.buffer[VOCAB]


SETTINGS = TTTSettings(chunk_tokens=64, epochs=2, lr=0.5, momentum=0.9, grad_clip=1.0, batch_seqs=2)
WINDOW, STRIDE, BATCH = 16, 4, 8


def val_tokens(seed=1, n=400):
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.int32)


def score_first(model, tokens):
    return ttt_eval(model, tokens, WINDOW, STRIDE, BATCH, byte_luts(), SETTINGS, keep_token_nll=True)


def train_then_score(model, tokens):
    """A deliberately illegal order, built from the same parts: each chunk trained on before it is scored."""
    plan = plan_ttt(len(tokens) - 1, WINDOW, STRIDE, SETTINGS.chunk_tokens)
    opt = model.ttt_optimizer(SETTINGS.momentum, SETTINGS.grad_clip)
    parts = []
    for c in range(plan.n_chunks):
        train_chunk(model, opt, tokens, plan, c, chunk_lr(SETTINGS.lr, c, plan.n_chunks), SETTINGS)
        parts.append(score_chunk(model, tokens, plan, c, BATCH, byte_luts(), True)[1])
    return np.concatenate(parts)


def earlier_scores_ignore(run, tokens, m: int) -> bool:
    """Whether changing token m leaves every target before it unchanged, bit for bit: target j predicts
    tokens[j + 1] from tokens[..j], so targets j < m - 1 read neither the token nor anything trained on it."""
    changed = tokens.copy()
    changed[m] = (changed[m] + 1) % VOCAB
    a, b = run(tokens), run(changed)
    assert a[m - 1] != b[m - 1]  # the model reads its targets: the check is not vacuous
    return np.array_equal(a[: m - 1], b[: m - 1])


def test_no_target_is_scored_after_the_model_saw_it():
    tokens = val_tokens()
    nll = lambda t: score_first(LearningStandIn(), t).token_nll  # noqa: E731
    for m in (30, 64, 65, 100, 128, 200, 350):  # inside chunks and on their edges
        assert earlier_scores_ignore(nll, tokens, m), m


def test_the_property_check_catches_training_before_scoring():
    tokens = val_tokens()
    broken = lambda t: train_then_score(LearningStandIn(), t)  # noqa: E731
    assert broken(tokens).size == 399  # every target, once
    assert not earlier_scores_ignore(broken, tokens, 100)


def test_a_chunks_score_ignores_later_chunks_and_counts_after_training():
    """Val A and A', different only after chunk k's targets: chunks 0..k score the same; chunk k + 1, scored
    after training on chunk k's (equal) tokens, differs only through its own tokens."""
    tokens = val_tokens()
    plan = plan_ttt(len(tokens) - 1, WINDOW, STRIDE, SETTINGS.chunk_tokens)
    k = 2
    changed = tokens.copy()
    after = int(plan.chunk_targets[k + 1]) + 1  # the first token that is a target of chunk k + 1
    changed[after:] = (changed[after:] + 5) % VOCAB
    a, b = (score_first(LearningStandIn(), t) for t in (tokens, changed))
    assert np.array_equal(a.chunk_sums[: k + 1], b.chunk_sums[: k + 1])
    assert not np.array_equal(a.chunk_sums[k + 1], b.chunk_sums[k + 1])
    # Training matters: the same chunks with lr 0 score differently from chunk 1 on, never chunk 0.
    still = ttt_eval(LearningStandIn(), tokens, WINDOW, STRIDE, BATCH, byte_luts(), TTTSettings(chunk_tokens=64, lr=0))
    assert np.array_equal(still.chunk_sums[0], a.chunk_sums[0])
    assert np.all(still.chunk_sums[1:, 0] != a.chunk_sums[1:, 0])


def test_the_backend_gets_its_weights_back():
    model = LearningStandIn()
    score_first(model, val_tokens())
    assert np.all(model.bias == 0) and model.gain == 0


# ---- real models ----------------------------------------------------------------------------------------

def test_torch_training_never_reaches_back_and_lr_zero_is_the_sliding_eval():
    model = build("torch")
    tokens, luts = val_tokens(n=257), byte_luts()  # 4 chunks of 64 targets
    settings = TTTSettings(chunk_tokens=64, epochs=1, lr=0.5)  # one step a chunk: 4 sequences
    def nll(t):
        return ttt_eval(model, t, WINDOW, STRIDE, BATCH, luts, settings, keep_token_nll=True).token_nll

    assert earlier_scores_ignore(nll, tokens, 150)  # in chunk 2, after two chunks of training

    plain = sliding_sums(model, tokens, plan_windows(len(tokens) - 1, WINDOW, STRIDE), BATCH, luts,
                         keep_token_nll=True)
    still = ttt_eval(model, tokens, WINDOW, STRIDE, BATCH, luts, TTTSettings(chunk_tokens=64, lr=0.0),
                     keep_token_nll=True)
    assert still.steps == 3 * 3  # it trained (1 step of 4 sequences, 3 epochs, 3 chunks) without moving
    # Bit for bit against the sliding eval over the same forward batches (each chunk's windows); against the
    # whole split's batches only to fp32 rounding, since a BLAS (OpenBLAS, preloaded in CI) may pick another
    # kernel for another batch shape.
    ttt_plan = plan_ttt(len(tokens) - 1, WINDOW, STRIDE, 64)
    per_chunk = [sliding_sums(model, tokens, ttt_plan.chunk_plan(c), BATCH, luts, keep_token_nll=True).token_nll
                 for c in range(ttt_plan.n_chunks)]
    assert np.array_equal(still.token_nll, np.concatenate(per_chunk))
    np.testing.assert_allclose(still.token_nll, plain.token_nll, rtol=1e-5, atol=1e-5)
    # The float64 sums are grouped by chunk here, by batch there.
    assert still.val_loss == pytest.approx(plain.sums[0] / plain.sums[1], rel=1e-6)
    trained = ttt_eval(model, tokens, WINDOW, STRIDE, BATCH, luts, settings)
    assert trained.val_loss != pytest.approx(still.val_loss, rel=1e-4)


def test_mlx_and_torch_agree_chunk_by_chunk():
    tokens, luts = val_tokens(3, n=257), byte_luts()
    # Clipping at 0.1 is active at every step here; momentum carries across chunks; two steps an epoch.
    settings = TTTSettings(chunk_tokens=64, epochs=2, lr=0.5, momentum=0.9, grad_clip=0.1, batch_seqs=2)
    results = [ttt_eval(build(b), tokens, WINDOW, STRIDE, BATCH, luts, settings) for b in ("mlx", "torch")]
    tol = TOLERANCES[("loss", "float32")]  # sums of fp32 cross-entropies; see its reason
    np.testing.assert_allclose(results[0].chunk_sums[:, 0], results[1].chunk_sums[:, 0], rtol=tol.rtol)
    assert results[0].steps == results[1].steps == 3 * 2 * 2


# ---- the CLI, and two gloo ranks -------------------------------------------------------------------------

def test_eval_flags_are_checked_before_anything_runs(tmp_path, capsys):
    from tools.cli import main

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    common = ["eval", "--weights", str(weights), "--data", str(tmp_path), "--seq-len", "64"]
    cases = [([], "--ttt scores each chunk with the sliding windows: give --stride too"),
             (["--stride", "32", "--set", "eval.ttt_lr=1"], "eval takes only TTT settings, which need --ttt"),
             (["--stride", "32", "--set", "train.iterations=1"], "eval takes only TTT settings, which need --ttt"),
             (["--stride", "32", "--ttt", "--set", "eval.ttt_lr=x"], "'eval.ttt_lr' = 'x': expected a number"),
             (["--stride", "32", "--ttt", "--set", "eval.ttt_chunk_tokens=32"],
              "eval.ttt_chunk_tokens = 32 is shorter than the window (--seq-len 64)")]
    for extra, message in cases:
        assert main([*common, *(["--ttt"] if not extra else extra)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_rank_ttt_eval(demo_data, tmp_path, capsys):
    """`loopgolf eval --ttt` end to end: two ranks split each chunk's windows and sequences and average the
    gradients; the numbers are one rank's, to fp32 rounding (the gradients are summed in another order). The
    step cap eval.ttt_batch_seqs is per rank, so it must not bind for the steps to be the same: 8 sequences a
    chunk, at most 8 a step."""
    from core.params import init_weights
    from core.spec import ModelSpec
    from core.weights import save_weights
    from tools.cli import main

    spec = ModelSpec.from_table({"vocab_size": 1024, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2,
                                 "layer_plan": "2x2"})
    weights = tmp_path / "model.safetensors"
    save_weights(weights, spec, init_weights(spec, 0))
    args = ["eval", "--weights", str(weights), "--data", str(demo_data), "--seq-len", "64", "--stride", "32",
            "--max-tokens", "2048", "--backend", "torch", "--dtype", "float32", "--no-progress", "--ttt",
            "--set", "eval.ttt_chunk_tokens=512", "--set", "eval.ttt_epochs=2", "--set", "eval.ttt_lr=0.05",
            "--set", "eval.ttt_batch_seqs=8"]
    reports = []
    for ranks in ("1", "2"):
        out = tmp_path / f"ranks{ranks}.json"
        assert main([*args, "--nproc", ranks, "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    one, two = reports
    assert two["world_size"] == 2 and one["ttt_chunks"] == two["ttt_chunks"] == 4
    assert one["ttt_steps"] == two["ttt_steps"] == 3 * 2  # 3 chunks trained on, 2 epochs, 1 step each
    assert two["ttt_val_loss"] == pytest.approx(one["ttt_val_loss"], rel=1e-6)
    assert one["ttt_val_loss"] != pytest.approx(one["sliding_val_loss"], rel=1e-4)  # it trained
    assert "ttt val_loss:" in capsys.readouterr().out


def test_a_resume_may_switch_ttt_on():
    """The TTT keys score the final model only: a checkpoint resumes under other ones (not under another lr)."""
    from core.checkpoint import config_differences, config_record

    before = config_from_dict({})
    meta = {"spec": before.model.to_dict(), "config": config_record(before)}
    after = config_from_dict({"eval": {"stride": 64, "ttt": True, "ttt_lr": 0.01, "ttt_epochs": 1}})
    assert config_differences(meta, after) == []
    assert config_differences(meta, config_from_dict({"optim": {"matrix_lr": 0.01}})) != []
