"""core.artifact: round trip per codec, byte-for-byte determinism, the size report, and a reader that
refuses every malformed file with a UserError and nothing else."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import pytest
import zstandard

from core.artifact import (
    MAGIC, PREFIX_BYTES, CODECS, build_artifact, canonical_json, encode_artifact, load_quantized,
    parse_artifact, payload_bytes, read_artifact, size_report, write_artifact,
)
from core.errors import UserError
from core.quant import dequantize_weights, quantize_weights

SPEC = {"model_dim": 8, "layer_plan": [0, 1, 0, 1], "name": "fake", "rope_base": 10000.0}
LEN_AT, SHA_AT = 36, 44  # prefix offsets: payload length (u64), SHA-256 (32 bytes)


def make_weights(seed: int = 0, big: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        "tok_emb.weight": (rng.standard_normal((40, 16)) * 0.02).astype(np.float32),
        "blocks.0.attn.q_gain": np.full(4, 1.5, np.float32),
        "blocks.0.attn_scale": np.ones(16, np.float32),
        "blocks.0.resid_mix": np.stack([np.ones(16), np.zeros(16)]).astype(np.float32),
        "blocks.1.mlp.fc.weight": (rng.standard_normal((32, 16)) * 0.1).astype(np.float32),
        "positions": np.arange(12, dtype=np.int32),
        "mask": np.array([True, False, True]),
    }
    if big:
        w["blocks.0.mlp.fc.weight"] = (rng.standard_normal((260, 256)) * 0.05).astype(np.float32)
        w["stack"] = (rng.standard_normal((2, 180, 200)) * 0.1).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def weights():
    return make_weights()


def reseal(payload: bytes, codec: str = "zlib", level: int = 9) -> bytes:
    """An artifact around any payload, with a correct prefix and checksum: reaches the payload checks."""
    label = f"{codec}-{level}".encode()
    prefix = MAGIC + struct.pack("<H", 1) + label.ljust(16, b"\0") + struct.pack("<Q", len(payload))
    return prefix + hashlib.sha256(payload).digest() + CODECS[codec].compress(payload, level)


def split_payload(payload: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", payload)
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def join_payload(header, data: bytes, raw_header: bytes | None = None) -> bytes:
    raw = canonical_json(header) if raw_header is None else raw_header
    return struct.pack("<Q", len(raw)) + raw + data


def refused(blob: bytes, match: str | None = None) -> None:
    with pytest.raises(UserError, match=match) as e:
        parse_artifact(blob, "art.bin")
    assert "art.bin" in str(e.value) and "\n" not in str(e.value)


# ---- round trip and determinism ---------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["zlib", "zstd", "lzma", "brotli"])
def test_round_trip(tmp_path, weights, codec):
    path = tmp_path / "model.art"
    info = write_artifact(path, SPEC, weights, codec=codec)
    spec, deq, info2 = read_artifact(path)
    assert spec == SPEC and info2 == info and info.total_bytes == path.stat().st_size
    assert info.codec == codec and info.level == CODECS[codec].default_level and info.scheme == "int8"
    expected = dequantize_weights(quantize_weights(weights))
    assert sorted(deq) == sorted(weights)
    for name in weights:
        assert deq[name].dtype == expected[name].dtype and deq[name].shape == weights[name].shape
        np.testing.assert_array_equal(deq[name], expected[name])
    assert [p.name for p in tmp_path.iterdir()] == ["model.art"]  # no temp file left behind


def test_round_trip_keeps_quantized_form(weights):
    blob = build_artifact(SPEC, weights)
    _, qw, _ = parse_artifact(blob)
    direct = quantize_weights(weights)
    for name, t in direct.tensors.items():
        got = qw.tensors[name]
        assert got.role == t.role and got.data.dtype == t.data.dtype
        np.testing.assert_array_equal(got.data, t.data)
        assert (got.scale is None) == (t.scale is None)
        if t.scale is not None:
            assert got.scale.dtype == t.scale.dtype
            np.testing.assert_array_equal(got.scale, t.scale)


@pytest.mark.parametrize("codec", ["zlib", "zstd", "lzma"])
def test_deterministic_bytes(weights, codec):
    one = build_artifact(SPEC, weights, codec=codec)
    reordered = {k: weights[k].copy() for k in reversed(list(weights))}
    two = build_artifact(dict(reversed(list(SPEC.items()))), reordered, codec=codec)
    assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()
    p1, p2 = payload_bytes(SPEC, weights), payload_bytes(SPEC, reordered)
    assert hashlib.sha256(p1).digest() == hashlib.sha256(p2).digest()
    # The prefix records the payload's SHA-256, the same whichever codec compressed it.
    assert one[SHA_AT : SHA_AT + 32] == hashlib.sha256(p1).digest()
    assert parse_artifact(one)[2].payload_sha256 == hashlib.sha256(p1).hexdigest()


def test_zstd_level_is_recorded(weights):
    blob, info = encode_artifact(SPEC, quantize_weights(weights), codec="zstd", level=3)
    assert b"zstd-3\0" in blob[:PREFIX_BYTES] and info.codec_label == "zstd-3"
    assert parse_artifact(blob)[2].level == 3
    assert blob == encode_artifact(SPEC, quantize_weights(weights), codec="zstd", level=3)[0]
    assert blob[PREFIX_BYTES:] != build_artifact(SPEC, weights, codec="zstd")[PREFIX_BYTES:]


def test_bad_codec_or_level_at_build(weights):
    for codec, level in [("lz4", None), ("brotli", 12), ("zlib", 10), ("zstd", 0), ("lzma", -1), ("zlib", True)]:
        with pytest.raises(UserError):
            build_artifact(SPEC, weights, codec=codec, level=level)


def test_empty_and_zero_size_tensors():
    w = {"nothing": np.zeros((0, 5), np.float32), "none": np.zeros(0, np.int64)}
    spec, qw, info = parse_artifact(build_artifact({}, w))
    deq = dequantize_weights(qw)
    assert spec == {} and deq["nothing"].shape == (0, 5) and deq["none"].dtype == np.int64
    assert info.total_bytes > PREFIX_BYTES and len(info.tensors) == 2
    assert parse_artifact(build_artifact({}, {}))[1].tensors == {}


# ---- size report --------------------------------------------------------------------------------------

def test_size_report(weights):
    w = dict(weights)
    w["blocks.10.attn.c_q.weight"] = w["blocks.2.attn.c_q.weight"] = weights["blocks.0.mlp.fc.weight"]
    blob, info = encode_artifact(SPEC, quantize_weights(w))
    ok = size_report(info, 1_000)
    for group in ("tok_emb", "blocks.0.mlp", "blocks.1.mlp", "scalars", "positions", "stack"):
        assert f"\n{group} " in ok
    assert ok.index("blocks.2.attn") < ok.index("blocks.10.attn")
    assert f"{info.total_bytes + 1_000:,}" in ok and "margin" in ok and "OVER" not in ok
    over = size_report(info, 16_000_000)
    assert f"OVER by {info.total_bytes:,}" in over
    rows = {line.split()[0]: line.split() for line in ok.splitlines()}
    assert rows["blocks.0.mlp"][2] == f"{260 * 256 * 4:,}"  # raw fp32 bytes
    assert rows["blocks.0.mlp"][3] == f"{260 * 256 + 260 * 2:,}"  # int8 codes + fp16 row scales


# ---- malformed files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_blobs():
    w = make_weights(1, big=False)
    w["q"] = (np.random.default_rng(1).standard_normal((257, 256)) * 0.1).astype(np.float32)
    return {codec: build_artifact(SPEC, w, codec=codec) for codec in CODECS}


def test_prefix_defects(small_blobs):
    blob = small_blobs["zlib"]
    refused(b"PK\x03\x04" + blob[4:], "bad magic")
    refused(MAGIC[:10], "truncated")
    refused(blob[:18] + struct.pack("<H", 2) + blob[20:], "version 2")
    refused(blob[:20] + b"lz4-9".ljust(16, b"\0") + blob[36:], "unknown codec")
    refused(blob[:20] + b"bs9+zlib-9".ljust(16, b"\0") + blob[36:], "unknown codec")
    refused(blob[:20] + b"bs2+zlib-9".ljust(16, b"\0") + blob[36:], "checksum")  # not shuffled: other bytes
    refused(blob[:20] + b"zlib-42".ljust(16, b"\0") + blob[36:], "out of range")
    refused(blob[:20] + b"zlib-9\0x".ljust(16, b"\0") + blob[36:], "unknown codec")
    refused(blob[:LEN_AT] + struct.pack("<Q", 1 << 40) + blob[LEN_AT + 8 :], "limit")
    refused(blob[:LEN_AT] + struct.pack("<Q", (1 << 64) - 1) + blob[LEN_AT + 8 :], "limit")
    size = struct.unpack_from("<Q", blob, LEN_AT)[0]
    refused(blob[:LEN_AT] + struct.pack("<Q", size + 1) + blob[LEN_AT + 8 :], "declares")
    refused(blob[:LEN_AT] + struct.pack("<Q", size - 1) + blob[LEN_AT + 8 :], "more than")
    bad_sha = bytes([blob[SHA_AT] ^ 1])
    refused(blob[:SHA_AT] + bad_sha + blob[SHA_AT + 1 :], "checksum")


@pytest.mark.parametrize("codec", ["zlib", "zstd", "lzma", "brotli"])
def test_truncated_and_extended(small_blobs, codec):
    blob = small_blobs[codec]
    for cut in sorted({0, 1, 17, 18, 20, 35, 36, 50, PREFIX_BYTES - 1, PREFIX_BYTES, PREFIX_BYTES + 1,
                       PREFIX_BYTES + 10, len(blob) // 2, len(blob) - 2, len(blob) - 1}):
        refused(blob[:cut])
    refused(blob + b"\0")
    refused(blob + blob[PREFIX_BYTES:])  # a second compressed stream appended


@pytest.mark.parametrize("codec", ["zlib", "zstd", "lzma"])
def test_every_single_byte_flip_is_refused(small_blobs, codec):
    # Every byte is covered: prefix fields are checked, the body by decompression and SHA-256.
    blob = small_blobs[codec]
    step = max(1, len(blob) // 400)
    for i in list(range(0, PREFIX_BYTES)) + list(range(PREFIX_BYTES, len(blob), step)):
        refused(blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1 :])


def test_zstd_frame_size_must_match_the_prefix():
    # zstandard allocates what a frame header claims: a claim other than the prefix's is refused first.
    payload = payload_bytes(SPEC, make_weights(1, big=False))
    frame = zstandard.ZstdCompressor(level=3).compress(payload + b"\0" * 4096)
    blob = reseal(payload, "zstd", 3)
    refused(blob[:PREFIX_BYTES] + frame, "frame declares")


def test_header_defects(small_blobs):
    blob = small_blobs["zlib"]
    payload = payload_bytes(SPEC, {**make_weights(1, big=False),
                                   "q": (np.random.default_rng(1).standard_normal((257, 256)) * 0.1).astype(np.float32)})
    assert reseal(payload) == blob  # the helper builds exactly what the writer builds
    header, data = split_payload(payload)

    def variant(mutate, data_=data):
        h = json.loads(json.dumps(header))
        mutate(h)
        return reseal(join_payload(h, data_))

    refused(reseal(join_payload(None, data, b"{not json")), "not valid JSON")
    refused(reseal(join_payload(None, data, json.dumps(header).encode())), "canonical")
    refused(reseal(join_payload(None, data, b"[" * 100_000 + b"]" * 100_000)), "JSON")
    refused(reseal(join_payload(None, data, b'{"a":1,"a":2}')), "repeats")
    refused(reseal(join_payload(None, data, b'{"spec":NaN}')), "NaN")
    refused(reseal(join_payload(None, data, "\u00e9".encode())), "JSON")
    refused(reseal(join_payload([1, 2], data)), "keys")
    refused(reseal(struct.pack("<Q", 10**9) + payload[8:]), "header length")
    refused(reseal(b"\0\0\0"), "too short")
    refused(reseal(payload + b"\0"), "data bytes")
    refused(reseal(payload[:-1]), "data bytes")
    refused(variant(lambda h: h.pop("scheme")), "keys")
    refused(variant(lambda h: h.update(extra=1)), "keys")
    refused(variant(lambda h: h.update(scheme="gptq")), "unknown quantization scheme")
    refused(variant(lambda h: h.update(spec=[1])), "spec")
    refused(variant(lambda h: h.update(tensors=[])), "tensors")
    refused(variant(lambda h: h.update(data_nbytes=True)), "data bytes")
    q = lambda h: h["tensors"]["q"]  # noqa: E731
    refused(variant(lambda h: q(h).update(dtype="float8")), "unknown dtype")
    refused(variant(lambda h: q(h).update(dtype=7)), "unknown dtype")
    refused(variant(lambda h: q(h).update(role="mystery")), "unknown role")
    refused(variant(lambda h: q(h).update(shape=[257, 255])), "needs")
    refused(variant(lambda h: q(h).update(shape=[257, -256])), "shape")
    refused(variant(lambda h: q(h).update(shape="257x256")), "shape")
    refused(variant(lambda h: q(h).update(shape=[1] * 9)), "shape")
    refused(variant(lambda h: q(h).update(shape=[2**31, 0])), "shape")
    refused(variant(lambda h: q(h).update(shape=[0, 2**30, 2**30], nbytes=0)), "implausibly large")
    refused(variant(lambda h: q(h).update(offset=q(h)["offset"] + 1)), "offset")
    refused(variant(lambda h: q(h).update(offset=-1)), "offset")
    refused(variant(lambda h: q(h).update(offset=1.5)), "offset")
    refused(variant(lambda h: q(h).update(nbytes=10**12)), "nbytes")
    refused(variant(lambda h: q(h).pop("scale")), "keys")
    refused(variant(lambda h: q(h).update(scale=None)), "no scale")
    refused(variant(lambda h: q(h)["scale"].update(dtype="float32", nbytes=257 * 4)), "scale")
    refused(variant(lambda h: q(h).update(role="passthrough")), "scale")
    refused(variant(lambda h: h["tensors"]["positions"].update(dtype="float32")), "passthrough dtype")
    # tok_emb.weight (fp16 40x16) is the last array: growing it, consistently, runs past the data.
    refused(variant(lambda h: h["tensors"]["tok_emb.weight"].update(shape=[140, 16], nbytes=140 * 16 * 2)),
            "runs past")
    refused(variant(lambda h: h.update(data_nbytes=len(data) + 8), data + bytes(8)), "belong to no tensor")
    # Raw values that no writer produces.
    pos = header["tensors"]["mask"]["offset"]
    refused(reseal(join_payload(header, data[:pos] + b"\x02" + data[pos + 1 :])), "bool")
    pos = header["tensors"]["q"]["offset"]
    refused(reseal(join_payload(header, data[:pos] + b"\x80" + data[pos + 1 :])), "outside")


def test_random_header_corruption_raises_only_user_error():
    # A checksum-valid payload with a mangled header: each parse either succeeds (a digit of the spec
    # changed is still a valid file) or raises UserError; any other exception fails the test.
    payload = payload_bytes(SPEC, make_weights(1, big=False))
    parse_artifact(reseal(payload))
    header, data = split_payload(payload)
    raw = canonical_json(header)
    json_bytes = list(b'0123456789{}[]":,-.eE ntfal')
    rng = np.random.default_rng(0)
    refusals = 0
    for _ in range(400):
        b = bytearray(raw)
        for i in rng.integers(0, len(b), int(rng.integers(1, 4))):
            b[i] = int(rng.choice(json_bytes)) if rng.random() < 0.7 else int(rng.integers(0, 256))
        try:
            parse_artifact(reseal(join_payload(None, data, bytes(b))))
        except UserError:
            refusals += 1
    assert refusals > 300


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        read_artifact(tmp_path / "missing.art")
    with pytest.raises(UserError, match="cannot read"):
        load_quantized(tmp_path)
    (tmp_path / "empty.art").write_bytes(b"")
    with pytest.raises(UserError, match="empty.art"):
        read_artifact(tmp_path / "empty.art")
    (tmp_path / "zlib.art").write_bytes(zlib.compress(b"hello"))
    with pytest.raises(UserError, match="bad magic"):
        read_artifact(tmp_path / "zlib.art")
