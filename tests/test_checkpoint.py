"""Checkpoints: the on-disk format, rotation, atomicity, refusals; backend state round trips; the loop's
behaviour on NaNs and signals (with a numpy stand-in backend, so these run in milliseconds).

The end-to-end kill-and-resume runs are in test_resume.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import numpy as np
import pytest

from core import checkpoint as ck
from core.bpb import ByteLuts
from core.config import config_from_dict
from core.errors import UserError
from core.loop import Trainer
from core.params import init_weights
from core.runlog import RunLog
from core.shards import shard_name, write_shard
from core.weights import load_weights
from tests.helpers import StandInBackend

MODEL = {"vocab_size": 64, "model_dim": 16, "num_heads": 2, "num_kv_heads": 1, "layer_plan": "2x2"}
TRAIN = {"iterations": 20, "batch_tokens": 64, "seq_len": 16, "warmup_steps": 0, "val_every": 0, "log_every": 0,
         "max_wallclock_seconds": 0, "compute_dtype": "float32", "checkpoint_every": 1}


def make_cfg(model=None, **train):
    return config_from_dict({"model": {**MODEL, **(model or {})}, "train": {**TRAIN, **train}})


CFG = make_cfg()
SPEC = CFG.model


def make_state(seed=0):
    rng = np.random.default_rng(seed)
    weights = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in init_weights(SPEC, seed).items()}
    optimizer = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in ck.optimizer_shapes(SPEC).items()}
    optimizer["adam.step"] = np.array(7, np.float32)
    return weights, optimizer


@pytest.fixture()
def shards(tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / "data" / shard_name("train", i))
        write_shard(files[-1], np.random.default_rng(i).integers(0, 64, 5000))
    return files


def meta(shards, cfg=CFG, train_ms=123.25, position=(0, 130)):
    return ck.checkpoint_meta(train_ms, None, position, ck.shard_record(shards), cfg, "mlx", 1, {})


def write(root, step, shards, keep=2, seed=0, cfg=CFG):
    weights, optimizer = make_state(seed)
    return ck.write_checkpoint(root, step, cfg.model, weights, optimizer, meta(shards, cfg), keep=keep)


# ---- format ------------------------------------------------------------------------------------------

def test_round_trip(tmp_path, shards):
    root = tmp_path / "run" / ck.DIR_NAME
    weights, optimizer = make_state(3)
    path = ck.write_checkpoint(root, 5, SPEC, weights, optimizer, meta(shards), keep=2)
    assert path == root / "step_000005"
    assert ck.list_checkpoints(root) == [(5, path)] and ck.latest(root) == path
    assert sorted(p.name for p in root.iterdir()) == ["step_000005"]  # no temporary left behind
    got = ck.load_checkpoint(path, SPEC)
    assert got.step == 5 and got.train_time_ms == 123.25 and got.position == (0, 130) and got.stop_after is None
    for want, have in ((weights, got.weights), (optimizer, got.optimizer)):
        assert sorted(want) == sorted(have)
        for k in want:
            assert have[k].dtype == np.float32 and have[k].shape == np.shape(want[k]), k
            np.testing.assert_array_equal(have[k], want[k], err_msg=k)
    assert got.optimizer["adam.step"].shape == ()  # a scalar stays a scalar
    m = got.meta
    assert m["format"] == ck.FORMAT and m["version"] == ck.VERSION and m["loopgolf_version"]
    assert m["spec"] == SPEC.to_dict() and m["config"]["train"]["iterations"] == 20
    assert m["data"]["train_shards"] == [[f.name, 5000] for f in shards] and m["rng"] is None
    spec, w = load_weights(path / ck.WEIGHTS_FILE)  # the weights file is an ordinary weight file (--init)
    assert spec == SPEC and all(np.array_equal(w[k], weights[k]) for k in w)


def test_keep_newest_k(tmp_path, shards):
    root = tmp_path / ck.DIR_NAME
    for step in (2, 4, 6, 8):
        write(root, step, shards, keep=2)
    assert [s for s, _ in ck.list_checkpoints(root)] == [6, 8]
    assert sorted(p.name for p in root.iterdir()) == ["step_000006", "step_000008"]
    for step in (10, 12, 14):
        write(root, step, shards, keep=0)  # 0 keeps all
    assert [s for s, _ in ck.list_checkpoints(root)] == [6, 8, 10, 12, 14]
    write(root, 14, shards, keep=0, seed=9)  # the same step again replaces it
    got = ck.load_checkpoint(root / "step_000014", SPEC)
    np.testing.assert_array_equal(got.optimizer["adam_m.skip_weights"], make_state(9)[1]["adam_m.skip_weights"])


def test_incomplete_directories_are_ignored_then_swept(tmp_path, shards):
    root = tmp_path / ck.DIR_NAME
    good = write(root, 3, shards)
    # What a kill leaves: a temporary being written, a directory being deleted, a stray step dir with no JSON.
    tmp = root / ".step_000006.k2j4.tmp"
    tmp.mkdir()
    (tmp / ck.WEIGHTS_FILE).write_bytes(b"half")
    (root / ".step_000001.x.del").mkdir()
    (root / "step_000009").mkdir()
    (root / "step_000009" / ck.WEIGHTS_FILE).write_bytes(b"x")
    assert ck.list_checkpoints(root) == [(3, good)]
    write(root, 4, shards, keep=0)
    assert not tmp.exists() and not (root / ".step_000001.x.del").exists()
    assert [s for s, _ in ck.list_checkpoints(root)] == [3, 4]


def test_a_failed_write_leaves_no_checkpoint(tmp_path, shards, monkeypatch):
    root = tmp_path / ck.DIR_NAME
    write(root, 2, shards)
    real = ck._write_synced

    def failing(path, data):
        if path.name == ck.OPTIMIZER_FILE:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ck, "_write_synced", failing)
    with pytest.raises(UserError, match=f"cannot write {root / 'step_000004'}: No space left on device"):
        write(root, 4, shards)
    assert [p.name for p in root.iterdir()] == ["step_000002"]


# ---- refusals ----------------------------------------------------------------------------------------

def test_resume_picks_the_newest_and_refuses_other_configs(tmp_path, shards):
    out = tmp_path / "run"
    write(out / ck.DIR_NAME, 4, shards, keep=0)
    newest = write(out / ck.DIR_NAME, 6, shards, keep=0)
    assert ck.resolve_resume(out, CFG, shards) == newest
    # Keys that do not touch the trajectory may change.
    free = make_cfg(val_every=5, log_every=1, checkpoint_every=7, keep_checkpoints=9, warmup_steps=3,
                    val_max_tokens=100)
    assert ck.resolve_resume(out, free, shards) == newest

    with pytest.raises(UserError) as e:
        ck.resolve_resume(out, make_cfg(iterations=99, seq_len=8), shards)
    msg = str(e.value)
    assert "train.iterations (checkpoint 20, now 99)" in msg and "train.seq_len (checkpoint 16, now 8)" in msg
    assert str(newest) in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"model\.model_dim \(checkpoint 16, now 32\)"):
        ck.resolve_resume(out, make_cfg({"model_dim": 32}), shards)
    other = config_from_dict({"model": MODEL, "train": TRAIN, "optim": {"matrix_lr": 0.01}})
    with pytest.raises(UserError, match=r"optim\.matrix_lr \(checkpoint 0\.04, now 0\.01\)"):
        ck.resolve_resume(out, other, shards)
    with pytest.raises(UserError, match="other data"):
        ck.resolve_resume(out, CFG, shards[:1])


def test_resume_may_change_the_scheme_and_eval_keys_but_not_a_qat_runs_scheme(tmp_path, shards):
    def cfg(artifact, eval_table=None, **train):
        return config_from_dict({"model": MODEL, "train": {**TRAIN, **train}, "artifact": artifact,
                                 "eval": eval_table or {}})

    plain, qat = cfg({"scheme": "int8"}), cfg({"scheme": "int8", "qat": "late"})
    for run, saved in (("plain", plain), ("qat", qat)):
        write(tmp_path / run / ck.DIR_NAME, 4, shards, cfg=saved)
    changed = cfg({"scheme": "int6"}, {"stride": 8, "hedge": True}, compile="on")
    assert ck.resolve_resume(tmp_path / "plain", changed, shards).name.endswith("4")
    assert ck.resolve_resume(tmp_path / "qat", cfg({"scheme": "int8", "qat": "late"}, {"stride": 8}), shards)
    with pytest.raises(UserError, match=r"artifact\.scheme \(checkpoint 'int8', now 'int6'\)"):
        ck.resolve_resume(tmp_path / "qat", cfg({"scheme": "int6", "qat": "late"}), shards)


def test_resume_without_a_checkpoint_and_a_fresh_run_over_one_are_refused(tmp_path, shards):
    with pytest.raises(UserError, match="no complete checkpoint"):
        ck.resolve_resume(tmp_path / "empty", CFG, shards)
    ck.refuse_fresh_run(tmp_path / "empty")  # nothing there: fine
    write(tmp_path / "run" / ck.DIR_NAME, 2, shards)
    with pytest.raises(UserError, match="--resume"):
        ck.refuse_fresh_run(tmp_path / "run")


def _json(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


CORRUPTIONS = {
    "weights missing": (ck.WEIGHTS_FILE, lambda p: p.unlink()),
    "optimizer truncated": (ck.OPTIMIZER_FILE, lambda p: p.write_bytes(p.read_bytes()[:-100])),
    "weights byte flipped": (ck.WEIGHTS_FILE, lambda p: p.write_bytes(_flip(p.read_bytes(), -5))),
    "json missing": (ck.META_FILE, lambda p: p.unlink()),
    "json not json": (ck.META_FILE, lambda p: p.write_text('{"format": "loopgolf-checkpoint", "step": ')),
    "json NaN": (ck.META_FILE, lambda p: p.write_text(p.read_text().replace('": 123.25', '": NaN'))),
    "json step negative": (ck.META_FILE, lambda p: _json(p, lambda m: m.__setitem__("step", -1))),
    "json no data position": (ck.META_FILE, lambda p: _json(p, lambda m: m["data"].pop("pos"))),
    "json other version": (ck.META_FILE, lambda p: _json(p, lambda m: m.__setitem__("version", 99))),
    "json list": (ck.META_FILE, lambda p: p.write_text("[1, 2]")),
}


def _flip(data: bytes, i: int) -> bytes:
    b = bytearray(data)
    b[i] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_refused_naming_the_file(name, tmp_path, shards):
    path = write(tmp_path / ck.DIR_NAME, 3, shards)
    file, damage = CORRUPTIONS[name]
    damage(path / file)
    with pytest.raises(UserError) as e:
        ck.load_checkpoint(path, SPEC)
    assert str(path / file) in str(e.value) and "\n" not in str(e.value)


def _optimizer_file(path, tensors):
    from safetensors.numpy import save

    path.write_bytes(save(tensors))
    return path


@pytest.mark.parametrize("change, fragment", [
    (lambda o: o.pop("adam_v.skip_weights"), "missing adam_v.skip_weights"),
    (lambda o: o.__setitem__("muon.extra", np.zeros(2, np.float32)), "extra muon.extra"),
    (lambda o: o.__setitem__("adam.step", np.zeros(3, np.float32)), "adam.step: shape [3], expected []"),
    (lambda o: o.__setitem__("adam_m.skip_weights", o["adam_m.skip_weights"].astype(np.float64)), "expected dtype F32"),
    (lambda o: o["adam_m.skip_weights"].__setitem__(0, np.nan), "non-finite"),
])
def test_optimizer_file_must_match_the_spec(change, fragment, tmp_path):
    _, optimizer = make_state()
    change(optimizer)
    path = _optimizer_file(tmp_path / ck.OPTIMIZER_FILE, optimizer)
    with pytest.raises(UserError) as e:
        ck.read_optimizer(path, SPEC)
    assert fragment in str(e.value) and str(path) in str(e.value)


def test_a_checkpoint_of_another_spec_is_refused(tmp_path, shards):
    path = write(tmp_path / ck.DIR_NAME, 3, shards)
    with pytest.raises(UserError, match="weights do not match the spec|spec differs"):
        ck.load_checkpoint(path, make_cfg({"model_dim": 32}).model)


def test_resume_command_names_the_run_and_its_ranks():
    from tools.train import resume_command

    args = argparse.Namespace(argv=["train", "--config", "c.toml", "--set", "train.iterations=9"], out=None)
    assert resume_command(args, "runs/x y", 1) == \
        "loopgolf train --config c.toml --set train.iterations=9 --out 'runs/x y' --resume"
    args = argparse.Namespace(argv=["train", "--config", "c.toml", "--out", "r", "--resume"], out="r")
    assert resume_command(args, "r", 4) == "loopgolf train --config c.toml --out r --nproc 4 --resume"


# ---- backends: get_state / set_state -----------------------------------------------------------------

def _batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[(x[:, :-1].astype(np.int32), x[:, 1:].astype(np.int32))] for x in rng.integers(0, 64, (steps, 4, 17))]


@pytest.fixture()
def one_torch_thread(monkeypatch):
    """torch's CPU threads spin against MLX's in one process (and against anything else on a busy machine):
    measured 1.3 s with one thread, 12 s with two on 2 cores. The trainer leaves OMP_NUM_THREADS to the user."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_backend_state_round_trip_continues_exactly(backend, request):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    if backend == "torch":
        request.getfixturevalue("one_torch_thread")
    from tools.backends import build_backend

    make = lambda w: build_backend(backend, SPEC, w, CFG.train, CFG.optim)  # noqa: E731
    batches = _batches(5)
    a = make(init_weights(SPEC, 1))
    for mbs in batches[:3]:
        a.train_step(mbs, 0.7, 0.9)
    weights, optimizer = a.get_state()
    assert set(optimizer) == set(ck.optimizer_shapes(SPEC)) and float(optimizer["adam.step"]) == 3.0
    assert all(np.shape(optimizer[k]) == s for k, s in ck.optimizer_shapes(SPEC).items())
    assert any(np.abs(v).max() > 0 for k, v in optimizer.items() if k.startswith("muon."))
    b = make(init_weights(SPEC, 2))  # other weights, fresh optimizer: set_state replaces both
    b.set_state(weights, optimizer)
    for mbs in batches[3:]:
        assert a.train_step(mbs, 0.5, 0.9) == b.train_step(mbs, 0.5, 0.9)
    (wa, oa), (wb, ob) = a.get_state(), b.get_state()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


