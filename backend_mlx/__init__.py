"""MLX backend: the model, Muon/Adam and the compiled training step."""

from __future__ import annotations

import numpy as np


def forward_logits(spec, weights: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """float32 soft-capped logits (batch, seq, vocab) for int token ids (batch, seq), computed in fp32."""
    import mlx.core as mx

    from backend_mlx.model import logits

    params = {k: mx.array(v, dtype=mx.float32) for k, v in weights.items()}
    out = logits(spec, params, mx.array(np.asarray(tokens, dtype=np.int32)), mx.float32)
    return np.array(out, dtype=np.float32)
