"""QAT (artifact.qat): the fake-quantized forward is the exported artifact's forward, in both backends.

Equality here is exact (==), not approximate: backend_*/qat.py do the same float32/float64 operations as
core.quant and round them the same way, so any difference is a real mismatch between what training sees
and what the artifact holds. The one approximate comparison is MLX against torch, two frameworks computing
the same forward (core.tolerances' dequant_logits band, as `loopgolf parity`).
"""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from backend_mlx import model as mm  # noqa: E402
from backend_mlx import qat as mq  # noqa: E402
from backend_torch import model as tm  # noqa: E402
from backend_torch import qat as tq  # noqa: E402
from core import quant  # noqa: E402
from core.artifact import build_artifact, parse_artifact  # noqa: E402
from core.fakequant import fake_quant_plan  # noqa: E402
from core.params import init_weights  # noqa: E402
from core.schedule import lr_multiplier  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from core.tolerances import tolerance  # noqa: E402

SCHEMES = ["int8", "int4", "int5", "int6", "int7", "int8_search", "fp16",
           "int6;*.attn.*=int5;tok_emb.weight=int8"]


def awkward_weights(rng) -> dict[str, np.ndarray]:
    """Tensors over the passthrough size with outliers, a zero row, a row of equal values and values on
    rounding ties; a 1-D tensor (per-tensor / one-row path); a small matrix (fp16); a control tensor."""
    def mat(shape, scale):
        w = (rng.standard_normal(shape) * scale).astype(np.float32)
        w.reshape(-1)[rng.integers(0, w.size, 12)] *= 25.0
        return w

    fc = mat((300, 257), 0.02)
    fc[3] = 0.0
    fc[5] = 0.0123
    fc[7, :8] = np.float32(0.5) * np.arange(8, dtype=np.float32) / 8  # multiples of 1/16: ties for coarse steps
    return {"blocks.0.mlp.fc.weight": fc, "blocks.0.attn.c_q.weight": mat((257, 300), 0.05),
            "tok_emb.weight": mat((70001,), 0.01).reshape(70001), "blocks.0.mlp.proj.weight": mat((16, 24), 0.1),
            "blocks.0.attn_scale": mat((32,), 1.0)}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quant_equals_the_export_round_trip(scheme):
    weights = awkward_weights(np.random.default_rng(7))
    expected = quant.dequantize_weights(quant.quantize_weights(weights, scheme))
    plan = fake_quant_plan({k: v.shape for k, v in weights.items()}, scheme)
    mlx_fn = mx.compile(lambda p: mq.fake_quant(p, plan))  # compiled, as in training
    got_mlx = {k: np.array(v) for k, v in mlx_fn({k: mx.array(v) for k, v in weights.items()}).items()}
    got_torch = {k: v.detach().numpy() for k, v in tq.fake_quant({k: torch.tensor(v) for k, v in weights.items()},
                                                                 plan).items()}
    for name in weights:
        np.testing.assert_array_equal(got_mlx[name], expected[name], err_msg=f"mlx {name} ({plan[name].kind})")
        np.testing.assert_array_equal(got_torch[name], expected[name], err_msg=f"torch {name} ({plan[name].kind})")
    assert plan["blocks.0.attn_scale"].kind == "keep"
    np.testing.assert_array_equal(got_torch["blocks.0.attn_scale"], weights["blocks.0.attn_scale"])


