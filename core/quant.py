"""Post-training quantization of a weight dict, in numpy, so every backend produces the same bytes.

A scheme is a name looked up in `SCHEMES`; the name is written into the artifact so a reader knows how
to dequantize. "int8", the default, is upstream's `int8_clean_per_row_v1` rule (train_gpt.py's
quantize_state_dict_int8), reproduced bit for bit against torch on CPU:

- float tensors with more than 65,536 elements are quantized to int8 in [-127, 127]:
  2-D per row, clip = quantile(|w|, 0.9999984) of the row, scale = max(clip/127, 1/127) stored fp16;
  other shapes with one float32 scale clip/127 (1.0 when clip is 0);
- smaller float tensors pass through as fp16, except control tensors (names containing
  `CONTROL_NAME_PATTERNS`), which stay fp32;
- non-float tensors pass through exactly.

Other schemes (same passthrough rule for small, control and non-float tensors):

- "int4" .. "int7", and "int8_search": per-row intN, codes in +/-(2^(N-1)-1) stored as int8, one fp16
  scale per row (one per tensor, as a 1-element row, for shapes other than 2-D), no 1/127 floor. The
  row's clip is chosen by reconstruction error (#895's "GPTQ-lite"): for every percentile in
  `CLIP_SEARCH_PERCENTILES` (1.0, no clipping, among them) the row is quantized with the fp16 scale
  that will be stored, and the candidate with the lowest squared error wins (the first on a tie).
- "int4_stdK" .. "int8_stdK" (e.g. "int6_std12.85", "int8_std20"): per-row intN with the records' std clip
  (#1394's SDClip, also #1493): one fp16 step per row, K * std(row) / (2^(N-1)-1), no search; std is the
  row's sample standard deviation (ddof 1, torch's default, as the records take it), in float64. K is in
  row standard deviations (0.1 to 1000); raising it widens the step and shrinks the artifact. Stored and
  read as the intN schemes are.
- "fp16": every float tensor is stored as fp16 whatever its size (control tensors fp32): the
  embedding passthrough option. Upstream's "int8" is the int8 embedding option.

A per-tensor mix is one composite name, "DEFAULT;PATTERN=SCHEME;PATTERN=SCHEME...": each tensor takes
the scheme of the first fnmatch PATTERN (over the full tensor name) that matches it, else DEFAULT. The
composite name is what the artifact header records, so a reader resolves every tensor's scheme from
its name alone; with no rules the name is just DEFAULT, and "int8" artifacts are unchanged.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Mapping
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
    "q_gain", "skip_weight", "skip_weights", "skip_gates",  # skip_gates (#1394) as skip_weights: fp32 here
    # Per-iteration conditioning (core.params; layer_attn_scales, layer_mlp_scales and layer_resid_mixes
    # already match the patterns above). #319 kept its loop embeddings and gates fp32 the same way.
    "iter_embeds", "loop_embeds", "iter_scales", "layer_in_gains", "layer_out_gains", "loop_gates",
    "cross_repeat_scales",  # #895
    "value_scales", "smear", "bigram.scale",  # #1110 kept smear and bigram.scale fp32 too
    "ve_shared.scale", "ve_layer_scales", "vrl_alphas",  # #1110's VE and VRL scalars, fp32 there too
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
    gptq: dict | None = None  # core.gptq's settings and tensors, recorded in the artifact header; None: no GPTQ


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


def torch_quantile_last_axis(a: np.ndarray, q: float, rank_dtype=np.float32) -> np.ndarray:
    """torch.quantile(a, q, dim=-1) for a float32 array with no NaN, reproduced bit for bit.

    np.quantile's default method is the same linear interpolation, but it computes the position
    q*(n-1) and the interpolation weight in float64 from a float64 q. torch before 2.14 wraps q in a
    float32 tensor and does both in float32, so the two disagree in the last bits of the clip for nearly
    every row (measured: 2,730 of 2,816 random rows), which moves scales and flips some codes. So we do
    torch's arithmetic by hand: float32 position, floor/ceil neighbours, and torch's two-sided lerp.
    That float32 rule is upstream's int8 rule (its records ran torch < 2.14) and loopgolf's artifacts keep
    it. torch 2.14 (pytorch#187574) computes the position in float64 from the float32 q and casts only the
    weight to float32: rank_dtype=np.float64 reproduces that (tests/test_quant.py compares both).
    """
    n = a.shape[-1]
    rank = rank_dtype(np.float32(q)) * rank_dtype(n - 1)
    below, above = int(np.floor(rank)), int(np.ceil(rank))
    weight = np.float32(rank - below)
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


def check_codes(t: QuantizedTensor, qmax: int, scheme: str) -> str | None:
    """What every per-row integer scheme requires of a quantized tensor read from a file: int8 codes in
    [-qmax, qmax], more elements than the passthrough size, and a scale."""
    if t.role != ROLE_QUANTIZED:
        return f"unknown role {t.role!r}"
    if t.data.dtype != np.int8:
        return f"quantized data has dtype {t.data.dtype}, expected int8"
    if t.data.size <= KEEP_FLOAT_MAX_NUMEL:
        return f"a quantized tensor has {t.data.size} elements; {scheme} quantizes only more than {KEEP_FLOAT_MAX_NUMEL}"
    if t.data.size and (int(t.data.min()) < -qmax or int(t.data.max()) > qmax):
        return f"quantized codes outside [-{qmax}, {qmax}] for {scheme}"
    if t.scale is None:
        return "a quantized tensor has no scale"
    return None


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
        problem = check_codes(t, INT8_MAX, "int8")
        if problem:
            return problem
        if t.data.ndim == 2:
            expected = (np.dtype(np.float16), (t.data.shape[0],))
        else:
            expected = (np.dtype(np.float32), ())
        if (t.scale.dtype, t.scale.shape) != expected:
            return (f"scale is {t.scale.dtype}{list(t.scale.shape)}, expected "
                    f"{expected[0]}{list(expected[1])} for a {t.data.ndim}-D tensor")
        return None


# ---- intN per row with a clip-percentile search ("GPTQ-lite", #895) -----------------------------------

CLIP_SEARCH_PERCENTILES = (0.9999, 0.99995, 0.99999, 0.999995, 0.999999, 1.0)
FP16_MAX = 65504.0
SCALE_FLOOR = 2.0**-24  # the smallest fp16 (subnormal): a zero row keeps a nonzero step and all-zero codes


def int_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def fp16_step(clip: np.ndarray, qmax: int) -> np.ndarray:
    """The fp16 step stored for a clip: clip/qmax, kept within fp16's finite positive range."""
    step = np.minimum(np.maximum(clip.astype(np.float32) / np.float32(qmax), np.float32(SCALE_FLOOR)),
                      np.float32(FP16_MAX))
    return step.astype(np.float16)


def quantize_rows_with_step(w2: np.ndarray, step16: np.ndarray, qmax: int) -> np.ndarray:
    """Round-to-nearest codes of a float32 (rows, cols) array with a per-row fp16 step; values beyond
    qmax steps are clipped there."""
    s = step16.astype(np.float32)[:, None]
    return np.clip(np.rint(w2 / s), -qmax, qmax).astype(np.int8)


def row_sq_error(w2: np.ndarray, q: np.ndarray, step16: np.ndarray) -> np.ndarray:
    deq = q.astype(np.float32) * step16.astype(np.float32)[:, None]
    diff = deq.astype(np.float64) - w2
    return np.einsum("ij,ij->i", diff, diff)


def quantize_rows_clip_search(w2: np.ndarray, qmax: int,
                              percentiles: Iterable[float] = CLIP_SEARCH_PERCENTILES) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, fp16 steps) for a float32 (rows, cols) array: per row, the candidate clip
    percentile whose quantize-dequantize squared error is lowest (the first candidate on a tie)."""
    percentiles = tuple(float(p) for p in percentiles)
    rows = w2.shape[0]
    if w2.size == 0:
        return np.zeros(w2.shape, np.int8), np.ones(rows, np.float16)
    clips = np.quantile(np.abs(w2), percentiles, axis=1)  # (P, rows); 1.0 is the row's max |w|
    best_q = best_s = best_err = None
    for clip in clips:
        step = fp16_step(clip, qmax)
        q = quantize_rows_with_step(w2, step, qmax)
        err = row_sq_error(w2, q, step)
        if best_q is None:
            best_q, best_s, best_err = q, step, err
            continue
        better = err < best_err
        if better.any():
            best_q[better] = q[better]
            best_s[better] = step[better]
            best_err[better] = err[better]
    return best_q, best_s


def _rows_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """2-D tensors are quantized per row; any other shape as one row."""
    if len(shape) == 2:
        return shape[0], shape[1]
    n = int(np.prod(shape))
    return 1, n


class IntNPerRow:
    """What every per-row intN scheme shares: int8 codes in +/-qmax, one fp16 step per row (2-D tensors; any
    other shape as one row), the same dequantization and file checks. Subclasses choose the steps."""

    def __init__(self, bits: int, name: str):
        self.bits = bits
        self.qmax = int_qmax(bits)
        self.name = name

    def row_steps(self, w2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def candidate_steps(self, w2: np.ndarray) -> list[np.ndarray]:
        """The per-row fp16 steps GPTQ tries (core.gptq), each row keeping its best."""
        raise NotImplementedError

    def quantize_rows(self, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = self.row_steps(w2)
        return quantize_rows_with_step(w2, step, self.qmax), step

    def quantize_tensor(self, name: str, w: np.ndarray) -> QuantizedTensor:
        if not is_float_dtype(w.dtype) or w.size <= KEEP_FLOAT_MAX_NUMEL:
            return passthrough_tensor(name, w)
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        q, step = self.quantize_rows(w32.reshape(_rows_view(w32.shape)))
        return QuantizedTensor(ROLE_QUANTIZED, q.reshape(w32.shape), step)

    def dequantize_tensor(self, name: str, t: QuantizedTensor) -> np.ndarray:
        if t.role == ROLE_PASSTHROUGH:
            return dequantize_passthrough(t)
        q2 = t.data.reshape(_rows_view(t.data.shape)).astype(np.float32)
        return (q2 * t.scale.astype(np.float32)[:, None]).reshape(t.data.shape)

    def check_tensor(self, name: str, t: QuantizedTensor) -> str | None:
        if t.role == ROLE_PASSTHROUGH:
            return Int8CleanPerRow().check_tensor(name, t)
        problem = check_codes(t, self.qmax, self.name)
        if problem:
            return problem
        rows = _rows_view(t.data.shape)[0]
        if t.scale.dtype != np.float16 or t.scale.shape != (rows,):
            return f"scale is {t.scale.dtype}{list(t.scale.shape)}, expected float16[{rows}] for {self.name}"
        if not np.all(np.isfinite(t.scale)) or np.any(t.scale <= 0):
            return "scales must be finite and positive"
        return None


class IntNClipSearch(IntNPerRow):
    """Per-row intN with a clip-percentile search (see the module docstring)."""

    def __init__(self, bits: int, name: str | None = None):
        super().__init__(bits, name or f"int{bits}")

    def quantize_rows(self, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return quantize_rows_clip_search(w2, self.qmax)

    def candidate_steps(self, w2: np.ndarray) -> list[np.ndarray]:
        # computed exactly as the clip search computes them, so its codes are among GPTQ's candidates
        return [fp16_step(c, self.qmax) for c in np.quantile(np.abs(w2), CLIP_SEARCH_PERCENTILES, axis=1)]


STD_SCHEME = re.compile(r"int([4-8])_std([0-9]+(?:\.[0-9]+)?)")
STD_K_MIN, STD_K_MAX = 0.1, 1000.0
STD_SCHEME_HINT = "or intN_stdK: N 4..8 bits, K the clip in row standard deviations, e.g. int6_std12.85"


def std_k_text(k: float) -> str:
    """K as a std scheme's name spells it: the shortest decimal that reads back as k, no exponent, no '.0'."""
    text = repr(float(k))
    return text[:-2] if text.endswith(".0") else text


