"""The seed topologies shipped in configs/ (issues 5 and 16): parameter counts against the seeds' logs, and
for every shipped config, at --small: one optimizer step (with the config's own optimizer settings, weight
decay included) moves every parameter, after which every parameter gets a nonzero gradient and sits in
exactly one optimizer group (#1110 shipped iteration embeddings that were in no group and never trained);
and a shared block's gradient is the sum of the gradients of an unrolled copy with one block per use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from core.config import load_config  # noqa: E402
from core.params import count_params, init_weights, param_table  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import grads_in_both, one_step_in_both  # noqa: E402
from tools import parity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))

# The seeds' logged parameter counts, which `loopgolf size --config` prints as "params: N unique".
SEED_PARAMS = {
    "loop_5x3_640.toml": 15_006_123,  # #319: 5 x 2,869,768 + 655,360 + 1,923, "matches the log"
    "progressive_3x5.toml": 17_150_040,  # #895's 4-hour run, "matches the log"
    "ut_3x4_iter.toml": 8_115_775,  # #1110's train_seed42.txt, VE and VRL included
    "shared_1x9.toml": 18_915_344,  # #470's train_log.txt, its multiplicative bigram table included
    "layer_sharing_3x9.toml": 6_037_528,  # #167's "6.0M" (test_layer_sharing_matches_its_6_0m)
}


def small(name: str):
    return load_config(ROOT / "configs" / name, small=True, small_vocab=True).model


@pytest.mark.parametrize("name", sorted(SEED_PARAMS))
def test_seed_config_parameter_counts(name):
    """count_params is what `loopgolf size --config` prints as "params: N unique"."""
    assert count_params(ModelSpec.from_toml(ROOT / "configs" / name))[0] == SEED_PARAMS[name]


def test_layer_sharing_matches_its_6_0m():
    """#167's "3 shared, 512d: 6.0M" (one decimal in the PR); by hand: 3 baseline blocks at d 512 (1,837,064
    each), the 1024 x 512 embedding and the 4 x 512 U-Net skip weights of its 9 virtual layers."""
    block = 512 * 512 * 2 + 2 * 256 * 512 + 2 * 1024 * 512 + 8 + 2 * 512 + 2 * 512  # q, o; k, v; fc, proj; gains
    n = count_params(ModelSpec.from_toml(ROOT / "configs" / "layer_sharing_3x9.toml"))[0]
    assert n == 3 * block + 1024 * 512 + 4 * 512 and round(n / 1e6, 1) == 6.0


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_after_one_step_every_parameter_moved_and_trains_in_exactly_one_group(name):
    """From the init (zero-init projections, gates and embeddings give many tensors no gradient at step 0,
    as upstream), one optimizer step in each backend with the config's optimizer: every tensor moved (a
    zero gradient still moves under weight decay, so this holds for the tensors with one), then a backward
    pass: every tensor's gradient is nonzero. one_step_in_both asserts each parameter sits in exactly one
    group of each backend."""
    cfg = load_config(ROOT / "configs" / name, small=True, small_vocab=True)
    spec = cfg.model
    w = init_weights(spec, 1)
    gm, gt = grads_in_both(spec, w)
    after_mlx, after_torch = one_step_in_both(spec, w, gm, gt, cfg.optim)
    had_gradient = [i.name for i in param_table(spec) if np.abs(gt[i.name].numpy()).max() > 0]
    for after in (after_mlx, after_torch):
        still = [n for n in had_gradient if np.array_equal(after[n], w[n])]
        assert not still, f"{name}: one step did not move {still}"
    for after in (after_mlx, after_torch):
        gm2, gt2 = grads_in_both(spec, after)
        dead = [i.name for i in param_table(spec)
                if not (np.abs(np.array(gm2[i.name])).max() > 0 and np.abs(gt2[i.name].numpy()).max() > 0)]
        assert not dead, f"{name}: no gradient after one step for {dead}"


# Tied to the loop structure, so an unrolled copy is another function: the loop options, and ln_scale (its
# 1/sqrt(b + 1) follows the unique block's index, which unrolling renumbers).
LOOP_OPTIONS = ("loop_embeds", "loop_gates", "cross_repeat_skips", "ln_scale")


def unrolled(spec: ModelSpec) -> ModelSpec:
    """The same model with one block per effective layer (block l is a copy of block layer_plan[l])."""
    return dataclasses.replace(spec, num_blocks=spec.num_layers, layer_plan=tuple(range(spec.num_layers)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CONFIGS if not any(getattr(small(c), o) for o in LOOP_OPTIONS)])
def test_shared_block_gradient_is_the_sum_over_its_uses(name):
    spec = small(name)
    if spec.num_blocks == spec.num_layers:
        pytest.skip(f"{name} shares no block")
    flat = unrolled(spec)
    w = parity.perturbed_weights(spec, 2)
    prefix = {b: f"blocks.{b}." for b in range(spec.num_layers)}
    w_flat = {}
    for name_flat in (i.name for i in param_table(flat)):
        if name_flat.startswith("blocks."):
            layer = int(name_flat.split(".")[1])
            w_flat[name_flat] = w[prefix[spec.layer_plan[layer]] + name_flat[len(prefix[layer]):]]
        else:
            w_flat[name_flat] = w[name_flat]
    shared, copies = grads_in_both(spec, w), grads_in_both(flat, w_flat)
    for backend in (0, 1):
        g, g_flat = ({k: np.asarray(v) for k, v in shared[backend].items()},
                     {k: np.asarray(v) for k, v in copies[backend].items()})
        for info in param_table(spec):
            if info.block is None:
                want = g_flat[info.name]
            else:
                rest = info.name[len(prefix[info.block]):]
                want = sum(g_flat[prefix[layer] + rest] for layer, b in enumerate(spec.layer_plan) if b == info.block)
            # fp32, summed in another order: relative to the gradient's size.
            np.testing.assert_allclose(g[info.name], want, atol=1e-6 + 1e-4 * np.abs(want).max(), rtol=0,
                                       err_msg=f"{name} {['mlx', 'torch'][backend]} {info.name}")
