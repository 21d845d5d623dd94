"""Per-iteration conditioning of the shared blocks (issue 5, items 1-3), in both backends.

For each option (core.spec.ModelSpec documents the forward pass): it validates and round-trips, its tensors
are in the parameter table, switching it on at its initial values leaves the logits of a model with the
same other weights as they were (identity / zero init), and `loopgolf parity` passes with all options on,
through --set. tests/test_model_runner.py runs each (and all together) against the numpy float64 reference
and MLX against torch, and checks that every new parameter gets a nonzero gradient in both backends (per
row, for the per-layer and per-loop tables), sits in exactly one optimizer group and moves in one step
(PR #1110's iteration embeddings were in no group and never trained).
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
from tests.helpers import ALL_ON, PLANS, spec_for, tokens  # noqa: E402
from tools import parity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ("iter_embeds", "loop_embeds", "per_layer_scales", "iter_scales", "layer_gains", "loop_gates")
# The new tensors of each option (and, for per_layer_scales, the per-block ones they replace).
NEW = {
    "iter_embeds": {"iter_embeds"},
    "loop_embeds": {"loop_embeds"},
    "per_layer_scales": {"layer_attn_scales", "layer_mlp_scales", "layer_resid_mixes"},
    "iter_scales": {"iter_scales"},
    "layer_gains": {"layer_in_gains", "layer_out_gains"},
    "loop_gates": {"loop_gates"},
}


# ---- the spec --------------------------------------------------------------------------------------------

def test_loop_index_and_loop_boundaries():
    s = spec_for("3x4")
    assert s.loop_index == tuple(layer // 3 for layer in range(12)) and s.num_loops == 4
    assert s.loop_starts == (0, 3, 6, 9) and s.loop_ends == (2, 5, 8, 11)
    s = spec_for("0 1 2 3 4 5 4 5 6 7 8")
    assert s.loop_index == (0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0) and s.num_loops == 2
    assert s.loop_starts == (0, 6, 8) and s.loop_ends == (5, 7, 10)
    assert spec_for("flat", num_layers=3).num_loops == 1


def test_options_default_off_validate_and_round_trip():
    s = ModelSpec()
    assert not any(getattr(s, o) for o in OPTIONS) and s.loop_gate_init == 1.0
    on = spec_for("2x3", **ALL_ON, loop_gate_init=1 / 3)
    assert ModelSpec.from_json(on.to_json()) == on
    for o in OPTIONS:
        assert f'"{o}":true' in on.to_json()
    with pytest.raises(UserError, match="'model.iter_embeds' = 'yes': expected true or false"):
        ModelSpec.from_table({"iter_embeds": "yes"})
    with pytest.raises(UserError, match="loop_gate_init = 0.5 has no effect while model.loop_gates = false"):
        ModelSpec.from_table({"loop_gate_init": 0.5})
    with pytest.raises(UserError, match="did you mean 'loop_gates'"):
        ModelSpec.from_table({"loop_gate": True})
    with pytest.raises(UserError, match="finite"):
        ModelSpec.from_table({"loop_gates": True, "loop_gate_init": float("nan")})


def test_parameter_table_shapes_groups_and_fp32_export():
    s = spec_for("3x4", **ALL_ON, loop_gate_init=0.25)
    table = {i.name: i for i in param_table(s)}
    L, R, d = 12, 4, 32
    want = {"iter_embeds": (L, d), "loop_embeds": (R, d), "layer_attn_scales": (L, d), "layer_mlp_scales": (L, d),
            "layer_resid_mixes": (L, 2, d), "iter_scales": (L, d), "layer_in_gains": (L,), "layer_out_gains": (L,),
            "loop_gates": (R,)}
    for name, shape in want.items():
        assert table[name].shape == shape and table[name].group == SCALAR and table[name].block is None, name
        assert is_control_name(name), f"{name} should stay fp32 in the artifact"
    # per_layer_scales replaces the blocks' own scales and resid_mix.
    assert not [n for n in table if n.startswith("blocks.") and n.endswith(("attn_scale", "mlp_scale", "resid_mix"))]
    w = init_weights(s)
    assert (w["iter_embeds"] == 0).all() and (w["loop_embeds"] == 0).all() and (w["iter_scales"] == 1).all()
    assert (w["layer_resid_mixes"][:, 0] == 1).all() and (w["layer_resid_mixes"][:, 1] == 0).all()
    assert (w["loop_gates"] == 0.25).all() and (w["layer_in_gains"] == 1).all()
    # Every option adds exactly its tensors to the count (unique = effective for per-layer tensors).
    base = spec_for("3x4")
    unique, effective = count_params(s)
    extra = sum(int(np.prod(v)) for v in want.values()) - 3 * (2 * d + 2 * d)  # minus 3 blocks' scales + mixes
    assert unique - count_params(base)[0] == extra
    assert effective - count_params(base)[1] == extra - 3 * 3 * (2 * d + 2 * d)  # each block ran 4x, counted 1x


# ---- identity at init ------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("option", OPTIONS)
def test_switching_an_option_on_leaves_the_initial_logits(option, plan):
    off, on = spec_for(plan), spec_for(plan, **{option: True})
    init_off, init_on = init_weights(off, 3), init_weights(on, 3)
    w_off = parity.perturbed_weights(off, 3)
    names_on = {i.name for i in param_table(on)}
    # Tensors the option replaces keep their (equal) init; the rest carry their perturbed values over.
    w_off = {k: (v if k in names_on else init_off[k]) for k, v in w_off.items()}
    w_on = {k: w_off.get(k, init_on[k]) for k in names_on}
    assert set(w_on) - set(w_off) == NEW[option]
    x = tokens()
    for backend in (backend_mlx, backend_torch):
        ref = backend.forward_logits(off, w_off, x)
        got = backend.forward_logits(on, w_on, x)
        # Identity up to rounding: h + (out - h) * 1 need not round to `out` exactly.
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=backend.__name__)
    # And the option is live: moving its tensors moves the logits.
    moved = {k: (v + 0.1 if k in NEW[option] else v) for k, v in w_on.items()}
    assert np.abs(backend_torch.forward_logits(on, moved, x) - backend_torch.forward_logits(on, w_on, x)).max() > 1e-3


def test_loop_gate_init_below_one_pulls_toward_x0():
    """#319's 1/3 initialisation is not the identity: it changes the step-0 output (its negative result)."""
    x = tokens()
    w = parity.perturbed_weights(spec_for("2x3"), 3)
    third = spec_for("2x3", loop_gates=True, loop_gate_init=1 / 3)
    w_third = {**w, "loop_gates": init_weights(third)["loop_gates"]}
    assert np.allclose(w_third["loop_gates"], 1 / 3)
    assert np.abs(backend_mlx.forward_logits(third, w_third, x) - backend_mlx.forward_logits(spec_for("2x3"), w, x)).max() > 1e-2


# ---- parity through --set --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS)
def test_parity_with_all_options_on(plan):
    """`loopgolf parity --config configs/demo.toml --small --set model.<option>=true ...` (demo: ~2 s a plan;
    ut_3x4 passes too, in ~16 s: `loopgolf parity --config configs/ut_3x4.toml --small --set ...`)."""
    sets = [f"model.{o}=true" for o in OPTIONS] + ["model.loop_gate_init=0.75", f"model.layer_plan='{plan}'"]
    cfg = load_config(ROOT / "configs" / "demo.toml", sets, small=True, small_vocab=True)
    assert all(getattr(cfg.model, o) for o in OPTIONS) and cfg.model.loop_gate_init == 0.75
    rows = parity.parity_rows(cfg, "float32", 11)
    assert not [r.check for r in rows if not r.ok], "\n" + parity.format_report(rows)
    grads = {r.check[5:] for r in rows if r.check.startswith("grad ")}
    assert set().union(*NEW.values()) <= grads
