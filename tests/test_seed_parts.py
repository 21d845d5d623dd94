"""The seeds' remaining parts (issue 16), in both backends: #319's exact gating (loop_gate_style = "seed319"),
#470's multiplicative bigram table, and #1110's VE into V, VRL, ln_scale, orthogonal init with its projection
rescale and the phase init of resid_mix. core.spec.ModelSpec's "seed parts" give the forward pass.

For each: the spec validates and round-trips; the parameter table has the seeds' shapes, groups and
inits; the zero-initialised ones start as the identity and the others change the function; truncated
plans keep what they still have; `loopgolf parity` passes with all on. tests/test_model_runner.py runs each
(and all together) against the numpy float64 reference, MLX against torch, and checks that every new
tensor gets a gradient in both backends, sits in one optimizer group and moves in one step.
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
from core.depth import truncate_weights, truncated_spec  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.params import EMBED, MATRIX, SCALAR, count_params, init_weights, param_table  # noqa: E402
from core.quant import is_control_name  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import REFERENCE_ATOL, SEED_PART_OPTIONS, TINY, reference_logits, spec_for, tokens  # noqa: E402
from tools import parity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = SEED_PART_OPTIONS
NEW = {  # the tensors each option adds
    "bigram_table": {"bigram_emb.weight"},
    "ve": {"ve_shared.embed.weight", "ve_shared.proj.weight", "ve_shared.scale", "ve_layer_scales"},
    "ve_full_width": {"ve_shared.embed.weight", "ve_shared.scale", "ve_layer_scales"},
    "vrl": {"vrl_alphas"},
    "ln_scale": set(),
    "seed319": {"loop_gates"},
    "phase": set(),
}
ALL = {k: v for o in ("bigram_table", "ve", "vrl", "ln_scale", "seed319", "phase") for k, v in OPTIONS[o].items()}


# ---- the spec ---------------------------------------------------------------------------------------------

def test_defaults_round_trip_and_validation():
    s = ModelSpec()
    assert (s.loop_gate_style, s.bigram_table_size, s.ve_layers, s.ve_dim) == ("every_loop", 0, "", 128)
    assert not (s.value_residual or s.ln_scale or s.ortho_init or s.resid_mix_phase)
    on = spec_for("2x3", **ALL, ortho_init=True)
    assert ModelSpec.from_json(on.to_json()) == on
    assert spec_for("3x4", ve_layers=" 10, 9").ve_layers == "9,10" == spec_for("3x4", ve_layers="9 10").ve_layers
    assert spec_for("3x4", ve_layers="10,9").ve_layer_list == (9, 10)
    bad = [({"ve_layers": "9,x"}, "ve_layers = '9,x': expected effective layer indices"),
           ({"ve_layers": "3,3"}, "names a layer twice"),
           ({"ve_layers": "6"}, "layer 6 is past the plan's 6 effective layers"),
           ({"ve_layers": "1", "ve_dim": 0}, "ve_dim = 0"),
           ({"bigram_table_size": -1}, "bigram_table_size = -1"),
           ({"loop_gate_style": "seed319"}, "has no effect while model.loop_gates = false"),
           ({"loop_gates": True, "loop_gate_style": "first"}, "expected one of 'every_loop', 'seed319'"),
           ({"loop_gates": True, "loop_gate_style": "seed319", "loop_gate_init": 0.5}, "starts? at 1/num_loops"),
           ({"resid_mix_phase": True, "per_layer_scales": True}, "switch one off")]
    for options, message in bad:
        with pytest.raises(UserError, match=message):
            spec_for("2x3", **options)
    with pytest.raises(UserError, match="needs a plan that runs some block more than once"):
        spec_for("flat", num_layers=3, loop_gates=True, loop_gate_style="seed319")
    with pytest.raises(UserError, match="at least 2 effective layers"):
        spec_for("flat", num_layers=1, value_residual=True)


# ---- the parameter table ---------------------------------------------------------------------------------

def test_parameter_table_shapes_groups_and_inits():
    d, L = TINY["model_dim"], 6
    table = {i.name: i for i in param_table(spec_for("2x3", **ALL))}
    want = {"bigram_emb.weight": ((32, d), EMBED, "zeros"), "ve_shared.embed.weight": ((64, 8), EMBED, "normal"),
            "ve_shared.proj.weight": ((16, 8), MATRIX, "uniform_fan_in"), "ve_shared.scale": ((1,), SCALAR, "const"),
            "ve_layer_scales": ((2,), SCALAR, "ones"), "vrl_alphas": ((L - 1,), SCALAR, "zeros"),
            "loop_gates": ((2,), SCALAR, "const")}  # seed319: no gate after the first of the 3 loops
    for name, (shape, group, init) in want.items():
        info = table[name]
        assert (info.shape, info.group, info.init, info.block) == (shape, group, init, None), name
        assert is_control_name(name) == (group == SCALAR), f"{name}: fp32 in the artifact iff a control tensor"
    w = init_weights(spec_for("2x3", **ALL))
    assert w["ve_shared.scale"][0] == np.float32(0.1) and 0.008 < w["ve_shared.embed.weight"].std() < 0.012
    assert np.allclose(w["loop_gates"], 1 / 3) and (w["vrl_alphas"] == 0).all() and (w["ve_layer_scales"] == 1).all()
    # The phase init (#1110: 0.18, 0.5, 0.82 for 3 blocks): resid_mix = [phase, 1 - phase] per block.
    w3 = init_weights(spec_for("3x2", resid_mix_phase=True))
    phases = [float(w3[f"blocks.{b}.resid_mix"][0, 0]) for b in range(3)]
    np.testing.assert_allclose(phases, [1 / (1 + np.exp(1.5)), 0.5, 1 / (1 + np.exp(-1.5))], rtol=1e-6)
    for b in range(3):
        np.testing.assert_allclose(w3[f"blocks.{b}.resid_mix"].sum(0), 1.0, rtol=1e-6)


def test_seed_counts():
    """The seeds' counts: #1110's VE is 163,841 + 2 layer scales and VRL 11 (d 512, 12 layers); #470's table 4,194,304."""
    base = {"layer_plan": "3x4"}
    ve = ModelSpec.from_table({**base, "ve_layers": "9,10"})
    assert count_params(ve)[0] - count_params(ModelSpec.from_table(base))[0] == 131_072 + 32_768 + 1 + 2
    vrl = ModelSpec.from_table({**base, "value_residual": True})
    assert count_params(vrl)[0] - count_params(ModelSpec.from_table(base))[0] == 11
    big = {"model_dim": 1024, "num_heads": 16, "num_kv_heads": 8, "layer_plan": "1x9"}
    extra = count_params(ModelSpec.from_table({**big, "bigram_table_size": 4096}))[0]
    assert extra - count_params(ModelSpec.from_table(big))[0] == 4_194_304