class IntNStdClip(IntNPerRow):
    """Per-row intN with the records' std clip, step = k * std(row) / qmax (see the module docstring)."""

    def __init__(self, bits: int, k: float):
        super().__init__(bits, f"int{bits}_std{std_k_text(k)}")
        self.k = float(k)

    def row_steps(self, w2: np.ndarray) -> np.ndarray:
        std = np.std(w2.astype(np.float64), axis=1, ddof=1) if w2.shape[1] > 1 else np.zeros(w2.shape[0])
        return fp16_step(self.k * std, self.qmax)

    def candidate_steps(self, w2: np.ndarray) -> list[np.ndarray]:
        return [self.row_steps(w2)]  # one fixed step per row: the records search nothing


@functools.lru_cache(maxsize=64)
def _std_scheme(bits: int, k: float) -> IntNStdClip:
    return IntNStdClip(bits, k)


class Fp16Passthrough:
    """Every float tensor as fp16 (control tensors fp32), whatever its size: the embedding option."""

    name = "fp16"

    def quantize_tensor(self, name: str, w: np.ndarray) -> QuantizedTensor:
        return passthrough_tensor(name, w)

    def dequantize_tensor(self, name: str, t: QuantizedTensor) -> np.ndarray:
        return dequantize_passthrough(t)

    def check_tensor(self, name: str, t: QuantizedTensor) -> str | None:
        if t.role != ROLE_PASSTHROUGH:
            return f"role {t.role!r}: the fp16 scheme stores every tensor as it is"
        if t.scale is not None:
            return "a passthrough tensor has a scale"
        if t.data.dtype.kind == "f" and t.data.dtype != (np.float32 if is_control_name(name) else np.float16):
            return f"passthrough dtype {t.data.dtype} breaks the fp16 scheme's fp16/fp32 rule"
        return None


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Int8CleanPerRow(), *(IntNClipSearch(b) for b in range(4, 8)), IntNClipSearch(8, "int8_search"),
    Fp16Passthrough(),
)}



