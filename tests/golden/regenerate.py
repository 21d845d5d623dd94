"""The golden trajectory, torchtitan style: a committed seed checkpoint and its per-step training losses.

tests/test_parity.py loads seed.safetensors, trains it for STEPS steps on a deterministic synthetic token
sequence (numpy seeded, no shards) in BOTH backends (fp32, CPU) and asserts that every loss matches
losses.json within core.tolerances' "golden_loss". A change that alters the numerics (an op, an
initial value, the optimizer, the schedule, the data generator) fails that test and must update the
golden files on purpose:

    python -m tests.golden.regenerate            # from the repository root; needs torch and mlx

It writes seed.safetensors (perturbed init of CONFIG's tiny looped model, ~66 KB) and losses.json
(torch's losses, with MLX's alongside for reference), after checking that the two backends agree.
Commit both, and say in the commit why the numbers moved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent
SEED_FILE = GOLDEN_DIR / "seed.safetensors"
LOSSES_FILE = GOLDEN_DIR / "losses.json"

# Tiny and looped: 2 unique blocks run 3 times (6 effective layers, U-Net skips), GQA 4q/2kv.
CONFIG = {
    "model": {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x3"},
    "train": {"seq_len": 32, "batch_tokens": 256, "grad_accum_steps": 2, "compute_dtype": "float32",
              "warmup_steps": 0, "max_wallclock_seconds": 0, "iterations": 8, "warmdown_iters": 4},
    "optim": {},
}
STEPS = 8
WEIGHT_SEED = 20240601
DATA_SEED = 7


def golden_config():
    from core.config import config_from_dict

    return config_from_dict(CONFIG, source="tests/golden/regenerate.py")


def golden_batches() -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """STEPS steps of grad_accum_steps micro-batches (x, y), from tools.parity.synthetic_batch."""
    from tools.parity import synthetic_batch

    cfg = golden_config()
    t = cfg.train
    seqs = t.batch_tokens // (t.seq_len * t.grad_accum_steps)
    rng = np.random.default_rng(DATA_SEED)
    return [[synthetic_batch(cfg.model.vocab_size, seqs, t.seq_len, rng) for _ in range(t.grad_accum_steps)]
            for _ in range(STEPS)]


def run_trajectory(backend: str, weights: dict[str, np.ndarray]) -> list[float]:
    """Per-step training losses of `backend` ("mlx" or "torch") from `weights`, on the CPU in fp32, with
    core's schedules (step-based warmdown over the last steps, Muon momentum warmup)."""
    from core.schedule import lr_multiplier, muon_momentum

    cfg = golden_config()
    if backend == "mlx":
        import mlx.core as mx

        from backend_mlx.trainer import MLXBackend

        before = mx.default_device()
        mx.set_default_device(mx.cpu)
        try:
            trainer = MLXBackend(cfg.model, weights, cfg.train, cfg.optim)
            return [trainer.train_step(mbs, lr_multiplier(i, 0.0, cfg.train), muon_momentum(i, cfg.optim))
                    for i, mbs in enumerate(golden_batches())]
        finally:
            mx.set_default_device(before)
    from backend_torch.trainer import TorchBackend

    trainer = TorchBackend(cfg.model, weights, cfg.train, cfg.optim, device="cpu")
    return [trainer.train_step(mbs, lr_multiplier(i, 0.0, cfg.train), muon_momentum(i, cfg.optim))
            for i, mbs in enumerate(golden_batches())]


def load_golden() -> tuple[dict[str, np.ndarray], dict]:
    """(seed weights, losses.json), after checking that the seed file's spec is CONFIG's model."""
    from core.weights import load_weights

    spec, weights = load_weights(SEED_FILE)
    if spec != golden_config().model:
        raise AssertionError(f"{SEED_FILE}: its spec differs from CONFIG's model; regenerate the golden files "
                             "(python -m tests.golden.regenerate)")
    return weights, json.loads(LOSSES_FILE.read_text())


def main() -> int:
    import backend_torch  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads OpenMP)
    import mlx.core as mx
    import torch

    from core.tolerances import tolerance
    from core.weights import load_weights, save_weights
    from tools.parity import perturbed_weights

    cfg = golden_config()
    save_weights(SEED_FILE, cfg.model, perturbed_weights(cfg.model, WEIGHT_SEED))
    _, weights = load_weights(SEED_FILE)
    losses = {b: run_trajectory(b, weights) for b in ("torch", "mlx")}
    tol = tolerance("golden_loss", "float32")
    worst = float(np.abs(np.subtract(losses["torch"], losses["mlx"])).max())
    if worst > tol.atol:
        print(f"the backends disagree by {worst:.3e} (> {tol.atol}); not writing {LOSSES_FILE}", file=sys.stderr)
        return 1
    record = {
        "about": "per-step training losses of tests/golden/seed.safetensors; see tests/golden/regenerate.py",
        "config": {**{k: v for k, v in CONFIG.items() if k != "model"}, "model": cfg.model.to_dict()},
        "steps": STEPS, "data_seed": DATA_SEED, "weight_seed": WEIGHT_SEED,
        "losses": losses["torch"],
        "losses_mlx": losses["mlx"],
        "generated_with": {"numpy": np.__version__, "torch": torch.__version__, "mlx": mx.__version__},
    }
    LOSSES_FILE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {SEED_FILE} ({SEED_FILE.stat().st_size:,} B) and {LOSSES_FILE}")
    print("losses (torch):", " ".join(f"{v:.6f}" for v in losses["torch"]))
    print(f"max |torch - mlx|: {worst:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
