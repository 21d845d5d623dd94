"""core.gptq: full Hessian GPTQ against round to nearest, its bounds, determinism, and its artifact record."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.artifact import build_artifact, encode_artifact, parse_artifact
from core.config import ArtifactConfig
from core.errors import UserError
from core.gptq import gptq_applies, gptq_quantize, gptq_targets, output_error, quantize_weights_gptq
from core.quant import dequantize_weights, int_qmax, quantize_rows_clip_search, quantize_weights

DAMP, BLOCK = ArtifactConfig.gptq_damp, ArtifactConfig.gptq_block  # the defaults live in the config


def correlated_problem(rows=96, cols=160, tokens=1024, seed=0):
    """W and H = X^T X for inputs with a strong low-rank shared component and uneven column scales: the
    case GPTQ exists for (one column's rounding error can be cancelled by its correlated neighbours)."""
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.normal(size=(tokens, cols)) + rng.normal(size=(tokens, 8)) @ rng.normal(size=(8, cols))
    x *= np.exp(0.5 * rng.normal(size=cols))
    w = (0.05 * rng.normal(size=(rows, cols))).astype(np.float32)
    return w, x.T @ x


def rtn_error(w, h, qmax):
    codes, step = quantize_rows_clip_search(w, qmax)
    return output_error(w.astype(np.float64), codes, step, h)


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    w, h = correlated_problem()
    qmax = int_qmax(bits)
    gptq = gptq_quantize(w, h, qmax, DAMP, BLOCK)
    gptq_err = output_error(w.astype(np.float64), gptq.codes, gptq.step, h).sum()
    # Measured ~100x lower on this problem; half is a loose bar that round to nearest cannot pass.
    assert gptq_err < 0.5 * rtn_error(w, h, qmax).sum()


@st.composite
def problems(draw):
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 40))
    tokens = draw(st.integers(1, 60))  # fewer tokens than columns: a singular H, which damping must handle
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, cols)) * np.exp(rng.normal(size=cols))
    dead = rng.random(cols) < draw(st.sampled_from([0.0, 0.3]))
    x[:, dead] = 0.0  # inputs that are always zero: a zero diagonal in H
    w = (rng.normal(size=(rows, cols)) * draw(st.sampled_from([1e-3, 0.05, 3.0]))).astype(np.float32)
    return w, x.T @ x, dead, draw(st.integers(3, 8)), draw(st.sampled_from([1, 7, 128]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(problems())
def test_gptq_error_bound(problem):
    w, h, dead, bits, block = problem
    qmax = int_qmax(bits)
    r = gptq_quantize(w, h, qmax, DAMP, block)
    assert r.codes.dtype == np.int8 and r.codes.shape == w.shape
    assert int(np.abs(r.codes.astype(np.int16)).max()) <= qmax
    assert r.step.dtype == np.float16 and np.all(np.isfinite(r.step)) and np.all(r.step > 0)
    # Every row's output error is at most that of the clip search's round to nearest (a candidate itself);
    # same arithmetic on both sides, so no tolerance.
    assert np.all(output_error(w.astype(np.float64), r.codes, r.step, h) <= rtn_error(w, h, qmax))
    # A dead column exchanges no error with the others: it is rounded to nearest with its row's step.
    # (GPTQ divides in float64, round to nearest in float32: either may decide a value at a rounding tie.)
    s = r.step.astype(np.float32)[:, None]
    rtn32, rtn64 = (np.clip(np.rint(w.astype(t) / s.astype(t)), -qmax, qmax) for t in (np.float32, np.float64))
    assert np.all(((r.codes == rtn32) | (r.codes == rtn64))[:, dead])


def test_gptq_is_deterministic_and_independent_of_block_size_for_one_block():
    w, h = correlated_problem(rows=40, cols=96, seed=3)
    a, b = gptq_quantize(w, h, 31, DAMP, BLOCK), gptq_quantize(w.copy(), h.copy(), 31, DAMP, BLOCK)
    assert a.codes.tobytes() == b.codes.tobytes() and a.step.tobytes() == b.step.tobytes()
    # Lazy batch updates are an exact reordering of the same sums: block sizes give (nearly) the same codes.
    c = gptq_quantize(w, h, 31, DAMP, 16)
    assert np.mean(c.codes != a.codes) < 0.01  # float64 reassociation can flip a code at a rounding tie


def weights_and_hessians(seed=0):
    rng = np.random.default_rng(seed)
    weights = {
        "blocks.0.mlp.fc.weight": (0.05 * rng.normal(size=(384, 192))).astype(np.float32),  # 73,728 elements
        "blocks.0.attn.c_q.weight": (0.05 * rng.normal(size=(400, 192))).astype(np.float32),
        "tok_emb.weight": (0.05 * rng.normal(size=(400, 192))).astype(np.float32),
        "blocks.0.attn_scale": np.ones(192, np.float32),
    }
    x = rng.normal(size=(300, 192)) @ rng.normal(size=(192, 192))
    hessians = {n: x.T @ x for n in ("blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight", "tok_emb.weight")}
    return weights, hessians


def test_gptq_weights_only_touch_intn_tensors_and_the_header_records_it():
    weights, hessians = weights_and_hessians()
    scheme = "int6;blocks.0.attn.*=int8"  # upstream int8 keeps its exact rule
    plain = quantize_weights(weights, scheme)
    qw = quantize_weights_gptq(weights, scheme, hessians, DAMP, BLOCK, record={"calibration": {"batches": 2}})
    assert qw.gptq == {"damp": 0.01, "block": 128, "tensors": ["blocks.0.mlp.fc.weight"],
                       "calibration": {"batches": 2}}
    for name in ("blocks.0.attn.c_q.weight", "tok_emb.weight", "blocks.0.attn_scale"):  # int8, lookup table, scalar
        assert qw.tensors[name].data.tobytes() == plain.tensors[name].data.tobytes()
    assert qw.tensors["blocks.0.mlp.fc.weight"].data.tobytes() != plain.tensors["blocks.0.mlp.fc.weight"].data.tobytes()

    blob, info = encode_artifact({"spec": 1}, qw, "zstd")
    assert blob == encode_artifact({"spec": 1}, quantize_weights_gptq(weights, scheme, hessians, DAMP, BLOCK,
                                                                      record={"calibration": {"batches": 2}}), "zstd")[0]
    _, back, info = parse_artifact(blob)
    assert back.gptq == qw.gptq and info.gptq == qw.gptq
    deq = dequantize_weights(back)
    t = qw.tensors["blocks.0.mlp.fc.weight"]
    np.testing.assert_array_equal(deq["blocks.0.mlp.fc.weight"], t.data.astype(np.float32) * t.scale.astype(np.float32)[:, None])
    # Without GPTQ the header has no gptq key, so earlier artifacts keep their bytes.
    _, plain_back, plain_info = parse_artifact(build_artifact({"spec": 1}, weights, scheme, "zstd"))
    assert plain_back.gptq is None and plain_info.gptq is None


def test_gptq_applies_agrees_with_the_targets():
    """The cheap pre-check (before Hessians) says yes exactly when quantize_weights_gptq has a target."""
    weights, hessians = weights_and_hessians()
    for scheme in ("int6", "int8", "fp16", "int8;*.mlp.*=int5", "int6;*.mlp.*=fp16", "int8_search",
                   "int8;tok_emb.weight=int6"):  # the last: only the lookup table is intN
        targets = gptq_targets(weights, scheme, hessians, quantize_weights(weights, scheme))  # what the solve takes
        assert gptq_applies(weights, scheme) == bool(targets), scheme
    small = {n: w[:, :96] for n, w in weights.items() if w.ndim == 2}  # every matrix at most 65,536 elements
    assert not gptq_applies(small, "int6")


def test_a_header_gptq_record_naming_an_unknown_tensor_is_refused():
    weights, hessians = weights_and_hessians()
    qw = quantize_weights_gptq(weights, "int6", hessians, DAMP, BLOCK)
    qw.gptq["tensors"].append("blocks.9.nothing")
    with pytest.raises(UserError, match="gptq record"):
        parse_artifact(encode_artifact({}, qw)[0])


def test_config_checks_the_gptq_settings():
    assert ArtifactConfig(scheme="int8", rules=["*.mlp.*=int5"], gptq=True).gptq_damp == 0.01
    with pytest.raises(UserError, match="artifact.gptq = true"):
        ArtifactConfig(scheme="int8", rules=["tok_emb.weight=fp16"], gptq=True)
    with pytest.raises(UserError, match="artifact.gptq_damp"):
        ArtifactConfig(scheme="int6", gptq=True, gptq_damp=-0.1)
    with pytest.raises(UserError, match="artifact.gptq_batches"):
        ArtifactConfig(scheme="int6", gptq=True, gptq_batches=0)