def base_scheme(name: str) -> Scheme | None:
    """The scheme a base name (no rules) stands for: one of SCHEMES, or an intN_stdK scheme in canonical
    spelling; None for anything else."""
    if not isinstance(name, str):
        return None
    if name in SCHEMES:
        return SCHEMES[name]
    m = STD_SCHEME.fullmatch(name)
    if m and STD_K_MIN <= float(m[2]) <= STD_K_MAX:
        s = _std_scheme(int(m[1]), float(m[2]))
        return s if s.name == name else None
    return None


def canonical_base(name: str, where: str) -> str:
    """A base scheme name as an artifact records it (intN_stdK with K spelled by std_k_text); a UserError
    naming `where` for anything that is not a scheme."""
    m = STD_SCHEME.fullmatch(name) if isinstance(name, str) else None
    if m:
        k = float(m[2])
        if not STD_K_MIN <= k <= STD_K_MAX:
            raise UserError(f"{where}: {name!r}: the std clip K must lie in {STD_K_MIN:g}..{STD_K_MAX:g} row "
                            "standard deviations (the records use 12.85 for matrices, 20 for the embedding)")
        return f"int{m[1]}_std{std_k_text(k)}"
    if base_scheme(name) is None:
        raise UserError(f"{where}: unknown quantization scheme {name!r}; known: {', '.join(sorted(SCHEMES))}, "
                        f"{STD_SCHEME_HINT}")
    return name


