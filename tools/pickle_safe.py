"""Every pickle-based input, read without executing code: upstream's int8 artifacts (`.ptz`) and the
torch files (through torch's own weights_only loader).

train_gpt_mlx.py writes `*_mlx_model.int8.ptz` as `zlib.compress(pickle.dumps(obj))`, where `obj` holds
only dicts, strings, ints and numpy arrays. A pickle may name any callable, so `load_pickle` uses an
Unpickler whose `find_class` hands out a handful of stand-ins for numpy's rebuild functions and refuses
every other global. The stand-ins never give the file a live numpy object to call `__setstate__` on:
they collect the pieces (dtype code, byte order, shape, raw bytes), check them against a short list of
plain numeric dtypes, and only then build a fresh array. After loading, `plain_tree` checks the whole
structure (dicts, lists, str, int, float, bool, None, numeric arrays) and swaps the stand-ins for arrays.
`dequantize_upstream` checks the container's layout (train_gpt.py's torch.save'd one too, once its
tensors are numpy) and dequantizes it as upstream does. torch files go only through
`torch.load(weights_only=True)`, imported when needed: core never imports torch at module level.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import zlib
from pathlib import Path

import numpy as np

from core.errors import UserError

MAX_INFLATED_BYTES = 1 << 30  # refuse to inflate more than 1 GiB (upstream's artifact is ~16 MB)
UPSTREAM_FORMAT = "int8_clean_per_row_v1"  # the "__quant_format__" both upstream scripts write
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # torch.save's pre-zip format
MAX_DEPTH = 8  # upstream nests three deep: obj["qmeta"][name]["scheme"]
# Plain numeric dtypes by numpy's pickled type code; nothing with objects, fields or subarrays.
_DTYPE_CODES = frozenset("b1 i1 u1 i2 u2 i4 u4 i8 u8 f2 f4 f8".split())
_REFUSAL = "upstream artifacts hold only dicts, strings and arrays"
# Persistent ids, the copyreg extension registry, protocol 0/1 instance building, out-of-band buffers.
_NEVER_OPCODES = frozenset("PERSID BINPERSID EXT1 EXT2 EXT4 INST OBJ NEXT_BUFFER READONLY_BUFFER".split())


class _Refused(Exception):
    """Why a pickle is not a plain upstream container; turned into a UserError naming the file."""


class _Dtype:
    """Stand-in for numpy.dtype(code, align, copy); pickle's BUILD hands it the state tuple."""

    __slots__ = ("code", "byteorder")

    def __init__(self, code=None, align=False, copy=True, *rest):
        if not isinstance(code, str) or code not in _DTYPE_CODES or rest:
            raise _Refused(f"dtype {code!r} is not a plain numeric dtype")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) for a plain dtype.
        if not (isinstance(state, tuple) and len(state) == 8 and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None):
            raise _Refused(f"dtype {self.code} has a structured or unexpected state")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder("=" if self.byteorder == "|" else self.byteorder)


