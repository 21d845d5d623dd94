"""`loopgolf convert` on the seeds' own checkpoints (tools/seed_layouts.py): for each layout a tiny file is
written the way the seed's script saves it (its names, ParameterLists, 0-d scalars, its parametrisation),
from loopgolf weights through an inverse map written out here; converting it back must give the table's
names and shapes, the original values, and the original model's logits (torch forward). Files whose
settings the tensors cannot show need --spec-from; options loopgolf lacks are one clear error."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import backend_torch  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.params import param_table  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from core.weights import load_weights  # noqa: E402
from tools import parity  # noqa: E402
from tools.formats import MLX_NORM_EPS, convert, flip_rope_halves  # noqa: E402

TINY = {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2}
TOKENS = np.arange(2 * 12).reshape(2, 12) * 7 % 64


def spec_of(**table) -> ModelSpec:
    return ModelSpec.from_table({**TINY, **table})


def save_state_dict(path, tensors: dict) -> None:
    torch.save({k: torch.tensor(np.asarray(v, np.float32)) for k, v in tensors.items()}, path)


def unstack(w: dict, ours: str, seed: str, row_shape=None) -> dict:
    """loopgolf's stacked tensor as the seed's ParameterList items seed.0, seed.1, ..."""
    return {f"{seed}.{i}": (row if row_shape is None else row.reshape(row_shape)) for i, row in enumerate(w.pop(ours))}


def toml_for(spec: ModelSpec, path) -> str:
    lines = ["[model]"]
    for k, v in spec.to_dict().items():
        value = (str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else
                 str(list(v)) if isinstance(v, list) else repr(v))
        lines.append(f"{k} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def check(spec: ModelSpec, original: dict, out, changed=()) -> dict:
    """The converted file holds the table's names and shapes, `original`'s values (but `changed`) and logits."""
    got_spec, got = load_weights(out)
    assert got_spec == spec
    assert {i.name: i.shape for i in param_table(spec)} == {k: v.shape for k, v in got.items()}
    for name, value in original.items():
        if name not in changed:
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    np.testing.assert_allclose(backend_torch.forward_logits(spec, got, TOKENS),
                               backend_torch.forward_logits(spec, original, TOKENS), atol=2e-6, rtol=0)
    return got


# ---- #1110 ----------------------------------------------------------------------------------------------

UT = spec_of(layer_plan="3x2", mlp_mult=3, mlp_activation="leaky_relu2", iter_embeds=True, iter_scales=True,
             layer_gains=True, rope_dims=4, rope_train_seq_len=8, xsa_last_n=6, bigram_buckets=16, bigram_dim=8,
             smear_gate=True, ve_layers="4,5", ve_dim=8, value_residual=True, ln_scale=True)


def as_1110(w: dict) -> dict:
    """How #1110's train_gpt.py names (and parametrises) these tensors in its state_dict."""
    w = dict(w)
    seed = {**unstack(w, "layer_in_gains", "hc_alpha", (1,)), **unstack(w, "layer_out_gains", "hc_beta", (1,)),
            **unstack(w, "iter_embeds", "iter_embeds"), **unstack(w, "iter_scales", "iter_scales"),
            **unstack(w, "vrl_alphas", "vrl_alphas", ()), **unstack(w, "ve_layer_scales", "ve_layer_scales", (1,))}
    w["bigram.scale"], w["ve_shared.scale"] = w["bigram.scale"].reshape(()), w["ve_shared.scale"].reshape(())
    s = w["smear.gate"].astype(np.float64)
    w["smear.gate"] = np.log(s / (1 - s)).astype(np.float32)  # the seed mixes with sigmoid(gate)
    return {**w, **seed}


def test_1110_state_dict_needs_its_config_then_gives_the_seed_model(tmp_path):
    w = parity.perturbed_weights(UT, 1)
    w["smear.gate"] = np.random.default_rng(2).uniform(0.1, 0.9, w["smear.gate"].shape).astype(np.float32)
    w["iter_embeds"][0] = 0  # as every #1110 checkpoint: its iteration embeddings never trained
    src = tmp_path / "final_model.pt"
    save_state_dict(src, {f"module.{k}": v for k, v in as_1110(w).items()})  # DDP's prefix, stripped
    with pytest.raises(UserError, match=r"#1110 train_gpt.py state_dict; .*VE layers.*give --spec-from "
                                        r"configs/ut_3x4_iter.toml"):
        convert(src, tmp_path / "x.safetensors")
    r = convert(src, tmp_path / "ut.safetensors", spec_from=toml_for(UT, tmp_path / "ut.toml"))
    assert r.notes[0].startswith("#1110 train_gpt.py state_dict: mapped") and any("sigmoid" in n for n in r.notes)
    got = check(UT, w, tmp_path / "ut.safetensors", changed={"smear.gate"})
    np.testing.assert_allclose(got["smear.gate"], w["smear.gate"], rtol=1e-6)


def test_1110_options_loopgolf_lacks_are_refused(tmp_path):
    w = as_1110({**parity.perturbed_weights(UT, 1), "smear.gate": np.full(32, 0.5, np.float32)})
    save_state_dict(tmp_path / "b.pt", {**w, "backout_lambda": np.ones(1)})
    with pytest.raises(UserError, match="trained with BACKOUT_ENABLED=1 .backout_lambda.; loopgolf has no such"):
        convert(tmp_path / "b.pt", tmp_path / "x.safetensors", spec_from=toml_for(UT, tmp_path / "ut.toml"))
    shc = {**w, "hc_alpha.0": np.array([1.0, 0.0, 0.0])}
    save_state_dict(tmp_path / "s.pt", shc)
    with pytest.raises(UserError, match="SHC_N > 0"):
        convert(tmp_path / "s.pt", tmp_path / "x.safetensors", spec_from=toml_for(UT, tmp_path / "ut.toml"))


