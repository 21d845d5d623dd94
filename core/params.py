"""The parameter table: every tensor's canonical name, shape, initializer and optimizer group.

Both backends build their models from this table and `init_weights` draws the initial values with
numpy, so both start from the same numbers. Names follow upstream's train_gpt.py where it has the
tensor, so importing an upstream checkpoint is a small name map. Linear weights are (out, in).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from core.spec import ModelSpec

# Optimizer groups (upstream's split): Muon for block matrices, Adam for the rest at their own LRs.
MATRIX, SCALAR, EMBED, HEAD = "matrix", "scalar", "embed", "head"
GROUPS = (MATRIX, SCALAR, EMBED, HEAD)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "uniform_fan_in", "orthogonal", "zeros", "ones", "const", "resid_mix"
    group: str
    value: float = 0.0  # std for "normal", the constant for "const", the gain for "orthogonal", x0's share for "resid_mix"
    block: int | None = None  # unique block index, for per-block parameters

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def param_table(spec: ModelSpec) -> list[ParamInfo]:
    d, v = spec.model_dim, spec.vocab_size
    table: list[ParamInfo] = []
    if spec.tie_embeddings:
        table.append(ParamInfo("tok_emb.weight", (v, d), "normal", EMBED, spec.tied_embed_init_std))
    else:
        # Upstream leaves an untied embedding at nn.Embedding's default N(0, 1) and zero-inits the head.
        table.append(ParamInfo("tok_emb.weight", (v, d), "normal", EMBED, 1.0))
    # Input variants (core.spec.ModelSpec's variant notes). BigramHash as #1110: the table starts at 0 (so
    # the option starts as the identity), the projection at a Linear's default init, the scale at 0.05.
    if spec.bigram_buckets:
        table.append(ParamInfo("bigram.embed.weight", (spec.bigram_buckets, spec.bigram_dim), "zeros", EMBED))
        if spec.bigram_dim != d:
            table.append(ParamInfo("bigram.proj.weight", (d, spec.bigram_dim), "uniform_fan_in", MATRIX))
        table.append(ParamInfo("bigram.scale", (1,), "const", SCALAR, 0.05))
    if spec.smear_gate:
        table.append(ParamInfo("smear.gate", (d,), "zeros", SCALAR))
    for e in range(spec.value_embeds):  # #895: nn.Embedding's default N(0, 1), Adam's embedding group
        table.append(ParamInfo(f"value_embeds.{e}.weight", (v, d), "normal", EMBED, 1.0))
    if spec.bigram_table_size:  # #470: zero-initialised, trained with the embedding (its token group)
        table.append(ParamInfo("bigram_emb.weight", (spec.bigram_table_size, d), "zeros", EMBED))
    # #1110's ValueEmbedding: table N(0, 0.01), scale 0.1, one scale per VE layer; the projection at a Linear's
    # default init: the seed's module zeroes it, but its orthogonal init (on in its run) overrides that, and a
    # zero projection would leave the table and scales without a gradient for the first two steps.
    if spec.ve_layers:
        table.append(ParamInfo("ve_shared.embed.weight", (v, spec.ve_dim), "normal", EMBED, 0.01))
        if spec.ve_dim != spec.kv_dim:
            table.append(ParamInfo("ve_shared.proj.weight", (spec.kv_dim, spec.ve_dim), "uniform_fan_in", MATRIX))
        table.append(ParamInfo("ve_shared.scale", (1,), "const", SCALAR, 0.1))
        table.append(ParamInfo("ve_layer_scales", (len(spec.ve_layer_list),), "ones", SCALAR))
    L, R = spec.num_layers, spec.num_loops
    for b in range(spec.num_blocks):
        p = f"blocks.{b}."
        if spec.q_rank:  # #167's Q_RANK: Wq = c_q_up @ c_q_down, both at PyTorch's default Linear init
            q = [ParamInfo(p + "attn.c_q_down.weight", (spec.q_rank, d), "uniform_fan_in", MATRIX, block=b),
                 ParamInfo(p + "attn.c_q_up.weight", (d, spec.q_rank), "uniform_fan_in", MATRIX, block=b)]
        else:
            q = [ParamInfo(p + "attn.c_q.weight", (d, d), "uniform_fan_in", MATRIX, block=b)]
        block = q + [
            ParamInfo(p + "attn.c_k.weight", (spec.kv_dim, d), "uniform_fan_in", MATRIX, block=b),
            ParamInfo(p + "attn.c_v.weight", (spec.kv_dim, d), "uniform_fan_in", MATRIX, block=b),
            ParamInfo(p + "attn.proj.weight", (d, d), "zeros", MATRIX, block=b),
            ParamInfo(p + "attn.q_gain", (spec.num_heads,), "const", SCALAR, spec.qk_gain_init, block=b),
            ParamInfo(p + "mlp.fc.weight", (spec.mlp_width, d), "uniform_fan_in", MATRIX, block=b),
            ParamInfo(p + "mlp.proj.weight", (d, spec.mlp_width), "zeros", MATRIX, block=b),
            ParamInfo(p + "attn_scale", (d,), "ones", SCALAR, block=b),
            ParamInfo(p + "mlp_scale", (d,), "ones", SCALAR, block=b),
            ParamInfo(p + "resid_mix", (2, d), "resid_mix", SCALAR,
                      1.0 - spec.resid_mix_phase_of(b) if spec.resid_mix_phase else 0.0, block=b),
        ]
        if spec.per_layer_scales:  # replaced by the per-effective-layer copies below
            block = [i for i in block if not i.name.endswith(("attn_scale", "mlp_scale", "resid_mix"))]
        table += block
    # Per-iteration conditioning (core.spec.ModelSpec documents the forward pass). All go to Adam's scalar
    # group; core.quant keeps them fp32 in the artifact (CONTROL_NAME_PATTERNS).
    if spec.iter_embeds:
        table.append(ParamInfo("iter_embeds", (L, d), "zeros", SCALAR))
    if spec.value_embeds:
        table.append(ParamInfo("value_scales", (L, spec.value_embeds, d), "zeros", SCALAR))
    if spec.loop_embeds:
        table.append(ParamInfo("loop_embeds", (R, d), "zeros", SCALAR))
    if spec.per_layer_scales:
        table += [
            ParamInfo("layer_attn_scales", (L, d), "ones", SCALAR),
            ParamInfo("layer_mlp_scales", (L, d), "ones", SCALAR),
            ParamInfo("layer_resid_mixes", (L, 2, d), "resid_mix", SCALAR),
        ]
    if spec.iter_scales:
        table.append(ParamInfo("iter_scales", (L, d), "ones", SCALAR))
    if spec.layer_gains:
        table += [ParamInfo("layer_in_gains", (L,), "ones", SCALAR), ParamInfo("layer_out_gains", (L,), "ones", SCALAR)]
    if spec.loop_gates:  # #319's own gating ("seed319"): no gate after the first loop, the rest at 1/num_loops
        init = 1.0 / R if spec.loop_gate_style == "seed319" else spec.loop_gate_init
        table.append(ParamInfo("loop_gates", (spec.num_loop_gates,), "const", SCALAR, init))
    if spec.value_residual:  # #1110's VRL: one alpha per layer after the first, sigmoid(0) = 1/2 of v0
        table.append(ParamInfo("vrl_alphas", (L - 1,), "zeros", SCALAR))
    if spec.cross_repeat_skips:
        table.append(ParamInfo("cross_repeat_scales", (spec.num_blocks, R - 1, d), "zeros", SCALAR))
    if spec.num_skip_weights:
        table.append(ParamInfo("skip_weights", (spec.num_skip_weights, d), "ones", SCALAR))
        if spec.skip_gates:  # #1394's sigmoid gates, one row per skip weight (sigmoid(0) = 1/2 at init)
            table.append(ParamInfo("skip_gates", (spec.num_skip_weights, d), "zeros", SCALAR))
    if not spec.tie_embeddings:
        table.append(ParamInfo("lm_head.weight", (v, d), "zeros", HEAD))
    if spec.ortho_init:
        table = [_orthogonal(info, spec) for info in table]
    return table


# Upstream's _zero_init matrices: ortho_init leaves them at zero (#1110).
ZERO_INIT_SUFFIXES = ("attn.proj.weight", "mlp.proj.weight")


def _orthogonal(info: ParamInfo, spec: ModelSpec) -> ParamInfo:
    """#1110's _init_weights: every linear of at least 64 x 64 that upstream does not zero-initialise starts
    orthogonal (its bigram and VE projections too, though their modules zero them first), and those whose
    module is named '.proj' are then scaled by 1/sqrt(2 num_blocks)."""
    if info.group != MATRIX or min(info.shape) < 64 or info.name.endswith(ZERO_INIT_SUFFIXES):
        return info
    gain = 1.0 / np.sqrt(2 * spec.num_blocks) if ".proj." in info.name else 1.0
    return dataclasses.replace(info, init="orthogonal", value=float(gain))


def _rng_for(seed: int, name: str) -> np.random.Generator:
    # One stream per tensor, keyed by its name: adding an option (a new tensor) never changes the
    # initial values of the others, so seeds stay comparable across configs.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def init_tensor(info: ParamInfo, seed: int) -> np.ndarray:
    shape = info.shape
    if info.init == "normal":
        return _rng_for(seed, info.name).normal(0.0, info.value, shape).astype(np.float32)
    if info.init == "uniform_fan_in":
        # PyTorch's default Linear init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / np.sqrt(shape[1])
        return _rng_for(seed, info.name).uniform(-bound, bound, shape).astype(np.float32)
    if info.init == "orthogonal":
        # nn.init.orthogonal_: QR of a normal matrix (of its transpose when wide), signs fixed by R's diagonal.
        rows, cols = shape
        a = _rng_for(seed, info.name).normal(0.0, 1.0, (max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))
        return (info.value * (q if rows >= cols else q.T)).astype(np.float32)
    if info.init == "zeros":
        return np.zeros(shape, np.float32)
    if info.init == "ones":
        return np.ones(shape, np.float32)
    if info.init == "const":
        return np.full(shape, info.value, np.float32)
    if info.init == "resid_mix":
        # [1, 0] along the second-to-last axis ((2, d) per block, (L, 2, d) per layer): the block starts
        # reading only its input x, none of x0; `value` moves that share to x0 (resid_mix_phase).
        out = np.zeros(shape, np.float32)
        out[..., 0, :] = 1.0 - info.value
        out[..., 1, :] = info.value
        return out
    raise ValueError(f"unknown initializer {info.init!r} for {info.name}")


def init_weights(spec: ModelSpec, seed: int = 1337) -> dict[str, np.ndarray]:
    """Initial float32 weights for `spec`, the same numbers in every backend."""
    return {info.name: init_tensor(info, seed) for info in param_table(spec)}


def count_params(spec: ModelSpec) -> tuple[int, int]:
    """(unique parameters stored, effective parameters: block tensors counted once per use in the plan)."""
    uses = {b: spec.layer_plan.count(b) for b in range(spec.num_blocks)}
    unique = effective = 0
    for info in param_table(spec):
        unique += info.numel
        effective += info.numel * (uses[info.block] if info.block is not None else 1)
    return unique, effective
