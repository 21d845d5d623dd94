"""Quantization-aware training in PyTorch: straight-through fake quantization of the weights, tensor by
tensor as the export quantizes them (core.fakequant's plan over core.quant's schemes), so the QAT forward
is the exported artifact's forward.

Mirror of the MLX backend's qat.py. Each weight w becomes

    w_eff = dequant(quant(w)).detach() + (w - w.detach())

which is w + stop_gradient(dequant(quant(w)) - w) written so that the forward value is exactly
dequant(quant(w)): the textbook form adds and subtracts w, and w + (d - w) is not always d in floats.
The gradient with respect to w is the gradient at w_eff (straight through).

Exactness: the per-row clips and steps are single float32 (or float64, for np.quantile) operations done
here in float64 and rounded, which gives the correctly rounded float32 result whatever the compiler fuses
(a float32 op evaluated in float64 and rounded is exact: 53 >= 2*24 + 2 bits). The code of each element is
round-half-even of a float32 quotient, computed the same way. The clip search compares float64 squared
errors summed in another order than numpy's; only a near-tie between two candidate clips (relative 1e-16)
could pick differently.

noise=True is #363's noisy QAT for training: instead of rounding, each quantized tensor gets uniform noise
of +/- half a step, step = row absmax / qmax (the scheme's qmax), and its gradient flows straight through.
Evaluation always uses the rounding, which is what the artifact holds.
"""

from __future__ import annotations

import torch

from core import fakequant as fq
from core import quant

_F32 = torch.float32
_F64 = torch.float64


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(_F32)


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to the nearest fp16 value (ties to even), as float32, for |x| < 65520.

    Not x.to(float16).to(float32): torch.compile's inductor drops that pair of casts (it keeps low-precision
    intermediates in float32 unless emulate_precision_casts is set, which would change the whole model's
    numerics), and the fp16 rounding of a scale is the whole point here. So: normal fp16 numbers keep 10 of
    float32's 23 mantissa bits, rounded half to even on the bit pattern (a carry moves into the exponent,
    which is right); below 2^-14 fp16 is subnormal, a fixed grid of 2^-24."""
    bits = x.view(torch.int32)
    normal = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    subnormal = torch.round(x * 2.0**24) * 2.0**-24
    return torch.where(x.abs() < 2.0**-14, subnormal, normal)


def _div32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 a / b, correctly rounded (through float64: a fused or approximate float32 division on a GPU
    could differ in the last bit, which moves a code at a rounding tie)."""
    return _f32(a.to(_F64) / b.to(_F64))


def clip_value(top: torch.Tensor, lerp: fq.Lerp) -> torch.Tensor:
    """One clip per row from the row's largest |w| (descending), float32 (rows,)."""
    lo, hi = top[:, lerp.lo_rank].to(_F64), top[:, lerp.hi_rank].to(_F64)
    d = _f32(hi - lo)  # float32 in both torch.quantile and np.quantile
    if lerp.style == "torch32":  # every op float32 (computed in float64 and rounded)
        if lerp.upper:
            return _f32(hi - _f32(d.to(_F64) * (1.0 - lerp.weight)))
        return _f32(lo + _f32(d.to(_F64) * lerp.weight))
    if lerp.upper:  # numpy64: the lerp in float64, then float32
        return _f32(hi - d.to(_F64) * (1.0 - lerp.weight))
    return _f32(lo + d.to(_F64) * lerp.weight)


def _top(w2: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(w2.abs(), k, dim=-1, sorted=True).values


def _int8_row(w2: torch.Tensor, plan: fq.TensorPlan) -> torch.Tensor:
    clip = clip_value(_top(w2, plan.top_k), plan.clips[0])[:, None]
    # The floor is float32(1/127), as core.quant (a Python float bound is rounded to the tensor's float32).
    scale = torch.clamp(_div32(clip, torch.full_like(clip, quant.INT8_MAX)), min=1.0 / quant.INT8_MAX)
    clipped = torch.maximum(torch.minimum(w2, clip), -clip)
    q = torch.clamp(torch.round(_div32(clipped, scale)), -quant.INT8_MAX, quant.INT8_MAX)
    return q * round_fp16(scale)  # quantized with float32 scales, stored (and used) as fp16


def _int8_tensor(w2: torch.Tensor, plan: fq.TensorPlan) -> torch.Tensor:
    clip = clip_value(_top(w2, plan.top_k), plan.clips[0])[:, None]
    # core.quant divides as Python floats (float64) and then rounds to float32; 1.0 for an all-zero tensor.
    scale = torch.where(clip > 0, _f32(clip.to(_F64) / 127.0), torch.ones_like(clip))
    clipped = torch.maximum(torch.minimum(w2, clip), -clip)
    q = torch.clamp(torch.round(_div32(clipped, scale)), -quant.INT8_MAX, quant.INT8_MAX)
    return q * scale


def _fp16_step(clip: torch.Tensor, qmax: int) -> torch.Tensor:
    step = torch.clamp(_div32(clip, torch.full_like(clip, qmax)), min=quant.SCALE_FLOOR, max=quant.FP16_MAX)
    return round_fp16(step)


def _int_n(w2: torch.Tensor, plan: fq.TensorPlan) -> torch.Tensor:
    top = _top(w2, plan.top_k)
    w64 = w2.to(_F64)
    best = best_err = None
    for lerp in plan.clips:  # in CLIP_SEARCH_PERCENTILES order: the first wins a tie, as in core.quant
        step = _fp16_step(clip_value(top, lerp), plan.qmax)[:, None]
        deq = torch.clamp(torch.round(_div32(w2, step)), -plan.qmax, plan.qmax) * step
        err = ((deq.to(_F64) - w64) ** 2).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = deq, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, deq, best), torch.where(better, err, best_err)
    return best


_QUANTIZERS = {fq.INT8_ROW: _int8_row, fq.INT8_TENSOR: _int8_tensor, fq.INTN: _int_n}


def fake_quant_value(w: torch.Tensor, plan: fq.TensorPlan) -> torch.Tensor:
    """dequant(quant(w)) as the export computes it (float32, w's shape); no gradient."""
    w = w.detach()
    if plan.kind == fq.KEEP:
        return w
    if plan.kind == fq.FP16:
        return round_fp16(_f32(w))
    return _QUANTIZERS[plan.kind](_f32(w).reshape(plan.rows, plan.cols), plan).reshape(w.shape)


def _noise(w: torch.Tensor, plan: fq.TensorPlan) -> torch.Tensor:
    w2 = w.detach().reshape(plan.rows, plan.cols)
    step = w2.abs().amax(dim=1, keepdim=True) / plan.qmax
    return ((torch.rand_like(w2) - 0.5) * step).reshape(w.shape)


def fake_quant(params: dict[str, torch.Tensor], plan: dict[str, fq.TensorPlan], noise: bool = False) -> dict[str, torch.Tensor]:
    """The params dict as the model sees it under QAT (straight-through; see the module docstring)."""
    out = {}
    for name, w in params.items():
        p = plan[name]
        if p.kind == fq.KEEP:
            out[name] = w
        elif noise and p.kind != fq.FP16:
            out[name] = w + _noise(w, p)
        else:
            out[name] = fake_quant_value(w, p) + (w - w.detach())
    return out
