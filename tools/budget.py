"""`loopgolf budget`: which widths, unique-block counts and quantization schemes fill a byte budget.

Method. Quantizing and compressing every candidate at full width would take minutes each (zstd-22 on a
17 MB payload is ~17 s), so artifact bytes are estimated with a bytes-per-element model, calibrated once
per (scheme, codec, level) on a small matrix and summed over the candidate's parameter table:

- a quantized tensor (float, more than 65,536 elements, under an intN/int8 scheme): numel times the
  compressed bytes per element of that scheme's codes plus fp16 row scales, measured on a
  CALIBRATION_SHAPE matrix of N(0, 1) values;
- a float tensor that passes through: numel times the compressed bytes per element of fp16 N(0, 1)
  values (fp32 for control tensors: 4 bytes, they are tiny); non-float tensors their raw bytes;
- the header (names, shapes, offsets as JSON) and the 76-byte prefix: a per-tensor constant measured on
  the same calibration.

Why N(0, 1) and not the fresh init: trained matrices are roughly Gaussian per row, while the init is
not (zero-initialized output projections, uniform fan-in matrices whose rows fall under upstream int8's
1/127 step floor). The baseline's init quantizes and compresses to 4.9 MB with int8+zlib; the trained
baseline's artifact is 15.8 MB (upstream's log), which this model predicts within a few percent. Treat
every number as an estimate: `loopgolf size --run DIR` gives the truth after training.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from core.artifact import CODECS, PREFIX_BYTES, encode_payload, tensor_group
from core.config import load_config
from core.errors import UserError
from core.params import count_params, param_table
from core.quant import (
    KEEP_FLOAT_MAX_NUMEL, QuantizedWeights, get_scheme, is_control_name, passthrough_tensor,
    scheme_for_tensor,
)
from core.size import CHALLENGE_LIMIT
from tools.script import DEFAULT_PACK, submission_code_bytes
from core.spec import ModelSpec

CALIBRATION_SHAPE = (256, 512)
CALIBRATION_SEED = 20240501
DEFAULT_SCHEMES = ("int8", "int8_search", "int7", "int6", "int5", "int6;*.attn.*=int7;*.mlp.*=int5")


# ---- the calibrated bytes model ---------------------------------------------------------------------

def _compress(data: bytes, codec: str, level: int) -> int:
    return len(CODECS[codec].compress(data, level))


@functools.lru_cache(maxsize=None)
def _gaussian(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(CALIBRATION_SEED).standard_normal(shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def quantized_bytes_per_element(base_scheme: str, codec: str, level: int) -> float:
    """Compressed bytes per element (codes and scales) of a base scheme on an N(0, 1) matrix."""
    w = _gaussian(CALIBRATION_SHAPE)
    t = get_scheme(base_scheme).quantize_tensor("calibration.weight", w)
    raw = t.data.tobytes() + (b"" if t.scale is None else t.scale.astype("<f2").tobytes())
    return _compress(raw, codec, level) / w.size


@functools.lru_cache(maxsize=None)
def fp16_bytes_per_element(codec: str, level: int) -> float:
    w = _gaussian(CALIBRATION_SHAPE)
    return _compress(w.astype("<f2").tobytes(), codec, level) / w.size


@functools.lru_cache(maxsize=None)
def header_bytes_per_tensor(codec: str, level: int) -> float:
    """Compressed header bytes (JSON names, shapes, offsets, the spec) per tensor, on a small model."""
    spec = ModelSpec(model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=128, num_layers=4, num_blocks=4,
                     layer_plan=(0, 1, 2, 3))
    tensors = {i.name: passthrough_tensor(i.name, np.zeros(i.shape, np.float32)) for i in param_table(spec)}
    payload, header_len = encode_payload(spec.to_dict(), QuantizedWeights("int8", tensors))
    return _compress(payload[: 8 + header_len], codec, level) / len(tensors)


@dataclasses.dataclass(frozen=True)
class Estimate:
    artifact_bytes: int
    by_group: dict[str, int]  # estimated compressed bytes per tensor group (core.artifact.tensor_group)
    quantized_params: int
    passthrough_params: int


def estimate_artifact_bytes(spec: ModelSpec, scheme: str, codec: str, level: int) -> Estimate:
    """Estimated artifact bytes of a *trained* model of `spec` (see the module docstring)."""
    get_scheme(scheme)
    by_group: dict[str, float] = {}
    quantized = passthrough = 0
    table = param_table(spec)
    for info in table:
        base = scheme_for_tensor(scheme, info.name)
        if base != "fp16" and info.numel > KEEP_FLOAT_MAX_NUMEL:
            b = info.numel * quantized_bytes_per_element(base, codec, level)
            quantized += info.numel
        else:
            per = 4.0 if is_control_name(info.name) else fp16_bytes_per_element(codec, level)
            b = info.numel * per
            passthrough += info.numel
        g = tensor_group(info.name)
        by_group[g] = by_group.get(g, 0.0) + b
    overhead = PREFIX_BYTES + len(table) * header_bytes_per_tensor(codec, level)
    total = int(round(sum(by_group.values()) + overhead))
    return Estimate(total, {g: int(round(v)) for g, v in by_group.items()}, quantized, passthrough)


# ---- the search -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Candidate:
    model_dim: int
    num_blocks: int
    plan: str
    scheme: str
    unique_params: int
    effective_params: int
    artifact_bytes: int
    total_bytes: int


def _cycle(spec: ModelSpec) -> tuple[int, int] | None:
    """(K, R) when the plan is K blocks cycled R times (flat is Kx1), else None."""
    k = spec.num_blocks
    if spec.num_layers % k == 0 and spec.layer_plan == tuple(range(k)) * (spec.num_layers // k):
        return k, spec.num_layers // k
    return None


def _variant(spec: ModelSpec, model_dim: int, blocks: int | None) -> ModelSpec | None:
    table = spec.to_dict()
    table["model_dim"] = model_dim
    if blocks is not None:
        _, r = _cycle(spec)
        table["layer_plan"] = list(range(blocks)) * r
        table["num_blocks"], table["num_layers"] = blocks, blocks * r
    try:
        return ModelSpec.from_table(table, where="model")
    except UserError:
        return None


def search(spec: ModelSpec, schemes: list[str], codec: str, level: int, limit: int, code: int,
           widths: list[int] | None = None, blocks: list[int] | None = None) -> list[Candidate]:
    """Every (width, unique blocks, scheme) whose estimated total fits `limit`, best first: most unique
    parameters, then the scheme with more bytes per parameter (finer quantization), then most effective
    parameters."""
    cyc = _cycle(spec)
    if widths is None:
        widths = [d for d in range(64, 2048 + 1, 64) if d % spec.num_heads == 0]
    if blocks is None:
        blocks = [None] if cyc is None else list(range(1, max(2 * cyc[0], cyc[0] + 4) + 1))
    out = []
    for d in widths:
        for k in blocks:
            s = _variant(spec, d, k)
            if s is None:
                continue
            unique, effective = count_params(s)
            plan = f"{s.num_blocks}x{len(s.layer_plan) // s.num_blocks}" if _cycle(s) else " ".join(map(str, s.layer_plan))
            for scheme in schemes:
                est = estimate_artifact_bytes(s, scheme, codec, level)
                total = est.artifact_bytes + code
                if total <= limit:
                    out.append(Candidate(d, s.num_blocks, plan, scheme, unique, effective, est.artifact_bytes, total))
    out.sort(key=lambda c: (-c.unique_params, -c.artifact_bytes, -c.effective_params, c.scheme))
    return out


# ---- the command ------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("budget", help="search width, unique blocks and schemes that fit a byte budget")
    p.add_argument("--config", required=True, help="run config TOML: its heads, plan, vocab and codec are kept")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--bytes", type=int, default=CHALLENGE_LIMIT, help=f"budget in bytes (default {CHALLENGE_LIMIT:,})")
    p.add_argument("--schemes", help="comma-separated schemes to try (default: the config's and "
                                     + ", ".join(DEFAULT_SCHEMES) + ")")
    p.add_argument("--widths", help="comma-separated model_dim values (default: multiples of 64 up to 2048 that "
                                    "the head count divides)")
    p.add_argument("--blocks", help="comma-separated unique-block counts K for a 'KxR' plan (default 1..2K)")
    p.add_argument("--top", type=int, default=20, help="print at most N candidates (default 20; 0: all)")


def _int_list(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected comma-separated integers") from None


def run_budget(args) -> int:
    cfg = load_config(args.config, list(args.set or []))
    art = cfg.artifact
    if args.bytes <= 0:
        raise UserError(f"--bytes {args.bytes}: expected a positive number of bytes")
    schemes = [s.strip() for s in args.schemes.split(",")] if args.schemes else [art.quant_scheme, *DEFAULT_SCHEMES]
    schemes = list(dict.fromkeys(s for s in schemes if s))
    for s in schemes:
        get_scheme(s)
    blocks = _int_list(args.blocks, "blocks")
    if blocks is not None and _cycle(cfg.model) is None:
        raise UserError(f"--blocks needs a 'KxR' (or flat) plan; {args.config} has [{' '.join(map(str, cfg.model.layer_plan))}]")
    code = submission_code_bytes(cfg)
    cands = search(cfg.model, schemes, art.codec, art.level, args.bytes, code,
                   widths=_int_list(args.widths, "widths"), blocks=blocks)
    print(f"budget {args.bytes:,} B = code {code:,} B (the exported train_gpt.py, {DEFAULT_PACK}) + artifact; "
          f"codec {art.codec}-{art.level}; heads {cfg.model.num_heads}, vocab {cfg.model.vocab_size}")
    print(f"estimate: compressed bytes per element measured once on N(0,1) {CALIBRATION_SHAPE[0]}x"
          f"{CALIBRATION_SHAPE[1]} matrices (a proxy for trained weights; see tools/budget.py):")
    for s in sorted({scheme_for_tensor(x, n) for x in schemes for n in ("tok_emb.weight", "blocks.0.attn.c_q.weight",
                                                                           "blocks.0.mlp.fc.weight")} - {"fp16"}):
        print(f"  {s:<12} {quantized_bytes_per_element(s, art.codec, art.level):.4f} B/param")
    print(f"  {'fp16':<12} {fp16_bytes_per_element(art.codec, art.level):.4f} B/param (passthrough)")
    if not cands:
        print("no candidate fits")
        return 1
    shown = cands if args.top <= 0 else cands[: args.top]
    print(f"{len(cands)} candidates fit, best first (most unique params, then finer quantization); "
          f"showing {len(shown)}:")
    print(f"{'dim':>5} {'plan':>8} {'scheme':<34} {'unique':>12} {'effective':>12} {'est artifact B':>15} "
          f"{'est total B':>13} {'margin':>11}")
    for c in shown:
        print(f"{c.model_dim:>5} {c.plan:>8} {c.scheme:<34} {c.unique_params:>12,} {c.effective_params:>12,} "
              f"{c.artifact_bytes:>15,} {c.total_bytes:>13,} {args.bytes - c.total_bytes:>11,}")
    return 0
