"""core.quant's intN clip-search schemes, the fp16 passthrough, per-tensor rules, and their artifacts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.artifact import CODECS, build_artifact, parse_artifact
from core.config import ArtifactConfig, config_from_dict
from core.errors import UserError
from core.quant import (
    CLIP_SEARCH_PERCENTILES, KEEP_FLOAT_MAX_NUMEL, ROLE_PASSTHROUGH, ROLE_QUANTIZED, compose_scheme,
    dequantize_weights, get_scheme, int_qmax, quantize_rows_clip_search, quantize_weights, row_sq_error,
    scheme_for_tensor,
)

SEARCH_SCHEMES = {"int4": 4, "int5": 5, "int6": 6, "int7": 7, "int8_search": 8}


def check_bound(w: np.ndarray, scheme: str) -> None:
    qmax = int_qmax(SEARCH_SCHEMES[scheme])
    t = quantize_weights({"m": w}, scheme).tensors["m"]
    assert t.role == ROLE_QUANTIZED and t.data.dtype == np.int8 and t.scale.dtype == np.float16
    assert int(np.abs(t.data.astype(np.int16)).max()) <= qmax
    deq = dequantize_weights(quantize_weights({"m": w}, scheme))["m"]
    rows = w.shape[0] if w.ndim == 2 else 1
    w2, d2 = w.reshape(rows, -1).astype(np.float64), deq.reshape(rows, -1).astype(np.float64)
    s = t.scale.astype(np.float64)[:, None]
    clip = qmax * s  # the effective clip: qmax steps
    unclipped = np.abs(w2) <= clip
    err = np.abs(d2 - w2)
    tol = np.abs(w2) * 2.0**-22 + 1e-30  # float32 rounding of w / step
    assert np.all((err <= s / 2 + tol)[unclipped])
    # Clipped values come back exactly at +-clip, never beyond the original value.
    edge = np.broadcast_to(np.sign(w2) * clip, w2.shape)
    np.testing.assert_allclose(d2[~unclipped], edge[~unclipped], rtol=1e-6)
    assert np.all(np.abs(d2[~unclipped]) <= np.abs(w2[~unclipped]))


@pytest.mark.parametrize("scheme", sorted(SEARCH_SCHEMES))
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 70), log_std=st.floats(-6, 3),
       outliers=st.integers(0, 20), shape3=st.booleans())
def test_error_bound_property(scheme, seed, rows, log_std, outliers, shape3):
    rng = np.random.default_rng(seed)
    cols = KEEP_FLOAT_MAX_NUMEL // rows + 1 + int(rng.integers(0, 64))
    w = (rng.standard_normal((rows, cols)) * 10.0**log_std).astype(np.float32)
    flat = w.reshape(-1)
    flat[rng.integers(0, flat.size, outliers)] *= rng.uniform(10, 1000, outliers).astype(np.float32)
    if rows > 2:
        w[rows // 2] = 0.0
    check_bound(w.reshape(1, rows, cols) if shape3 else w, scheme)


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_clip_search_never_worse_than_no_clipping(bits):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((64, 1024)) * 0.05).astype(np.float32)
    w[::3, 5] *= 40.0  # outliers: clipping them pays on these rows
    w = np.where(rng.random(w.shape) < 0.001, w * 30, w).astype(np.float32)
    qmax = int_qmax(bits)
    q, s = quantize_rows_clip_search(w, qmax)
    q1, s1 = quantize_rows_clip_search(w, qmax, percentiles=(1.0,))
    assert 1.0 in CLIP_SEARCH_PERCENTILES
    searched, plain = row_sq_error(w, q, s), row_sq_error(w, q1, s1)
    assert np.all(searched <= plain)
    assert searched.sum() < plain.sum()  # and it helps somewhere


def test_zero_and_tiny_rows():
    w = np.zeros((300, 300), np.float32)
    w[1] = 1e-9
    t = quantize_weights({"m": w}, "int6").tensors["m"]
    assert np.all(t.scale > 0) and np.all(np.isfinite(t.scale))
    assert not t.data[0].any()
    np.testing.assert_array_equal(dequantize_weights(quantize_weights({"m": w}, "int6"))["m"][0], 0.0)


def test_small_control_and_nonfloat_pass_through_like_int8():
    rng = np.random.default_rng(0)
    w = {"small": rng.standard_normal((8, 16)).astype(np.float32), "blocks.0.attn_scale": np.ones(16, np.float32),
         "ids": np.arange(10, dtype=np.int64)}
    for scheme in ["int5", "fp16"]:
        t = quantize_weights(w, scheme).tensors
        assert t["small"].role == ROLE_PASSTHROUGH and t["small"].data.dtype == np.float16
        assert t["blocks.0.attn_scale"].data.dtype == np.float32
        assert t["ids"].data.dtype == np.int64
    big = rng.standard_normal((300, 300)).astype(np.float32)
    t = quantize_weights({"tok_emb.weight": big}, "fp16").tensors["tok_emb.weight"]
    assert t.role == ROLE_PASSTHROUGH and t.data.dtype == np.float16


def weights_for_rules(seed=0):
    rng = np.random.default_rng(seed)
    g = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    return {"tok_emb.weight": g(1024, 128), "blocks.0.attn.c_q.weight": g(512, 256),
            "blocks.0.mlp.fc.weight": g(512, 256), "blocks.0.mlp.proj.weight": g(256, 512),
            "lm_head.weight": g(600, 128), "blocks.0.attn_scale": g(256)}


RULES = ("*.attn.*=int7", "*.mlp.*=int5", "tok_emb.weight=int8")


def test_rules_pick_the_right_scheme():
    name = compose_scheme("int6", RULES)
    assert name == "int6;*.attn.*=int7;*.mlp.*=int5;tok_emb.weight=int8"
    assert compose_scheme("int8") == "int8"  # no rules: the plain name, upstream's artifacts unchanged
    expect = {"blocks.0.attn.c_q.weight": "int7", "blocks.0.mlp.fc.weight": "int5", "blocks.0.mlp.proj.weight": "int5",
              "tok_emb.weight": "int8", "lm_head.weight": "int6", "blocks.0.attn_scale": "int6"}
    for tensor, scheme in expect.items():
        assert scheme_for_tensor(name, tensor) == scheme
    assert scheme_for_tensor(compose_scheme("int6", ("*=int4", "*.mlp.*=int7")), "blocks.0.mlp.fc.weight") == "int4"
    w = weights_for_rules()
    qw = quantize_weights(w, name)
    assert qw.scheme == name
    for tensor, scheme in expect.items():
        if tensor == "blocks.0.attn_scale":
            continue
        alone = quantize_weights({tensor: w[tensor]}, scheme).tensors[tensor]
        np.testing.assert_array_equal(qw.tensors[tensor].data, alone.data)
        np.testing.assert_array_equal(qw.tensors[tensor].scale, alone.scale)
    assert np.abs(qw.tensors["blocks.0.mlp.fc.weight"].data).max() <= 15
    assert np.abs(qw.tensors["blocks.0.attn.c_q.weight"].data).max() <= 63
    fp16_emb = quantize_weights(w, compose_scheme("int6", ("tok_emb.*=fp16",))).tensors["tok_emb.weight"]
    assert fp16_emb.role == ROLE_PASSTHROUGH and fp16_emb.data.dtype == np.float16


def test_bad_names_and_rules():
    for bad in ["int3", "int9", "", "int6;", "int6;*.mlp.*=int5;", "int6; *.mlp.*=int5", "int6;x=y=int5"]:
        with pytest.raises(UserError):
            get_scheme(bad)
    for rules in [("*.mlp.*",), ("*.mlp.*=int2",), ("a b=int5",), ("x;y=int5",)]:
        with pytest.raises(UserError):
            compose_scheme("int6", rules)


@pytest.mark.slow
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_artifact_round_trip_and_determinism_per_codec(codec):
    w = weights_for_rules(1)
    name = compose_scheme("int6", RULES)
    one = build_artifact({"x": 1}, w, name, codec)
    two = build_artifact({"x": 1}, {k: w[k].copy() for k in reversed(list(w))}, name, codec)
    assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()
    spec, qw, info = parse_artifact(one)
    assert info.scheme == name and info.codec == codec and info.level == CODECS[codec].default_level
    ref = dequantize_weights(quantize_weights(w, name))
    for k, v in dequantize_weights(qw).items():
        np.testing.assert_array_equal(v, ref[k])
    for scheme in ["int4", "int5", "int7", "int8_search", "fp16"]:
        assert build_artifact({}, w, scheme, codec) == build_artifact({}, dict(w), scheme, codec)


def test_reader_checks_codes_against_the_rule_scheme():
    w = weights_for_rules(2)
    qw = quantize_weights(w, "int7")
    # Relabel an int7 artifact as "MLP int5": the MLP codes exceed +-15, so a reader refuses it.
    from core.artifact import encode_artifact
    from core.quant import QuantizedWeights

    blob, _ = encode_artifact({}, QuantizedWeights(compose_scheme("int7", ("*.mlp.*=int5",)), qw.tensors))
    with pytest.raises(UserError, match="int5"):
        parse_artifact(blob)


def test_config_rules_and_codec_level():
    cfg = config_from_dict({"artifact": {"scheme": "int6", "codec": "zstd", "rules": list(RULES)}})
    assert cfg.artifact.level == 22 and cfg.artifact.rules == RULES
    assert cfg.artifact.quant_scheme == compose_scheme("int6", RULES)
    assert 'rules = ["*.attn.*=int7", "*.mlp.*=int5", "tok_emb.weight=int8"]' in cfg.to_toml()
    assert ArtifactConfig().level == 9 and ArtifactConfig(codec="lzma").level == 9
    over = config_from_dict({}, ["artifact.rules=['*.mlp.*=int5']", "artifact.codec=zstd", "artifact.level=3"])
    assert over.artifact.quant_scheme == "int8;*.mlp.*=int5" and over.artifact.level == 3
    for table, match in [({"scheme": "int3"}, "artifact.scheme"), ({"rules": ["*.mlp.*"]}, r"artifact.rules\[0\]"),
                         ({"codec": "lz4"}, "artifact.codec"), ({"codec": "zstd", "level": 23}, "artifact.level"),
                         ({"rule": []}, "rules")]:
        with pytest.raises(UserError, match=match):
            config_from_dict({"artifact": table})
