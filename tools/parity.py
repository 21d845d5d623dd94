"""`loopgolf parity`: do the MLX and PyTorch backends compute the same model? A table, one row per check.

    loopgolf parity --config configs/ut_3x4.toml --small [--dtype float32|bfloat16] [--seed N] [--set k=v]
    python -m tools.parity --config ...            (the same, without the console script)

Both backends are built from ONE weight file: init_weights(spec, seed) nudged off its init by a seeded
perturbation (zero-initialised projections would make every block the identity and hide attention and
MLP bugs), written with core.weights.save_weights and read back with load_weights, the real path, then
handed to each backend's trainer. The checks, in the order a bug would show first:

- per op on small random inputs: RMSNorm, RoPE, attention with GQA, MLP, softcap, cross-entropy;
- each effective layer's hidden state (naming the block it runs), the logits and the loss;
- the gradients of one backward pass, one row per parameter tensor;
- one optimizer step (Muon and Adam) of each backend's update function on the SAME numpy gradients, one
  with decoupled weight decay on every group ("update+wd": the config's decay, else 0.04), and Muon with
  MuonEq-R's row normalisation ("update+row_norm", optim.muon_row_normalize), then one full
  train_step of each trainer on the same batch (weights' change, one row per group);
- the artifact: the weights exported from each backend (backend tensors -> numpy) quantized and
  serialized by core; the SHA-256 of the uncompressed payload and of the compressed artifact must be
  identical, and the dequantized weights must give the same logits in both backends.

A row holds when max|a - b| <= tolerance = atol + rtol * max(|a|, |b|); the numbers and their reasons
are in core/tolerances.py. Exit 0 when every row holds, 1 otherwise (with "first divergence: <row>");
a bad config is one error line (exit 2). Everything runs on the CPU in both frameworks; --dtype bfloat16
runs the forward passes in bf16 and checks a looser band.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.config import RunConfig, load_config
from core.errors import UserError
from core.params import EMBED, GROUPS, MATRIX, param_table
from core.quant import STD_SCHEME
from core.schedule import muon_momentum
from core.spec import ModelSpec
from core.tolerances import ADAM_GRAD_FLOOR, NOT_COMPARED, tolerance
# HEADER and format_report are part of this module's interface (tests, tools): re-exported.
from tools.parity_rows import HEADER, Row, compare, compare_exact, compare_group, first_divergence, format_report  # noqa: F401

DTYPES = ("float32", "bfloat16")
PERTURB_VECTOR = 0.05  # std of the nudge on 1-D tensors; matrices get 0.5 / sqrt(fan_in)
OP_BATCH = 2  # sequences in every forward batch


# ---- shared inputs (tests/golden depends on these: changing them means regenerating the golden file) ----

def perturbed_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """init_weights(spec, seed) plus seeded noise on every tensor, so no projection starts at zero."""
    from core.params import init_weights

    rng = np.random.default_rng([seed, 0x9A717])
    out = {}
    for name, w in init_weights(spec, seed).items():
        std = 0.5 / math.sqrt(w.shape[1]) if w.ndim == 2 else PERTURB_VECTOR
        out[name] = (w + rng.normal(0.0, std, w.shape)).astype(np.float32)
    return out


def synthetic_batch(vocab: int, batch: int, seq: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int32 (batch, seq): a noisy affine bigram chain t -> (5 t + 3) mod vocab with 10% random tokens,
    so a model can learn it and a short training run shows a falling loss."""
    seqs = np.empty((batch, seq + 1), np.int64)
    seqs[:, 0] = rng.integers(0, vocab, batch)
    for t in range(seq):
        seqs[:, t + 1] = (5 * seqs[:, t] + 3) % vocab
    noise = rng.random(seqs.shape) < 0.1
    seqs[noise] = rng.integers(0, vocab, int(noise.sum()))
    return seqs[:, :-1].astype(np.int32), seqs[:, 1:].astype(np.int32)


# ---- the checks -----------------------------------------------------------------------------------------

