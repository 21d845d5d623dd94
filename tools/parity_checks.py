"""The checks of `loopgolf parity` (tools/parity.py), one function per phase, each returning its rows in
table order: per op, forward, backward, optimizer update, train_step, artifact, fake quantization. Every
phase compares the two trainers of one `Pair`, built on the same weights."""

from __future__ import annotations

import dataclasses

import numpy as np

from core.params import EMBED, GROUPS, MATRIX, param_table
from core.quant import STD_SCHEME
from core.schedule import muon_momentum
from core.spec import ModelSpec
from core.tolerances import ADAM_GRAD_FLOOR, NOT_COMPARED, tolerance
from tools.parity_rows import Row, compare, compare_exact, compare_group


def _np(x) -> np.ndarray:
    """A backend array (MLX or torch, any float dtype) as float64 numpy."""
    if hasattr(x, "detach"):
        import torch

        return x.detach().to("cpu", torch.float64).numpy()
    import mlx.core as mx

    return np.array(x.astype(mx.float32), dtype=np.float64)


@dataclasses.dataclass
class Pair:
    """What every phase compares: one model and dtype, and both trainers built on the same weights."""

    spec: ModelSpec
    dtype: str
    weights: dict[str, np.ndarray]
    mlx: object  # MLXBackend
    torch: object  # TorchBackend

    @property
    def dtypes(self) -> tuple:
        """(mlx dtype, torch dtype) of the forward passes."""
        import mlx.core as mx
        import torch

        return {"float32": (mx.float32, torch.float32), "bfloat16": (mx.bfloat16, torch.bfloat16)}[self.dtype]


def _M(a):
    import mlx.core as mx

    return mx.array(a)


def _T(a):
    import torch

    return torch.tensor(np.asarray(a))


def op_rows(pair: Pair, batch: int, seq: int, rng: np.random.Generator) -> list[Row]:
    """Each op on small random inputs, the first block's weights where it has some."""
    import torch

    from backend_mlx import model as mm
    from backend_torch import model as tm

    spec, dtype, (mdt, tdt) = pair.spec, pair.dtype, pair.dtypes
    pm, pt = pair.mlx.params, pair.torch.params
    h = rng.normal(size=(batch, seq, spec.model_dim)).astype(np.float32)
    heads = rng.normal(size=(batch, spec.num_heads, seq, spec.head_dim)).astype(np.float32)
    z = (20.0 * rng.normal(size=(batch, seq, spec.vocab_size))).astype(np.float32)
    ids = rng.integers(0, spec.vocab_size, (batch, seq)).astype(np.int32)
    # RMSNorm's input spans rows of rms 1e-4 .. 10, so its epsilon matters in some of them.
    small = (h * 10.0 ** rng.uniform(-4, 1, (batch, seq, 1))).astype(np.float32)
    hm, ht = _M(h).astype(mdt), _T(h).to(tdt)
    op, op32 = tolerance("op", dtype), tolerance("op_fp32", dtype)
    gqa = f"{'GQA ' if spec.num_kv_heads < spec.num_heads else ''}{spec.num_heads}q/{spec.num_kv_heads}kv"
    b0 = f"blocks.{spec.layer_plan[0]}."
    with torch.no_grad():
        cases = [
            ("op rms_norm", mm.rms_norm(_M(small).astype(mdt), spec.norm_eps),
             tm.rms_norm(_T(small).to(tdt), spec.norm_eps), op),
            ("op rope", mm.rotary(_M(heads).astype(mdt), spec), tm.rotary(_T(heads).to(tdt), spec),
             tolerance("rope", dtype, seq_len=seq)),
            (f"op attention ({gqa})", mm.attention(spec, pm, b0 + "attn.", hm),
             tm.attention(spec, pt, b0 + "attn.", ht), op),
            (f"op mlp ({spec.mlp_activation})", mm.mlp(pm, b0 + "mlp.", hm, spec.mlp_activation),
             tm.mlp(pt, b0 + "mlp.", ht, spec.mlp_activation), op),
            ("op softcap (fp32 logits)", mm.softcap(_M(z), spec.logit_softcap),
             tm.softcap(_T(z), spec.logit_softcap), op32),
            ("op cross_entropy (fp32)", mm.cross_entropy(_M(z), _M(ids)), tm.cross_entropy(_T(z), _T(ids)), op32),
        ]
        for b in spec.parallel_block_list:  # #1493's parallel residual: the whole block, at its first layer
            layer = spec.layer_plan.index(b)
            cases.append((f"op block {b} (parallel residual)", mm.block(spec, pm, b, hm, hm, layer),
                          tm.block(spec, pt, b, ht, ht, layer), tolerance("hidden", dtype)))  # one layer's band
        return [compare(name, _np(a), _np(b), tol) for name, a, b, tol in cases]


