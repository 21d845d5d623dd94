"""Quantization-aware training in MLX: straight-through fake quantization of the weights, tensor by tensor
as the export quantizes them (core.fakequant's plan over core.quant's schemes), so the QAT forward is the
exported artifact's forward.

Mirror of the PyTorch backend's qat.py. Each weight w becomes

    w_eff = stop_gradient(dequant(quant(w))) + (w - stop_gradient(w))

which is w + stop_gradient(dequant(quant(w)) - w) written so that the forward value is exactly
dequant(quant(w)): the textbook form adds and subtracts w, and w + (d - w) is not always d in floats.
The gradient with respect to w is the gradient at w_eff (straight through).

Exactness: the per-row clips and steps are single float32 (or float64, for np.quantile) operations done
here in float64 and rounded, which gives the correctly rounded float32 result whatever the compiler fuses
(53 >= 2*24 + 2 bits). Metal has no float64: there this arithmetic runs in float32, where a clip can land
one float32 step from the export's and, rarely, move an fp16 step. The clip search compares squared errors
summed in another order than numpy's (float64 on the CPU, float32 on Metal); only a near-tie between two
candidate clips could pick differently.

noise=True is #363's noisy QAT for training: instead of rounding, each quantized tensor gets uniform noise
of +/- half a step, step = row absmax / qmax (the scheme's qmax), and its gradient flows straight through.
Evaluation always uses the rounding, which is what the artifact holds.
"""

from __future__ import annotations

import mlx.core as mx

from core import fakequant as fq
from core import quant

_F32 = mx.float32


def _wide():
    """float64 where MLX has it (the CPU), else float32 (Metal; see the module docstring)."""
    return mx.float64 if mx.default_device() == mx.cpu else mx.float32


def _f32(x: mx.array) -> mx.array:
    return x.astype(_F32)


def _div32(a: mx.array, b: mx.array) -> mx.array:
    """float32 a / b, correctly rounded (through float64 where there is one)."""
    return _f32(a.astype(_wide()) / b.astype(_wide()))


def clip_value(top: mx.array, lerp: fq.Lerp) -> mx.array:
    """One clip per row from the row's largest |w| (descending), float32 (rows,)."""
    wide = _wide()
    lo, hi = top[:, lerp.lo_rank].astype(wide), top[:, lerp.hi_rank].astype(wide)
    d = _f32(hi - lo)  # float32 in both torch.quantile and np.quantile
    if lerp.style == "torch32":  # every op float32 (computed in float64 and rounded)
        if lerp.upper:
            return _f32(hi - _f32(d.astype(wide) * (1.0 - lerp.weight)))
        return _f32(lo + _f32(d.astype(wide) * lerp.weight))
    if lerp.upper:  # numpy64: the lerp in float64, then float32
        return _f32(hi - d.astype(wide) * (1.0 - lerp.weight))
    return _f32(lo + d.astype(wide) * lerp.weight)


def _top(w2: mx.array, k: int) -> mx.array:
    # mx.topk leaves its k values unordered: sort them, largest first.
    return mx.sort(mx.topk(mx.abs(w2), k, axis=-1), axis=-1)[:, ::-1]


def _int8_row(w2: mx.array, plan: fq.TensorPlan) -> mx.array:
    clip = clip_value(_top(w2, plan.top_k), plan.clips[0])[:, None]
    # The floor is float32(1/127), as core.quant.
    scale = mx.maximum(_div32(clip, mx.full(clip.shape, quant.INT8_MAX, _F32)), mx.array(1.0 / quant.INT8_MAX, _F32))
    clipped = mx.maximum(mx.minimum(w2, clip), -clip)
    q = mx.clip(mx.round(_div32(clipped, scale)), -quant.INT8_MAX, quant.INT8_MAX)
    return q * _f32(scale.astype(mx.float16))  # quantized with float32 scales, stored (and used) as fp16


def _int8_tensor(w2: mx.array, plan: fq.TensorPlan) -> mx.array:
    clip = clip_value(_top(w2, plan.top_k), plan.clips[0])[:, None]
    # core.quant divides as Python floats (float64) and then rounds to float32; 1.0 for an all-zero tensor.
    scale = mx.where(clip > 0, _f32(clip.astype(_wide()) / 127.0), mx.ones_like(clip))
    clipped = mx.maximum(mx.minimum(w2, clip), -clip)
    q = mx.clip(mx.round(_div32(clipped, scale)), -quant.INT8_MAX, quant.INT8_MAX)
    return q * scale


def _fp16_step(clip: mx.array, qmax: int) -> mx.array:
    step = mx.clip(_div32(clip, mx.full(clip.shape, qmax, _F32)), quant.SCALE_FLOOR, quant.FP16_MAX)
    return _f32(step.astype(mx.float16))


def _int_n(w2: mx.array, plan: fq.TensorPlan) -> mx.array:
    top = _top(w2, plan.top_k)
    w_wide = w2.astype(_wide())
    best = best_err = None
    for lerp in plan.clips:  # in CLIP_SEARCH_PERCENTILES order: the first wins a tie, as in core.quant
        step = _fp16_step(clip_value(top, lerp), plan.qmax)[:, None]
        deq = mx.clip(mx.round(_div32(w2, step)), -plan.qmax, plan.qmax) * step
        err = mx.square(deq.astype(w_wide.dtype) - w_wide).sum(axis=1, keepdims=True)
        if best is None:
            best, best_err = deq, err
        else:
            better = err < best_err
            best, best_err = mx.where(better, deq, best), mx.where(better, err, best_err)
    return best


_QUANTIZERS = {fq.INT8_ROW: _int8_row, fq.INT8_TENSOR: _int8_tensor, fq.INTN: _int_n}


def fake_quant_value(w: mx.array, plan: fq.TensorPlan) -> mx.array:
    """dequant(quant(w)) as the export computes it (float32, w's shape); no gradient."""
    w = mx.stop_gradient(w)
    if plan.kind == fq.KEEP:
        return w
    if plan.kind == fq.FP16:
        return _f32(w.astype(mx.float16))
    return _QUANTIZERS[plan.kind](_f32(w).reshape(plan.rows, plan.cols), plan).reshape(w.shape)


def _noise(w: mx.array, plan: fq.TensorPlan) -> mx.array:
    w2 = mx.stop_gradient(w).reshape(plan.rows, plan.cols)
    step = mx.abs(w2).max(axis=1, keepdims=True) / plan.qmax
    return ((mx.random.uniform(shape=w2.shape) - 0.5) * step).reshape(w.shape)


def fake_quant(params: dict[str, mx.array], plan: dict[str, fq.TensorPlan], noise: bool = False) -> dict[str, mx.array]:
    """The params dict as the model sees it under QAT (straight-through; see the module docstring)."""
    out = {}
    for name, w in params.items():
        p = plan[name]
        if p.kind == fq.KEEP:
            out[name] = w
        elif noise and p.kind != fq.FP16:
            out[name] = w + _noise(w, p)
        else:
            out[name] = fake_quant_value(w, p) + (w - mx.stop_gradient(w))
    return out