def test_torch_fp16_rounding_by_bits_matches_numpy():
    """round_fp16 replaces a cast pair that torch.compile drops; it must round exactly as numpy's cast."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = bits[np.isfinite(bits) & (np.abs(bits) < 65504)]
    halves = np.float32(2.0**-24) * (np.arange(-3000, 3000, dtype=np.float32) + np.float32(0.5))  # subnormal ties
    ties = (np.arange(1, 5000, dtype=np.float16).astype(np.float32) * np.float32(1.0 + 2.0**-11))  # normal ties
    x = np.concatenate([x, halves, ties, -ties, np.float32([0.0, -0.0, 2.0**-14, 65504.0, 6.1e-5, 6.11e-5])])
    got = tq.round_fp16(torch.tensor(x)).numpy()
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))


# ---- the model's forward and gradient --------------------------------------------------------------------

SCHEME = "int5;*.attn.*=int6;tok_emb.weight=int8"


@pytest.fixture
def tiny(monkeypatch):
    """A tiny model whose matrices are all quantized: the passthrough size lowered to 256 elements."""
    monkeypatch.setattr(quant, "KEEP_FLOAT_MAX_NUMEL", 256)
    spec = ModelSpec.from_table({"vocab_size": 128, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2,
                                 "layer_plan": "2x2"})
    rng = np.random.default_rng(0)
    weights = {k: (v + rng.normal(0, 0.02, v.shape)).astype(np.float32) for k, v in init_weights(spec, 1).items()}
    x = rng.integers(0, 128, (2, 16)).astype(np.int32)
    plan = fake_quant_plan({k: v.shape for k, v in weights.items()}, SCHEME)
    assert sum(p.kind not in ("keep", "fp16") for p in plan.values()) >= 9  # every matrix and the embedding
    return spec, weights, x, plan


def test_qat_forward_is_the_artifact_forward_in_both_backends(tiny):
    spec, weights, x, plan = tiny
    quantized = parse_artifact(build_artifact(spec.to_dict(), weights, SCHEME, "zlib", 9), "<test>")[1]
    deq = quant.dequantize_weights(quantized)
    z_art_m = np.array(mm.logits(spec, {k: mx.array(v) for k, v in deq.items()}, mx.array(x)))
    z_qat_m = np.array(mm.logits(spec, mq.fake_quant({k: mx.array(v) for k, v in weights.items()}, plan), mx.array(x)))
    with torch.no_grad():
        z_art_t = tm.logits(spec, {k: torch.tensor(v) for k, v in deq.items()}, torch.tensor(x)).numpy()
        z_qat_t = tm.logits(spec, tq.fake_quant({k: torch.tensor(v) for k, v in weights.items()}, plan),
                            torch.tensor(x)).numpy()
    np.testing.assert_array_equal(z_qat_m, z_art_m)  # the same weights, bit for bit, through the same forward
    np.testing.assert_array_equal(z_qat_t, z_art_t)
    tol = tolerance("dequant_logits", "float32")
    assert np.abs(z_qat_m - z_qat_t).max() <= tol.atol + tol.rtol * np.abs(z_qat_t).max()
    z_float = np.array(mm.logits(spec, {k: mx.array(v) for k, v in weights.items()}, mx.array(x)))
    assert np.abs(z_float - z_qat_m).max() > 1e-3  # quantization really changes this forward


def _grads_mlx(spec, params, x, transform):
    y = mx.array(np.roll(x, -1, axis=1))
    return mx.grad(lambda p: mm.mean_loss(spec, transform(p), mx.array(x), y))(params)


def _grads_torch(spec, params, x, transform):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    tm.mean_loss(spec, transform(leaves), torch.tensor(x, dtype=torch.int64),
                 torch.tensor(np.roll(x, -1, axis=1), dtype=torch.int64)).backward()
    return {k: v.grad.numpy() for k, v in leaves.items()}


@pytest.mark.parametrize("noise", [False, True])
def test_gradient_is_straight_through(tiny, noise):
    """d loss(fake_quant(w)) / dw equals d loss / dw_eff at w_eff = fake_quant(w): the rounding (or the
    noise) is invisible to the gradient."""
    spec, weights, x, plan = tiny
    pm = {k: mx.array(v) for k, v in weights.items()}
    pt = {k: torch.tensor(v) for k, v in weights.items()}
    mx.random.seed(5)
    torch.manual_seed(5)
    eff_m = {k: mx.stop_gradient(v) for k, v in mq.fake_quant(pm, plan, noise=noise).items()}
    eff_t = {k: v.detach() for k, v in tq.fake_quant(pt, plan, noise=noise).items()}
    mx.random.seed(5)
    torch.manual_seed(5)  # the same noise again inside the straight-through call
    ste_m = _grads_mlx(spec, pm, x, lambda p: mq.fake_quant(p, plan, noise=noise))
    ste_t = _grads_torch(spec, pt, x, lambda p: tq.fake_quant(p, plan, noise=noise))
    at_m = _grads_mlx(spec, eff_m, x, lambda p: p)
    at_t = _grads_torch(spec, eff_t, x, lambda p: p)
    for k in weights:
        np.testing.assert_array_equal(np.array(ste_m[k]), np.array(at_m[k]), err_msg=f"mlx {k}")
        np.testing.assert_array_equal(ste_t[k], at_t[k], err_msg=f"torch {k}")
    if noise:  # #363: uniform noise within half a step (row absmax / qmax) on each quantized tensor
        name = "blocks.0.mlp.fc.weight"
        w, step = weights[name], np.abs(weights[name]).max(axis=1, keepdims=True) / plan[name].qmax
        for eff in (np.array(eff_m[name]), eff_t[name].numpy()):
            delta = eff - w
            assert np.all(np.abs(delta) <= step / 2 * (1 + 1e-6)) and np.abs(delta).max() > step.min() / 10


# ---- end to end ------------------------------------------------------------------------------------------

TINY_RUN = [
    "--set", "model.model_dim=32", "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "model.layer_plan='2x2'", "--set", "train.seq_len=32", "--set", "train.batch_tokens=1024",
    "--set", "train.val_every=0", "--set", "train.val_max_tokens=4096", "--set", "train.warmup_steps=1",
    "--set", "train.warmdown_iters=6", "--set", "train.log_every=0", "--set", "train.compute_dtype='float32'",
    "--set", "train.iterations=12", "--set", "train.max_wallclock_seconds=0",
]


def train(demo_data, out, backend, *extra):
    from tools.cli import main

    code = main(["train", "--config", "configs/demo.toml", "--backend", backend, "--data", str(demo_data),
                 "--out", str(out), *TINY_RUN, *extra])
    assert code == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_qat_from_the_start_scores_what_the_artifact_scores(demo_data, tmp_path, monkeypatch):
    """With QAT the run's own final val_bpb is the artifact's: the trained forward is the exported one."""
    monkeypatch.setattr(quant, "KEEP_FLOAT_MAX_NUMEL", 256)  # quantize every matrix of the tiny model
    events = train(demo_data, tmp_path, "mlx", "--set", "artifact.qat='start'", "--set", "artifact.scheme='int4'")
    (qat,) = [e for e in events if e["event"] == "qat"]
    final = [e for e in events if e["event"] == "final"][-1]
    assert qat["step"] == 1 and final["qat"] == "start"
    # The same weights, bit for bit, through two compiled graphs (the fake-quant one and the plain one), which
    # may sum in another order: 1e-6 relative. Without QAT int4 moves this tiny model's bpb by about 1e-2.
    assert final["roundtrip_val_bpb"] == pytest.approx(final["val_bpb"], rel=1e-6)


@pytest.mark.slow
def test_late_qat_switches_on_at_the_first_step_below_the_threshold(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(quant, "KEEP_FLOAT_MAX_NUMEL", 256)
    events = train(demo_data, tmp_path, "torch", "--set", "artifact.qat='late'", "--set", "artifact.scheme='int6'",
                   "--set", "artifact.qat_lr_threshold=0.5")
    from core.config import load_config

    t = load_config(tmp_path / "config.toml").train
    first = next(s for s in range(t.iterations) if lr_multiplier(s, 0.0, t) < 0.5) + 1  # 1-based step number
    qat = [e for e in events if e["event"] == "qat"]
    assert [e["step"] for e in qat] == [first] and 1 < first < t.iterations
    final = [e for e in events if e["event"] == "final"][-1]
    assert final["roundtrip_val_bpb"] == pytest.approx(final["val_bpb"], rel=1e-6)  # as above; torch is eager here
    assert f"qat: on from step:{first}" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("key, value, message", [
    ("qat", "'on'", "artifact.qat = 'on': expected 'off', 'start' or 'late'"),
    ("qat_lr_threshold", "1.5", "artifact.qat_lr_threshold = 1.5: expected a number in (0, 1]"),
    ("qat_noise", "'yes'", "artifact.qat_noise"),
])
def test_bad_qat_settings_are_one_clear_error(key, value, message):
    from core.config import config_from_dict
    from core.errors import UserError

    with pytest.raises(UserError) as e:
        config_from_dict({}, [f"artifact.{key}={value}"])
    assert message in str(e.value)