def test_orthogonal_init_and_projection_rescale():
    """#1110's _init_weights at d 64 (3 blocks): the >= 64 x 64 matrices that are not zero-init are orthogonal,
    bigram/VE projections (named .proj.) scaled by 1/sqrt(2 * 3); attn.proj/mlp.proj stay 0; smaller ones
    keep the default init."""
    spec = ModelSpec.from_table({"vocab_size": 64, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                                 "layer_plan": "3x2", "bigram_buckets": 16, "bigram_dim": 96,
                                 "ve_layers": "5", "ve_dim": 64, "ortho_init": True})
    table = {i.name: i for i in param_table(spec)}
    w = init_weights(spec, 3)
    for name in ("blocks.0.attn.c_q.weight", "blocks.2.mlp.fc.weight", "bigram.proj.weight"):
        m = w[name].astype(np.float64)
        gain = 1 / np.sqrt(6) if ".proj." in name else 1.0
        small_side = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        np.testing.assert_allclose(small_side, gain**2 * np.eye(min(m.shape)), atol=1e-5, err_msg=name)
        assert table[name].init == "orthogonal"
    assert table["blocks.1.attn.c_k.weight"].init == "uniform_fan_in"  # (32, 64): below 64 rows
    assert table["ve_shared.proj.weight"].init == "uniform_fan_in"  # (32, 64): below 64, a Linear's default
    assert not w["blocks.0.attn.proj.weight"].any() and not w["blocks.0.mlp.proj.weight"].any()
    # Without the option the same tensors keep their defaults, and other tensors' values do not move.
    plain = init_weights(ModelSpec.from_table({**spec.to_dict(), "ortho_init": False}), 3)
    assert not np.allclose(plain["blocks.0.attn.c_q.weight"], w["blocks.0.attn.c_q.weight"])
    np.testing.assert_array_equal(plain["tok_emb.weight"], w["tok_emb.weight"])


def test_flops():
    """The shared VE's projection is counted once per token with the inputs (core.flops); the bigram table,
    VRL, ln_scale and the gates are lookups and elementwise."""
    from core.flops import flops_per_token

    base = flops_per_token(spec_for("2x3"), 16)
    assert flops_per_token(spec_for("2x3", **OPTIONS["ve"]), 16).inputs - base.inputs == 2 * 8 * 16
    assert flops_per_token(spec_for("2x3", **OPTIONS["ve_full_width"]), 16) == base
    for option in ("bigram_table", "vrl", "ln_scale", "seed319", "phase"):
        assert flops_per_token(spec_for("2x3", **OPTIONS[option]), 16) == base, option


# ---- forward: identity at init and liveness --------------------------------------------------------------

IDENTITY = ("bigram_table", "ve_full_width")  # a zero table: step 0 unchanged (VE's with its table zeroed)


