"""Pick and build a backend. Imports are lazy so `loopgolf --help` needs neither MLX nor torch."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

from core.errors import UserError

INSTALL_HINT = {
    "mlx": "pip install 'loopgolf[mlx]' (Metal on Apple Silicon, the CPU build on Linux)",
    "torch": "pip install torch==<version> then pip install 'loopgolf[torch]' (see the README for CPU vs CUDA builds)",
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def under_torchrun() -> bool:
    """True in a rank that torchrun (or `--nproc`, which runs it) started: it sets RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_backend(name: str) -> str:
    """auto: MLX on Apple Silicon, torch elsewhere (MLX where torch is missing)."""
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        if apple and _available("mlx"):
            return "mlx"
        if _available("torch"):
            return "torch"
        if _available("mlx"):
            return "mlx"
        raise UserError(f"no backend installed: {INSTALL_HINT['mlx']}, or {INSTALL_HINT['torch']}")
    if name not in INSTALL_HINT:
        raise UserError(f"--backend {name!r}: expected auto, mlx or torch")
    module = "mlx" if name == "mlx" else "torch"
    if not _available(module):
        raise UserError(f"--backend {name}: {module} is not installed; {INSTALL_HINT[name]}")
    return name


def build_backend(name: str, spec, weights, train, optim, **kwargs):
    """The trainer, with its framework's random generator seeded from train.seed: the only draws after
    init_weights are noisy QAT's (artifact.qat_noise), and they follow the seed like everything else."""
    if name == "mlx":
        import mlx.core as mx

        from backend_mlx.trainer import MLXBackend

        mx.random.seed(train.seed)
        return MLXBackend(spec, weights, train, optim)
    import torch

    from backend_torch.trainer import TorchBackend

    torch.manual_seed(train.seed)  # every rank the same: the noise perturbs replicated weights
    return TorchBackend(spec, weights, train, optim, **kwargs)
