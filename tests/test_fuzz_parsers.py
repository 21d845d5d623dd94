"""Fuzz the readers of files that come from outside: artifacts, weight files, shards and checkpoints.

Each reader gets valid files mutated by hypothesis (derandomized, so a run is reproducible): truncations,
flipped bytes, inserted bytes, huge integers written over size fields; plus hand-made cases for huge
declared sizes and wrong dtypes. The contract: every input is either read (and then is well-formed) or
refused with a one-line UserError; no other exception escapes. Every read runs under an address-space
limit a little above what the process already uses (Linux), so a reader that allocates from a declared
size instead of checking it first fails here with a MemoryError (or dies) instead of passing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import checkpoint as ck
from core.artifact import MAGIC, PREFIX_BYTES, _PREFIX, build_artifact, parse_artifact, read_artifact
from core.config import config_from_dict
from core.errors import UserError
from core.params import init_weights
from core.shards import HEADER_BYTES, SHARD_MAGIC, read_shard, write_shard
from core.weights import load_weights, save_weights

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HUGE = [2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
CFG = config_from_dict({"model": {"vocab_size": 64, "model_dim": 16, "num_heads": 2, "num_kv_heads": 1,
                                  "layer_plan": "2x2"}})
SPEC = CFG.model
HEADROOM = 768 << 20  # far above what any of these small files needs


@contextlib.contextmanager
def memory_cap():
    if not sys.platform.startswith("linux"):
        yield
        return
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + HEADROOM if hard == resource.RLIM_INFINITY else min(vm + HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def read_or_refuse(read, *args):
    """The reader's result, or None when it refused with a one-line UserError. Anything else fails the test."""
    with memory_cap():
        try:
            return read(*args)
        except UserError as e:
            assert "\n" not in str(e), str(e)
            return None


# ---- mutations ---------------------------------------------------------------------------------------

position = st.floats(0, 1, exclude_max=True)
mutations = st.lists(st.one_of(
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), position, st.integers(1, 12)),
    st.tuples(st.just("u64"), position, st.sampled_from(HUGE)),
    st.tuples(st.just("u32"), position, st.sampled_from([2**31 - 1, 2**32 - 1, 2**31])),
), min_size=1, max_size=4)


def mutate(data: bytes, ops, head: int | None = None) -> bytes:
    """Apply the ops; positions fall in the first `head` bytes (the header, where the parsing is) when given."""
    b = bytearray(data)
    for op in ops:
        span = max(1, min(len(b), head or len(b)))
        i = int(op[1] * span)
        if op[0] == "truncate":
            del b[i:]
        elif op[0] == "flip" and i < len(b):
            b[i] ^= op[2]
        elif op[0] == "insert":
            b[i:i] = op[2]
        elif op[0] == "delete":
            del b[i : i + op[2]]
        elif op[0] in ("u64", "u32"):
            fmt = "<Q" if op[0] == "u64" else "<I"
            b[i : i + struct.calcsize(fmt)] = struct.pack(fmt, op[2])
    return bytes(b)


def head_or_all():
    return st.sampled_from([True, False])


# ---- artifacts ---------------------------------------------------------------------------------------

def _artifact_weights():
    w = init_weights(SPEC, 0)
    w["blocks.0.mlp.fc.weight"] = (np.random.default_rng(0).standard_normal((260, 256)) * 0.05).astype(np.float32)
    return w  # one tensor large enough to be quantized (int8 + scales), the rest passthrough


ARTIFACTS = {codec: build_artifact(SPEC.to_dict(), _artifact_weights(), codec=codec) for codec in ("zlib", "zstd")}


def reseal(payload: bytes, codec="zlib", level=9, size=None) -> bytes:
    """A valid prefix (codec, length, SHA-256) around any payload, so the payload parser is reached."""
    import zstandard

    body = zlib.compress(payload, level) if codec == "zlib" else zstandard.ZstdCompressor(level=level).compress(payload)
    return _PREFIX.pack(MAGIC, 1, f"{codec}-{level}".encode(), len(payload) if size is None else size,
                        hashlib.sha256(payload).digest()) + body


ZLIB_PAYLOAD = zlib.decompress(ARTIFACTS["zlib"][PREFIX_BYTES:])


def check_artifact(blob: bytes) -> None:
    got = read_or_refuse(parse_artifact, blob)
    if got is not None:
        spec, qw, info = got
        assert isinstance(spec, dict) and info.total_bytes == len(blob)


