"""Sliding-window eval (core/sliding.py): exact coverage, the standard eval as its stride = window case,
ranks, and MLX vs torch."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.bpb import ByteLuts
from core.errors import UserError
from core.loop import evaluate
from core.params import init_weights
from core.sliding import plan_windows, rank_windows, sliding_eval, sliding_sums
from core.spec import ModelSpec
from core.tolerances import TOLERANCES
from tests.helpers import trainer

VOCAB = 64
SPEC = ModelSpec.from_table({"vocab_size": VOCAB, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2,
                             "layer_plan": "2x2"})
SHORT = {"warmup_tokens": 40, "update_every": 16}  # a Hedge mixer that mixes within a few hundred targets


def coverage(plan, world: int = 1):
    """How often each target is scored, over every rank's windows; and each rank's targets in order."""
    counts = np.zeros(plan.n_targets, int)
    per_rank = []
    for rank in range(world):
        lo, hi = rank_windows(len(plan), rank, world)
        targets = [t for w in range(lo, hi)
                   for t in range(plan.starts[w] + plan.score_from[w], plan.starts[w] + plan.window_len)]
        per_rank.append(targets)
        np.add.at(counts, np.array(targets, int), 1)
    return counts, per_rank


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 400), window=st.integers(1, 48), data=st.data(), world=st.integers(1, 5))
def test_every_target_is_scored_exactly_once_with_the_longest_context(n, window, data, world):
    stride = data.draw(st.integers(1, window))
    plan = plan_windows(n, window, stride)
    L, S = plan.window_len, min(stride, plan.window_len)
    assert L == min(window, n)
    assert np.all(plan.starts >= 0) and np.all(plan.starts + L <= n)  # every window lies inside the split
    counts, per_rank = coverage(plan, world)
    assert np.all(counts == 1)
    for rank, targets in enumerate(per_rank):  # contiguous, in order, as the rank reports them
        assert targets == list(range(*plan.scored_targets(*rank_windows(len(plan), rank, world))))
    assert plan.score_from[0] == 0  # the first window scores all of its targets
    for p, f in zip(plan.starts, plan.score_from):
        for offset in range(f, L):  # each target sees all it can: its whole prefix, or at least L - S tokens
            assert offset >= min(p + offset, L - S)


@pytest.mark.parametrize("n, window, stride, starts, score_from", [
    (10, 4, 2, [0, 2, 4, 6], [0, 2, 2, 2]),  # the stride divides n - L: no tail window
    (11, 4, 3, [0, 3, 6, 7], [0, 1, 1, 3]),  # a right-aligned tail window scores only target 10
    (96, 16, 16, [0, 16, 32, 48, 64, 80], [0] * 6),  # stride = window: upstream's non-overlapping windows
    (100, 16, 16, [0, 16, 32, 48, 64, 80, 84], [0] * 6 + [12]),
    (3, 8, 2, [0], [0]),  # fewer targets than a window: one window over all of them
])
def test_plans_by_hand(n, window, stride, starts, score_from):
    plan = plan_windows(n, window, stride)
    assert plan.starts.tolist() == starts and plan.score_from.tolist() == score_from


def test_a_stride_longer_than_the_window_is_refused():
    with pytest.raises(UserError, match="stride 9 is longer than the window"):
        plan_windows(100, 8, 9)


# ---- a numpy stand-in model, for the rank logic ---------------------------------------------------------

class ContextModel:
    """Losses that depend on every token of the window before the target, so a window at the wrong place
    or a target scored with the wrong context changes the sum."""

    def __init__(self, rank=0, world_size=1, world=None):
        self.rank, self.world_size, self.world = rank, world_size, world

    def eval_token_losses(self, x, y):
        context = np.cumsum(x * 31 + 7, axis=1)
        return (0.5 + ((context + 13 * y) % 97) / 25.0).astype(np.float32)

    def all_reduce_sum(self, values):
        return values if self.world is None else self.world.all_reduce(self.rank, values)


class ThreadWorld:
    """SUM all-reduce among threads, one per rank."""

    def __init__(self, size):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size)

    def all_reduce(self, rank, values):
        self.slots[rank] = np.asarray(values, np.float64)
        self.barrier.wait()
        total = np.sum(self.slots, axis=0)
        self.barrier.wait()
        return total


def byte_luts(vocab=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    boundary = np.zeros(vocab, bool)
    boundary[:3] = True
    return ByteLuts(rng.integers(1, 5, vocab).astype(np.int16), rng.random(vocab) < 0.4, boundary)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_the_windows_and_give_the_single_rank_numbers(world):
    tokens = np.random.default_rng(1).integers(0, VOCAB, 400).astype(np.int32)
    luts = byte_luts()
    hedge = {"hedge_eta": 0.1, "vocab_size": VOCAB, "hedge_options": SHORT}
    single = sliding_eval(ContextModel(), tokens, 24, 7, 4, luts, **hedge)
    shared = ThreadWorld(world)
    results = [None] * world

    def rank_main(rank):
        results[rank] = sliding_eval(ContextModel(rank, world, shared), tokens, 24, 7, 4, luts, **hedge)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:  # float64 sums grouped differently by rank: a few ulps
        assert r.val_bpb == pytest.approx(single.val_bpb, rel=1e-12)
        assert r.hedge_val_bpb == pytest.approx(single.hedge_val_bpb, rel=1e-12)
        assert r.hedge_weights == pytest.approx(single.hedge_weights, rel=1e-12)
    assert single.hedge_val_bpb != single.val_bpb


def test_a_shifted_window_changes_the_number():
    """The stand-in model is sensitive enough for the rank test to mean something."""
    tokens = np.random.default_rng(1).integers(0, VOCAB, 400).astype(np.int32)
    plan = plan_windows(len(tokens) - 1, 24, 7)
    good = sliding_sums(ContextModel(), tokens, plan, 4, byte_luts()).sums
    plan.starts[3] += 1
    plan.score_from[3] -= 1  # the same targets, one token less of context
    assert sliding_sums(ContextModel(), tokens, plan, 4, byte_luts()).sums[0] != good[0]


# ---- real models --------------------------------------------------------------------------------------

def random_weights(seed=0):
    """Init weights with every matrix perturbed, so attention (and so the context) matters."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.08, v.shape) if v.ndim == 2 else v).astype(np.float32)
            for k, v in init_weights(SPEC, seed).items()}


