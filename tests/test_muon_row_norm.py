"""MuonEq-R (optim.muon_row_normalize, #1394/#1493): each row of Muon's Nesterov update divided by its L2 norm
(at least 1e-7) before Newton-Schulz, in both backends.

The update is a numpy reference's; it no longer depends on the scale of a gradient row (the point of the
normalisation), which the plain Muon update does; MLX and torch agree; off is bit for bit the plain step; a
backend's state round trip continues a row-normalised run exactly (the option adds no state).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from backend_mlx.optim import init_state as mlx_init_state, make_update as mlx_make_update  # noqa: E402
from backend_torch.optim import NS_COEFFS, init_state as torch_init_state, make_update as torch_make_update  # noqa: E402
from core.checkpoint import config_differences, config_record  # noqa: E402
from core.config import OptimConfig, config_from_dict  # noqa: E402
from core.params import MATRIX, param_table  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import assert_optimizer_option_resumes_exactly  # noqa: E402
from tools import parity  # noqa: E402

SPEC = ModelSpec.from_table({"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x2"})
ROW_NORM = OptimConfig(muon_row_normalize=True)
MOMENTUM, LR_SCALE = 0.9, 0.7


def one_update(backend: str, optim: OptimConfig, w: dict, g: dict) -> dict:
    if backend == "mlx":
        p = {k: mx.array(v) for k, v in w.items()}
        p, _ = mlx_make_update(SPEC, optim)(p, mlx_init_state(SPEC), {k: mx.array(v) for k, v in g.items()},
                                            mx.array(LR_SCALE), mx.array(MOMENTUM))
        return {k: np.array(v, np.float64) for k, v in p.items()}
    p = {k: torch.tensor(v) for k, v in w.items()}
    torch_make_update(SPEC, optim)(p, torch_init_state(SPEC), {k: torch.tensor(v) for k, v in g.items()},
                                   torch.tensor(LR_SCALE), torch.tensor(MOMENTUM))
    return {k: v.numpy().astype(np.float64) for k, v in p.items()}


def reference_step(p: np.ndarray, g: np.ndarray, lr: float, steps: int) -> np.ndarray:
    """The MuonEq-R step in float64 numpy, from RECORDS.md's description (first step: momentum buffer = g)."""
    x = g + MOMENTUM * g  # Nesterov: buf = 0 * mu + g, then g + mu * buf
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-7)
    a, b, c = NS_COEFFS
    x = x / (np.linalg.norm(x) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    return p - lr * x * max(1.0, p.shape[0] / p.shape[1]) ** 0.5


@pytest.fixture(scope="module")
def weights_and_grads():
    w = parity.perturbed_weights(SPEC, 1)
    rng = np.random.default_rng(2)
    return w, {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in w.items()}


MATRICES = [i.name for i in param_table(SPEC) if i.group == MATRIX]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_step_is_the_reference_and_ignores_the_scale_of_a_gradient_row(backend, weights_and_grads):
    w, g = weights_and_grads
    got = one_update(backend, ROW_NORM, w, g)
    lr = ROW_NORM.matrix_lr * LR_SCALE
    for name in MATRICES:
        want = reference_step(w[name].astype(np.float64), g[name].astype(np.float64), lr, ROW_NORM.muon_backend_steps)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-5 * lr, err_msg=name)  # fp32 NS vs float64
    # Rows scaled by 1/8 .. 8: the normalised update barely moves (rounding), the plain one visibly.
    rng = np.random.default_rng(7)
    scaled = {k: (v * rng.uniform(0.125, 8, (v.shape[0], 1)).astype(np.float32) if k in MATRICES else v)
              for k, v in g.items()}
    moved, plain_moved = [], []
    plain, plain_scaled = one_update(backend, OptimConfig(), w, g), one_update(backend, OptimConfig(), w, scaled)
    again = one_update(backend, ROW_NORM, w, scaled)
    for name in MATRICES:
        step = np.abs(got[name] - w[name]).max()
        moved.append(np.abs(again[name] - got[name]).max() / step)
        plain_moved.append(np.abs(plain_scaled[name] - plain[name]).max() / np.abs(plain[name] - w[name]).max())
    assert max(moved) < 1e-4 and min(plain_moved) > 1e-2, (moved, plain_moved)


def test_backends_agree_and_off_is_bit_for_bit_the_plain_step(weights_and_grads):
    w, g = weights_and_grads
    m, t = one_update("mlx", ROW_NORM, w, g), one_update("torch", ROW_NORM, w, g)
    for name in w:
        # Newton-Schulz differs by its rounding (core/tolerances.py 'update_muon'); Adam is untouched.
        np.testing.assert_allclose(m[name], t[name], rtol=0, atol=1e-5, err_msg=name)
    off = dataclasses.replace(ROW_NORM, muon_row_normalize=False)
    for backend in ("mlx", "torch"):
        a, b = one_update(backend, OptimConfig(), w, g), one_update(backend, off, w, g)
        assert all(np.array_equal(a[k], b[k]) for k in w), backend


@pytest.mark.slow  # MLX compiles its step: about 3 s
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_row_normalised_run_continues_exactly_from_its_state(backend, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert_optimizer_option_resumes_exactly(backend, SPEC, ROW_NORM, MATRICES)  # plain Muon ends elsewhere


def test_the_key_validates_and_a_resume_refuses_a_change():
    from core.errors import UserError

    raw = {"model": SPEC.to_dict()}
    with pytest.raises(UserError, match="muon_row_normalize"):
        config_from_dict({**raw, "optim": {"muon_row_normalize": "yes"}})
    before = config_from_dict(raw)
    meta = {"spec": before.model.to_dict(), "config": config_record(before)}
    assert config_differences(meta, before) == []
    after = config_from_dict({**raw, "optim": {"muon_row_normalize": True}})
    assert config_differences(meta, after) == ["optim.muon_row_normalize (checkpoint False, now True)"]