@pytest.mark.parametrize("option", IDENTITY)
def test_zero_initialised_options_leave_the_initial_logits(option):
    off, on = spec_for("2x3"), spec_for("2x3", **OPTIONS[option])
    w_off = parity.perturbed_weights(off, 3)
    init_on = init_weights(on, 3)
    if option == "ve_full_width":  # N(0, 0.01) in the seed: zeroed here, VE into V adds nothing
        init_on["ve_shared.embed.weight"] = np.zeros_like(init_on["ve_shared.embed.weight"])
    w_on = {**init_on, **w_off}
    x = tokens()
    for backend in (backend_mlx, backend_torch):
        np.testing.assert_allclose(backend.forward_logits(on, w_on, x), backend.forward_logits(off, w_off, x),
                                   atol=1e-6, rtol=0, err_msg=backend.__name__)
    moved = {k: (v + 0.1 if k in NEW[option] else v) for k, v in w_on.items()}
    assert np.abs(backend_torch.forward_logits(on, moved, x) - backend_torch.forward_logits(on, w_on, x)).max() > 1e-3


@pytest.mark.parametrize("option", ["ve", "vrl", "ln_scale", "seed319", "phase"])
def test_the_other_parts_change_the_function(option):
    """VE adds its (small) table to V, VRL half of layer 0's V at init, ln_scale shrinks the later blocks'
    inputs, #319's gates start at 1/3 and skip the first loop, the phase init moves resid_mix: none is the
    identity."""
    off, on = spec_for("2x3"), spec_for("2x3", **OPTIONS[option])
    w_off = parity.perturbed_weights(off, 3)
    init_on = init_weights(on, 3)
    w_on = {k: init_on[k] if (k in NEW[option] or option == "phase" and k.endswith("resid_mix")) else w_off[k]
            for k in init_on}
    x = tokens()
    moved = np.abs(backend_mlx.forward_logits(on, w_on, x) - backend_mlx.forward_logits(off, w_off, x)).max()
    assert moved > (1e-5 if option == "ve" else 1e-3)  # VE's table is N(0, 0.01) x 0.1: ~3e-4 here, fp32 noise ~1e-7


def test_seed319_gates_skip_the_first_loop():
    """With #319's style the gate after loop r >= 1 is loop_gates[r - 1]: all gates at 1 is the ungated
    model, and every_loop with a first gate of 1 and the same later gates is the same function."""
    plain = spec_for("2x3")
    w = parity.perturbed_weights(plain, 4)
    seed = spec_for("2x3", loop_gates=True, loop_gate_style="seed319")
    every = spec_for("2x3", loop_gates=True)
    x = tokens()
    ones = backend_torch.forward_logits(seed, {**w, "loop_gates": np.ones(2, np.float32)}, x)
    np.testing.assert_allclose(ones, backend_torch.forward_logits(plain, w, x), atol=1e-6, rtol=0)
    gates = np.array([0.6, 0.3], np.float32)
    got = backend_torch.forward_logits(seed, {**w, "loop_gates": gates}, x)
    same = backend_torch.forward_logits(every, {**w, "loop_gates": np.array([1.0, 0.6, 0.3], np.float32)}, x)
    np.testing.assert_allclose(got, same, atol=1e-6, rtol=0)


def test_truncated_plans_keep_the_parts_they_still_have():
    """Progressive depth's truncated model: VE only at the layers it has, #319's gates off with one loop."""
    spec = spec_for("2x3", **ALL)
    two = truncated_spec(spec, 4)
    assert two.ve_layers == "1" and two.loop_gates and two.num_loop_gates == 1
    one = truncated_spec(spec, 2)
    assert one.ve_layers == "1" and not one.loop_gates and "loop_gates" not in {i.name for i in param_table(one)}
    w = parity.perturbed_weights(spec, 6)
    for layers in (2, 4):
        sub = truncated_spec(spec, layers)
        ws = truncate_weights(spec, w, layers)
        np.testing.assert_allclose(backend_mlx.forward_logits(sub, ws, tokens()), reference_logits(sub, ws, tokens()),
                                   atol=REFERENCE_ATOL, rtol=0)


# ---- parity through --set ------------------------------------------------------------------------------------

def test_parity_with_every_part_on():
    """`loopgolf parity --config configs/demo.toml --small --set model.ve_layers='1,4' --set ...` (~3 s), with
    the records' parts on too (tests/test_record_parts.py): a parallel block, which gets its own op row, and
    the skip gates."""
    sets = [f"model.{k}={v!r}".replace("True", "true") for k, v in ALL.items() if k != "ve_dim"]
    sets += ["model.ve_dim=8", "model.ortho_init=true", "model.layer_plan='2x3'"]
    sets += ["model.parallel_blocks='1'", "model.skip_gates=true"]
    cfg = load_config(ROOT / "configs" / "demo.toml", sets, small=True, small_vocab=True)
    assert cfg.model.value_residual and cfg.model.ve_layers == "1,4" and cfg.model.loop_gate_style == "seed319"
    rows = parity.parity_rows(cfg, "float32", 11)
    assert not [r.check for r in rows if not r.ok], "\n" + parity.format_report(rows)
    grads = {r.check[5:] for r in rows if r.check.startswith("grad ")}
    assert set().union(*NEW.values()) | {"skip_gates"} <= grads
    assert "op block 1 (parallel residual)" in {r.check for r in rows}