def build(backend, seq_len=16):
    return trainer(backend, SPEC, random_weights(), seq_len)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_stride_equal_to_the_window_is_the_standard_eval(backend):
    model = build(backend)
    tokens = np.random.default_rng(2).integers(0, VOCAB, 16 * 9 + 1).astype(np.int32)
    luts = byte_luts()
    loss, bpb = evaluate(model, tokens, 16, 16 * 4, luts)
    r = sliding_eval(model, tokens, 16, 16, 4, luts)
    # The same windows and fp32 per-token losses; the standard eval sums each batch in fp32 on the device,
    # the sliding eval in float64 on the host: a few fp32 roundings over 64-token sums.
    assert r.val_loss == pytest.approx(loss, rel=1e-6) and r.val_bpb == pytest.approx(bpb, rel=1e-6)
    # ...while overlapping windows score the same targets with more context: a different number.
    assert sliding_eval(model, tokens, 16, 4, 4, luts).val_loss != pytest.approx(loss, rel=1e-4)


def test_mlx_and_torch_agree_on_sliding_bpb():
    tokens = np.random.default_rng(3).integers(0, VOCAB, 150).astype(np.int32)
    luts = byte_luts()
    # A window of 24 where training used 16, and a stride that divides nothing.
    mlx_r, torch_r = (sliding_eval(build(b), tokens, 24, 5, 3, luts, hedge_eta=0.1, vocab_size=VOCAB,
                                   hedge_options=SHORT) for b in ("mlx", "torch"))
    assert mlx_r.windows == torch_r.windows and mlx_r.targets == torch_r.targets == 149
    tol = TOLERANCES[("loss", "float32")]  # a mean of fp32 cross-entropies; see its reason
    assert mlx_r.val_bpb == pytest.approx(torch_r.val_bpb, rel=tol.rtol)
    assert mlx_r.hedge_val_bpb == pytest.approx(torch_r.hedge_val_bpb, rel=tol.rtol)