def forward_rows(pair: Pair, x: np.ndarray) -> list[Row]:
    """The whole model: each effective layer's hidden state, then the logits."""
    import mlx.core as mx
    import torch

    from backend_mlx import model as mm
    from backend_torch import model as tm

    spec, dtype, (mdt, tdt) = pair.spec, pair.dtype, pair.dtypes
    pm, pt = pair.mlx.params, pair.torch.params
    layers_m, layers_t = [], []
    logits_m = mm.softcap(mm.linear(mm.hidden_states(spec, pm, _M(x), mdt, collect=layers_m),
                                    _head(spec, pm)).astype(mx.float32), spec.logit_softcap)
    with torch.no_grad():
        logits_t = tm.softcap(tm.linear(tm.hidden_states(spec, pt, _T(x), tdt, collect=layers_t),
                                        _head(spec, pt)).to(torch.float32), spec.logit_softcap)
    if len(layers_m) != spec.num_layers or len(layers_t) != spec.num_layers:
        raise AssertionError(f"collected {len(layers_m)} (mlx) and {len(layers_t)} (torch) layers, "
                             f"expected {spec.num_layers}")
    hid = tolerance("hidden", dtype)
    rows = [compare(f"layer {layer} (block {spec.layer_plan[layer]})", _np(a), _np(b), hid)
            for layer, (a, b) in enumerate(zip(layers_m, layers_t))]
    return rows + [compare("logits", _np(logits_m), _np(logits_t), tolerance("logits", dtype))]


def backward_rows(pair: Pair, x: np.ndarray, y: np.ndarray) -> tuple[list[Row], dict[str, np.ndarray]]:
    """One backward pass: the loss and one row per parameter's gradient; also torch's gradients as numpy
    (the update rows feed both optimizers these same numbers)."""
    import mlx.core as mx

    from backend_mlx import model as mm
    from backend_torch import model as tm

    spec, dtype, (mdt, tdt) = pair.spec, pair.dtype, pair.dtypes
    pm, pt = pair.mlx.params, pair.torch.params
    loss_m, grads_m = mx.value_and_grad(lambda p: mm.mean_loss(spec, p, _M(x), _M(y), mdt))(pm)
    for p in pt.values():
        p.grad = None
    loss_t = tm.mean_loss(spec, pt, _T(x), _T(y), tdt)
    loss_t.backward()
    rows = [compare("loss", _np(loss_m), _np(loss_t), tolerance("loss", dtype))]
    gtol = tolerance("grad", dtype, seq_len=x.shape[1])
    grads_np = {}
    for info in param_table(spec):
        gm, gt = grads_m[info.name], pt[info.name].grad
        if gt is None:
            rows.append(Row(f"grad {info.name}", None, None, None, False, "torch: no gradient"))
            continue
        rows.append(compare(f"grad {info.name}", _np(gm), _np(gt), gtol))
        grads_np[info.name] = gt.detach().numpy().astype(np.float32)
    for p in pt.values():
        p.grad = None
    return rows, grads_np


def update_rows(pair: Pair, optim, grads_np: dict[str, np.ndarray]) -> list[Row]:
    """One optimizer step of each backend's update function on the same numpy gradients: plain, with
    decoupled weight decay, and with Muon's row normalisation."""
    import mlx.core as mx
    import torch

    from backend_mlx import optim as mo
    from backend_torch import optim as to

    spec, weights, table = pair.spec, pair.weights, param_table(pair.spec)
    if len(grads_np) != len(table):
        return [Row("update (same numpy gradients)", None, None, None, False, "skipped: missing gradients")]
    rows = []
    for prefix, opt in (("update", optim), ("update+wd", with_weight_decay(optim)),
                        ("update+row_norm", dataclasses.replace(optim, muon_row_normalize=True))):
        momentum = muon_momentum(0, opt)
        p_m = {k: _M(v) for k, v in weights.items()}
        p_m, _ = mo.make_update(spec, opt)(p_m, mo.init_state(spec), {k: _M(v) for k, v in grads_np.items()},
                                           mx.array(1.0), mx.array(momentum))
        p_t = {k: _T(v) for k, v in weights.items()}
        to.make_update(spec, opt)(p_t, to.init_state(spec), {k: _T(v) for k, v in grads_np.items()},
                                  torch.tensor(1.0), torch.tensor(momentum))
        delta_m = {k: np.array(v, np.float64) - weights[k] for k, v in p_m.items()}
        delta_t = {k: p_t[k].numpy().astype(np.float64) - weights[k] for k in p_t}
        step_rows = group_rows(prefix, table, weights, delta_m, delta_t, pair.dtype, "update_muon", "update_adam")
        if prefix == "update+row_norm":  # it changes Muon only: Adam's rows would repeat 'update'
            step_rows = [r for r in step_rows if r.kind == "update_muon"]
        rows += step_rows
    return rows


