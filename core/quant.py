"""Post-training quantization of a weight dict, in numpy, so every backend produces the same bytes.

A scheme is a name looked up in `SCHEMES`; the name is written into the artifact so a reader knows how
to dequantize. Only "int8" exists now: upstream's `int8_clean_per_row_v1` rule (REFERENCE.md),
reproduced bit for bit against torch on CPU:

- float tensors with more than 65,536 elements are quantized to int8 in [-127, 127]:
  2-D per row, clip = quantile(|w|, 0.9999984) of the row, scale = max(clip/127, 1/127) stored fp16;
  other shapes with one float32 scale clip/127 (1.0 when clip is 0);
- smaller float tensors pass through as fp16, except control tensors (names containing
  `CONTROL_NAME_PATTERNS`), which stay fp32;
- non-float tensors pass through exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.errors import UserError

ROLE_QUANTIZED = "quantized"
ROLE_PASSTHROUGH = "passthrough"

KEEP_FLOAT_MAX_NUMEL = 65_536  # float tensors this small are stored as floats, not quantized
CLIP_QUANTILE = 99.99984 / 100.0  # written as upstream writes it (INT8_CLIP_PERCENTILE / 100)
INT8_MAX = 127
CONTROL_NAME_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
    "q_gain", "skip_weight", "skip_weights",
)


@dataclass(frozen=True)
class QuantizedTensor:
    """One tensor as stored. `data` has the tensor's shape: int8 codes for ROLE_QUANTIZED, the stored
    array itself for ROLE_PASSTHROUGH. `scale` is None for passthrough; for int8 it is (rows,) float16
    (per row, 2-D tensors) or a () float32 (per tensor, other shapes)."""

    role: str
    data: np.ndarray
    scale: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def is_float(self) -> bool:
        """Whether the original tensor was floating point (quantized, or passed through as a float)."""
        return self.role == ROLE_QUANTIZED or self.data.dtype.kind == "f"

    @property
    def stored_bytes(self) -> int:
        return int(self.data.nbytes) + (0 if self.scale is None else int(self.scale.nbytes))


@dataclass(frozen=True)
class QuantizedWeights:
    scheme: str
    tensors: dict[str, QuantizedTensor]  # keyed by name, in sorted order


class Scheme(Protocol):
    name: str

    def quantize_tensor(self, name: str, w: np.ndarray) -> QuantizedTensor: ...

    def dequantize_tensor(self, name: str, t: QuantizedTensor) -> np.ndarray: ...

    def check_tensor(self, name: str, t: QuantizedTensor) -> str | None:
        """Why `t` cannot have come from this scheme (a reader's check on a file), or None if it can."""
        ...


def is_control_name(name: str) -> bool:
    return any(p in name for p in CONTROL_NAME_PATTERNS)


def is_float_dtype(dtype: np.dtype) -> bool:
    # bfloat16 (from ml_dtypes, if a backend hands one over) is not a numpy floating subtype.
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def torch_quantile_last_axis(a: np.ndarray, q: float) -> np.ndarray:
    """torch.quantile(a, q, dim=-1) for a float32 array with no NaN, reproduced bit for bit.

    np.quantile's default method is the same linear interpolation, but it computes the position
    q*(n-1) and the interpolation weight in float64 from a float64 q. torch wraps q in a float32
    tensor and does both in float32, so the two disagree in the last bits of the clip for nearly every
    row (measured: 2,730 of 2,816 random rows), which moves scales and flips some codes. So we do
    torch's arithmetic by hand: float32 position, floor/ceil neighbours, and torch's two-sided lerp.
    """
    n = a.shape[-1]
    rank = np.float32(q) * np.float32(n - 1)
    below, above = int(np.floor(rank)), int(np.ceil(rank))
    weight = rank - np.float32(below)
    # Partitioning puts the exact order statistics at `below` and `above`, like a full sort, but faster.
    part = np.partition(a, sorted({below, above}), axis=-1)
    lo, hi = part[..., below], part[..., above]
    # torch's lerp: start + w*(end-start) when w < 0.5, else end - (end-start)*(1-w), in float32.
    if weight < 0.5:
        return lo + weight * (hi - lo)
    return hi - (hi - lo) * (np.float32(1.0) - weight)


def _quantize_int8_per_row(w32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = torch_quantile_last_axis(np.abs(w32), CLIP_QUANTILE)[:, None]
    clipped = np.maximum(np.minimum(w32, clip), -clip)
    # float32 throughout, as torch: clip/127 is a float32 division, the floor is float32(1/127).
    scale = np.maximum(clip / np.float32(INT8_MAX), np.float32(1.0 / INT8_MAX))
    # np.round is round-half-to-even (rint), as torch.round; the float32 division is IEEE in both.
    q = np.clip(np.round(clipped / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    # Upstream quantizes with the float32 scale but stores (and dequantizes with) its fp16 rounding.
    return q, scale[:, 0].astype(np.float16)


def _quantize_int8_per_tensor(w32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = float(torch_quantile_last_axis(np.abs(w32).reshape(1, -1), CLIP_QUANTILE)[0])
    # Upstream divides as Python floats (float64) and only then makes a float32 tensor: keep that order.
    scale = np.float32(clip / 127.0 if clip > 0 else 1.0)
    clipped = np.clip(w32, np.float32(-clip), np.float32(clip))
    q = np.clip(np.round(clipped / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, np.array(scale, dtype=np.float32)


def passthrough_tensor(name: str, w: np.ndarray) -> QuantizedTensor:
    """Upstream's rule for tensors that are not quantized: small floats -> fp16 (control tensors fp32),
    everything else exactly as given (a private, native-byte-order copy)."""
    if is_float_dtype(w.dtype):
        dtype = np.float32 if is_control_name(name) else np.float16
        return QuantizedTensor(ROLE_PASSTHROUGH, np.ascontiguousarray(w.astype(dtype)))
    return QuantizedTensor(ROLE_PASSTHROUGH, np.array(w, dtype=w.dtype.newbyteorder("="), order="C"))


def dequantize_passthrough(t: QuantizedTensor) -> np.ndarray:
    return t.data.astype(np.float32) if t.data.dtype.kind == "f" else t.data.copy()


class Int8CleanPerRow:
    """Upstream's int8_clean_per_row_v1 (see the module docstring)."""

    name = "int8"

    def quantize_tensor(self, name: str, w: np.ndarray) -> QuantizedTensor:
        if not is_float_dtype(w.dtype) or w.size <= KEEP_FLOAT_MAX_NUMEL:
            return passthrough_tensor(name, w)
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        q, scale = _quantize_int8_per_row(w32) if w32.ndim == 2 else _quantize_int8_per_tensor(w32)
        return QuantizedTensor(ROLE_QUANTIZED, q, scale)

    def dequantize_tensor(self, name: str, t: QuantizedTensor) -> np.ndarray:
        if t.role == ROLE_PASSTHROUGH:
            return dequantize_passthrough(t)
        if t.data.ndim == 2:
            return t.data.astype(np.float32) * t.scale.astype(np.float32)[:, None]
        return t.data.astype(np.float32) * t.scale.astype(np.float32)

    def check_tensor(self, name: str, t: QuantizedTensor) -> str | None:
        if t.role == ROLE_PASSTHROUGH:
            if t.scale is not None:
                return "a passthrough tensor has a scale"
            if t.data.dtype.kind != "f":
                return None
            if t.data.size > KEEP_FLOAT_MAX_NUMEL:
                return f"a float tensor of {t.data.size} elements passes through; int8 quantizes it"
            if t.data.dtype != (np.float32 if is_control_name(name) else np.float16):
                return f"passthrough dtype {t.data.dtype} breaks the int8 scheme's fp16/fp32 rule"
            return None
        if t.role != ROLE_QUANTIZED:
            return f"unknown role {t.role!r}"
        if t.data.dtype != np.int8:
            return f"quantized data has dtype {t.data.dtype}, expected int8"
        if t.data.size <= KEEP_FLOAT_MAX_NUMEL:
            return f"a quantized tensor has {t.data.size} elements; int8 quantizes only more than {KEEP_FLOAT_MAX_NUMEL}"
        if t.data.size and int(t.data.min()) < -INT8_MAX:
            return "quantized codes outside [-127, 127]"
        if t.scale is None:
            return "a quantized tensor has no scale"
        if t.data.ndim == 2:
            expected = (np.dtype(np.float16), (t.data.shape[0],))
        else:
            expected = (np.dtype(np.float32), ())
        if (t.scale.dtype, t.scale.shape) != expected:
            return (f"scale is {t.scale.dtype}{list(t.scale.shape)}, expected "
                    f"{expected[0]}{list(expected[1])} for a {t.data.ndim}-D tensor")
        return None


SCHEMES: dict[str, Scheme] = {s.name: s for s in (Int8CleanPerRow(),)}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown quantization scheme {name!r}; known: {', '.join(sorted(SCHEMES))}") from None


def quantize_weights(weights: Mapping[str, np.ndarray], scheme: str = "int8") -> QuantizedWeights:
    """Quantize every tensor of `weights` with `scheme`. Deterministic; `weights` is not modified."""
    s = get_scheme(scheme)
    out: dict[str, QuantizedTensor] = {}
    for name in sorted(weights):
        w = weights[name]
        if not isinstance(name, str):
            raise TypeError(f"weight names must be str, got {name!r}")
        if not isinstance(w, np.ndarray):
            raise TypeError(f"weights[{name!r}] is a {type(w).__name__}; convert to numpy at the backend boundary")
        if is_float_dtype(w.dtype) and not np.all(np.isfinite(w.astype(np.float32, copy=False))):
            # Quantizing NaN/inf gives garbage codes silently (upstream would); say so instead.
            raise UserError(f"weight tensor {name!r} has NaN or inf values; the run probably diverged")
        out[name] = s.quantize_tensor(name, w)
    return QuantizedWeights(scheme=s.name, tensors=out)


def dequantize_weights(q: QuantizedWeights) -> dict[str, np.ndarray]:
    """Back to arrays of the original shapes: float32 for float tensors, the exact values otherwise."""
    s = get_scheme(q.scheme)
    return {name: s.dequantize_tensor(name, t) for name, t in sorted(q.tensors.items())}
