"""Pick and build a backend. Imports are lazy so `loopgolf --help` needs neither MLX nor torch."""

from __future__ import annotations

import importlib.util
import platform
import sys

from core.errors import UserError

INSTALL_HINT = {
    "mlx": "pip install 'loopgolf[mlx]' (Metal on Apple Silicon, the CPU build on Linux)",
    "torch": "pip install torch==<version> then pip install 'loopgolf[torch]' (see the README for CPU vs CUDA builds)",
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def torch_backend_ready() -> bool:
    return _available("torch") and importlib.util.find_spec("backend_torch.trainer") is not None


def resolve_backend(name: str) -> str:
    """auto: MLX on Apple Silicon, torch elsewhere (MLX where torch is missing)."""
    if name == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        if apple and _available("mlx"):
            return "mlx"
        if torch_backend_ready():
            return "torch"
        if _available("mlx"):
            return "mlx"
        raise UserError(f"no backend installed: {INSTALL_HINT['mlx']}, or {INSTALL_HINT['torch']}")
    if name not in INSTALL_HINT:
        raise UserError(f"--backend {name!r}: expected auto, mlx or torch")
    module = "mlx" if name == "mlx" else "torch"
    if not _available(module):
        raise UserError(f"--backend {name}: {module} is not installed; {INSTALL_HINT[name]}")
    if name == "torch" and not torch_backend_ready():
        raise UserError("--backend torch: the torch backend is not available in this version of loopgolf")
    return name


def build_backend(name: str, spec, weights, train, optim, **kwargs):
    if name == "mlx":
        from backend_mlx.trainer import MLXTrainer

        return MLXTrainer(spec, weights, train, optim)
    from backend_torch.trainer import TorchTrainer

    return TorchTrainer(spec, weights, train, optim, **kwargs)