class _Array:
    """A numeric array rebuilt from checked pieces; `plain_tree` replaces it with `.value`."""

    __slots__ = ("value",)

    def __init__(self, value: np.ndarray | None = None):
        self.value = value

    def __setstate__(self, state):
        # ndarray state from numpy's _reconstruct path: (version, shape, dtype, is_fortran, raw bytes).
        if self.value is not None:
            raise _Refused("an array is rebuilt twice")
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("an ndarray state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        self.value = _from_bytes(raw, dtype, shape, "F" if fortran else "C")


class _Global:
    """What find_class hands out: a call-only wrapper. pickle's BUILD on it is refused, so a file can
    never set attributes on our functions or classes (which would outlive this load)."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, key, value):
        raise _Refused("tries to set an attribute on an allowed global")

    def __setstate__(self, state):
        raise _Refused("tries to set the state of an allowed global")


def _ndarray(*args):
    raise _Refused("numpy.ndarray may only appear inside numpy's _reconstruct")


_NDARRAY = _Global(_ndarray)


def _shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_INFLATED_BYTES for d in shape):
        raise _Refused(f"array shape {shape!r} is not a tuple of sizes")
    return shape


def _from_bytes(raw, dtype, shape, order) -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise _Refused("an array's dtype was not built by numpy.dtype")
    if isinstance(raw, pickle.PickleBuffer):
        raw = bytes(raw)
    if not isinstance(raw, (bytes, bytearray)) or order not in ("C", "F"):
        raise _Refused("an array's data is not raw bytes")
    dt, shape = dtype.resolve(), _shape(shape)
    if len(raw) != math.prod(shape) * dt.itemsize:
        raise _Refused(f"array data is {len(raw)} bytes, {dt}{list(shape)} needs {math.prod(shape) * dt.itemsize}")
    arr = np.frombuffer(raw, dtype=dt).reshape(shape, order=order)
    if dt.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise _Refused("a bool array holds bytes other than 0 and 1")
    return np.array(arr, dtype=dt.newbyteorder("="), order="C")  # a private, native, writable copy


def _frombuffer(buf, dtype, shape, order="C") -> _Array:
    return _Array(_from_bytes(buf, dtype, shape, order))


def _reconstruct(cls, shape, typecode) -> _Array:
    if cls is not _NDARRAY:
        raise _Refused("_reconstruct is asked for something other than numpy.ndarray")
    return _Array()


def _scalar(dtype, raw) -> _Array:
    return _Array(_from_bytes(raw, dtype, (), "C"))


def _encode(text, encoding="utf-8") -> bytes:
    # Protocol 2 stores bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode is only allowed as protocol 2's latin1 bytes")
    return text.encode("latin1")


# Every global the file may name: numpy 1.x (numpy.core) and 2.x (numpy._core) spellings, protocols 2-5.
_ALLOWED = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Global(_Dtype), ("_codecs", "encode"): _Global(_encode)}
for _mod in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_mod}.multiarray", "_reconstruct")] = _Global(_reconstruct)
    _ALLOWED[(f"{_mod}.multiarray", "scalar")] = _Global(_scalar)
    _ALLOWED[(f"{_mod}.numeric", "_frombuffer")] = _Global(_frombuffer)


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"refuses global {module}.{name}: {_REFUSAL}") from None

    def persistent_load(self, pid):
        raise _Refused(f"refuses a persistent id: {_REFUSAL}")


def plain_tree(obj, depth: int = 0):
    """The loaded object with stand-ins swapped for arrays; anything but plain data is refused."""
    if depth > MAX_DEPTH:
        raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, _Array):
        if obj.value is None:
            raise _Refused("an array was never given its data")
        return obj.value
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise _Refused("a dict has a key that is not a string")
        return {k: plain_tree(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_tree(v, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise _Refused(f"holds a {type(obj).__name__}: {_REFUSAL}")


def inflate_capped(data: bytes, source: str, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """zlib-decompress at most `limit` bytes; a truncated, padded or oversized stream is a UserError."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise UserError(f"{source}: not a zlib-compressed artifact ({e})") from None
    if len(out) > limit:
        raise UserError(f"{source}: inflates to more than {limit:,} bytes; refusing it")
    if not d.eof:
        raise UserError(f"{source}: the zlib stream is truncated")
    if d.unused_data:
        raise UserError(f"{source}: {len(d.unused_data)} stray bytes follow the zlib stream")
    return out


def _prescan(raw: bytes) -> None:
    """Walk the opcodes first (pickletools reads, never calls): every length must fit in the bytes there,
    opcodes upstream never writes are refused, and nothing may follow STOP. So the unpickler never
    allocates for a length the file cannot back."""
    last = -1
    for op, _, pos in pickletools.genops(raw):
        if op.name in _NEVER_OPCODES:
            raise _Refused(f"refuses opcode {op.name}: {_REFUSAL}")
        last = pos
    if last != len(raw) - 1:
        raise _Refused(f"has {len(raw) - 1 - last} stray bytes after its end")


def load_pickle(raw: bytes, source: str):
    """Unpickle `raw` with SafeUnpickler and return the checked plain tree. Never executes code."""
    try:
        _prescan(raw)
        return plain_tree(SafeUnpickler(io.BytesIO(raw)).load())
    except _Refused as e:
        raise UserError(f"{source}: unpickling {e}") from None
    except RecursionError:
        raise UserError(f"{source}: the pickle nests too deeply") from None
    except Exception as e:  # pickle's own errors for malformed bytes: UnpicklingError, EOFError, ValueError, ...
        raise UserError(f"{source}: not a readable pickle ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    """An exception as one short line, for a UserError."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def as_recorded(x: np.ndarray, dtype_name) -> np.ndarray:
    """float32 `x` rounded (to nearest even) through the dtype upstream's loader casts it back to."""
    if dtype_name == "bfloat16":
        u = x.view(np.uint32).astype(np.uint64)
        return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return x.astype(np.float16).astype(np.float32) if dtype_name == "float16" else x


def dequantize_upstream(obj, source: str) -> dict[str, np.ndarray]:
    """Upstream's int8_clean_per_row_v1 container (numpy leaves) -> float32 arrays, the values upstream's
    dequantize_state_dict_int8 loads: per-row q * scale[:, None], per-tensor q * scale, passthrough as
    stored, each then rounded through the dtype recorded for it (bf16 for train_gpt.py's embedding)."""
    def table(key, required=True) -> dict:
        value = obj.get(key, {} if not required else None)
        if not isinstance(value, dict):
            raise UserError(f"{source}: the artifact's '{key}' should be a dict of name -> value, got "
                            f"{type(value).__name__}")
        return value

    if not isinstance(obj, dict):
        raise UserError(f"{source}: holds a {type(obj).__name__}, expected upstream's int8 artifact dict")
    fmt = obj.get("__quant_format__", UPSTREAM_FORMAT)
    if fmt != UPSTREAM_FORMAT:
        raise UserError(f"{source}: quant format {fmt!r}; this reader knows only {UPSTREAM_FORMAT!r}")
    quantized, scales, passthrough, qmeta = table("quantized"), table("scales"), table("passthrough"), table("qmeta", False)
    dtypes, orig_dtypes = table("dtypes", False), table("passthrough_orig_dtypes", False)
    out: dict[str, np.ndarray] = {}
    for name, q in quantized.items():
        s = scales.get(name)
        if not isinstance(q, np.ndarray) or q.dtype != np.int8 or not isinstance(s, np.ndarray) or s.dtype.kind != "f":
            raise UserError(f"{source}: {name!r} should be int8 codes with a float scale")
        s = s.astype(np.float32)
        meta = qmeta.get(name)
        per_row = (isinstance(meta, dict) and meta.get("scheme") == "per_row") or s.ndim > 0
        if per_row and (q.ndim == 0 or s.size != q.shape[0]):
            raise UserError(f"{source}: {name!r} has {s.size} row scales for shape {list(q.shape)}")
        if not per_row and s.size != 1:
            raise UserError(f"{source}: {name!r} should have one scale, has {s.size}")
        scale = s.reshape((q.shape[0],) + (1,) * (q.ndim - 1)) if per_row else s.reshape(())
        out[name] = as_recorded(q.astype(np.float32) * scale, dtypes.get(name))
    for name, t in passthrough.items():
        if not isinstance(t, np.ndarray) or name in out:
            raise UserError(f"{source}: passthrough {name!r} should be an array of a tensor not quantized")
        out[name] = as_recorded(t.astype(np.float32), orig_dtypes.get(name)) if t.dtype.kind == "f" else t
    return out


# ---- torch's own restricted loader, and the whole .ptz --------------------------------------------------

def need_torch(path):
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading or writing torch files needs PyTorch (pip install torch)") from None
    return torch


def torch_load(torch, source, data) -> object:
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch wraps the reason in paragraphs of advice: keep the line that names it.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file", "Check the doc"))]
        reason = (why or [""])[0][:200]
        if "Weights only load failed" in str(e):
            raise UserError(f"{source}: torch.load(weights_only=True) refused it: expected only tensors and plain "
                            f"containers ({reason})") from None
        raise UserError(f"{source}: not a readable torch.save file ({type(e).__name__}{': ' * bool(reason)}"
                        f"{reason})") from None


def tensors_to_numpy(torch, value):
    """Tensors -> numpy arrays (bf16 -> float32) throughout a container; other leaves unchanged."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    if isinstance(value, dict):
        return {k: tensors_to_numpy(torch, v) for k, v in value.items()}
    return value


def read_upstream_ptz(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """An upstream `.ptz`, dequantized: (float32 arrays under upstream's names, which script wrote it)."""
    if path.stat().st_size > MAX_INFLATED_BYTES:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes is far too large for an int8 artifact")
    raw = inflate_capped(path.read_bytes(), str(path))
    if raw.startswith(b"PK\x03\x04") or raw.startswith(TORCH_LEGACY_MAGIC):
        torch = need_torch(path)
        obj, kind = tensors_to_numpy(torch, torch_load(torch, path, io.BytesIO(raw))), "torch.save (train_gpt.py)"
    else:
        obj, kind = load_pickle(raw, str(path)), "a numpy pickle (train_gpt_mlx.py)"
    return dequantize_upstream(obj, str(path)), kind
