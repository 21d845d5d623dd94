"""Training with the torch backend: the same trajectory as MLX, and the same run on 1 and 2 processes.

fp32 on CPU. The multi-process runs go through `loopgolf train --nproc 2` (torch.distributed.run, gloo).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backend_torch.trainer import TorchBackend  # noqa: E402
from core.config import OptimConfig, TrainConfig  # noqa: E402
from core.params import MATRIX, init_weights, param_table  # noqa: E402
from core.schedule import muon_momentum  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from core.weights import load_weights  # noqa: E402

SPEC = ModelSpec.from_table({"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x3"})
TRAIN = TrainConfig(compute_dtype="float32")
OPTIM = OptimConfig()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_steps(steps=10, micro=2, batch=4, seq=32, vocab=64, seed=0):
    """Learnable token batches from a fixed numpy seed: a noisy affine bigram chain, so the loss falls."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        mbs = []
        for _ in range(micro):
            seqs = np.empty((batch, seq + 1), np.int64)
            seqs[:, 0] = rng.integers(0, vocab, batch)
            for t in range(seq):
                seqs[:, t + 1] = (5 * seqs[:, t] + 3) % vocab
            noise = rng.random(seqs.shape) < 0.1
            seqs[noise] = rng.integers(0, vocab, noise.sum())
            mbs.append((seqs[:, :-1].astype(np.int32), seqs[:, 1:].astype(np.int32)))
        out.append(mbs)
    return out


def run_steps(trainer, steps):
    return np.array([trainer.train_step(mbs, 1.0, muon_momentum(i, OPTIM)) for i, mbs in enumerate(steps)])


@pytest.mark.slow
def test_ten_steps_match_mlx():
    pytest.importorskip("mlx.core")
    from backend_mlx.trainer import MLXBackend

    weights, steps = init_weights(SPEC, seed=7), synthetic_steps()
    mlx_losses = run_steps(MLXBackend(SPEC, weights, TRAIN, OPTIM), steps)
    torch_trainer = TorchBackend(SPEC, weights, TRAIN, OPTIM, device="cpu")
    torch_losses = run_steps(torch_trainer, steps)
    assert mlx_losses[-1] < mlx_losses[0] - 0.5  # it learns, so the comparison covers real updates
    # Both fp32; per-step rounding differs (matmul order, Newton-Schulz), ~1e-7 relative, and is carried
    # forward by the updates. Observed <= 1e-6 over 10 steps on losses 4.2 -> 1.9; 2e-4 leaves margin for
    # other BLAS builds, while one changed detail moves the trajectory by 5e-3 to 2e-2 (checked by hand:
    # Newton-Schulz c = 2.0 instead of 2.0315, beta2 = 0.99, RoPE run backwards).
    np.testing.assert_allclose(torch_losses, mlx_losses, atol=2e-4, rtol=0)


def test_snapshot_restore_and_weights_roundtrip():
    weights, steps = init_weights(SPEC, seed=3), synthetic_steps(steps=3)
    t = TorchBackend(SPEC, weights, TRAIN, OPTIM, device="cpu")
    assert (t.rank, t.world_size, t.name) == (0, 1, "torch")
    t.train_step(steps[0], 1.0, 0.9)
    snap = t.snapshot()
    after_one = t.get_weights()
    second = t.train_step(steps[1], 1.0, 0.9)
    assert any(np.abs(after_one[k] - v).max() > 0 for k, v in t.get_weights().items())
    t.restore(snap)  # a deep copy: the step after the snapshot did not leak into it
    for k, v in t.get_weights().items():
        np.testing.assert_array_equal(v, after_one[k])
    assert t.train_step(steps[1], 1.0, 0.9) == second  # optimizer state restored too
    t.set_weights(weights)
    for k, v in t.get_weights().items():
        np.testing.assert_array_equal(v, weights[k])
    x, y = steps[2][0]
    assert t.eval_loss_sum(x, y) == pytest.approx(float(x.size) * np.log(SPEC.vocab_size), rel=0.05)