# ---- #470 -----------------------------------------------------------------------------------------------

SHARED = spec_of(layer_plan="1x5", mlp_mult=5, per_layer_scales=True, bigram_table_size=32)


def test_470_state_dict_infers_its_spec(tmp_path):
    w = parity.perturbed_weights(SHARED, 3)
    seed = dict(w)
    seed = {**{("shared_block." + k[len("blocks.0."):] if k.startswith("blocks.0.") else k): v for k, v in seed.items()}}
    seed.update(unstack(seed, "layer_attn_scales", "attn_scales"))
    seed.update(unstack(seed, "layer_mlp_scales", "mlp_scales"))
    seed.update(unstack(seed, "layer_resid_mixes", "resid_mixes"))
    save_state_dict(tmp_path / "final_model.pt", seed)
    r = convert(tmp_path / "final_model.pt", tmp_path / "s.safetensors")
    assert "#470" in r.spec_how and r.spec == SHARED
    check(SHARED, w, tmp_path / "s.safetensors")
    save_state_dict(tmp_path / "a.pt", {**seed, "q_adapter_A.0": np.zeros((32, 4))})
    with pytest.raises(UserError, match="ADAPTER_RANK > 0"):
        convert(tmp_path / "a.pt", tmp_path / "x.safetensors")


# ---- #319 -----------------------------------------------------------------------------------------------

LOOP = spec_of(layer_plan="2x3", unet_skips=False, loop_embeds=True, loop_gates=True, loop_gate_style="seed319")


def test_319_state_dict_drops_the_gate_its_forward_never_applies(tmp_path):
    w = parity.perturbed_weights(LOOP, 4)
    seed = {**w, "loop_gates": np.concatenate([[0.123], w["loop_gates"]]).astype(np.float32)}  # g_0, unused
    save_state_dict(tmp_path / "final_model.pt", seed)
    r = convert(tmp_path / "final_model.pt", tmp_path / "l.safetensors")
    assert r.spec == LOOP and any("dropped the seed's first gate (0.123)" in n for n in r.notes)
    check(LOOP, w, tmp_path / "l.safetensors")
    # Our own gating over the same file: all three gates kept, with a note that this is not the seed's model.
    every = spec_of(layer_plan="2x3", unet_skips=False, loop_embeds=True, loop_gates=True)
    r = convert(tmp_path / "final_model.pt", tmp_path / "e.safetensors", spec_from=toml_for(every, tmp_path / "e.toml"))
    assert any("not the seed's" in n for n in r.notes)
    np.testing.assert_array_equal(load_weights(tmp_path / "e.safetensors")[1]["loop_gates"], seed["loop_gates"])


# ---- #895 -----------------------------------------------------------------------------------------------

PROG = spec_of(layer_plan="2x3", mlp_activation="leaky_relu2", unet_skips=False, iter_embeds=True,
               value_embeds=2, cross_repeat_skips=True, xsa_last_n=2)


def test_895_state_dict_with_its_config(tmp_path):
    w = parity.perturbed_weights(PROG, 5)
    seed = dict(w)
    seed["loop_embed"] = seed.pop("iter_embeds")
    save_state_dict(tmp_path / "final_model.pt", seed)
    with pytest.raises(UserError, match="give --spec-from configs/progressive_3x5.toml"):
        convert(tmp_path / "final_model.pt", tmp_path / "x.safetensors")
    convert(tmp_path / "final_model.pt", tmp_path / "p.safetensors", spec_from=toml_for(PROG, tmp_path / "p.toml"))
    check(PROG, w, tmp_path / "p.safetensors")


# ---- #167 -----------------------------------------------------------------------------------------------

SHARING = spec_of(layer_plan=[0, 1, 0, 1, 0], per_layer_scales=True, iter_embeds=True, norm_eps=MLX_NORM_EPS)


def test_167_mlx_exp_npz_infers_its_spec_and_drops_the_unused_block_scales(tmp_path):
    w = parity.perturbed_weights(SHARING, 6)
    seed = flip_rope_halves(w, SHARING)  # its MLX RoPE turns the other way (its own inverse)
    seed["repeat_embeds"] = seed.pop("iter_embeds")
    seed["attn_scales"], seed["mlp_scales"] = seed.pop("layer_attn_scales"), seed.pop("layer_mlp_scales")
    seed["resid_mixes"] = np.ascontiguousarray(seed.pop("layer_resid_mixes").transpose(1, 0, 2))  # (2, L, d)
    for b in range(2):  # the blocks keep their own, which its per-layer forward pass never reads
        seed[f"blocks.{b}.attn_scale"] = np.ones(32, np.float32)
        seed[f"blocks.{b}.mlp_scale"] = np.ones(32, np.float32)
        seed[f"blocks.{b}.resid_mix"] = np.stack([np.ones(32), np.zeros(32)]).astype(np.float32)
    np.savez(tmp_path / "run_mlx_model.npz", **seed)
    r = convert(tmp_path / "run_mlx_model.npz", tmp_path / "m.safetensors")
    assert r.spec == SHARING and any("dropped the blocks' own scales" in n for n in r.notes)
    check(SHARING, w, tmp_path / "m.safetensors")
