"""Hessians H = sum x^T x of the inputs of every linear, for core.gptq: an uncompiled forward, no gradients.

The model functions call the module-level `linear(x, w)` by its global name, so for the duration of the
collection that name is replaced by a recording version that finds the weight by identity (the array
object in the parameter dict) and adds x^T x for it. A shared block's weights are applied once per
effective layer, and every application adds its inputs: the Hessian is summed over all of them (#1110).
Each product is taken in float32 on the device (Metal has no float64) and summed in float64 in numpy,
once per batch; the inputs are whatever the forward computes in, as in training.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np

from backend_mlx import model
from core.spec import ModelSpec


@contextlib.contextmanager
def recording_linear(params: dict[str, mx.array], pending: list[tuple[str, mx.array]]):
    """Within the block, model.linear also appends (name, x^T x in float32) to `pending` for each matrix."""
    names = {id(t): name for name, t in params.items() if t.ndim == 2}
    original = model.linear

    def linear(x: mx.array, w: mx.array) -> mx.array:
        name = names.get(id(w))
        if name is not None:
            x2 = mx.stop_gradient(x).reshape(-1, x.shape[-1]).astype(mx.float32)
            pending.append((name, x2.T @ x2))
        return original(x, w)

    model.linear = linear
    try:
        yield pending
    finally:
        model.linear = original


def collect_hessians(spec: ModelSpec, params: dict[str, mx.array], batches, dtype=mx.float32) -> dict[str, np.ndarray]:
    """{weight name: H (in, in) float64} over the token batches `batches` ((x, y) pairs or x arrays, int ids
    (batch, seq)), for every matrix applied through model.linear (the tied embedding included, as the head)."""
    sums: dict[str, np.ndarray] = {}
    pending: list[tuple[str, mx.array]] = []
    with recording_linear(params, pending):
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple) else batch
            model.logits(spec, params, mx.array(np.asarray(x, dtype=np.int32)), dtype)  # lazy: only the products run
            mx.eval([product for _, product in pending])
            for name, product in pending:
                h = np.array(product, dtype=np.float64)
                sums[name] = h if name not in sums else sums[name] + h
            pending.clear()
    return {name: sums[name] for name in sorted(sums)}
