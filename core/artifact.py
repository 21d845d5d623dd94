"""The artifact: quantized weights plus the model spec, serialized without pickle, compressed, byte for
byte deterministic. Reading it never executes code and refuses any malformed file with a UserError.

Layout (all integers little-endian):

    prefix, 76 bytes, uncompressed
      18  magic b"LOOPGOLF-ARTIFACT\\x00"
       2  u16 format version (1)
      16  codec label, ASCII, NUL-padded: "zlib-9", "zstd-22", "lzma-9", "brotli-11"; "bsS+" in front
          ("bs2+brotli-11") when the payload was byte-shuffled with stride S before compression
       8  u64 uncompressed payload length
      32  SHA-256 of the uncompressed payload
    the payload, compressed with that codec, to the end of the file

    payload
       8  u64 header length H
       H  header: canonical JSON (sorted keys, no spaces, ASCII)
          {"data_nbytes": D, "scheme": "int8", "spec": {...},
           "tensors": {name: {"role": "quantized"|"passthrough", "dtype": "int8", "shape": [r, c],
                              "offset": o, "nbytes": n,
                              "scale": null | {"dtype": "float16", "shape": [r], "offset": o, "nbytes": n}}}}
       D  data: each tensor's array then its scale array, tensors in name order, back to back, raw
          little-endian C order; offsets are relative to the start of the data section

Byte shuffle (#1394/#1493's, there with stride 2 before brotli): the payload's bytes split into S planes,
bytes 0, S, 2S, ... then 1, S+1, ... (the low and high bytes of fp16 scales and of int16/fp32 data land in
planes of their own, which compress better). It keeps the length, so the prefix's length and SHA-256 are the
unshuffled payload's, and every codec's decompression stays capped at that declared length.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import zstandard

from core.atomic import atomic_write_bytes
from core.errors import UserError
from core.quant import (
    ROLE_PASSTHROUGH, ROLE_QUANTIZED, QuantizedTensor, QuantizedWeights, dequantize_weights, get_scheme,
    is_control_name, quantize_weights,
)
from core.size import CHALLENGE_LIMIT

MAGIC = b"LOOPGOLF-ARTIFACT\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<18sH16sQ32s")
PREFIX_BYTES = _PREFIX.size
MAX_PAYLOAD_BYTES = 1 << 30  # refuse to inflate anything bigger: the whole budget is 16 MB
_MAX_NDIM = 8

# Stored dtypes, all little-endian. Floats other than fp16/fp32 never reach an artifact (see quant).
_DTYPES = {name: np.dtype(code) for name, code in (
    ("bool", "|b1"), ("int8", "|i1"), ("uint8", "|u1"), ("int16", "<i2"), ("uint16", "<u2"),
    ("int32", "<i4"), ("uint32", "<u4"), ("int64", "<i8"), ("uint64", "<u8"),
    ("float16", "<f2"), ("float32", "<f4"),
)}


class _Malformed(Exception):
    """Why a file is not a valid artifact; turned into a UserError naming the file."""


# ---- codecs ------------------------------------------------------------------------------------------

def _inflate_capped(d, data: bytes, size: int) -> bytes:
    """Run a zlib or lzma decompressor object, never inflating more than one byte past `size`."""
    out = d.decompress(data, size + 1)
    if len(out) > size:
        raise _Malformed(f"the payload inflates to more than the declared {size} bytes")
    if not d.eof:
        raise _Malformed("the compressed payload is truncated")
    if d.unused_data:
        raise _Malformed(f"{len(d.unused_data)} stray bytes follow the compressed payload")
    return out


def _zstd_compress(data: bytes, level: int) -> bytes:
    # threads=0: single-threaded, so the output depends only on the input, the level and the library.
    return zstandard.ZstdCompressor(level=level, threads=0, write_content_size=True).compress(data)


# Compressed bytes fed to zstd per call. python-zstandard's streaming decompressor has no output limit (zlib's
# and lzma's take max_length), so the cap is kept by feeding small pieces: a zstd block needs at least 4 bytes
# (an RLE block) for its at most 128 KiB, so one piece inflates to at most 32 MiB past the cap.
_ZSTD_PIECE = 1 << 10


def _zstd_decompress(data: bytes, size: int) -> bytes:
    """Inflate one zstd frame to at most `size` bytes, whatever its header declares (or leaves out)."""
    content = zstandard.get_frame_parameters(data).content_size
    if content not in (size, zstandard.CONTENTSIZE_UNKNOWN):
        raise _Malformed(f"the zstd frame declares {content} bytes, the prefix {size}")
    stream = zstandard.ZstdDecompressor().decompressobj()
    out, produced, view = [], 0, memoryview(data)
    for start in range(0, len(data), _ZSTD_PIECE):
        piece = stream.decompress(view[start : start + _ZSTD_PIECE])
        produced += len(piece)
        if produced > size:
            raise _Malformed(f"the payload inflates to more than the declared {size} bytes")
        out.append(piece)
        if stream.eof:
            stray = len(stream.unused_data) + max(0, len(data) - start - _ZSTD_PIECE)
            if stray:
                raise _Malformed(f"{stray} bytes follow the zstd frame")
            break
    if not stream.eof:
        raise _Malformed("the compressed payload is truncated")
    out = b"".join(out)
    if len(out) != size:
        raise _Malformed(f"the payload inflates to {len(out)} bytes, the prefix declares {size}")
    return out


BROTLI_MISSING = "the brotli codec needs the brotli package (pip install 'brotli>=1.2')"


def _brotli_compress(data: bytes, level: int) -> bytes:
    try:
        import brotli  # here, not at the top: only a brotli artifact needs the package
    except ImportError:
        raise UserError(BROTLI_MISSING) from None
    return brotli.compress(data, quality=level)  # single-threaded and deterministic for a given library


def _brotli_decompress(data: bytes, size: int) -> bytes:
    try:
        import brotli
    except ImportError:
        raise _Malformed(BROTLI_MISSING) from None
    d = brotli.Decompressor()
    try:
        # output_buffer_limit (brotli >= 1.2) stops the output growing much past size + 1, whatever the stream
        # says; the decoder may hand its output over in pieces, so ask (with no more input) until it has none.
        out = d.process(data, output_buffer_limit=size + 1)
        while len(out) <= size and not d.is_finished():
            more = d.process(b"", output_buffer_limit=size + 1 - len(out))
            if not more:
                break
            out += more
    except brotli.error as e:
        raise _Malformed(f"the brotli payload does not decompress ({e})") from None
    if len(out) > size:
        raise _Malformed(f"the payload inflates to more than the declared {size} bytes")
    if not d.is_finished():
        raise _Malformed("the compressed payload is truncated")
    return out


BYTE_SHUFFLE_STRIDES = range(2, 9)


def shuffle_bytes(data: bytes, stride: int) -> bytes:
    """The payload as `stride` byte planes, plane i holding bytes i, i + stride, ... (see the module docstring)."""
    a = np.frombuffer(data, dtype=np.uint8)
    return b"".join(a[i::stride].tobytes() for i in range(stride))


def unshuffle_bytes(data: bytes, stride: int) -> bytes:
    a = np.frombuffer(data, dtype=np.uint8)
    out = np.empty_like(a)
    start = 0
    for i in range(stride):
        n = len(range(i, len(a), stride))
        out[i::stride] = a[start : start + n]
        start += n
    return out.tobytes()


def _lzma_compress(data: bytes, level: int) -> bytes:
    # No xz integrity check: the prefix's SHA-256 covers the payload already.
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=level)


@dataclass(frozen=True)
class _Codec:
    default_level: int
    levels: range
    compress: Callable[[bytes, int], bytes]
    decompress: Callable[[bytes, int], bytes]


CODECS: dict[str, _Codec] = {
    "zlib": _Codec(9, range(0, 10), lambda data, level: zlib.compress(data, level),
                   lambda data, size: _inflate_capped(zlib.decompressobj(), data, size)),
    "zstd": _Codec(22, range(1, 23), _zstd_compress, _zstd_decompress),
    # memlimit: an xz header can ask for a huge dictionary; preset 9 needs 65 MiB.
    "lzma": _Codec(9, range(0, 10), _lzma_compress,
                   lambda data, size: _inflate_capped(lzma.LZMADecompressor(lzma.FORMAT_XZ, 256 << 20), data, size)),
    "brotli": _Codec(11, range(0, 12), _brotli_compress, _brotli_decompress),
}
_DECODE_ERRORS = (zlib.error, lzma.LZMAError, zstandard.ZstdError, MemoryError)


def codec_label(codec: str, level: int, byte_shuffle: int = 0) -> str:
    """The prefix's codec label: "zlib-9", "bs2+brotli-11"."""
    return f"bs{byte_shuffle}+{codec}-{level}" if byte_shuffle else f"{codec}-{level}"