# ---- per-tensor rules: "DEFAULT;PATTERN=SCHEME;..." ----------------------------------------------------

_PATTERN_OK = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def parse_rule(text: str, where: str = "rule") -> tuple[str, str]:
    """'blocks.*.mlp.*=int5' -> ('blocks.*.mlp.*', 'int5'), each part checked."""
    if not isinstance(text, str) or text.count("=") != 1:
        raise UserError(f"{where} = {text!r}: expected 'PATTERN=SCHEME', e.g. '*.mlp.*=int5'")
    pattern, scheme = (p.strip() for p in text.split("="))
    if not _PATTERN_OK.fullmatch(pattern):
        raise UserError(f"{where} = {text!r}: the pattern may hold only letters, digits and _ . * ? [ ] ! -")
    return pattern, canonical_base(scheme, f"{where} = {text!r}")


def compose_scheme(default: str, rules: Iterable[str] = (), where: str = "") -> str:
    """The one scheme name (as recorded in an artifact) for a default scheme and ordered rules.
    `where` ("artifact") prefixes the key names in error messages."""
    prefix = f"{where}." if where else ""
    default = canonical_base(default, f"{prefix}scheme")
    parsed = [parse_rule(r, f"{prefix}rules[{i}]") for i, r in enumerate(rules)]
    return ";".join([default] + [f"{p}={s}" for p, s in parsed])