@pytest.mark.slow
@FUZZ
@given(codec=st.sampled_from(["zlib", "zstd"]), ops=mutations, head=head_or_all())
def test_artifact_bytes(codec, ops, head):
    check_artifact(mutate(ARTIFACTS[codec], ops, PREFIX_BYTES + 16 if head else None))


@pytest.mark.slow
@FUZZ
@given(ops=mutations, head=head_or_all())
def test_artifact_payload_behind_a_valid_prefix(ops, head):
    (header_len,) = struct.unpack_from("<Q", ZLIB_PAYLOAD)
    check_artifact(reseal(mutate(ZLIB_PAYLOAD, ops, 8 + header_len if head else None)))


def _header_edit(edit):
    (n,) = struct.unpack_from("<Q", ZLIB_PAYLOAD)
    header = json.loads(ZLIB_PAYLOAD[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + ZLIB_PAYLOAD[8 + n :]


def _tensor(h, name="blocks.0.mlp.fc.weight"):
    return h["tensors"][name]


ARTIFACT_CASES = {
    "payload length 2**63": lambda: ARTIFACTS["zlib"][:36] + struct.pack("<Q", 2**63) + ARTIFACTS["zlib"][44:],
    "payload length 2**64-1": lambda: ARTIFACTS["zlib"][:36] + struct.pack("<Q", 2**64 - 1) + ARTIFACTS["zlib"][44:],
    "prefix declares more than the stream holds": lambda: reseal(ZLIB_PAYLOAD, size=len(ZLIB_PAYLOAD) * 1000),
    "zstd frame declaring 1 GiB": lambda: _zstd_bomb(),
    "shape 2**40 x 2**40": lambda: reseal(_header_edit(lambda h: _tensor(h).__setitem__("shape", [2**40, 2**40]))),
    "nbytes 2**62": lambda: reseal(_header_edit(lambda h: _tensor(h).__setitem__("nbytes", 2**62))),
    "data_nbytes 2**62": lambda: reseal(_header_edit(lambda h: h.__setitem__("data_nbytes", 2**62))),
    "dtype float64": lambda: reseal(_header_edit(lambda h: _tensor(h).__setitem__("dtype", "float64"))),
    "dtype object": lambda: reseal(_header_edit(lambda h: _tensor(h).__setitem__("dtype", "object"))),
    "dtype bfloat16": lambda: reseal(_header_edit(lambda h: _tensor(h).__setitem__("dtype", "bfloat16"))),
    "scale dtype int64": lambda: reseal(_header_edit(lambda h: _tensor(h)["scale"].__setitem__("dtype", "int64"))),
    "negative shape": lambda: reseal(_header_edit(lambda h: _tensor(h).__setitem__("shape", [-260, -256]))),
    "header length past the end": lambda: reseal(struct.pack("<Q", 2**40) + ZLIB_PAYLOAD[8:]),
    "header nested 100000 deep": lambda: reseal(struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000),
}


def _zstd_bomb():
    import zstandard

    size = 1 << 30
    c = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=size)
    frame = c.compress(b"\0" * 1000) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    return _PREFIX.pack(MAGIC, 1, b"zstd-22", size, bytes(32)) + frame


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_artifact_declared_sizes_and_dtypes(case, tmp_path):
    blob = ARTIFACT_CASES[case]()
    assert read_or_refuse(parse_artifact, blob) is None
    path = tmp_path / "a.art"
    path.write_bytes(blob)
    assert read_or_refuse(read_artifact, path) is None


# ---- weight files ------------------------------------------------------------------------------------

def _weight_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_weights(path, SPEC, init_weights(SPEC, 0))
    return path.read_bytes()


@pytest.fixture(scope="module")
def weight_bytes(tmp_path_factory):
    return _weight_bytes(tmp_path_factory)


def check_weights_file(path) -> None:
    got = read_or_refuse(load_weights, path)
    if got is not None:
        spec, weights = got
        assert spec == SPEC and all(v.dtype == np.float32 for v in weights.values())


@FUZZ
@given(ops=mutations, head=head_or_all())
def test_weight_file_bytes(ops, head, weight_bytes, tmp_path):
    path = tmp_path / "w.safetensors"
    n = struct.unpack_from("<Q", weight_bytes)[0]
    path.write_bytes(mutate(weight_bytes, ops, 8 + n if head else None))
    check_weights_file(path)


def _safetensors_edit(data: bytes, edit, data_bytes: bytes | None = None) -> bytes:
    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + (data[8 + n :] if data_bytes is None else data_bytes)


def _retype(h, name, dtype, itemsize):
    """Give tensor `name` another dtype with a consistent byte range (the file stays self-consistent)."""
    start, _ = h[name]["data_offsets"]
    h[name]["dtype"] = dtype
    h[name]["data_offsets"] = [start, start + itemsize * int(np.prod(h[name]["shape"]))]  # may leave a gap


def _entry(name, key, value):
    return lambda d: _safetensors_edit(d, lambda h: h[name].__setitem__(key, value))


def _spec_text(text):
    return _entry("__metadata__", "loopgolf.spec", text)


WEIGHT_CASES = {
    "header length 2**63": lambda d: struct.pack("<Q", 2**63) + d[8:],
    "header length 2**40": lambda d: struct.pack("<Q", 2**40) + d[8:],
    "shape 2**40 x 2**40": _entry("skip_weights", "shape", [2**40, 2**40]),
    "offsets to 2**62": _entry("skip_weights", "data_offsets", [0, 2**62]),
    "dtype BF16": lambda d: _safetensors_edit(d, lambda h: _retype(h, "skip_weights", "BF16", 2)),
    "dtype I8": lambda d: _safetensors_edit(d, lambda h: _retype(h, "skip_weights", "I8", 1)),
    "dtype BOOL": lambda d: _safetensors_edit(d, lambda h: _retype(h, "skip_weights", "BOOL", 1)),
    "dtype unknown": _entry("skip_weights", "dtype", "Q9"),
    "metadata not a table": lambda d: _safetensors_edit(d, lambda h: h.__setitem__("__metadata__", 5)),
    "spec not a string": _spec_text(5),
    "spec nested deep": _spec_text("[" * 100000),
    "spec 5000-digit int": _spec_text('{"model_dim": ' + "9" * 5000 + "}"),
    "spec vocab 2**40": _spec_text(json.dumps({**SPEC.to_dict(), "vocab_size": 2**40})),
    "spec width 2**40": _spec_text(json.dumps({**SPEC.to_dict(), "model_dim": 2**40})),
    "empty": lambda d: b"",
    "header only": lambda d: d[: 8 + struct.unpack_from("<Q", d)[0]],
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weight_file_declared_sizes_and_dtypes(case, weight_bytes, tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(WEIGHT_CASES[case](weight_bytes))
    assert read_or_refuse(load_weights, path) is None


# ---- shards ------------------------------------------------------------------------------------------

SHARD_TOKENS = np.random.default_rng(0).integers(0, 1024, 3000)


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "fineweb_train_000000.bin"
    write_shard(path, SHARD_TOKENS)
    return path.read_bytes()


def check_shard(path) -> None:
    got = read_or_refuse(read_shard, path)
    if got is not None:
        assert got.dtype == np.uint16 and got.size == (path.stat().st_size - HEADER_BYTES) // 2
        int(np.asarray(got, dtype=np.int64).sum())  # touch every token
        del got


@FUZZ
@given(ops=mutations, head=head_or_all())
def test_shard_bytes(ops, head, shard_bytes, tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(mutate(shard_bytes, ops, 16 if head else None))
    check_shard(path)


def _shard_header(data, index, value):
    return data[: 4 * index] + struct.pack("<i", value) + data[4 * index + 4 :]


SHARD_CASES = {
    "num_tokens 2**31-1": lambda d: _shard_header(d, 2, 2**31 - 1),
    "num_tokens -1": lambda d: _shard_header(d, 2, -1),
    "num_tokens -2**31": lambda d: _shard_header(d, 2, -(2**31)),
    "num_tokens one more": lambda d: _shard_header(d, 2, len(SHARD_TOKENS) + 1),
    "wrong magic": lambda d: _shard_header(d, 0, SHARD_MAGIC + 1),
    "version 2": lambda d: _shard_header(d, 1, 2),
    "odd length": lambda d: d[:-1],
    "header cut": lambda d: d[: HEADER_BYTES - 1],
    "empty": lambda d: b"",
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_shard_declared_sizes(case, shard_bytes, tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(SHARD_CASES[case](shard_bytes))
    assert read_or_refuse(read_shard, path) is None


# ---- checkpoints -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    shard = root / "fineweb_train_000000.bin"
    write_shard(shard, SHARD_TOKENS)
    rng = np.random.default_rng(0)
    optimizer = {k: rng.standard_normal(s).astype(np.float32) for k, s in ck.optimizer_shapes(SPEC).items()}
    meta = ck.checkpoint_meta(10.0, None, (0, 99), ck.shard_record([shard]), CFG, "mlx", 1, {})
    return ck.write_checkpoint(root / ck.DIR_NAME, 3, SPEC, init_weights(SPEC, 0), optimizer, meta)


@contextlib.contextmanager
def replaced(path, data: bytes):
    original = path.read_bytes()
    path.write_bytes(data)
    try:
        yield path
    finally:
        path.write_bytes(original)


@pytest.mark.slow
@FUZZ
@given(file=st.sampled_from([ck.WEIGHTS_FILE, ck.OPTIMIZER_FILE, ck.META_FILE]), ops=mutations, head=head_or_all())
def test_checkpoint_files(file, ops, head, checkpoint_dir):
    path = checkpoint_dir / file
    original = path.read_bytes()
    mutated = mutate(original, ops, 256 if head else None)
    run_dir = checkpoint_dir.parent.parent
    with replaced(path, mutated):
        got = read_or_refuse(ck.load_checkpoint, checkpoint_dir, SPEC)
        read_or_refuse(ck.resolve_resume, run_dir, CFG, [run_dir / "fineweb_train_000000.bin"])
    # The tensor files are covered by SHA-256: any change is refused. The JSON may survive a change that
    # keeps it valid (a digit in a timestamp), but then it still describes a loadable checkpoint.
    if file != ck.META_FILE and mutated != original:
        assert got is None


@FUZZ
@given(ops=mutations, head=head_or_all())
def test_optimizer_file_behind_the_checksum(ops, head, checkpoint_dir, tmp_path):
    """read_optimizer on its own (no SHA-256 in front): names, shapes, dtypes and sizes are checked."""
    data = (checkpoint_dir / ck.OPTIMIZER_FILE).read_bytes()
    path = tmp_path / ck.OPTIMIZER_FILE
    path.write_bytes(mutate(data, ops, 8 + struct.unpack_from("<Q", data)[0] if head else None))
    got = read_or_refuse(ck.read_optimizer, path, SPEC)
    if got is not None:
        assert {k: v.shape for k, v in got.items()} == ck.optimizer_shapes(SPEC)


def _meta_edit(edit):
    def apply(d):
        meta = json.loads(d)
        edit(meta)
        return json.dumps(meta).encode()
    return apply


CHECKPOINT_CASES = {
    "json nested deep": (ck.META_FILE, lambda d: b"[" * 100000),
    "json 5000-digit step": (ck.META_FILE, lambda d: d.replace(b'"step": 3', b'"step": ' + b"9" * 5000)),
    "json step 2**62": (ck.META_FILE, _meta_edit(lambda m: m.__setitem__("step", 2**62))),
    "json position 2**62": (ck.META_FILE, _meta_edit(lambda m: m["data"].__setitem__("pos", 2**62))),
    "json file size 2**62": (ck.META_FILE, _meta_edit(lambda m: m["files"][ck.WEIGHTS_FILE].update(bytes=2**62))),
    "json files not a table": (ck.META_FILE, _meta_edit(lambda m: m.__setitem__("files", [1]))),
    "json schedule string": (ck.META_FILE, _meta_edit(lambda m: m.__setitem__("schedule", "x"))),
    "json config tables missing": (ck.META_FILE, _meta_edit(lambda m: m["config"].pop("optim"))),
    "json not utf-8": (ck.META_FILE, lambda d: b"\xff\xfe" + d),
    "optimizer shape 2**40": (ck.OPTIMIZER_FILE, lambda d: _safetensors_edit(
        d, lambda h: h["adam_m.skip_weights"].__setitem__("shape", [2**40, 2**40]))),
    "optimizer dtype F64": (ck.OPTIMIZER_FILE, lambda d: _safetensors_edit(
        d, lambda h: h["adam_m.skip_weights"].__setitem__("dtype", "F64"))),
    "optimizer header length 2**63": (ck.OPTIMIZER_FILE, lambda d: struct.pack("<Q", 2**63) + d[8:]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_declared_sizes_and_dtypes(case, checkpoint_dir, tmp_path):
    file, damage = CHECKPOINT_CASES[case]
    path = checkpoint_dir / file
    with replaced(path, damage(path.read_bytes())):
        assert read_or_refuse(ck.load_checkpoint, checkpoint_dir, SPEC) is None
        if file == ck.OPTIMIZER_FILE:  # without the checksum in front, too
            assert read_or_refuse(ck.read_optimizer, path, SPEC) is None