def _resolve_codec(codec: str, level: int | None) -> tuple[_Codec, int]:
    if codec not in CODECS:
        raise UserError(f"unknown artifact codec {codec!r}; known: {', '.join(CODECS)}")
    c = CODECS[codec]
    level = c.default_level if level is None else level
    if isinstance(level, bool) or not isinstance(level, int) or level not in c.levels:
        raise UserError(f"codec {codec} takes a level in {c.levels.start}..{c.levels.stop - 1}, got {level!r}")
    return c, level


# ---- the info a caller gets back ---------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: str
    dtype: str  # as stored
    shape: tuple[int, ...]
    raw_bytes: int  # float32 bytes for a float tensor, the exact bytes otherwise
    stored_bytes: int  # data + scale, uncompressed


@dataclass(frozen=True)
class ArtifactInfo:
    total_bytes: int  # the whole artifact: prefix + compressed payload (what the challenge counts)
    payload_bytes: int  # uncompressed payload: header + data
    header_bytes: int
    payload_sha256: str
    codec: str
    level: int
    scheme: str
    tensors: tuple[TensorInfo, ...]
    gptq: dict | None = None  # the header's "gptq" record (core.gptq), None for an artifact without GPTQ
    byte_shuffle: int = 0  # the byte-shuffle stride applied before compression (0: none)

    @property
    def codec_label(self) -> str:
        return codec_label(self.codec, self.level, self.byte_shuffle)