def train_step_rows(pair: Pair, optim, x: np.ndarray, y: np.ndarray, grads_np: dict[str, np.ndarray]) -> list[Row]:
    """One full train_step of each trainer on the same batch: its loss, the loss after it, and the weights'
    change per group."""
    dtype, weights = pair.dtype, pair.weights
    lm = pair.mlx.train_step([(x, y)], 1.0, muon_momentum(0, optim))
    lt = pair.torch.train_step([(x, y)], 1.0, muon_momentum(0, optim))
    rows = [compare("train_step loss", lm, lt, tolerance("step_loss", dtype))]
    lm, lt = pair.mlx.eval_loss_sum(x, y) / x.size, pair.torch.eval_loss_sum(x, y) / x.size
    rows.append(compare("train_step loss after the step", lm, lt, tolerance("after_step_loss", dtype)))
    after_m, after_t = pair.mlx.get_weights(), pair.torch.get_weights()
    delta_m = {k: after_m[k].astype(np.float64) - weights[k] for k in weights}
    delta_t = {k: after_t[k].astype(np.float64) - weights[k] for k in weights}
    # Adam's first step is lr * g / (|g| + eps): where g is within the gradients' own rounding of 0 it maps
    # that noise onto up to +-lr, so those few elements are left out (counted in the note).
    floor = ADAM_GRAD_FLOOR.get(dtype, 0.0)
    masks = {k: np.abs(g) >= floor * np.abs(g).max() for k, g in grads_np.items()}
    return rows + group_rows("train_step", param_table(pair.spec), weights, delta_m, delta_t, dtype,
                              "step_muon", "step_adam", masks)


def _scheme(a) -> str:
    return getattr(a, "quant_scheme", a.scheme)  # the scheme with its per-tensor rules, where configs have them


def artifact_rows(pair: Pair, a, exported: dict, x: np.ndarray) -> tuple[list[Row], dict]:
    """The artifact of each backend's exported weights: payload and compressed SHA-256 identical, and the
    dequantized weights' logits in both backends; also the dequantized weights (for the QAT rows)."""
    import torch

    from backend_mlx import model as mm
    from backend_torch import model as tm
    from core import artifact as art
    from core.quant import dequantize_weights

    spec, scheme, (mdt, tdt) = pair.spec, _scheme(a), pair.dtypes
    spec_json = spec.to_dict()
    payload = {k: art.payload_bytes(spec_json, w, scheme) for k, w in exported.items()}
    blobs = {k: art.build_artifact(spec_json, w, scheme, a.codec, a.level, getattr(a, "byte_shuffle", 0))
             for k, w in exported.items()}
    rows = [compare_exact("artifact payload sha256 (uncompressed)", payload["mlx"], payload["torch"]),
            compare_exact(f"artifact sha256 ({a.scheme}, {a.codec})", blobs["mlx"], blobs["torch"])]
    deq = {k: dequantize_weights(art.parse_artifact(blob, f"<{k} artifact>")[1]) for k, blob in blobs.items()}
    with torch.no_grad():
        zm = mm.logits(spec, {k: _M(v) for k, v in deq["mlx"].items()}, _M(x), mdt)
        zt = tm.logits(spec, {k: _T(v) for k, v in deq["torch"].items()}, _T(x), tdt)
    rows.append(compare("dequantized logits", _np(zm), _np(zt), tolerance("dequant_logits", pair.dtype)))
    return rows, deq


def qat_rows(pair: Pair, a, deq: dict, x: np.ndarray) -> list[Row]:
    scheme = _scheme(a)
    if any(STD_SCHEME.fullmatch(s) for s in [scheme.split(";")[0]] + [r.split("=")[1] for r in scheme.split(";")[1:]]):
        return [Row("fake-quant (QAT) weights and logits", None, None, None, True,
                    f"skipped: {scheme} has a std-clip scheme, which QAT does not take (artifact.qat refuses it)")]
    return _fake_quant_rows(pair.spec, scheme, pair.weights, deq["mlx"], x, pair.dtype, *pair.dtypes)


