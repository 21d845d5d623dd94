"""Eval-time extra loops in PyTorch (core.depth gives the semantics): the trained loops, then the last loop
again with its own per-layer rows, recording the residual stream at every loop's end.

Mirrors the MLX backend's depth_eval.py line by line. The trained loops are model.hidden_states
itself (its `collect` hands back every layer's output); the extra loops call model.py's layer_step.
"""

from __future__ import annotations

import numpy as np
import torch

from backend_torch.dist import device_ids
from backend_torch.model import (cross_entropy, head, hidden_states, input_features, layer_step, linear, rms_norm,
                                 softcap)
from core.depth import require_cyclic
from core.spec import ModelSpec


def loop_states(spec: ModelSpec, p: dict, tokens: torch.Tensor, total_loops: int, dtype=torch.float32) -> list:
    """The residual stream (before the final norm) at the end of loops 1..total_loops."""
    k, r = require_cyclic(spec, "eval-time extra loops")
    outs: list = []
    prev_out: dict = {}  # each block's latest output and layer 0's values, as the trained loops left them
    hidden_states(spec, p, tokens, dtype, collect=outs, prev_out=prev_out)  # the trained loops: the model's own
    states = [outs[layer] for layer in sorted(spec.loop_ends)]
    x0, ve = input_features(spec, p, tokens, dtype)
    x = outs[-1]
    for _ in range(total_loops - r):  # the last loop's layers again: their rows, no U-Net skips (all consumed)
        for layer in range(spec.num_layers - k, spec.num_layers):
            x = layer_step(spec, p, layer, x, x0, dtype, prev_out, ve)
        states.append(x)
    return states


def _head_losses(spec: ModelSpec, p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = softcap(linear(rms_norm(x, spec.norm_eps), head(spec, p)).to(torch.float32), spec.logit_softcap)
    return cross_entropy(z, y)


@torch.no_grad()
def loop_stats(backend, x: np.ndarray, y: np.ndarray, total_loops: int) -> np.ndarray:
    """(total_loops, 3) float64 per batch: loss sum (nats), sum (x_k - x_{k-1})^2, sum x_{k-1}^2 (row 0: 0, 0)."""
    tokens, targets = device_ids(x, backend.torch_device), device_ids(y, backend.torch_device)
    with backend.autocast():  # as the trainer's own evaluation (bf16 autocast on CUDA)
        states = loop_states(backend.spec, backend.params, tokens, total_loops, backend.dtype)
        losses = [_head_losses(backend.spec, backend.params, s, targets).sum().item() for s in states]
    out = np.zeros((total_loops, 3), np.float64)
    prev = None
    for i, s in enumerate(states):
        out[i, 0] = losses[i]
        if prev is not None:
            s32, p32 = s.to(torch.float32), prev.to(torch.float32)
            out[i, 1] = (s32 - p32).square().sum().item()
            out[i, 2] = p32.square().sum().item()
        prev = s
    return out
