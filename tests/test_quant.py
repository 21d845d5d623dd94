"""core.quant: upstream's int8 rule, checked against a row-by-row reference, torch (when installed), and
its error bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import UserError
from core.quant import (
    CONTROL_NAME_PATTERNS, KEEP_FLOAT_MAX_NUMEL, ROLE_PASSTHROUGH, ROLE_QUANTIZED, dequantize_weights,
    get_scheme, quantize_weights,
)

Q = 0.9999984


def reference_clip(row: np.ndarray) -> np.float32:
    """torch.quantile(|row|, Q) the slow way: full sort, scalar float32 arithmetic, torch's lerp."""
    a = np.sort(np.abs(row.astype(np.float32)))
    pos = np.float32(Q) * np.float32(a.size - 1)
    i = int(pos)
    j = min(i + 1, a.size - 1) if pos != np.float32(i) else i
    w = np.float32(pos - np.float32(i))
    if w < np.float32(0.5):
        return np.float32(a[i] + w * (a[j] - a[i]))
    return np.float32(a[j] - (a[j] - a[i]) * (np.float32(1) - w))


def reference_int8_2d(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.empty(w.shape, np.int8)
    scales = np.empty(w.shape[0], np.float16)
    for r, row in enumerate(w.astype(np.float32)):
        clip = reference_clip(row)
        s = max(np.float32(clip / np.float32(127)), np.float32(1 / 127))
        clamped = np.where(row > clip, clip, np.where(row < -clip, -clip, row)).astype(np.float32)
        q[r] = np.clip(np.rint(clamped / s), -127, 127).astype(np.int8)
        scales[r] = np.float16(s)
    return q, scales


def random_matrix(rng, rows=96, cols=1024, std=0.05):
    w = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
    w[1] *= 100.0  # a row with |w| well above 1: no floor
    # With n=1024 the 0.9999984 quantile sits 99.8% of the way from the 2nd largest |w| to the
    # largest, so only the largest is clipped, and only a little.
    w[2, 7] = 50.0
    w[2, 9] = -80.0
    w[3] = 0.0  # an all-zero row
    return w


def test_int8_matches_row_by_row_reference():
    rng = np.random.default_rng(0)
    w = random_matrix(rng)
    t = quantize_weights({"m": w}).tensors["m"]
    q, s = reference_int8_2d(w)
    assert t.role == ROLE_QUANTIZED
    assert t.data.dtype == np.int8 and t.scale.dtype == np.float16 and t.scale.shape == (w.shape[0],)
    np.testing.assert_array_equal(t.data, q)
    np.testing.assert_array_equal(t.scale, s)


def test_clip_is_the_documented_quantile():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((70, 1000)) * 0.3).astype(np.float32)
    clips = np.array([reference_clip(r) for r in w])
    np.testing.assert_allclose(clips, np.quantile(np.abs(w), Q, axis=1), rtol=1e-4)


def test_floor_and_outliers():
    rng = np.random.default_rng(2)
    w = random_matrix(rng)
    t = quantize_weights({"m": w}).tensors["m"]
    small_rows = np.abs(w).max(axis=1) < 1.0
    assert small_rows.sum() > 50
    # Every row whose clip is below 1 uses the floor step 1/127.
    np.testing.assert_array_equal(t.scale[small_rows], np.float16(1 / 127))
    assert t.scale[1] > np.float16(1 / 127)
    # The largest |w| is beyond the clip: it lands on -127 and comes back a little smaller.
    deq = dequantize_weights(quantize_weights({"m": w}))["m"]
    clip = reference_clip(w[2])
    assert 50.0 < clip < 80.0
    assert t.data[2, 9] == -127 and -80.0 < deq[2, 9] < -79.0
    assert t.data[2, 7] == np.rint(50.0 / (clip / np.float32(127)))  # the second largest: unclipped
    np.testing.assert_array_equal(deq[3], 0.0)