def _tensor_info(name: str, t: QuantizedTensor) -> TensorInfo:
    numel = int(t.data.size)
    raw = numel * 4 if t.is_float else int(t.data.nbytes)
    return TensorInfo(name, t.role, t.data.dtype.name, t.shape, raw, t.stored_bytes)


# ---- writing -----------------------------------------------------------------------------------------

def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _array_bytes(name: str, arr: np.ndarray) -> tuple[str, bytes]:
    dtype_name = arr.dtype.name
    if dtype_name not in _DTYPES:
        raise UserError(f"tensor {name!r} has dtype {arr.dtype}, which an artifact cannot store")
    return dtype_name, np.ascontiguousarray(arr, dtype=_DTYPES[dtype_name]).tobytes()


def _encode_payload(spec_json: dict, qw: QuantizedWeights) -> tuple[bytes, int]:
    if not isinstance(spec_json, dict):
        raise TypeError(f"the spec must be a JSON object (dict), got {type(spec_json).__name__}")
    entries: dict[str, dict] = {}
    chunks: list[bytes] = []
    cursor = 0

    def place(name: str, arr: np.ndarray) -> dict:
        nonlocal cursor
        dtype_name, raw = _array_bytes(name, arr)
        entry = {"dtype": dtype_name, "shape": list(arr.shape), "offset": cursor, "nbytes": len(raw)}
        chunks.append(raw)
        cursor += len(raw)
        return entry

    for name in sorted(qw.tensors):
        t = qw.tensors[name]
        entry = {"role": t.role, **place(name, t.data)}
        entry["scale"] = None if t.scale is None else place(name, t.scale)
        entries[name] = entry
    header = {"data_nbytes": cursor, "scheme": qw.scheme, "spec": spec_json, "tensors": entries}
    if qw.gptq is not None:  # only then: artifacts without GPTQ keep their bytes
        header["gptq"] = qw.gptq
    header = canonical_json(header)
    return struct.pack("<Q", len(header)) + header + b"".join(chunks), len(header)


def encode_payload(spec_json: dict, qw: QuantizedWeights) -> tuple[bytes, int]:
    """The uncompressed payload of already-quantized weights and its header length (for size tools)."""
    return _encode_payload(spec_json, qw)


