"""The seeds' own checkpoints under loopgolf's names: the one place their names are mapped.

`loopgolf convert` (tools/formats.py) reads a file, strips wrapper prefixes, and, when the file carries no
loopgolf spec, asks `detect` whether its names are one of these layouts:

  #1110  train_gpt.py state_dict (USE_UNIVERSAL): hc_alpha.i/hc_beta.i, iter_embeds.i, iter_scales.i,
         vrl_alphas.i, ve_shared.*, ve_layer_scales.i, smear.gate, bigram.*
  #470   train_gpt.py state_dict: shared_block.*, attn_scales.i, mlp_scales.i, resid_mixes.i, bigram_emb
  #319   train_gpt.py state_dict: blocks.*, loop_embeds (R, d), loop_gates (R,), no skip_weights
  #895   train_gpt.py state_dict: loop_embed (L, d), value_embeds.e, value_scales, cross_repeat_scales
         (names as in its sibling #1453's script: #895's own script is not among the stored PR files)
  #167   train_gpt_mlx_exp.py npz (mx.savez): repeat_embeds (L, d), attn_scales, mlp_scales (L, d),
         resid_mixes (2, L, d); MLX conventions (RoPE direction, eps 1e-6) as every upstream MLX file

A layout gives the [model] keys its tensors imply (`spec_table`), or says which settings they cannot show
(then the spec comes from --spec-from, e.g. the seed's config in configs/), and `to_loopgolf` turns the
tensors into loopgolf's for a spec: renames, ParameterLists stacked into one tensor (`iter_embeds.3` is row 3
of `iter_embeds`), 0-d scalars as (1,), and the few parametrisations that differ (#1110's SmearGate mixes
with sigmoid(gate), loopgolf's with the gate itself; #167 stores resid_mixes (2, L, d), loopgolf (L, 2, d)).
Tensors a seed's forward pass never reads are dropped with a note (#319's first gate under 'seed319', #167's
per-block scales that its per-layer ones replace); an option loopgolf does not have is one clear error.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from core.errors import UserError

_LIST_ITEM = re.compile(r"^(.*)\.(\d+)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    seed: str  # "#1110"
    name: str  # what the file is, for messages
    config: str  # the shipped config with the seed's settings
    hidden: str = ""  # settings the tensors cannot show: non-empty means the spec must be given
    unsupported: tuple[tuple[str, str], ...] = ()  # (name prefix, the seed option loopgolf lacks)


LAYOUTS = {
    "1110": Layout("#1110", "#1110 train_gpt.py state_dict", "configs/ut_3x4_iter.toml",
                   "its VE layers, partial RoPE and its NTK base, XSA, ln_scale and LeakyReLU(0.5)^2",
                   (("backout_lambda", "BACKOUT_ENABLED=1"), ("blocks.*.ddl_", "DDL_ENABLED=1"))),
    "470": Layout("#470", "#470 train_gpt.py state_dict", "configs/shared_1x9.toml", "",
                  (("q_adapter_", "ADAPTER_RANK > 0 (the reported run used 0)"), ("v_adapter_", "ADAPTER_RANK > 0"),
                   ("q_projs.", "PER_LAYER_Q"), ("v_projs.", "PER_LAYER_QV"), ("trigram_emb", "TRIGRAM_TABLE_SIZE"))),
    "319": Layout("#319", "#319 train_gpt.py state_dict", "configs/loop_5x3_640.toml"),
    "895": Layout("#895", "#895 train_gpt.py state_dict", "configs/progressive_3x5.toml",
                  "its LeakyReLU(0.5)^2 and XSA on the last XSA_LAST_N layers"),
    "167": Layout("#167", "#167 train_gpt_mlx_exp.py npz", "configs/layer_sharing_3x9.toml", "",
                  (("recurrence_gates", "BOUNDED_RECURRENCE=1"), ("blocks.*.w1", "USE_KRONECKER or USE_SWIGLU"))),
}


def detect(names) -> Layout | None:
    """The seed layout these tensor names are, or None (upstream's baseline names, or loopgolf's own)."""
    names = set(names)
    if "hc_alpha.0" in names:
        return LAYOUTS["1110"]
    if any(n.startswith("shared_block.") for n in names):
        return LAYOUTS["470"]
    if "loop_embed" in names:
        return LAYOUTS["895"]
    if "repeat_embeds" in names or "resid_mixes" in names:
        return LAYOUTS["167"]
    if {"loop_embeds", "loop_gates"} <= names and "skip_weights" not in names:
        return LAYOUTS["319"]
    return None


def _count(names, base: str) -> int:
    """How many ParameterList items `base.0`, `base.1`, ... there are (0 if none)."""
    items = sorted(int(m.group(2)) for n in names if (m := _LIST_ITEM.match(n)) and m.group(1) == base)
    if items != list(range(len(items))):
        raise UserError(f"{base}.*: items {items} should be 0..N-1")
    return len(items)


def _blocks(names) -> int:
    return len({n.split(".")[1] for n in names if n.startswith("blocks.") and n.split(".")[1].isdigit()})


def _check_supported(layout: Layout, names, source: str) -> None:
    for prefix, option in layout.unsupported:
        pattern = re.compile("^" + re.escape(prefix).replace(r"\*", r"\d+"))
        found = sorted(n for n in names if pattern.match(n))
        if found:
            raise UserError(f"{source}: a {layout.name} trained with {option} ({found[0]}); loopgolf has no such "
                            "option, so it cannot reproduce this model")


def spec_table(layout: Layout, weights: dict[str, np.ndarray], source: str) -> dict:
    """The [model] keys the tensors of a `layout` file imply (vocab, width, heads and MLP are inferred by the
    caller from the block tensors, as for upstream's baseline). UserError if the spec has to be given."""
    names = set(weights)
    _check_supported(layout, names, source)
    if layout.hidden:
        raise UserError(f"{source}: a {layout.name}; its forward pass depends on settings its tensors do not show "
                        f"({layout.hidden}): give --spec-from {layout.config} (the seed's settings)")
    if layout is LAYOUTS["470"]:
        layers = _count(names, "attn_scales")
        table = {"num_blocks": 1, "layer_plan": [0] * layers, "per_layer_scales": True}
        if "bigram_emb.weight" in weights:
            table["bigram_table_size"] = int(weights["bigram_emb.weight"].shape[0])
        return table
    k = _blocks(names)
    if layout is LAYOUTS["319"]:
        loops = int(weights["loop_embeds"].shape[0])
        return {"num_blocks": k, "layer_plan": f"{k}x{loops}", "unet_skips": False, "loop_embeds": True,
                "loop_gates": True, "loop_gate_style": "seed319"}
    # #167's train_gpt_mlx_exp.py: virtual layer i runs block i % K (both tables have a row per virtual layer).
    layers = int(weights["repeat_embeds" if "repeat_embeds" in names else "attn_scales"].shape[0])
    return {"num_blocks": k, "layer_plan": [i % k for i in range(layers)],
            "per_layer_scales": "attn_scales" in names, "iter_embeds": "repeat_embeds" in names}


def block_view(layout: Layout | None, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors with #470's shared block under loopgolf's block 0 names, for inferring the shapes."""
    if layout is not LAYOUTS["470"]:
        return weights
    return {("blocks.0." + n[len("shared_block."):] if n.startswith("shared_block.") else n): v for n, v in weights.items()}


def _stack(weights: dict, base: str, n: int, row_shape: tuple) -> np.ndarray:
    missing = [f"{base}.{i}" for i in range(n) if f"{base}.{i}" not in weights]
    if missing:
        raise UserError(f"expected {n} tensors {base}.0..{n - 1}; missing {', '.join(missing[:3])}")
    return np.stack([np.asarray(weights.pop(f"{base}.{i}"), np.float32).reshape(row_shape) for i in range(n)])


def _scalar(weights: dict, name: str) -> None:
    if name in weights:
        weights[name] = np.asarray(weights[name], np.float32).reshape(1)


def to_loopgolf(layout: Layout, weights: dict[str, np.ndarray], spec, notes: list[str]) -> dict[str, np.ndarray]:
    """`weights` (a `layout` file's, wrapper prefixes stripped) under loopgolf's names and shapes for `spec`."""
    _check_supported(layout, set(weights), layout.name)
    w = dict(weights)
    L, d = spec.num_layers, spec.model_dim
    if layout is LAYOUTS["1110"]:
        for seed_name, ours, row in (("hc_alpha", "layer_in_gains", ()), ("hc_beta", "layer_out_gains", ()),
                                     ("iter_embeds", "iter_embeds", (d,)), ("iter_scales", "iter_scales", (d,)),
                                     ("vrl_alphas", "vrl_alphas", ()), ("ve_layer_scales", "ve_layer_scales", ())):
            n = _count(w, seed_name)
            if n and seed_name.startswith("hc_") and np.asarray(w[f"{seed_name}.0"]).size != 1:
                raise UserError(f"{layout.name} with SHC_N > 0 ({seed_name}.0 has {np.asarray(w[f'{seed_name}.0']).size}"
                                " streams); loopgolf's layer gains are SHC_N = 0, the seed's setting")
            if n:
                w[ours] = _stack(w, seed_name, n, row)
        for name in ("bigram.scale", "ve_shared.scale"):
            _scalar(w, name)
        if "smear.gate" in w:  # (1 - sigmoid(g)) x + sigmoid(g) x_prev == x + s (x_prev - x) with s = sigmoid(g)
            w["smear.gate"] = (1.0 / (1.0 + np.exp(-w["smear.gate"].astype(np.float64)))).astype(np.float32)
            notes.append("smear.gate: the seed mixes with sigmoid(gate); stored as sigmoid(gate), loopgolf's weight")
        if spec.iter_embeds and "iter_embeds" in w and np.abs(w["iter_embeds"][0]).max() > 0:
            notes.append("iter_embeds[0] is not 0: the seed's VRL took v0 without it, loopgolf's from layer 0's own "
                         "values (core.spec's seed parts), so the logits differ slightly from the seed's")
    elif layout is LAYOUTS["470"]:
        for name in [n for n in w if n.startswith("shared_block.")]:
            w["blocks.0." + name[len("shared_block."):]] = w.pop(name)
        for seed_name, ours, row in (("attn_scales", "layer_attn_scales", (d,)), ("mlp_scales", "layer_mlp_scales", (d,)),
                                     ("resid_mixes", "layer_resid_mixes", (2, d))):
            w[ours] = _stack(w, seed_name, _count(w, seed_name), row)
    elif layout is LAYOUTS["319"]:
        gates = np.asarray(w["loop_gates"], np.float32)
        if spec.loop_gates and spec.loop_gate_style == "seed319" and gates.shape == (spec.num_loops,):
            w["loop_gates"] = gates[1:]
            notes.append(f"loop_gates: dropped the seed's first gate ({gates[0]:.6g}), which its forward pass never "
                         "applies (loop_gate_style = 'seed319')")
        elif spec.loop_gates and spec.loop_gate_style != "seed319":
            notes.append("loop_gates: this spec applies a gate after the first loop too, the seed did not: the "
                         "logits are not the seed's (loop_gate_style = 'seed319' is its gating)")
    elif layout is LAYOUTS["895"]:
        w["iter_embeds"] = w.pop("loop_embed")
        _scalar(w, "bigram.scale")
    else:  # #167 train_gpt_mlx_exp.py
        if "repeat_embeds" in w:
            w["iter_embeds"] = w.pop("repeat_embeds")
        if "attn_scales" in w:
            w["layer_attn_scales"], w["layer_mlp_scales"] = w.pop("attn_scales"), w.pop("mlp_scales")
            w["layer_resid_mixes"] = np.ascontiguousarray(np.transpose(w.pop("resid_mixes"), (1, 0, 2)))
            own = sorted(n for n in w if n.startswith("blocks.") and n.endswith(("attn_scale", "mlp_scale", "resid_mix")))
            for name in own:
                del w[name]
            if own:
                notes.append(f"dropped the blocks' own scales and resid_mix ({len(own)} tensors): with per-layer "
                             "scales the seed's forward pass never reads them")
    return w
