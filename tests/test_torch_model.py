"""The torch model's ops and optimizer against MLX (same weights, same updates), RoPE against numpy, and the
compiled graphs (tests/test_model_runner.py compares whole models, both backends and the numpy reference).

All in float32 on CPU. Tolerances are stated where they are used, with their reasons.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backend_torch import model as tm  # noqa: E402
from backend_torch.optim import init_state as torch_init_state, make_update as torch_make_update  # noqa: E402
from core.config import OptimConfig  # noqa: E402
from core.params import MATRIX, param_table  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import perturbed  # noqa: E402

TINY = {"vocab_size": 96, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2}
SPEC = ModelSpec.from_table({**TINY, "layer_plan": "2x3"})


def tokens(spec, batch=2, seq=32, seed=1):
    return np.random.default_rng(seed).integers(0, spec.vocab_size, (batch, seq))


def numpy_rope(x: np.ndarray, base: float) -> np.ndarray:
    """Upstream's half-split rotation by minus the angle, in float64: (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(x.shape[-2])[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def test_rotary_matches_numpy_formula():
    spec = ModelSpec.from_table({**TINY, "model_dim": 64})  # head_dim 16
    x = np.random.default_rng(2).normal(size=(2, 4, 48, spec.head_dim))
    got = tm.rotary(torch.tensor(x, dtype=torch.float32), spec).numpy()
    # float32 angles at positions < 48 are off by <= 48 * 2**-24 rad; values are O(3): 1e-5 is ~10x margin.
    np.testing.assert_allclose(got, numpy_rope(x, spec.rope_base), atol=1e-5, rtol=0)
    # Position 0 is the identity, and the rotation preserves each pair's norm.
    np.testing.assert_allclose(got[..., 0, :], x[..., 0, :], atol=1e-6)
    half = spec.head_dim // 2
    pair_norm = lambda a: a[..., :half] ** 2 + a[..., half:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair_norm(got), pair_norm(x), rtol=1e-5, atol=1e-6)