def test_other_shapes_use_one_float32_scale():
    rng = np.random.default_rng(3)
    for shape in [(70_000,), (3, 200, 120)]:
        w = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        t = quantize_weights({"x": w}).tensors["x"]
        assert t.role == ROLE_QUANTIZED and t.data.shape == shape
        assert t.scale.dtype == np.float32 and t.scale.shape == ()
        clip = reference_clip(w.ravel())
        assert t.scale == np.float32(float(clip) / 127.0)  # no 1/127 floor for these
        np.testing.assert_array_equal(t.data, np.clip(np.rint(np.clip(w, -clip, clip) / t.scale), -127, 127))
    zeros = quantize_weights({"z": np.zeros(70_000, np.float32)}).tensors["z"]
    assert zeros.scale == np.float32(1.0) and not zeros.data.any()


def test_passthrough_rules():
    rng = np.random.default_rng(4)
    small = rng.standard_normal((8, 16)).astype(np.float32)
    weights = {
        "small": small,
        "edge": rng.standard_normal(KEEP_FLOAT_MAX_NUMEL).astype(np.float32),  # exactly the limit: kept
        "over": rng.standard_normal(KEEP_FLOAT_MAX_NUMEL + 1).astype(np.float32),  # one more: quantized
        "half": small.astype(np.float16),
        "ids": np.arange(100_000, dtype=np.int64),  # non-float: exact, however large
        "mask": np.array([True, False, True]),
    }
    for i, pattern in enumerate(CONTROL_NAME_PATTERNS):
        weights[f"blocks.{i}.{pattern}"] = small * 3.3
    qw = quantize_weights(weights)
    t = qw.tensors
    assert t["small"].role == ROLE_PASSTHROUGH and t["small"].data.dtype == np.float16
    assert t["edge"].role == ROLE_PASSTHROUGH and t["over"].role == ROLE_QUANTIZED
    assert t["half"].data.dtype == np.float16
    for i, pattern in enumerate(CONTROL_NAME_PATTERNS):
        kept = t[f"blocks.{i}.{pattern}"]
        assert kept.data.dtype == np.float32 and kept.scale is None
    deq = dequantize_weights(qw)
    np.testing.assert_array_equal(deq["small"], small.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(deq["blocks.0.attn_scale"], small * 3.3)
    assert deq["ids"].dtype == np.int64 and np.array_equal(deq["ids"], weights["ids"])
    assert deq["mask"].dtype == np.bool_ and np.array_equal(deq["mask"], weights["mask"])
    assert all(deq[k].dtype == np.float32 for k in ("small", "over", "half", "edge"))
    assert all(deq[k].shape == weights[k].shape for k in weights)


def test_deterministic_and_input_untouched():
    rng = np.random.default_rng(5)
    w = {"a": random_matrix(rng), "b": rng.standard_normal((4, 4)).astype(np.float32)}
    before = {k: v.copy() for k, v in w.items()}
    one, two = quantize_weights(w), quantize_weights(dict(reversed(w.items())))
    assert list(one.tensors) == ["a", "b"]
    for k in w:
        np.testing.assert_array_equal(w[k], before[k])
        np.testing.assert_array_equal(one.tensors[k].data, two.tensors[k].data)


def test_refuses_nan_unknown_scheme_and_non_arrays():
    w = np.zeros((300, 300), np.float32)
    w[5, 5] = np.nan
    with pytest.raises(UserError, match="'bad'"):
        quantize_weights({"bad": w})
    with pytest.raises(UserError, match="unknown quantization scheme"):
        quantize_weights({}, scheme="int3")
    with pytest.raises(UserError):
        get_scheme("gptq")
    with pytest.raises(TypeError):
        quantize_weights({"x": [1.0, 2.0]})


def check_error_bound(w: np.ndarray) -> None:
    """Unclipped elements are within half a step of their value, for the float32 step used to round;
    the stored fp16 step adds at most |q| times its rounding error."""
    t = quantize_weights({"m": w}).tensors["m"]
    deq = dequantize_weights(quantize_weights({"m": w}))["m"]
    if w.ndim == 2:
        clip = np.array([reference_clip(r) for r in w], np.float32)[:, None]
        s32 = np.maximum(clip / np.float32(127), np.float32(1 / 127))
        s16 = t.scale.astype(np.float32)[:, None]
    else:
        clip = reference_clip(w.ravel())
        s32 = s16 = t.scale.astype(np.float32)
    unclipped = np.abs(w) <= clip
    err = np.abs(deq.astype(np.float64) - w)
    bound = s32 / 2 + np.abs(t.data) * np.abs(s16 - s32)
    assert np.all((err <= bound * (1 + 1e-5) + 1e-30)[np.broadcast_to(unclipped, w.shape)])
    # With the float32 step itself (no fp16 storage) the bound is exactly half a step.
    err32 = np.abs(t.data.astype(np.float64) * s32 - w)
    assert np.all((err32 <= s32 / 2 * (1 + 1e-5) + 1e-30)[np.broadcast_to(unclipped, w.shape)])
    # Clipped elements get the code of +-clip (127 unless the 1/127 floor made the step coarser).
    clipped = ~np.broadcast_to(unclipped, w.shape)
    edge = np.broadcast_to(np.sign(w) * np.rint(clip / s32), w.shape)
    np.testing.assert_array_equal(t.data[clipped], edge[clipped])


def test_error_bound_fixed_cases():
    rng = np.random.default_rng(6)
    check_error_bound(random_matrix(rng))
    check_error_bound((rng.standard_normal((2, 300, 120)) * 4).astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 80),
    log_std=st.floats(-6, 3),
    outliers=st.integers(0, 20),
    three_d=st.booleans(),
)
def test_error_bound_property(seed, rows, log_std, outliers, three_d):
    rng = np.random.default_rng(seed)
    cols = KEEP_FLOAT_MAX_NUMEL // rows + 1 + int(rng.integers(0, 64))
    w = (rng.standard_normal((rows, cols)) * 10.0**log_std).astype(np.float32)
    flat = w.reshape(-1)
    idx = rng.integers(0, flat.size, outliers)
    flat[idx] *= rng.uniform(10, 1000, outliers).astype(np.float32)
    if rows > 2:
        w[rows // 2] = 0.0
    check_error_bound(w.reshape(1, rows, cols) if three_d else w)


# torch.quantile computes the position q*(n-1) in float32 before torch 2.14 and in float64 since (pytorch#187574,
# which lifted quantile's 16M-element limit; the weight is still cast to float32). That moves the clip of a few
# rows by an ulp and so a few int8 codes by one: 10 of the 179,200 codes of the (256, 700) case below.
TORCH_FLOAT64_QUANTILE_RANKS = (2, 14)


def test_bit_exact_with_torch_reference(monkeypatch):
    """Upstream's int8 rule written out in torch, against core.quant on the installed torch.

    Holds for every torch version, each against the rule that version computes: torch < 2.14 is bit-exact
    with core.quant (whose float32 rank is the rule upstream's records ran under); torch >= 2.14 is bit-exact
    with the same code at float64 ranks (torch_quantile_last_axis(rank_dtype=np.float64)), and core.quant is
    then within one code of it. core.quant does not follow the installed torch: its artifacts are numpy only
    (test_artifact_bytes_do_not_depend_on_torch).
    """
    torch = pytest.importorskip("torch")
    from functools import partial

    from core import quant

    float64_ranks = torch.__version__ >= TORCH_FLOAT64_QUANTILE_RANKS

    def upstream_rule(t32):  # the rule as upstream's train_gpt.py computes it in torch
        if t32.ndim == 2:
            clip = torch.quantile(t32.abs(), Q, dim=1)
            clamped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
            s = (clip / 127.0).clamp_min(1.0 / 127.0)
            return torch.clamp(torch.round(clamped / s[:, None]), -127, 127).to(torch.int8), s.half()
        clip = float(torch.quantile(t32.abs().flatten(), Q).item())
        s = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float32)
        return torch.clamp(torch.round(torch.clamp(t32, -clip, clip) / s), -127, 127).to(torch.int8), s

    rng = np.random.default_rng(7)
    for shape, std in [((96, 1024), 0.05), ((256, 700), 2.0), ((70_001,), 0.1), ((2, 300, 120), 0.01)]:
        w = (rng.standard_normal(shape) * std).astype(np.float32)
        if w.ndim == 2:
            w[0, :5] = 30.0
        ours = quantize_weights({"w": w})
        if float64_ranks:
            with monkeypatch.context() as m:
                m.setattr(quant, "torch_quantile_last_axis", partial(quant.torch_quantile_last_axis,
                                                                     rank_dtype=np.float64))
                expected = quantize_weights({"w": w})
            assert np.abs(ours.tensors["w"].data.astype(int) - expected.tensors["w"].data).max() <= 1
        else:
            expected = ours
        t = expected.tensors["w"]
        q, s = upstream_rule(torch.from_numpy(w))
        np.testing.assert_array_equal(t.data, q.numpy())
        np.testing.assert_array_equal(t.scale, s.numpy())
        assert t.scale.dtype == s.numpy().dtype
        deq = dequantize_weights(expected)["w"]
        ref = q.float() * (s.float()[:, None] if w.ndim == 2 else float(s))
        np.testing.assert_array_equal(deq, ref.numpy())