# ---- the loop: NaNs and signals, with a numpy stand-in backend ----------------------------------------

class FakeBackend(StandInBackend):
    def __init__(self, losses=None, nan_weights_at=None, on_step=None):
        super().__init__(init_weights(SPEC, 0),
                         {k: np.zeros(s, np.float32) for k, s in ck.optimizer_shapes(SPEC).items()})
        self.losses, self.nan_weights_at, self.on_step, self.steps = losses or {}, nan_weights_at, on_step, 0

    def train_step(self, micro_batches, lr_scale, momentum):
        self.steps += 1
        for v in self.weights.values():
            v += np.float32(0.001)
        if self.steps == self.nan_weights_at:
            self.weights["skip_weights"][0] = np.nan
        if self.on_step:
            self.on_step(self.steps)
        return self.losses.get(self.steps, 3.0)

    def eval_loss_sum(self, x, y):
        if getattr(self, "on_eval", None):
            self.on_eval()
        return 3.0 * x.size


def trainer(tmp_path, shards, backend, **train):
    log = RunLog(tmp_path / "run", echo=False, progress_bar=False)
    luts = ByteLuts(np.ones(64, np.int16), np.zeros(64, bool), np.zeros(64, bool))  # one byte per token
    return Trainer(make_cfg(**train), backend, shards, np.zeros(100, np.int32), luts, log, out_dir=tmp_path / "run")


