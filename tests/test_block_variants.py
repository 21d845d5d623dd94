"""Skips and block variants (issue 5, items 4-5), in both backends: unet_skips, cross_repeat_skips,
mlp_activation and mlp_hidden.

As tests/test_recurrence_options.py: cross_repeat_skips is zero-initialised, so switching it on leaves the
step-0 logits; unet_skips = false and the MLP variants change the function by design. Here: validation, the
parameter table, identity at init, and `loopgolf parity` with them on; tests/test_model_runner.py runs each
(and all together) against the numpy float64 reference, MLX against torch, and checks the gradients, the
optimizer groups and the reached rows of cross_repeat_scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

import backend_mlx  # noqa: E402
from core.config import load_config  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.params import SCALAR, count_params, init_weights, param_table  # noqa: E402
from core.quant import is_control_name  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import ALL_ON, PLANS, TINY, spec_for, tokens  # noqa: E402
from tools import parity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVERYTHING = {"unet_skips": False, "cross_repeat_skips": True, "mlp_activation": "leaky_relu2", "mlp_hidden": 40}


def test_defaults_validation_and_round_trip():
    s = ModelSpec()
    assert s.unet_skips and not s.cross_repeat_skips and s.mlp_activation == "relu2" and s.mlp_hidden == 0
    assert s.mlp_width == 2 * 512
    on = spec_for("2x3", **EVERYTHING)
    assert ModelSpec.from_json(on.to_json()) == on and on.mlp_width == 40
    for text in ('"unet_skips":false', '"cross_repeat_skips":true', '"mlp_activation":"leaky_relu2"', '"mlp_hidden":40'):
        assert text in on.to_json()
    with pytest.raises(UserError, match="mlp_activation = 'gelu': expected one of 'relu2', 'leaky_relu2'"):
        ModelSpec.from_table({"mlp_activation": "gelu"})
    with pytest.raises(UserError, match="mlp_hidden = -1"):
        ModelSpec.from_table({"mlp_hidden": -1})
    with pytest.raises(UserError, match="expected true or false"):
        ModelSpec.from_table({"unet_skips": "no"})
    with pytest.raises(UserError, match="cross_repeat_skips = true needs a plan that runs some block more than once"):
        spec_for("flat", num_layers=3, cross_repeat_skips=True)


def test_parameter_table():
    d = TINY["model_dim"]
    base = spec_for("3x4")
    assert {i.name: i.shape for i in param_table(base)}["skip_weights"] == (6, d)
    off = spec_for("3x4", unet_skips=False)
    assert "skip_weights" not in {i.name for i in param_table(off)}
    assert count_params(base)[0] - count_params(off)[0] == 6 * d
    cr = spec_for("3x4", cross_repeat_skips=True)
    info = {i.name: i for i in param_table(cr)}["cross_repeat_scales"]
    assert info.shape == (3, 3, d) and info.group == SCALAR and info.block is None and info.init == "zeros"
    assert is_control_name("cross_repeat_scales") and (init_weights(cr)["cross_repeat_scales"] == 0).all()
    assert count_params(cr)[0] - count_params(base)[0] == 3 * 3 * d
    h = spec_for("3x4", mlp_hidden=40)
    shapes = {i.name: i.shape for i in param_table(h)}
    assert shapes["blocks.0.mlp.fc.weight"] == (40, d) and shapes["blocks.2.mlp.proj.weight"] == (d, 40)
    assert count_params(h)[0] - count_params(base)[0] == 3 * 2 * d * (40 - 2 * d)


@pytest.mark.parametrize("plan", PLANS)
def test_cross_repeat_skips_at_init_leave_the_logits(plan):
    off, on = spec_for(plan, **ALL_ON), spec_for(plan, **ALL_ON, cross_repeat_skips=True)
    w_off = parity.perturbed_weights(off, 3)
    w_on = {**w_off, "cross_repeat_scales": init_weights(on, 3)["cross_repeat_scales"]}
    x = tokens()
    for backend in (backend_mlx, backend_torch):
        np.testing.assert_array_equal(backend.forward_logits(on, w_on, x), backend.forward_logits(off, w_off, x))
    moved = {**w_on, "cross_repeat_scales": w_on["cross_repeat_scales"] + 0.1}
    assert np.abs(backend_torch.forward_logits(on, moved, x) - backend_torch.forward_logits(on, w_on, x)).max() > 1e-3


@pytest.mark.slow
def test_parity_with_the_variants_on():
    """`loopgolf parity --config configs/demo.toml --small --set model.unet_skips=false --set ...`."""
    sets = ["model.unet_skips=false", "model.cross_repeat_skips=true", "model.mlp_activation='leaky_relu2'",
            "model.mlp_hidden=48", "model.layer_plan='2x3'"]
    cfg = load_config(ROOT / "configs" / "demo.toml", sets, small=True, small_vocab=True)
    assert not cfg.model.unet_skips and cfg.model.cross_repeat_skips and cfg.model.mlp_hidden == 48
    rows = parity.parity_rows(cfg, "float32", 11)
    assert not [r.check for r in rows if not r.ok], "\n" + parity.format_report(rows)
    grads = {r.check[5:] for r in rows if r.check.startswith("grad ")}
    assert "cross_repeat_scales" in grads and "skip_weights" not in grads
    assert any(r.check == "op mlp (leaky_relu2)" for r in rows)