def test_float64_ranks_move_a_few_codes_by_one(monkeypatch):
    """What torch >= 2.14's float64 quantile ranks change, in numpy (no torch needed): the torch test's second
    case, where torch 2.14.1 gave 10 of the 179,200 codes one off the float32 rule."""
    from functools import partial

    from core import quant

    rng = np.random.default_rng(7)
    rng.standard_normal((96, 1024))  # the torch test's first case, drawn so that the second one matches it
    w = (rng.standard_normal((256, 700)) * 2.0).astype(np.float32)
    w[0, :5] = 30.0
    ours = quantize_weights({"w": w}).tensors["w"].data.astype(int)
    monkeypatch.setattr(quant, "torch_quantile_last_axis", partial(quant.torch_quantile_last_axis,
                                                                   rank_dtype=np.float64))
    diff = np.abs(ours - quantize_weights({"w": w}).tensors["w"].data)
    assert diff.max() == 1 and int((diff > 0).sum()) == 10


ARTIFACT_DIGEST = """
import hashlib, sys
import numpy as np
from core.artifact import build_artifact
from core.params import init_weights
from core.spec import ModelSpec
spec = ModelSpec(vocab_size=64, model_dim=256, num_heads=4, num_kv_heads=2, layer_plan=(0, 1, 0, 1), num_blocks=2,
                 num_layers=4)
w = init_weights(spec, 3)
print(hashlib.sha256(build_artifact(spec.to_dict(), w, "int8", "zstd", 3)).hexdigest())
print(sorted(m for m in ("torch", "mlx") if sys.modules.get(m) is not None))
"""


@pytest.mark.slow
def test_artifact_bytes_do_not_depend_on_torch():
    """An artifact is numpy and zstandard only: the same bytes in a process where torch cannot be imported as
    in one that has imported it, so no torch version can change them."""
    import subprocess
    import sys

    pytest.importorskip("torch")

    def digest(first_line: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", first_line + "\n" + ARTIFACT_DIGEST], capture_output=True,
                              text=True, check=True).stdout.split()

    with_torch = digest("import torch")
    without = digest("import sys; sys.modules['torch'] = sys.modules['mlx'] = None")
    assert with_torch[0] == without[0] and with_torch[1:] == ["['torch']"] and without[1:] == ["[]"]