def _fake_quant_rows(spec: ModelSpec, scheme: str, weights: dict, deq: dict, x, dtype: str, mdt, tdt) -> list[Row]:
    """QAT (artifact.qat): each backend's fake quantization equals the artifact's round trip bit for bit,
    and the two fake-quantized forwards agree as the dequantized ones must."""
    import mlx.core as mx
    import torch

    from backend_mlx import model as mm
    from backend_mlx import qat as mq
    from backend_torch import model as tm
    from backend_torch import qat as tq
    from core.fakequant import fake_quant_plan

    plan = fake_quant_plan({k: v.shape for k, v in weights.items()}, scheme)
    fm = mq.fake_quant({k: mx.array(v) for k, v in weights.items()}, plan)
    ft = tq.fake_quant({k: torch.tensor(v) for k, v in weights.items()}, plan)
    rows = []
    for backend, got in (("mlx", {k: np.array(v) for k, v in fm.items()}),
                         ("torch", {k: v.detach().numpy() for k, v in ft.items()})):
        bad = [k for k in sorted(deq) if not np.array_equal(got[k], deq[k])]
        note = f"{len(deq)} tensors" if not bad else f"{len(bad)} tensor(s) differ, first {bad[0]}"
        rows.append(Row(f"fake-quant weights == round trip ({backend})", None, None, None, not bad, note))
    with torch.no_grad():
        zm = mm.logits(spec, fm, mx.array(np.asarray(x)), mdt)
        zt = tm.logits(spec, ft, torch.tensor(np.asarray(x)), tdt)
    rows.append(compare("fake-quant (QAT) logits", _np(zm), _np(zt), tolerance("dequant_logits", dtype)))
    return rows


WEIGHT_DECAY_ROW = 0.04  # the seeds' decay (#895, #470, #1110), for the 'update+wd' rows of a config without one
WEIGHT_DECAY_KEYS = ("matrix_weight_decay", "scalar_weight_decay", "embed_weight_decay", "head_weight_decay")


def with_weight_decay(optim):
    """The config's optimizer with decoupled weight decay on every group: its own value where it sets one, else
    WEIGHT_DECAY_ROW (its exemptions and its before/after-step order kept), so parity always checks a decayed step."""
    return dataclasses.replace(optim, **{k: getattr(optim, k) or WEIGHT_DECAY_ROW for k in WEIGHT_DECAY_KEYS})


def export_row(weights: dict, exported: dict) -> Row:
    """Each backend's weights, exported back to numpy, must equal the file's bit for bit."""
    problems = []
    for backend, w in exported.items():
        bad = [k for k in weights if k not in w or w[k].dtype != np.float32 or w[k].shape != weights[k].shape
               or w[k].tobytes() != weights[k].tobytes()]
        if bad:
            problems.append(f"{backend} differs from the file in {len(bad)} tensor(s), first {bad[0]}")
    note = "; ".join(problems) or f"{len(weights)} tensors bit-identical to the file in both"
    return Row("weights loaded, exported back to numpy", None, None, None, not problems, note, "exact")


def _head(spec: ModelSpec, p: dict):
    return p["tok_emb.weight"] if spec.tie_embeddings else p["lm_head.weight"]


def group_rows(prefix: str, table, old: dict, delta_m: dict, delta_t: dict, dtype: str, muon_kind: str,
                adam_kind: str, adam_masks: dict | None = None) -> list[Row]:
    """Rows for the change of the weights (new - old, exact in float64), one per optimizer group. Each
    backend rounds its new fp32 weight once, so two equal updates can differ by one ulp of the weight: that
    ulp is added to the bound (it is exact, not a tolerance)."""
    floors = {k: float(np.spacing(np.float32(np.abs(old[k]).max() + np.abs(delta_m[k]).max()))) for k in old}
    rows = []
    for group in GROUPS:
        names = [i.name for i in table if i.group == group]
        if not names:
            continue
        kind, opt = (muon_kind, "muon") if group == MATRIX else (adam_kind, "adam")
        if (kind, dtype) in NOT_COMPARED:
            continue
        label = f"{prefix} {opt} ({group}{', tied' if group == EMBED and len(names) == 1 else ''})"
        pairs = {n: (delta_m[n], delta_t[n]) for n in names}
        note = ""
        if adam_masks is not None and group != MATRIX:
            masks = {n: adam_masks.get(n, np.ones(delta_m[n].shape, bool)) for n in names}
            pairs = {n: (a[masks[n]], b[masks[n]]) for n, (a, b) in pairs.items()}
            left_out = sum(int((~masks[n]).sum()) for n in names)
            note = f"; {left_out} of {sum(delta_m[n].size for n in names):,} elements with |g| ~ 0 left out"
        tols = {n: tolerance(kind, dtype, dim=max(delta_m[n].shape)) for n in names}
        row = compare_group(label, pairs, tols, floors)
        rows.append(dataclasses.replace(row, note=row.note + note) if note else row)
    return rows


# ---- the command ----------------------------------------------------------------------------------------
