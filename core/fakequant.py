"""The fake-quantization plan for QAT: per tensor, what the export (core.quant) will do to it, as the
host-side constants a backend needs to reproduce that on the device, bit for bit.

Both backends' qat.py read this plan, so they agree with each other and with core.quant by construction:
- "keep": control tensors (fp32 in the artifact) and non-float tensors: untouched;
- "fp16": float tensors the export passes through as fp16 (small ones, and the "fp16" scheme): rounded
  to fp16, because the artifact stores them so (without it the QAT forward would differ from the
  artifact's in the 4th digit of every gain);
- "int8_row" / "int8_tensor": upstream's int8 rule (2-D per row, else per tensor);
- "intN": per-row intN with the clip-percentile search ("int4".."int7", "int8_search").

A clip is an interpolated order statistic of |w| over a row. For the percentiles used here it is always
one of the few largest values, so a backend takes the top-k of |w| per row (no full sort) and
interpolates between two of them with the constants below. The two interpolations differ, as in
core.quant: upstream's is torch.quantile's (float32 position and weight, float32 lerp); the search's is
np.quantile's (float32 difference, then float64 lerp, then float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core import quant

KEEP, FP16, INT8_ROW, INT8_TENSOR, INTN = "keep", "fp16", "int8_row", "int8_tensor", "intN"


@dataclass(frozen=True)
class Lerp:
    """One interpolated order statistic of a row of n values: between the `lo_rank`-th and `hi_rank`-th
    largest (0 = the max), `lo` being the smaller value. `upper`: the lerp runs from the upper neighbour
    (weight >= 0.5), as both torch and numpy do. `weight` is float32 for style "torch32", float64 for
    "numpy64"."""

    lo_rank: int
    hi_rank: int
    weight: float
    upper: bool
    style: str


@dataclass(frozen=True)
class TensorPlan:
    kind: str
    rows: int = 1  # intN / int8: the rows view (2-D per row; anything else one row)
    cols: int = 1
    qmax: int = 0
    clips: tuple[Lerp, ...] = ()  # int8: one; intN: one per CLIP_SEARCH_PERCENTILES candidate
    top_k: int = 1  # how many of the largest |w| per row the clips read (a plain field: torch.compile traces it)


def _quantized(kind: str, rows: int, cols: int, qmax: int, clips: tuple[Lerp, ...]) -> TensorPlan:
    top_k = 1 + max(max(c.lo_rank, c.hi_rank) for c in clips)
    return TensorPlan(kind, rows, cols, qmax, clips, top_k)


def torch_lerp(n: int, q: float) -> Lerp:
    """torch.quantile(.., q) over n values, as core.quant.torch_quantile_last_axis computes it."""
    rank = np.float32(q) * np.float32(n - 1)
    below, above = int(np.floor(rank)), int(np.ceil(rank))
    weight = np.float32(rank - np.float32(below))
    return Lerp(n - 1 - below, n - 1 - above, float(weight), bool(weight >= 0.5), "torch32")


def numpy_lerp(n: int, p: float) -> Lerp:
    """np.quantile(.., p, method="linear") over n values (numpy's _quantile/_get_indexes/_lerp)."""
    virtual = (n - 1) * float(p)
    if virtual >= n - 1:  # numpy takes the last value; its weight is then irrelevant (lo == hi)
        return Lerp(0, 0, 0.0, False, "numpy64")
    below = math.floor(virtual)
    gamma = virtual - below
    return Lerp(n - 1 - below, n - 1 - (below + 1), gamma, gamma >= 0.5, "numpy64")


def tensor_plan(name: str, shape: tuple[int, ...], scheme: str, is_float: bool = True) -> TensorPlan:
    size = int(np.prod(shape)) if shape else 1
    if not is_float or quant.is_control_name(name):
        return TensorPlan(KEEP)
    base = quant.scheme_for_tensor(scheme, name)
    if base == "fp16" or size <= quant.KEEP_FLOAT_MAX_NUMEL:
        return TensorPlan(FP16)
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, size)
    if base == "int8":
        kind = INT8_ROW if len(shape) == 2 else INT8_TENSOR
        return _quantized(kind, rows, cols, quant.INT8_MAX, (torch_lerp(cols, quant.CLIP_QUANTILE),))
    s = quant.get_scheme(base)
    if not isinstance(s, quant.IntNClipSearch):
        raise ValueError(f"no fake quantization for scheme {base!r}")  # a new scheme needs a plan here
    return _quantized(INTN, rows, cols, s.qmax, tuple(numpy_lerp(cols, p) for p in quant.CLIP_SEARCH_PERCENTILES))


def fake_quant_plan(shapes: dict[str, tuple[int, ...]], scheme: str) -> dict[str, TensorPlan]:
    """Every tensor's plan for a quantization scheme (plain or composite, ArtifactConfig.quant_scheme)."""
    return {name: tensor_plan(name, tuple(shape), scheme) for name, shape in shapes.items()}
