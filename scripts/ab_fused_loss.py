"""Side-by-side A/B of the torch CPU training step with the fused softcap cross-entropy (the default on the
eager float32 path) against the written-out loss, in one process on the same weights and batch, steps
alternated, so that machine noise hits both alike (docs/benchmarks.md).

    python scripts/ab_fused_loss.py [--config configs/demo.toml] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import backend_torch.trainer as torch_trainer
from backend_torch.model import token_losses
from core.config import load_config
from core.params import init_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    cfg = load_config(args.config)
    spec, t = cfg.model, cfg.train
    weights = init_weights(spec, t.seed)
    fused = torch_trainer.TorchBackend(spec, weights, t, cfg.optim, device="cpu")
    chosen = torch_trainer.per_token_losses
    torch_trainer.per_token_losses = lambda compiled, dtype: token_losses  # the written-out loss, for arm B
    try:
        plain = torch_trainer.TorchBackend(spec, weights, t, cfg.optim, device="cpu")
    finally:
        torch_trainer.per_token_losses = chosen
    rng = np.random.default_rng(0)
    shape = (t.batch_tokens // t.seq_len, t.seq_len)
    x, y = rng.integers(0, spec.vocab_size, shape), rng.integers(0, spec.vocab_size, shape)
    times = {"fused": [], "written-out": []}
    for _ in range(args.rounds):
        for name, trainer in (("fused", fused), ("written-out", plain)):
            t0 = time.perf_counter()
            trainer.train_step([(x, y)], 1.0, 0.95)
            times[name].append(1000 * (time.perf_counter() - t0))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round warms up
    for k, v in times.items():
        print(f"{k}: median {med[k]:.0f} ms/step, min {min(v[1:]):.0f} ms, {t.batch_tokens / med[k] * 1000:,.0f} tok/s")
    print(f"written-out / fused: {med['written-out'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