def test_a_nan_loss_stops_with_the_last_checkpoint_and_exports_nothing(tmp_path, shards):
    t = trainer(tmp_path, shards, FakeBackend(losses={5: float("nan")}), checkpoint_every=2)
    with pytest.raises(FloatingPointError) as e:
        t.run()
    msg = str(e.value)
    last = tmp_path / "run" / ck.DIR_NAME / "step_000004"
    assert "step 5" in msg and str(last) in msg and f"--init {last / ck.WEIGHTS_FILE}" in msg
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run" / ck.DIR_NAME)] == [2, 4]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    nonfinite = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert nonfinite["event"] == "nonfinite" and nonfinite["step"] == 5 and nonfinite["checkpoint"] == str(last)


def test_nan_weights_are_never_checkpointed_or_exported(tmp_path, shards):
    t = trainer(tmp_path, shards, FakeBackend(nan_weights_at=3), checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="non-finite weights.*step_000002"):
        t.run()
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run" / ck.DIR_NAME)] == [1, 2]
    with pytest.raises(FloatingPointError, match="nothing exported"):
        t.export(tmp_path / "run", {}, code_bytes=0)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_sigint_finishes_the_step_checkpoints_and_restores_the_handlers(tmp_path, shards):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    backend = FakeBackend(on_step=lambda s: s == 5 and os.kill(os.getpid(), signal.SIGINT))
    t = trainer(tmp_path, shards, backend, checkpoint_every=0)
    with pytest.raises(ck.Interrupted) as e:
        t.run()
    assert (e.value.signum, e.value.step) == (signal.SIGINT, 5) and backend.steps == 5
    assert e.value.checkpoint == tmp_path / "run" / ck.DIR_NAME / "step_000005"
    got = ck.load_checkpoint(e.value.checkpoint, SPEC)
    assert got.step == 5 and got.position == (0, 5 * 65)  # 5 steps of 64 tokens + 1 (upstream's slicing)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_during_the_final_validation_stops_before_the_export(tmp_path, shards):
    backend, fired = FakeBackend(), []

    def once():  # a second SIGTERM would terminate the test process
        if backend.steps == 3 and not fired:
            fired.append(os.kill(os.getpid(), signal.SIGTERM))

    backend.on_eval = once
    with pytest.raises(ck.Interrupted) as e:
        trainer(tmp_path, shards, backend, checkpoint_every=2, iterations=3).run()
    assert (e.value.signum, e.value.step) == (signal.SIGTERM, 3)
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run" / ck.DIR_NAME)] == [2, 3]