class RuleScheme:
    """A default scheme plus first-match fnmatch rules over tensor names."""

    def __init__(self, name: str):
        default, *rules = name.split(";")
        self.name = compose_scheme(default, rules)
        if self.name != name:
            raise UserError(f"scheme {name!r} is not in canonical form (expected {self.name!r})")
        self.default = self.name.split(";")[0]
        self.rules = tuple(parse_rule(r) for r in rules)

    def scheme_name_for(self, tensor: str) -> str:
        for pattern, scheme in self.rules:
            if fnmatch.fnmatchcase(tensor, pattern):
                return scheme
        return self.default

    def quantize_tensor(self, name: str, w: np.ndarray) -> QuantizedTensor:
        return base_scheme(self.scheme_name_for(name)).quantize_tensor(name, w)

    def dequantize_tensor(self, name: str, t: QuantizedTensor) -> np.ndarray:
        return base_scheme(self.scheme_name_for(name)).dequantize_tensor(name, t)

    def check_tensor(self, name: str, t: QuantizedTensor) -> str | None:
        sub = self.scheme_name_for(name)
        reason = base_scheme(sub).check_tensor(name, t)
        return None if reason is None else f"{reason} (scheme {sub} by the rules)"


@functools.lru_cache(maxsize=64)
def _rule_scheme(name: str) -> RuleScheme:
    return RuleScheme(name)


def get_scheme(name: str) -> Scheme:
    base = base_scheme(name)
    if base is not None:
        return base
    if isinstance(name, str) and ";" in name:
        return _rule_scheme(name)
    raise UserError(f"unknown quantization scheme {name!r}; known: {', '.join(sorted(SCHEMES))}, {STD_SCHEME_HINT} "
                    "(in canonical spelling)")


def scheme_for_tensor(scheme: str, tensor: str) -> str:
    """The base scheme that `scheme` (plain or composite) applies to one tensor name."""
    s = get_scheme(scheme)
    return s.scheme_name_for(tensor) if isinstance(s, RuleScheme) else s.name


def quantize_weights(weights: Mapping[str, np.ndarray], scheme: str = "int8") -> QuantizedWeights:
    """Quantize every tensor of `weights` with `scheme` (a name in SCHEMES or a composite
    "DEFAULT;PATTERN=SCHEME;..." name, see compose_scheme). Deterministic; `weights` is not modified."""
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
