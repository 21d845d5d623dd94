"""Decoupled weight decay per optimizer group ([optim] *_weight_decay, issue 16), in both backends.

A decayed step is the undecayed one plus the decay term, as the seeds apply it: p * (1 - lr wd) - delta
(#1110's Muon and AdamW, #895's Muon) or (p - delta) * (1 - lr wd) (#470, weight_decay_after_step), with
the group's scheduled lr; exempt names and groups at 0 are not touched; MLX and torch agree; a backend's
state round trip continues a decayed run bit for bit; the keys validate, and a resume refuses a new decay.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from backend_mlx.optim import init_state as mlx_init_state, make_update as mlx_make_update  # noqa: E402
from backend_torch.optim import init_state as torch_init_state, make_update as torch_make_update  # noqa: E402
from core.checkpoint import config_differences, config_record  # noqa: E402
from core.config import OptimConfig, config_from_dict  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.params import EMBED, HEAD, MATRIX, SCALAR, param_table  # noqa: E402
from core.schedule import group_base_lrs, weight_decays  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import assert_optimizer_option_resumes_exactly  # noqa: E402
from tools import parity  # noqa: E402

# Untied, so all four groups (Muon matrices, Adam scalars, the embedding, the head) are there.
SPEC = ModelSpec.from_table({"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2,
                             "layer_plan": "2x2", "tie_embeddings": False, "layer_gains": True})
WD = {"matrix_weight_decay": 0.04, "scalar_weight_decay": 0.05, "embed_weight_decay": 0.06, "head_weight_decay": 0.07}
LR_SCALE = 0.7


def one_update(backend: str, optim: OptimConfig, w: dict, g: dict) -> dict:
    if backend == "mlx":
        p = {k: mx.array(v) for k, v in w.items()}
        p, _ = mlx_make_update(SPEC, optim)(p, mlx_init_state(SPEC), {k: mx.array(v) for k, v in g.items()},
                                            mx.array(LR_SCALE), mx.array(0.9))
        return {k: np.array(v, np.float64) for k, v in p.items()}
    p = {k: torch.tensor(v) for k, v in w.items()}
    torch_make_update(SPEC, optim)(p, torch_init_state(SPEC), {k: torch.tensor(v) for k, v in g.items()},
                                   torch.tensor(LR_SCALE), torch.tensor(0.9))
    return {k: v.numpy().astype(np.float64) for k, v in p.items()}


@pytest.fixture(scope="module")
def weights_and_grads():
    w = parity.perturbed_weights(SPEC, 1)
    rng = np.random.default_rng(2)
    return w, {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in w.items()}


@pytest.mark.parametrize("after", [False, True], ids=["before_step", "after_step"])
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_decayed_step_is_the_plain_step_plus_the_decay(backend, after, weights_and_grads):
    w, g = weights_and_grads
    exempt = ("layer_*_gains",)
    optim = OptimConfig(**WD, weight_decay_exempt=exempt, weight_decay_after_step=after)
    plain, decayed = one_update(backend, OptimConfig(), w, g), one_update(backend, optim, w, g)
    lrs = group_base_lrs(SPEC, optim)
    wds = {MATRIX: 0.04, SCALAR: 0.05, EMBED: 0.06, HEAD: 0.07}
    for info in param_table(SPEC):
        p, new = w[info.name].astype(np.float64), plain[info.name]
        if info.name.startswith("layer_") and info.name.endswith("_gains"):
            np.testing.assert_array_equal(decayed[info.name], new, err_msg=f"{info.name} is exempt")
            continue
        keep = 1 - lrs[info.group] * LR_SCALE * wds[info.group]
        want = new * keep if after else p * keep - (p - new)
        np.testing.assert_allclose(decayed[info.name], want, rtol=0, atol=4 * np.spacing(np.float32(np.abs(p).max() + 1)),
                                   err_msg=f"{backend} {info.name}")
        assert np.abs(decayed[info.name] - new).max() > 1e-7, f"{info.name} did not decay"


def test_backends_agree_and_no_decay_is_bit_for_bit_the_plain_step(weights_and_grads):
    w, g = weights_and_grads
    optim = OptimConfig(**WD)
    m, t = one_update("mlx", optim, w, g), one_update("torch", optim, w, g)
    for name in w:
        # Newton-Schulz differs by its rounding (core/tolerances.py 'update_muon'); Adam and the decay by ulps.
        np.testing.assert_allclose(m[name], t[name], rtol=0, atol=1e-5, err_msg=name)
    everything_exempt = OptimConfig(**WD, weight_decay_exempt=("*",))
    for backend in ("mlx", "torch"):
        a, b = one_update(backend, OptimConfig(), w, g), one_update(backend, everything_exempt, w, g)
        assert all(np.array_equal(a[k], b[k]) for k in w), backend


def test_weight_decays_per_name():
    optim = OptimConfig(matrix_weight_decay=0.04, weight_decay_exempt=("blocks.1.*",))
    decays = weight_decays(SPEC, optim)
    matrices = {i.name for i in param_table(SPEC) if i.group == MATRIX}
    assert set(decays) == {n for n in matrices if not n.startswith("blocks.1.")} and set(decays.values()) == {0.04}
    assert weight_decays(SPEC, OptimConfig()) == {}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_decayed_run_continues_exactly_from_its_state(backend, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # ... and the decay is live in that run: the same steps without it end elsewhere.
    assert_optimizer_option_resumes_exactly(backend, SPEC, OptimConfig(**WD, weight_decay_exempt=("layer_in_gains",)))


def test_keys_validate_and_a_resume_refuses_a_new_decay():
    raw = {"model": {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x2"}}
    for optim, message in [({"matrix_weight_decay": -0.1}, "optim.matrix_weight_decay = -0.1: expected 0 or more"),
                           ({"weight_decay_exempt": "iter_*"}, "expected a list of str"),
                           ({"weight_decay_exempt": [""]}, "expected parameter name patterns"),
                           ({"weight_decay_exempt": ["itr_embeds"]}, "'itr_embeds' matches no parameter"),
                           ({"weight_decay_after_step": 1}, "expected true or false")]:
        with pytest.raises(UserError, match=message):
            config_from_dict({**raw, "optim": optim})
    before = config_from_dict(raw)
    meta = {"spec": before.model.to_dict(), "config": config_record(before)}
    assert config_differences(meta, before) == []
    decayed = config_from_dict({**raw, "optim": {"matrix_weight_decay": 0.04}})
    assert config_differences(meta, decayed) == ["optim.matrix_weight_decay (checkpoint 0.0, now 0.04)"]
    # A checkpoint written before these keys (and the seed-part model keys) existed still resumes.
    old = {"spec": {k: v for k, v in meta["spec"].items() if k not in ("ve_layers", "ln_scale")},
           "config": {**meta["config"], "optim": {k: v for k, v in meta["config"]["optim"].items()
                                                  if "weight_decay" not in k}}}
    assert config_differences(old, before) == []
    assert dataclasses.asdict(before.optim)["weight_decay_exempt"] == ()