def _need_backends():
    import importlib.util

    missing = [m for m in ("mlx", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        from tools.backends import INSTALL_HINT

        hints = "; ".join(f"{m}: {INSTALL_HINT[m]}" for m in missing)
        raise UserError(f"parity runs both backends, but {' and '.join(missing)} is not installed ({hints})")


@contextlib.contextmanager
def _mlx_on_cpu():
    import mlx.core as mx

    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(before)


@contextlib.contextmanager
def _torch_threads_restored():
    """Parity runs torch on one thread (set after the trainer picks its own count) and restores the count
    after. CPU-sized parity gains nothing from threads, and when torch was imported before backend_torch
    could set OMP_WAIT_POLICY=PASSIVE, its spinning OpenMP workers beside MLX's threads made a run 5-20x
    slower (measured on 2 cores). The tolerances hold for 1 and 2 threads (core/tolerances.py)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _np(x) -> np.ndarray:
    """A backend array (MLX or torch, any float dtype) as float64 numpy."""
    if hasattr(x, "detach"):
        import torch

        return x.detach().to("cpu", torch.float64).numpy()
    import mlx.core as mx

    return np.array(x.astype(mx.float32), dtype=np.float64)


def save_and_load(spec: ModelSpec, weights: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Through the real weight-file path: core.weights.save_weights, then load_weights."""
    from core.weights import load_weights, save_weights

    save_weights(path, spec, weights)
    spec2, loaded = load_weights(path)
    if spec2 != spec:
        raise AssertionError(f"{path}: the spec read back differs from the one written")
    return loaded


def parity_rows(cfg: RunConfig, dtype: str = "float32", seed: int = 1337, progress=None) -> list[Row]:
    """Every check for `cfg`'s model, MLX against torch, in table order."""
    _need_backends()
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    with _mlx_on_cpu(), _torch_threads_restored(), tempfile.TemporaryDirectory(prefix="loopgolf-parity-") as tmp:
        return _parity_rows(cfg, dtype, seed, Path(tmp), progress or (lambda msg: None))


def _parity_rows(cfg: RunConfig, dtype: str, seed: int, tmp: Path, progress) -> list[Row]:
    import mlx.core as mx
    import torch

    from backend_mlx import model as mm
    from backend_mlx import optim as mo
    from backend_mlx.trainer import MLXBackend
    from backend_torch import model as tm
    from backend_torch import optim as to
    from backend_torch.trainer import TorchBackend
    from core import artifact as art
    from core.quant import dequantize_weights

    spec, optim = cfg.model, cfg.optim
    train = dataclasses.replace(cfg.train, compute_dtype=dtype)
    mdt, tdt = {"float32": (mx.float32, torch.float32), "bfloat16": (mx.bfloat16, torch.bfloat16)}[dtype]
    T = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    M = mx.array
    rows: list[Row] = []
    table = param_table(spec)

    weights = save_and_load(spec, perturbed_weights(spec, seed), tmp / "parity.safetensors")
    progress("building both trainers")
    mlx_tr = MLXBackend(spec, weights, train, optim)
    torch_tr = TorchBackend(spec, weights, train, optim, device="cpu")
    torch.set_num_threads(1)  # see _torch_threads_restored
    try:
        # What each backend holds, back at the numpy boundary (the artifact is built from these).
        exported = {"mlx": mlx_tr.get_weights(), "torch": torch_tr.get_weights()}
        rows.append(_export_row(weights, exported))
        pm, pt = mlx_tr.params, torch_tr.params

        # ---- per op ----
        progress("per-op checks")
        rng = np.random.default_rng([seed, 1])
        seq = cfg.train.seq_len
        h = rng.normal(size=(OP_BATCH, seq, spec.model_dim)).astype(np.float32)
        heads = rng.normal(size=(OP_BATCH, spec.num_heads, seq, spec.head_dim)).astype(np.float32)
        z = (20.0 * rng.normal(size=(OP_BATCH, seq, spec.vocab_size))).astype(np.float32)
        ids = rng.integers(0, spec.vocab_size, (OP_BATCH, seq)).astype(np.int32)
        # RMSNorm's input spans rows of rms 1e-4 .. 10, so its epsilon matters in some of them.
        small = (h * 10.0 ** rng.uniform(-4, 1, (OP_BATCH, seq, 1))).astype(np.float32)
        hm, ht = M(h).astype(mdt), T(h).to(tdt)
        op, op32 = tolerance("op", dtype), tolerance("op_fp32", dtype)
        gqa = f"{'GQA ' if spec.num_kv_heads < spec.num_heads else ''}{spec.num_heads}q/{spec.num_kv_heads}kv"
        b0 = f"blocks.{spec.layer_plan[0]}."
        with torch.no_grad():
            cases = [
                ("op rms_norm", mm.rms_norm(M(small).astype(mdt), spec.norm_eps),
                 tm.rms_norm(T(small).to(tdt), spec.norm_eps), op),
                ("op rope", mm.rotary(M(heads).astype(mdt), spec), tm.rotary(T(heads).to(tdt), spec),
                 tolerance("rope", dtype, seq_len=seq)),
                (f"op attention ({gqa})", mm.attention(spec, pm, b0 + "attn.", hm),
                 tm.attention(spec, pt, b0 + "attn.", ht), op),
                (f"op mlp ({spec.mlp_activation})", mm.mlp(pm, b0 + "mlp.", hm, spec.mlp_activation),
                 tm.mlp(pt, b0 + "mlp.", ht, spec.mlp_activation), op),
                ("op softcap (fp32 logits)", mm.softcap(M(z), spec.logit_softcap),
                 tm.softcap(T(z), spec.logit_softcap), op32),
                ("op cross_entropy (fp32)", mm.cross_entropy(M(z), M(ids)), tm.cross_entropy(T(z), T(ids)), op32),
            ]
            for b in spec.parallel_block_list:  # #1493's parallel residual: the whole block, at its first layer
                layer = spec.layer_plan.index(b)
                cases.append((f"op block {b} (parallel residual)", mm.block(spec, pm, b, hm, hm, layer),
                              tm.block(spec, pt, b, ht, ht, layer), tolerance("hidden", dtype)))  # one layer's band
            rows += [compare(name, _np(a), _np(b), tol) for name, a, b, tol in cases]

        # ---- the whole model: each effective layer, logits, loss ----
        progress("forward")
        x, y = synthetic_batch(spec.vocab_size, OP_BATCH, seq, np.random.default_rng([seed, 2]))
        layers_m, layers_t = [], []
        logits_m = mm.softcap(mm.linear(mm.hidden_states(spec, pm, M(x), mdt, collect=layers_m),
                                        _head(spec, pm)).astype(mx.float32), spec.logit_softcap)
        with torch.no_grad():
            logits_t = tm.softcap(tm.linear(tm.hidden_states(spec, pt, T(x), tdt, collect=layers_t),
                                            _head(spec, pt)).to(torch.float32), spec.logit_softcap)
        if len(layers_m) != spec.num_layers or len(layers_t) != spec.num_layers:
            raise AssertionError(f"collected {len(layers_m)} (mlx) and {len(layers_t)} (torch) layers, "
                                 f"expected {spec.num_layers}")
        hid = tolerance("hidden", dtype)
        for layer, (a, b) in enumerate(zip(layers_m, layers_t)):
            rows.append(compare(f"layer {layer} (block {spec.layer_plan[layer]})", _np(a), _np(b), hid))
        rows.append(compare("logits", _np(logits_m), _np(logits_t), tolerance("logits", dtype)))

        # ---- one backward pass ----
        progress("backward")
        loss_m, grads_m = mx.value_and_grad(lambda p: mm.mean_loss(spec, p, M(x), M(y), mdt))(pm)
        for p in pt.values():
            p.grad = None
        loss_t = tm.mean_loss(spec, pt, T(x), T(y), tdt)
        loss_t.backward()
        rows.append(compare("loss", _np(loss_m), _np(loss_t), tolerance("loss", dtype)))
        gtol = tolerance("grad", dtype, seq_len=seq)
        grads_np = {}
        for info in table:
            gm, gt = grads_m[info.name], pt[info.name].grad
            if gt is None:
                rows.append(Row(f"grad {info.name}", None, None, None, False, "torch: no gradient"))
                continue
            rows.append(compare(f"grad {info.name}", _np(gm), _np(gt), gtol))
            grads_np[info.name] = gt.detach().numpy().astype(np.float32)
        for p in pt.values():
            p.grad = None

        # ---- one optimizer step on the same numpy gradients, then one with decoupled weight decay ----
        progress("optimizer step")
        if len(grads_np) == len(table):
            for prefix, opt in (("update", optim), ("update+wd", with_weight_decay(optim)),
                                ("update+row_norm", dataclasses.replace(optim, muon_row_normalize=True))):
                momentum = muon_momentum(0, opt)
                p_m = {k: M(v) for k, v in weights.items()}
                p_m, _ = mo.make_update(spec, opt)(p_m, mo.init_state(spec), {k: M(v) for k, v in grads_np.items()},
                                                   mx.array(1.0), mx.array(momentum))
                p_t = {k: T(v) for k, v in weights.items()}
                to.make_update(spec, opt)(p_t, to.init_state(spec), {k: T(v) for k, v in grads_np.items()},
                                          torch.tensor(1.0), torch.tensor(momentum))
                delta_m = {k: np.array(v, np.float64) - weights[k] for k, v in p_m.items()}
                delta_t = {k: p_t[k].numpy().astype(np.float64) - weights[k] for k in p_t}
                group_rows = _group_rows(prefix, table, weights, delta_m, delta_t, dtype, "update_muon", "update_adam")
                if prefix == "update+row_norm":  # it changes Muon only: Adam's rows would repeat 'update'
                    group_rows = [r for r in group_rows if r.kind == "update_muon"]
                rows += group_rows
        else:
            rows.append(Row("update (same numpy gradients)", None, None, None, False, "skipped: missing gradients"))

        # ---- one full train_step of each trainer ----
        progress("train_step")
        lm = mlx_tr.train_step([(x, y)], 1.0, muon_momentum(0, optim))
        lt = torch_tr.train_step([(x, y)], 1.0, muon_momentum(0, optim))
        rows.append(compare("train_step loss", lm, lt, tolerance("step_loss", dtype)))
        lm, lt = mlx_tr.eval_loss_sum(x, y) / x.size, torch_tr.eval_loss_sum(x, y) / x.size
        rows.append(compare("train_step loss after the step", lm, lt, tolerance("after_step_loss", dtype)))
        after_m, after_t = mlx_tr.get_weights(), torch_tr.get_weights()
        delta_m = {k: after_m[k].astype(np.float64) - weights[k] for k in weights}
        delta_t = {k: after_t[k].astype(np.float64) - weights[k] for k in weights}
        # Adam's first step is lr * g / (|g| + eps): where g is within the gradients' own rounding of 0 it maps
        # that noise onto up to +-lr, so those few elements are left out (counted in the note).
        floor = ADAM_GRAD_FLOOR.get(dtype, 0.0)
        masks = {k: np.abs(g) >= floor * np.abs(g).max() for k, g in grads_np.items()}
        rows += _group_rows("train_step", table, weights, delta_m, delta_t, dtype, "step_muon", "step_adam", masks)
    finally:
        torch_tr.close()

    # ---- the artifact ----
    progress("artifact")
    a = cfg.artifact
    scheme = getattr(a, "quant_scheme", a.scheme)  # the scheme with its per-tensor rules, where configs have them
    spec_json = spec.to_dict()
    payload = {k: art.payload_bytes(spec_json, w, scheme) for k, w in exported.items()}
    blobs = {k: art.build_artifact(spec_json, w, scheme, a.codec, a.level, getattr(a, "byte_shuffle", 0))
             for k, w in exported.items()}
    rows.append(compare_exact("artifact payload sha256 (uncompressed)", payload["mlx"], payload["torch"]))
    rows.append(compare_exact(f"artifact sha256 ({a.scheme}, {a.codec})", blobs["mlx"], blobs["torch"]))
    deq = {k: dequantize_weights(art.parse_artifact(blob, f"<{k} artifact>")[1]) for k, blob in blobs.items()}
    with torch.no_grad():
        zm = mm.logits(spec, {k: M(v) for k, v in deq["mlx"].items()}, M(x), mdt)
        zt = tm.logits(spec, {k: T(v) for k, v in deq["torch"].items()}, T(x), tdt)
    rows.append(compare("dequantized logits", _np(zm), _np(zt), tolerance("dequant_logits", dtype)))
    progress("fake quantization (QAT)")
    if any(STD_SCHEME.fullmatch(s) for s in [scheme.split(";")[0]] + [r.split("=")[1] for r in scheme.split(";")[1:]]):
        rows.append(Row("fake-quant (QAT) weights and logits", None, None, None, True,
                        f"skipped: {scheme} has a std-clip scheme, which QAT does not take (artifact.qat refuses it)"))
    else:
        rows += _fake_quant_rows(spec, scheme, weights, deq["mlx"], x, dtype, mdt, tdt)
    return rows


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


def _export_row(weights: dict, exported: dict) -> Row:
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


def _group_rows(prefix: str, table, old: dict, delta_m: dict, delta_t: dict, dtype: str, muon_kind: str,
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

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("parity", help="check that the MLX and torch backends compute the same model",
                              description="Build the model in both backends from one weight file and compare "
                                          "ops, layers, logits, gradients, optimizer steps and the artifact.")
    _add_args(p)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config TOML (see configs/)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set model.layer_plan='2x3' (repeatable)")
    p.add_argument("--small", action="store_true",
                   help="shrink width, sequence length and vocabulary (keeping the topology): CPU-sized")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype of the forward passes (default float32; bfloat16 checks a looser band)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for the weights, their perturbation and the inputs (default: train.seed)")


def run_parity(args) -> int:
    cfg = load_config(args.config, list(args.set or []), small=args.small, small_vocab=args.small)
    seed = cfg.train.seed if args.seed is None else args.seed
    if seed < 0:
        raise UserError(f"--seed {seed}: expected 0 or more")
    _need_backends()  # after the config: a bad path is reported before a missing backend
    import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
    import mlx.core as mx
    import torch

    start = time.perf_counter()
    print(f"loopgolf parity: {args.config}{' --small' if args.small else ''}, {args.dtype}, seed {seed}, "
          f"MLX {mx.__version__} vs torch {torch.__version__}, both on CPU")
    print(f"model: {cfg.model.describe()}")
    print(f"batch: {OP_BATCH} x {cfg.train.seq_len} tokens; weights: init_weights + seeded perturbation, "
          "through save_weights/load_weights")
    print("a row holds when max abs diff <= tolerance = atol + rtol * max|value| (core/tolerances.py; weight "
          "changes add one ulp of the weight); max rel diff = max abs diff / max|value|")
    for (kind, dtype), why in NOT_COMPARED.items():
        if dtype == args.dtype:
            print(f"not compared in {dtype}: {kind} rows. {why}")
    print()

    def progress(msg: str) -> None:  # phases on stderr, so a long full-width run shows where it is
        if sys.stderr.isatty():
            print(f"  ... {msg} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    rows = parity_rows(cfg, args.dtype, seed, progress)
    print(format_report(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if first_divergence(rows) is None else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.parity ...`: the `loopgolf parity` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="loopgolf parity", description=__doc__.split("\n\n")[0])
    _add_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_parity(args)
    except UserError as e:
        print(f"loopgolf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