def test_per_op_parity_with_mlx():
    """rms_norm, rotary, attention, mlp, block and token_losses one at a time (diagnoses a whole-model miss)."""
    mx = pytest.importorskip("mlx.core")
    from backend_mlx import model as mm

    spec = SPEC
    w = perturbed(spec)
    rng = np.random.default_rng(3)
    h = rng.normal(size=(2, 32, spec.model_dim)).astype(np.float32)
    qk = rng.normal(size=(2, spec.num_heads, 32, spec.head_dim)).astype(np.float32)
    y = tokens(spec, seed=4)
    pt = {k: torch.tensor(v) for k, v in w.items()}
    pm = {k: mx.array(v) for k, v in w.items()}
    T, M = torch.tensor, mx.array
    cases = {
        "rms_norm": (tm.rms_norm(T(h), spec.norm_eps), mm.rms_norm(M(h), spec.norm_eps)),
        "rotary": (tm.rotary(T(qk), spec), mm.rotary(M(qk), spec)),
        "attention": (tm.attention(spec, pt, "blocks.1.attn.", T(h)), mm.attention(spec, pm, "blocks.1.attn.", M(h))),
        "mlp": (tm.mlp(pt, "blocks.0.mlp.", T(h)), mm.mlp(pm, "blocks.0.mlp.", M(h))),
        "block": (tm.block(spec, pt, 1, T(h), T(h[::-1].copy())), mm.block(spec, pm, 1, M(h), M(h[::-1].copy()))),
        "token_losses": (tm.token_losses(spec, pt, T(y), T(y)), mm.token_losses(spec, pm, M(y), M(y))),
    }
    for name, (a, b) in cases.items():
        a, b = a.detach().numpy(), np.array(b)
        assert a.shape == b.shape, name
        # Single ops in fp32 on O(1) values: a few ulps, observed <= 1e-6.
        assert np.abs(a - b).max() < 1e-5, name


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["noclip", "clip"])
def test_optimizer_steps_match_mlx(clip):
    """Muon + Adam in torch and MLX on the same numpy gradients: three steps, so the momentum buffers,
    Nesterov term and Adam bias correction all matter."""
    mx = pytest.importorskip("mlx.core")
    from backend_mlx.optim import init_state as mlx_init_state, make_update as mlx_make_update

    spec = SPEC
    optim = OptimConfig(grad_clip_norm=clip)
    w = perturbed(spec)
    rng = np.random.default_rng(5)
    grads = [{k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in w.items()} for _ in range(3)]
    assert sum(i.group == MATRIX for i in param_table(spec)) >= 2

    mp = {k: mx.array(v) for k, v in w.items()}
    ms = mlx_init_state(spec)
    mlx_update = mlx_make_update(spec, optim)
    tp = {k: torch.tensor(v) for k, v in w.items()}
    ts = torch_init_state(spec)
    torch_update = torch_make_update(spec, optim)
    for lr_scale, momentum, g in zip((1.0, 0.7, 0.4), (0.85, 0.9, 0.95), grads):
        mp, ms = mlx_update(mp, ms, {k: mx.array(v) for k, v in g.items()}, mx.array(lr_scale), mx.array(momentum))
        torch_update(tp, ts, {k: torch.tensor(v) for k, v in g.items()}, torch.tensor(lr_scale), torch.tensor(momentum))
    moved = max(np.abs(np.array(mp[k]) - w[k]).max() for k in w)
    assert moved > 0.05  # the steps did something
    # Newton-Schulz in fp32 on both sides: 5 quintic iterations amplify summation-order differences to
    # ~1e-7 relative; observed <= 2.4e-7 on weights of size ~1. 2e-6 keeps a 10x margin, while a wrong
    # coefficient, momentum form or bias correction moves weights by >= 1e-3.
    for k in w:
        np.testing.assert_allclose(tp[k].numpy(), np.array(mp[k]), atol=2e-6, rtol=0, err_msg=k)
    for k in ts["muon"]:
        np.testing.assert_allclose(ts["muon"][k].numpy(), np.array(ms["muon"][k]), atol=1e-7, rtol=1e-5, err_msg=k)
    for k in ts["adam"]:
        for s in ("m", "v"):
            np.testing.assert_allclose(ts["adam"][k][s].numpy(), np.array(ms["adam"][k][s]), atol=1e-9, rtol=1e-5)
    assert float(ts["step"]) == float(ms["step"]) == 3


@pytest.mark.slow
def test_loss_and_update_capture_as_full_graphs(monkeypatch):
    """The CUDA path compiles the loss with fullgraph=True and the optimizer pieces with torch.compile. Trace
    them here with the aot_eager backend (no codegen, so CPU-only CI runs it in seconds): a graph break from
    a model edit fails on CPU instead of on an H100. Results must equal eager."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager",
                                                                                "fullgraph": True}))
    spec = ModelSpec.from_table({**TINY, "layer_plan": "1x3"})
    w, x = perturbed(spec), torch.tensor(tokens(spec, seq=16))
    y = torch.roll(x, -1, 1)
    for dtype in (torch.float32, torch.bfloat16):
        p = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
        compiled = torch.compile(lambda p, x, y: tm.mean_loss(spec, p, x, y, dtype), dynamic=False)
        loss = compiled(p, x, y)
        loss.backward()
        eager = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
        ref = tm.mean_loss(spec, eager, x, y, dtype)
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-5
        assert max((p[k].grad - eager[k].grad).abs().max().item() for k in p) < 1e-5
    grads = {k: v.grad for k, v in p.items()}
    states = [torch_init_state(spec), torch_init_state(spec)]
    params = [{k: torch.tensor(v, requires_grad=True) for k, v in w.items()} for _ in states]  # leaves, as in training
    for i, compile in enumerate((True, False)):
        update = torch_make_update(spec, OptimConfig(grad_clip_norm=0.1), compile=compile)
        update(params[i], states[i], grads, torch.tensor(1.0), torch.tensor(0.9))
        with torch._dynamo.config.patch(error_on_recompile=True):  # new lr/momentum values are tensors: no retrace
            update(params[i], states[i], grads, torch.tensor(0.5), torch.tensor(0.95))
    for k in w:
        torch.testing.assert_close(params[0][k].detach(), params[1][k].detach(), atol=1e-6, rtol=0)