def encode_artifact(spec_json: dict, qw: QuantizedWeights, codec: str = "zlib",
                    level: int | None = None, byte_shuffle: int = 0) -> tuple[bytes, ArtifactInfo]:
    """Serialize already-quantized weights: (artifact bytes, its info). byte_shuffle: a stride (0: none)."""
    c, level = _resolve_codec(codec, level)
    if isinstance(byte_shuffle, bool) or byte_shuffle not in (0, *BYTE_SHUFFLE_STRIDES):
        raise UserError(f"byte shuffle stride {byte_shuffle!r}: expected 0 (none) or "
                        f"{BYTE_SHUFFLE_STRIDES.start}..{BYTE_SHUFFLE_STRIDES.stop - 1}")
    payload, header_len = _encode_payload(spec_json, qw)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise UserError(f"the artifact payload is {len(payload):,} bytes, over the {MAX_PAYLOAD_BYTES:,} limit")
    digest = hashlib.sha256(payload).digest()
    label = codec_label(codec, level, byte_shuffle).encode("ascii")
    stored = shuffle_bytes(payload, byte_shuffle) if byte_shuffle else payload
    blob = _PREFIX.pack(MAGIC, FORMAT_VERSION, label, len(payload), digest) + c.compress(stored, level)
    info = ArtifactInfo(len(blob), len(payload), header_len, digest.hex(), codec, level, qw.scheme,
                        tuple(_tensor_info(n, t) for n, t in sorted(qw.tensors.items())), qw.gptq, byte_shuffle)
    return blob, info


def payload_bytes(spec_json: dict, weights: Mapping[str, np.ndarray], scheme: str = "int8") -> bytes:
    """The uncompressed payload (header + data): its SHA-256 identifies the model across codecs."""
    return _encode_payload(spec_json, quantize_weights(weights, scheme))[0]


def build_artifact(spec_json: dict, weights: Mapping[str, np.ndarray], scheme: str = "int8",
                   codec: str = "zlib", level: int | None = None, byte_shuffle: int = 0) -> bytes:
    return encode_artifact(spec_json, quantize_weights(weights, scheme), codec, level, byte_shuffle)[0]


def write_quantized(path: str | os.PathLike, spec_json: dict, qw: QuantizedWeights, codec: str = "zlib",
                    level: int | None = None, byte_shuffle: int = 0) -> ArtifactInfo:
    """Write already-quantized weights (e.g. core.gptq's) as an artifact file."""
    blob, info = encode_artifact(spec_json, qw, codec, level, byte_shuffle)
    atomic_write_bytes(path, blob)
    return info


def write_artifact(path: str | os.PathLike, spec_json: dict, weights: Mapping[str, np.ndarray],
                   scheme: str = "int8", codec: str = "zlib", level: int | None = None,
                   byte_shuffle: int = 0) -> ArtifactInfo:
    blob, info = encode_artifact(spec_json, quantize_weights(weights, scheme), codec, level, byte_shuffle)
    atomic_write_bytes(path, blob)
    return info


# ---- reading -----------------------------------------------------------------------------------------

def _decompress_prefixed(data: bytes) -> tuple[bytes, str, int, str, int]:
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise _Malformed("not a loopgolf artifact (bad magic)")
    if len(data) < PREFIX_BYTES:
        raise _Malformed(f"truncated: {len(data)} bytes, shorter than the {PREFIX_BYTES}-byte prefix")
    _, version, label, size, digest = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise _Malformed(f"artifact format version {version}; this loopgolf reads version {FORMAT_VERSION}")
    m = re.fullmatch(rb"(?:bs([2-8])\+)?([a-z]+)-([0-9]{1,2})\x00*", label)
    if not m or m[2].decode() not in CODECS:
        raise _Malformed(f"unknown codec {label.rstrip(bytes(1))!r}; known: {', '.join(CODECS)} "
                         "(each optionally behind a byte shuffle, bs2+ .. bs8+)")
    shuffle, codec, level = int(m[1] or 0), m[2].decode(), int(m[3])
    if level not in CODECS[codec].levels:
        raise _Malformed(f"codec {codec} level {level} is out of range")
    if size > MAX_PAYLOAD_BYTES:
        raise _Malformed(f"declares a {size:,}-byte payload, over the {MAX_PAYLOAD_BYTES:,}-byte limit")
    try:
        payload = CODECS[codec].decompress(data[PREFIX_BYTES:], size)
    except _DECODE_ERRORS as e:
        raise _Malformed(f"the {codec} payload does not decompress ({e})") from None
    if len(payload) != size:
        raise _Malformed(f"the payload is {len(payload)} bytes, the prefix declares {size}")
    if shuffle:
        payload = unshuffle_bytes(payload, shuffle)
    if hashlib.sha256(payload).digest() != digest:
        raise _Malformed("checksum mismatch: the payload's SHA-256 differs from the prefix's")
    return payload, codec, level, digest.hex(), shuffle


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Malformed("the header JSON repeats a key")
    return dict(pairs)


