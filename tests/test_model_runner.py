"""One runner for every model variant x layer plan x backend: the forward pass against the numpy float64
reference (tests/helpers.py), MLX against torch, and the gradients and optimizer groups.

For each case, a [model] option alone or a family of them together (VARIANTS), on a cyclic and a
middle-looped plan (the plain and untied models also on flat, odd-depth and irregular plans):
- each backend's logits match the reference, and the reference depends on the option (it is live), except
  for options that change only the initial values;
- MLX and torch agree to fp32 parity;
- for the families: every parameter of the table gets a finite, nonzero gradient in both backends, the same
  in both, on every row of a per-layer or per-loop table (a wrong index leaves a row untrained), sits in
  exactly one optimizer group of each backend, and one step moves it (PR #1110 shipped iteration
  embeddings that were in no group and never trained).
What is particular to an option (validation, its parameter table, identity at init, equivalences, parity
through --set) stays in its own test file.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

pytest.importorskip("mlx.core")
pytest.importorskip("torch")

import backend_mlx  # noqa: E402
from core.params import param_table  # noqa: E402
from tests.helpers import (  # noqa: E402
    ALL_ON, LOGIT_ATOL, PLANS, REFERENCE_ATOL, SEED_PART_OPTIONS, checked_grads, one_step_in_both, reference_logits,
    spec_for, tokens)
from tools import parity  # noqa: E402

CONDITIONING = {**ALL_ON, "loop_gate_init": 0.7}
BLOCKS = {"unet_skips": False, "cross_repeat_skips": True, "mlp_activation": "leaky_relu2", "mlp_hidden": 40}
ATTENTION_AND_INPUTS = {"q_rank": 8, "rope_dims": 6, "rope_train_seq_len": 8, "xsa_last_n": 3, "bigram_buckets": 16,
                        "bigram_dim": 8, "smear_gate": True, "value_embeds": 2}
SEED_PARTS = {"bigram_table_size": 32, "ve_layers": "1,4", "ve_dim": 8, "value_residual": True, "ln_scale": True,
              "loop_gates": True, "loop_gate_style": "seed319", "resid_mix_phase": True}
# The recurrent records' stack (#1394, #1493) in small: block 1 (a repeated block in both plans) parallel.
RECORDS = {"parallel_blocks": "1", "skip_gates": True, "ln_scale": True, "mlp_activation": "leaky_relu2",
           "xsa_last_n": 6, "rope_dims": 4, "qk_gain_init": 5.25}
VARIANTS = {
    "plain": {},
    "untied": {"tie_embeddings": False},
    # per-iteration conditioning (tests/test_recurrence_options.py)
    "iter_embeds": {"iter_embeds": True},
    "loop_embeds": {"loop_embeds": True},
    "per_layer_scales": {"per_layer_scales": True},
    "iter_scales": {"iter_scales": True},
    "layer_gains": {"layer_gains": True},
    "loop_gates": {"loop_gates": True, "loop_gate_init": 0.7},
    "conditioning": CONDITIONING,
    # skips and block variants (tests/test_block_variants.py)
    "no_unet": {"unet_skips": False},
    "cross_repeat": {"cross_repeat_skips": True},
    "leaky": {"mlp_activation": "leaky_relu2"},
    "hidden": {"mlp_hidden": 40},
    "blocks": BLOCKS,
    "blocks+conditioning": {**BLOCKS, **CONDITIONING},
    # attention and input variants (tests/test_attention_input_variants.py)
    "q_rank": {"q_rank": 8},
    "rope_dims": {"rope_dims": 4},
    "rope_ntk": {"rope_dims": 6, "rope_train_seq_len": 8},  # the test sequences (16) are longer: rescaled
    "xsa": {"xsa_last_n": 2},
    "bigram": {"bigram_buckets": 16, "bigram_dim": 8},
    "bigram_full_width": {"bigram_buckets": 16, "bigram_dim": 32},
    "smear": {"smear_gate": True},
    "value_embeds": {"value_embeds": 2},
    "attention+inputs": {**ATTENTION_AND_INPUTS, **CONDITIONING},
    # the seeds' remaining parts (tests/test_seed_parts.py)
    **SEED_PART_OPTIONS,
    "seed_parts": SEED_PARTS,
    # the recurrent records' parts (tests/test_record_parts.py)
    "parallel": {"parallel_blocks": "1"},
    "parallel_all": {"parallel_blocks": "0,1"},
    "skip_gates": {"skip_gates": True},
    "records": RECORDS,
    # all at once (the phase init and per-layer scales exclude each other; #319's gates replace the others)
    "everything": {**BLOCKS, **ATTENTION_AND_INPUTS, **{k: v for k, v in CONDITIONING.items() if k != "loop_gate_init"},
                   **{k: v for k, v in SEED_PARTS.items() if k != "resid_mix_phase"}, "tie_embeddings": False,
                   "parallel_blocks": "1"},  # no skip gates: BLOCKS has no U-Net
}
# Options that change only the initial values: the same weights give the same function as the plain model.
INIT_ONLY = {"phase"}
# Options that change the shapes of tensors the plain model has: no liveness check against it.
RESHAPING = {"hidden", "q_rank", "blocks", "blocks+conditioning", "attention+inputs", "everything"}
# The families: together they hold every tensor any option adds.
FAMILIES = ("plain", "untied", "conditioning", "blocks+conditioning", "attention+inputs", "seed_parts", "records",
            "everything")
EXTRA_PLANS = {"plain": ("flat3", "flat5", "0 1 1 0 1"), "untied": ("flat3",)}  # flat5: the last layer gets no skip
CASES = [(v, p) for v in VARIANTS for p in PLANS + EXTRA_PLANS.get(v, ())]
BACKENDS = {"mlx": backend_mlx, "torch": backend_torch}


@functools.lru_cache(maxsize=None)
def case(variant: str, plan: str):
    """(spec, perturbed weights, tokens) of one case; the same objects for every test that asks."""
    options = dict(VARIANTS[variant])
    if plan.startswith("flat"):
        options["num_layers"] = int(plan[4:])
        plan = "flat"
    if plan == "0 1 2 1 2 3" and "ve_layers" in options:  # VE at a layer whose block runs once and one that repeats
        options["ve_layers"] = options["ve_layers"].replace("1,", "2,")
    spec = spec_for(plan, **options)
    return spec, parity.perturbed_weights(spec, 5), tokens(2)


@functools.lru_cache(maxsize=None)
def logits(variant: str, plan: str, backend: str) -> np.ndarray:
    spec, w, x = case(variant, plan)
    return reference_logits(spec, w, x) if backend == "numpy" else BACKENDS[backend].forward_logits(spec, w, x)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("variant,plan", CASES)
def test_logits_match_the_numpy_reference(variant, plan, backend):
    spec = case(variant, plan)[0]
    got = logits(variant, plan, backend)
    assert got.dtype == np.float32 and got.shape == (2, 16, spec.vocab_size)
    np.testing.assert_allclose(got, logits(variant, plan, "numpy"), atol=REFERENCE_ATOL, rtol=0)


@pytest.mark.parametrize("variant,plan", CASES)
def test_mlx_and_torch_agree(variant, plan):
    assert np.abs(logits(variant, plan, "mlx") - logits(variant, plan, "torch")).max() < LOGIT_ATOL


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "plain" and v not in RESHAPING])
def test_the_reference_depends_on_the_option(variant):
    """Without this, a reference that ignored an option would agree with backends that ignore it too."""
    spec, w, x = case(variant, "2x3")
    plain = spec_for("2x3")
    w_plain = {**parity.perturbed_weights(plain, 5), **w}  # per_layer_scales drops the blocks' own scales
    without = reference_logits(plain, {i.name: w_plain[i.name] for i in param_table(plain)}, x)
    moved = np.abs(logits(variant, "2x3", "numpy") - without).max()
    if variant in INIT_ONLY:
        assert moved == 0, f"{variant} should change only the initial values"
    else:
        # Five times the agreement tolerance, so that agreement tells the option from its absence (the smallest
        # effect here, one full-width VE at the last layer only, moves the logits by 9e-4).
        assert moved > 5 * REFERENCE_ATOL, f"{variant} does not change the reference's logits"


# Tables with one row per effective layer, per loop or per use (a wrong index would leave a row untrained).
PER_ROW = {"iter_embeds", "loop_embeds", "layer_attn_scales", "layer_mlp_scales", "layer_resid_mixes", "iter_scales",
           "layer_in_gains", "layer_out_gains", "loop_gates", "value_scales", "vrl_alphas", "ve_layer_scales",
           "skip_weights", "skip_gates"}


@pytest.mark.parametrize("variant,plan", [(v, p) for v in FAMILIES for p in PLANS])
def test_every_parameter_gets_a_gradient_a_group_and_moves(variant, plan):
    spec, w, _ = case(variant, plan)
    gm, gt = checked_grads(spec, w)
    for info in param_table(spec):
        if info.name in PER_ROW:
            for g in (gm[info.name], gt[info.name]):  # every layer's (or loop's, or table's) row trains
                rows = np.abs(g).max(-1) if g.ndim > 1 else np.abs(g)
                assert (rows > 0).all(), f"{info.name}: rows {np.argwhere(rows == 0).tolist()} get no gradient"
    if spec.cross_repeat_skips:  # the (block, repeat) rows the plan reaches train; the rest stay untouched
        uses = [spec.layer_plan.count(b) for b in range(spec.num_blocks)]
        rows = np.abs(gm["cross_repeat_scales"]).max(-1)
        assert [[bool(rows[b, r]) for r in range(spec.num_loops - 1)] for b in range(spec.num_blocks)] == \
            [[r + 1 < uses[b] for r in range(spec.num_loops - 1)] for b in range(spec.num_blocks)]
    after_mlx, after_torch = one_step_in_both(spec, w, gm, gt)
    for name in w:  # Muon moves each matrix, Adam's first step every element with a gradient by about its LR
        for backend, after in (("mlx", after_mlx), ("torch", after_torch)):
            assert np.abs(after[name] - w[name]).max() > 1e-4, f"{backend}: one step leaves {name} where it was"