def test_a_second_signal_acts_as_without_the_handler(tmp_path, shards):
    class Previous(Exception):
        pass

    def previous(signum, frame):
        raise Previous

    def twice(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Previous):
            trainer(tmp_path, shards, FakeBackend(on_step=twice), checkpoint_every=0).run()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert ck.list_checkpoints(tmp_path / "run" / ck.DIR_NAME) == []


def test_resume_restores_step_time_and_data_position(tmp_path, shards):
    first = FakeBackend(on_step=lambda s: s == 4 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(ck.Interrupted):
        trainer(tmp_path, shards, first, checkpoint_every=0).run()
    saved = ck.load_checkpoint(ck.latest(tmp_path / "run" / ck.DIR_NAME), SPEC)
    seen = []
    second = FakeBackend(on_step=lambda s: seen.append(s))
    result = trainer(tmp_path, shards, second, checkpoint_every=0, iterations=6).run(saved)
    assert result["steps"] == 6 and seen == [1, 2]  # steps 5 and 6 only (the fake counts its own calls)
    assert result["val_loss"] == 3.0 and result["train_time_ms"] >= saved.train_time_ms
    want = first.weights["skip_weights"] + np.float32(0.001) + np.float32(0.001)  # two more steps of the fake
    np.testing.assert_array_equal(second.weights["skip_weights"], want)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 4, "train_time_ms": saved.train_time_ms, "checkpoint": str(saved.path)} in events