def _reject_constant(name: str):
    raise _Malformed(f"the header JSON contains {name}")


def _expect_keys(obj, keys: set[str], what: str) -> dict:
    if not isinstance(obj, dict) or set(obj) != keys:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise _Malformed(f"{what} should have exactly the keys {sorted(keys)}, got {got}")
    return obj


def _expect_int(value, what: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= upper:
        raise _Malformed(f"{what} should be an integer in 0..{upper}, got {value!r}")
    return value


def _read_array(entry, what: str, data: bytes, cursor: int) -> tuple[np.ndarray, int]:
    """One array from the data section, after checking its entry against the bytes really there."""
    entry = _expect_keys(entry, {"dtype", "shape", "offset", "nbytes"}, what)
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise _Malformed(f"{what} has unknown dtype {entry['dtype']!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
        raise _Malformed(f"{what} shape should be a list of at most {_MAX_NDIM} sizes, got {shape!r}")
    shape = tuple(_expect_int(d, f"{what} shape", MAX_PAYLOAD_BYTES) for d in shape)
    # Bound the product of the nonzero sizes: even a zero-size array needs a shape numpy can represent.
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_PAYLOAD_BYTES:
        raise _Malformed(f"{what} shape {list(shape)} is implausibly large")
    offset = _expect_int(entry["offset"], f"{what} offset", MAX_PAYLOAD_BYTES)
    nbytes = _expect_int(entry["nbytes"], f"{what} nbytes", MAX_PAYLOAD_BYTES)
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise _Malformed(f"{what} is {nbytes} bytes, but {entry['dtype']}{list(shape)} needs "
                         f"{math.prod(shape) * dtype.itemsize}")
    # Arrays lie back to back in name order: anything else is not a file this module wrote.
    if offset != cursor:
        raise _Malformed(f"{what} starts at data offset {offset}, expected {cursor}")
    if offset + nbytes > len(data):
        raise _Malformed(f"{what} runs past the end of the data section ({offset}+{nbytes} > {len(data)})")
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise _Malformed(f"{what} is bool but holds bytes other than 0 and 1")
    return arr.astype(dtype.newbyteorder("="), copy=True), offset + nbytes


def _parse_payload(payload: bytes) -> tuple[dict, QuantizedWeights, int]:
    if len(payload) < 8:
        raise _Malformed("the payload is too short to hold a header length")
    (header_len,) = struct.unpack_from("<Q", payload)
    if header_len > len(payload) - 8:
        raise _Malformed(f"the header length {header_len} runs past the {len(payload)}-byte payload")
    raw_header = payload[8 : 8 + header_len]
    try:
        header = json.loads(raw_header.decode("ascii"), object_pairs_hook=_no_duplicate_keys,
                            parse_constant=_reject_constant)
        canonical = canonical_json(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _Malformed(f"the header is not valid JSON ({e})") from None
    if canonical != raw_header:
        raise _Malformed("the header JSON is not in canonical form")
    keys = {"data_nbytes", "scheme", "spec", "tensors"} | ({"gptq"} & set(header) if isinstance(header, dict) else set())
    header = _expect_keys(header, keys, "the header")
    if not isinstance(header["spec"], dict):
        raise _Malformed("the header's spec should be a JSON object")
    if not isinstance(header["tensors"], dict):
        raise _Malformed("the header's tensors should be a JSON object")
    try:
        scheme = get_scheme(header["scheme"])
    except UserError as e:
        raise _Malformed(str(e)) from None
    data = payload[8 + header_len :]
    if header["data_nbytes"] != len(data) or isinstance(header["data_nbytes"], bool):
        raise _Malformed(f"the header declares {header['data_nbytes']!r} data bytes, the payload holds {len(data)}")

    tensors: dict[str, QuantizedTensor] = {}
    cursor = 0
    for name in sorted(header["tensors"]):
        what = f"tensor {name!r}"
        entry = _expect_keys(header["tensors"][name], {"role", "dtype", "shape", "offset", "nbytes", "scale"}, what)
        if entry["role"] not in (ROLE_QUANTIZED, ROLE_PASSTHROUGH):
            raise _Malformed(f"{what} has unknown role {entry['role']!r}")
        arr, cursor = _read_array({k: entry[k] for k in ("dtype", "shape", "offset", "nbytes")}, what, data, cursor)
        scale = None
        if entry["scale"] is not None:
            scale, cursor = _read_array(entry["scale"], f"{what} scale", data, cursor)
        t = QuantizedTensor(entry["role"], arr, scale)
        reason = scheme.check_tensor(name, t)
        if reason:
            raise _Malformed(f"{what}: {reason}")
        tensors[name] = t
    if cursor != len(data):
        raise _Malformed(f"{len(data) - cursor} data bytes belong to no tensor")
    gptq = header.get("gptq")
    if gptq is not None:
        listed = gptq.get("tensors") if isinstance(gptq, dict) else None
        if not isinstance(listed, list) or not all(isinstance(n, str) and n in tensors and
                                                   tensors[n].role == ROLE_QUANTIZED for n in listed):
            raise _Malformed("the header's gptq record should list quantized tensors of this file")
    return header["spec"], QuantizedWeights(scheme.name, tensors, gptq), header_len


def parse_artifact(data: bytes, source: str = "<bytes>") -> tuple[dict, QuantizedWeights, ArtifactInfo]:
    """Check and decode artifact bytes: (spec JSON, quantized weights, info). UserError on any defect."""
    try:
        payload, codec, level, digest, shuffle = _decompress_prefixed(data)
        spec, qw, header_len = _parse_payload(payload)
    except _Malformed as e:
        raise UserError(f"artifact {source}: {e}") from None
    info = ArtifactInfo(len(data), len(payload), header_len, digest, codec, level, qw.scheme,
                        tuple(_tensor_info(n, t) for n, t in qw.tensors.items()), qw.gptq, shuffle)
    return spec, qw, info


def load_quantized(path: str | os.PathLike) -> tuple[dict, QuantizedWeights, ArtifactInfo]:
    try:
        size = os.path.getsize(path)
        if size > MAX_PAYLOAD_BYTES + (1 << 20):
            raise UserError(f"artifact {path}: {size:,} bytes is far too large to be an artifact")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"artifact {path}: cannot read it ({e.strerror or e})") from None
    return parse_artifact(data, str(path))


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], ArtifactInfo]:
    """(spec JSON, dequantized weights, info) from an artifact file."""
    spec, qw, info = load_quantized(path)
    return spec, dequantize_weights(qw), info


