"""PyTorch backend: the model, Muon/Adam, the training step and torchrun/NCCL distribution."""

from __future__ import annotations

import os

import numpy as np

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning. On a shared CPU
# this avoids the oversubscription collapse (demo step with one core busy elsewhere, 2 threads: 3.1 s
# spinning vs 1.7 s passive) and costs nothing when the machine is idle (1.00 s vs 0.96 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def forward_logits(spec, weights: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """float32 soft-capped logits (batch, seq, vocab) for int token ids (batch, seq), computed in fp32 on CPU."""
    import torch

    from backend_torch.model import logits

    params = {k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()}
    with torch.no_grad():
        out = logits(spec, params, torch.as_tensor(np.asarray(tokens, dtype=np.int64)), torch.float32)
    return out.numpy().astype(np.float32)