def test_torch_parameters_keep_the_table_order_whatever_the_input_order():
    """Gradients are all-reduced through one flat buffer in parameter order; weights loaded from safetensors
    come in a different order in every process, so that order must not leak into the trainer (it did:
    two ranks resuming, or starting from --init, summed misaligned gradients)."""
    pytest.importorskip("torch")
    from backend_torch.trainer import TorchBackend
    from core.params import param_table

    weights = init_weights(SPEC, 0)
    shuffled = {k: weights[k] for k in reversed(list(weights))}
    t = TorchBackend(SPEC, shuffled, CFG.train, CFG.optim, device="cpu")
    assert list(t.params) == [info.name for info in param_table(SPEC)]


# ---- the command line ----------------------------------------------------------------------------------

QUICK = ["--config", "configs/demo.toml", "--backend", "mlx", "--small", "--set", "train.iterations=2",
         "--set", "train.warmup_steps=0", "--set", "train.val_every=0", "--set", "train.val_max_tokens=1024",
         "--set", "train.max_wallclock_seconds=0", "--set", "train.checkpoint_every=1", "--set", "train.log_every=0"]


@pytest.mark.slow
def test_cli_resume_refusals_and_a_resume_at_the_end(demo_data, tmp_path, capsys):
    pytest.importorskip("mlx.core")
    from tools.cli import main

    def cli(*argv):
        code = main(["train", "--data", str(demo_data), *QUICK, *argv])
        err = capsys.readouterr().err.strip()
        return code, err

    def refused(fragment, *argv):
        code, err = cli(*argv)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("loopgolf: error: "), err
        assert fragment in err, err

    out = tmp_path / "run"
    refused("--resume needs --out", "--resume")
    refused("no complete checkpoint", "--out", str(out), "--resume")
    assert cli("--out", str(out)) == (0, "")
    assert [s for s, _ in ck.list_checkpoints(out / ck.DIR_NAME)] == [1, 2]
    refused("already holds checkpoints", "--out", str(out))
    refused("train.iterations (checkpoint 2, now 3)", "--out", str(out), "--resume", "--set", "train.iterations=3")
    refused("cannot be combined with --init", "--out", str(out), "--resume", "--init", str(out / "model.safetensors"))
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert cli("--out", str(out), "--resume", "--set", "train.log_every=1")[0] == 0  # log_every may change
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert events[-1]["event"] == "final" and events[-1]["val_loss"] == final["val_loss"]