# ---- size report -------------------------------------------------------------------------------------

def tensor_group(name: str) -> str:
    """tok_emb, blocks.N.attn, blocks.N.mlp, scalars (control tensors), lm_head, ..."""
    if is_control_name(name):
        return "scalars"
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) >= 4:
        return ".".join(parts[:3])
    if parts[0] == "blocks" and len(parts) >= 2:
        return ".".join(parts[:2])
    return parts[0]


def _natural_key(s: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s)]


def size_report(info: ArtifactInfo, code_bytes: int) -> str:
    """What the challenge counts, per tensor group then in total, as a small table for a terminal."""
    groups: dict[str, list[int]] = {}
    for t in info.tensors:
        g = groups.setdefault(tensor_group(t.name), [0, 0, 0])
        g[0] += 1
        g[1] += t.raw_bytes
        g[2] += t.stored_bytes
    w = 24
    lines = [f"{'group':<{w}} {'tensors':>8} {'raw fp32 B':>14} {'stored B':>14}"]
    for name in sorted(groups, key=_natural_key):
        n, raw, stored = groups[name]
        lines.append(f"{name:<{w}} {n:>8,} {raw:>14,} {stored:>14,}")
    raw_total = sum(t.raw_bytes for t in info.tensors)
    lines.append(f"{'all tensors':<{w}} {len(info.tensors):>8,} {raw_total:>14,} "
                 f"{info.payload_bytes - info.header_bytes - 8:>14,}")
    total = code_bytes + info.total_bytes
    margin = CHALLENGE_LIMIT - total
    verdict = f"margin {margin:,}" if margin >= 0 else f"OVER by {-margin:,}"
    lines += [
        f"payload (header {info.header_bytes:,} B + data), uncompressed: {info.payload_bytes:,} B",
        f"artifact ({info.scheme}, {info.codec_label}): {info.total_bytes:,} B",
        *([f"GPTQ: {len(info.gptq['tensors'])} tensors, damp {info.gptq.get('damp')}, block {info.gptq.get('block')}"]
          if info.gptq else []),
        f"code: {code_bytes:,} B",
        f"total: {total:,} B of {CHALLENGE_LIMIT:,}  {verdict}",
    ]
    return "\n".join(lines)