# End to end through the CLI on the demo shards: 2 gloo ranks x 1 micro-batch against 1 process x 2
# micro-batches. upstream's slicing gives both the same token windows, and averaging two ranks' gradients
# equals weighting two micro-batches by 1/2, so the runs should agree to rounding (observed: bit-identical).
CLI_TINY = [
    "--small", "--set", "train.iterations=4", "--set", "train.val_every=0",
    "--set", "train.val_max_tokens=4096", "--set", "train.log_every=1", "--set", "train.warmup_steps=1",
    "--set", "train.compute_dtype='float32'", "--set", "train.batch_tokens=512",
]


def loopgolf_train(demo_data, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.cli", "train", "--config", "configs/demo.toml", "--backend", "torch",
           "--data", str(demo_data), "--out", str(out), *CLI_TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(demo_data, tmp_path):
    two = loopgolf_train(demo_data, tmp_path / "two", "--nproc", "2")
    one = loopgolf_train(demo_data, tmp_path / "one", "--nproc", "1", "--set", "train.grad_accum_steps=2")
    for run in (one, two):
        assert [e["step"] for e in run if e["event"] == "train"] == [1, 2, 3, 4]
        assert [e for e in run if e["event"] == "final"], "no final record"
    start = next(e for e in two if e["event"] == "start")
    assert start["world_size"] == 2
    spec = ModelSpec.from_table(start["spec"])
    assert sum(i.group == MATRIX for i in param_table(spec)) >= 2  # both ranks own Muon matrices
    losses = {name: np.array([e["train_loss"] for e in run if e["event"] == "train"])
              for name, run in (("one", one), ("two", two))}
    # Identical data and maths up to the order of two-term sums: 1e-5 on losses ~6.9.
    np.testing.assert_allclose(losses["two"], losses["one"], atol=1e-5, rtol=0)
    _, w1 = load_weights(tmp_path / "one" / "model.safetensors")
    _, w2 = load_weights(tmp_path / "two" / "model.safetensors")
    for k in w1:  # every matrix was updated on its owner rank and shared: the weights agree too
        np.testing.assert_allclose(w2[k], w1[k], atol=1e-6, rtol=0, err_msg=k)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_two_processes_agree_on_the_wallclock_stop(demo_data, tmp_path):
    run = loopgolf_train(demo_data, tmp_path / "cap", "--nproc", "2", "--set", "train.iterations=100000",
                         "--set", "train.max_wallclock_seconds=0.2")
    final = next(e for e in run if e["event"] == "final")
    assert 1 <= final["steps"] < 100000 and final["world_size"] == 2
    assert "stopping_early: wallclock_cap" in (tmp_path / "cap" / "train.log").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled bf16 path)")
def test_cuda_compiled_bf16_step_tracks_cpu_fp32():
    weights, steps = init_weights(SPEC, seed=7), synthetic_steps(steps=5)
    cpu = run_steps(TorchBackend(SPEC, weights, TRAIN, OPTIM, device="cpu"), steps)
    gpu = run_steps(TorchBackend(SPEC, weights, TrainConfig(compute_dtype="auto"), OPTIM, device="cuda"), steps)
    # bf16 matmuls (8-bit mantissa) and bf16 Newton-Schulz: a looser band than fp32 parity.
    np.testing.assert_allclose(gpu, cpu, atol=5e-2, rtol=0)


@pytest.mark.slow  # importing torch._dynamo alone takes seconds
def test_train_compile_setting_picks_the_compiled_path(monkeypatch):
    """train.compile: 'auto' compiles on CUDA only, 'on'/'off' force it; anything else is one config error.
    Only the choice is checked here, by the torch.compile calls the trainer makes (an inductor compile on a
    CPU takes 25-70 s, measured in docs/benchmarks.md)."""
    import dataclasses

    from backend_torch.trainer import TorchBackend
    from core.config import TrainConfig, config_from_dict
    from core.errors import UserError
    from core.params import init_weights

    cfg = config_from_dict({"model": {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2,
                                      "layer_plan": "2x2"}})
    weights = init_weights(cfg.model, 0)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(fn) or fn)
    for setting, expect in (("auto", False), ("on", True), ("off", False)):
        compiled.clear()
        TorchBackend(cfg.model, weights, dataclasses.replace(cfg.train, compile=setting), cfg.optim, device="cpu")
        assert bool(compiled) is expect, setting
    with pytest.raises(UserError, match="train.compile"):
        TrainConfig(compile="yes")
