"""Hessians H = sum x^T x of the inputs of every linear, for core.gptq: an uncompiled forward, no gradients.

The model functions call the module-level `linear(x, w)` by its global name, so for the duration of the
collection that name is replaced by a recording version that finds the weight by identity (the tensor
object in the parameter dict) and adds x^T x for it. A shared block's weights are applied once per
effective layer, and every application adds its inputs: the Hessian is summed over all of them (#1110).
The products are taken in float64 (TF32 matmuls on CUDA would cost most of the precision); the inputs are
whatever the forward computes in, as in training (bf16 under autocast on CUDA).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from backend_torch import model
from backend_torch.dist import device_ids
from core.spec import ModelSpec


@contextlib.contextmanager
def recording_linear(params: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]):
    """Within the block, model.linear also adds x^T x (float64) into sums[name] for each matrix of params."""
    names = {id(t): name for name, t in params.items() if t.ndim == 2}
    original = model.linear

    def recording(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        name = names.get(id(w))
        if name is not None:
            with torch.autocast(x.device.type, enabled=False):
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                product = x2.T @ x2
            sums[name] = product if name not in sums else sums[name] + product
        return original(x, w)

    model.linear = recording
    try:
        yield sums
    finally:
        model.linear = original


@torch.no_grad()
def collect_hessians(spec: ModelSpec, params: dict[str, torch.Tensor], batches, dtype=torch.float32,
                     autocast=contextlib.nullcontext) -> dict[str, np.ndarray]:
    """{weight name: H (in, in) float64} over the token batches `batches` ((x, y) pairs or x arrays, int ids
    (batch, seq)) on this process, for every matrix applied through model.linear (the tied embedding
    included, as the head). `autocast`: the trainer's autocast context, so inputs match training's."""
    device = next(iter(params.values())).device
    sums: dict[str, torch.Tensor] = {}
    with recording_linear(params, sums):
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple) else batch
            tokens = device_ids(x, device)
            with autocast():
                model.logits(spec, params, tokens, dtype)
    return {name: sums[name].cpu().numpy() for name in sorted(sums)}
