"""ModelSpec: the backend-neutral description of a looped transformer.

Depth is explicit: `num_blocks` unique blocks and a `layer_plan`, the block index run at each effective
layer. Upstream's flat 9-layer baseline is the plan 0..8; a Universal Transformer of 3 blocks looped 4
times is `layer_plan = "3x4"`. Every numeric choice the two frameworks could make differently (norm
epsilon, softcap, RoPE base) is a field here, so both backends compute the same function.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.spec_text import check_layers, parse_indices, parse_layer_plan
from core.tables import check_known_keys, coerce, read_toml

# torch's F.rms_norm default for float32 (eps=None -> finfo(float32).eps), which upstream train_gpt.py uses.
FLOAT32_EPS = 1.1920928955078125e-07
MAX_VOCAB = 65536  # shards store token ids as uint16
MLP_ACTIVATIONS = ("relu2", "leaky_relu2")
LOOP_GATE_STYLES = ("every_loop", "seed319")
# Sizes refused before anything is allocated (a typo like model_dim=1000000000 or "1x100000000" should be one
# line, not numpy's MemoryError or a hang). Far above anything trainable, so no real model meets them.
MAX_STATE_BYTES = 1 << 40  # fp32 weights, gradients and optimizer state of one process: 1 TiB
MAX_ACTIVATION_BYTES_PER_TOKEN = 1 << 30  # fp32 activations kept for backward, per token: 1 GiB


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 1024
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    num_layers: int = 9  # effective layers: len(layer_plan)
    num_blocks: int = 9  # unique blocks
    layer_plan: tuple[int, ...] = tuple(range(9))
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    norm_eps: float = FLOAT32_EPS
    # Per-iteration conditioning of the shared blocks (all off by default; each is identity- or
    # zero-initialised, so switching one on does not change the model's output at step 0). See
    # `per_layer_options` below for the exact forward pass.
    iter_embeds: bool = False  # iter_embeds (L, d), init 0: added to the block input at each effective layer
    loop_embeds: bool = False  # loop_embeds (num_loops, d), init 0: added to the residual when a loop starts
    per_layer_scales: bool = False  # layer_attn_scales/layer_mlp_scales (L, d) = 1, layer_resid_mixes (L, 2, d) = [1, 0]
    iter_scales: bool = False  # iter_scales (L, d), init 1: out = h_in + (block(h_in) - h_in) * iter_scale
    layer_gains: bool = False  # layer_in_gains, layer_out_gains (L,), init 1 (#1110's hc_alpha/hc_beta, SHC n=0)
    loop_gates: bool = False  # loop_gates (num_loops,): x = g*x + (1-g)*x0 after every loop
    loop_gate_init: float = 1.0  # loop_gates' initial value; 1.0 is the identity (#319's 1/3 was its negative result)
    # Skips and block variants.
    unet_skips: bool = True  # upstream's U-Net skip stack and skip_weights; false removes both (#319, #895)
    cross_repeat_skips: bool = False  # cross_repeat_scales (num_blocks, num_loops-1, d), init 0 (#895)
    mlp_activation: str = "relu2"  # "relu2": relu(h)^2 (upstream); "leaky_relu2": leaky_relu(h, 0.5)^2 (#895, #1110)
    mlp_hidden: int = 0  # MLP hidden size; 0 means mlp_mult * model_dim (#1110, #167)
    # Attention and input variants (all off by default, see `variant notes` below).
    q_rank: int = 0  # attn.c_q_down (r, d) then attn.c_q_up (d, r) in place of attn.c_q (#167); 0: full c_q
    rope_dims: int = 0  # rotate only the first rope_dims dims of each head (#1110: 16 of 64); 0: all
    rope_train_seq_len: int = 0  # NTK: at seq T > this, base * (T/this)^(rd/(rd-2)) (#1110: 1024); 0: off
    xsa_last_n: int = 0  # XSA on the last N effective layers (#895: 4; #1110: all); more than L means all
    bigram_buckets: int = 0  # BigramHash XOR table rows (#1110: 2048, #167: 4096); 0: off
    bigram_dim: int = 128  # BigramHash table width; projected to model_dim unless equal to it
    smear_gate: bool = False  # SmearGate after the embedding norm (#1110, #167), gate (d,) init 0
    value_embeds: int = 0  # extra (vocab, d) tables mixed into the residual per layer (#895: 2)
    # The seeds' remaining parts (all off by default, see `seed parts` below).
    loop_gate_style: str = "every_loop"  # "every_loop": a gate after every loop; "seed319": #319's gating exactly
    bigram_table_size: int = 0  # #470's (prev*1619 + cur) mod N table (N, d), added to the embedding; 0: off
    ve_layers: str = ""  # #1110's VE: effective layers whose V gets the shared value embedding, e.g. "9,10"
    ve_dim: int = 128  # width of the shared value-embedding table, projected to kv_dim unless equal to it
    value_residual: bool = False  # VRL (#1110): every layer after the first adds sigmoid(alpha) * layer 0's V
    ln_scale: bool = False  # #1110: the block's normed attention and MLP inputs times 1/sqrt(block + 1)
    ortho_init: bool = False  # #1110: orthogonal init of the matrices >= 64 x 64; ".proj." ones / sqrt(2 K)
    resid_mix_phase: bool = False  # #1110: block b's resid_mix starts at [phase_b, 1 - phase_b] (see below)
    # The recurrent records' parts (#1394, #1493; all off by default, see `record parts` below).
    parallel_blocks: str = ""  # #1493: physical blocks whose attention and MLP read one input, e.g. "7,8,9,10"
    skip_gates: bool = False  # #1394: skip_gates (skips, d) init 0: x = lerp(skip_weights[j] * skip, x, sigmoid(g_j))

    def __post_init__(self):
        object.__setattr__(self, "layer_plan", tuple(int(i) for i in self.layer_plan))
        for name in ("vocab_size", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "num_layers", "num_blocks"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} = {getattr(self, name)}: expected a positive integer")
        for name in ("num_layers", "num_blocks", "value_embeds"):  # before any per-layer or per-table list exists
            check_layers(getattr(self, name), f"model.{name}")
        if self.mlp_hidden < 0:
            raise UserError(f"model.mlp_hidden = {self.mlp_hidden}: expected 0 (mlp_mult * model_dim) or a positive size")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise UserError(
                f"model.mlp_activation = {self.mlp_activation!r}: expected one of {', '.join(map(repr, MLP_ACTIVATIONS))}"
            )
        for name in ("tied_embed_init_std", "rope_base", "logit_softcap", "norm_eps"):
            if not getattr(self, name) > 0:
                raise UserError(f"model.{name} = {getattr(self, name)}: expected a positive number")
        if self.vocab_size > MAX_VOCAB:
            raise UserError(f"model.vocab_size = {self.vocab_size}: at most {MAX_VOCAB} (shards store uint16 ids)")
        if self.model_dim % self.num_heads:
            raise UserError(
                f"model.model_dim = {self.model_dim} is not divisible by model.num_heads = {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_heads = {self.num_heads} is not divisible by model.num_kv_heads = {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UserError(
                f"head_dim = model_dim/num_heads = {self.head_dim} is odd; RoPE needs an even head_dim"
            )
        if len(self.layer_plan) != self.num_layers:
            raise UserError(
                f"model.layer_plan has {len(self.layer_plan)} layers but model.num_layers = {self.num_layers}"
            )
        for layer, block in enumerate(self.layer_plan):
            if not 0 <= block < self.num_blocks:
                raise UserError(
                    f"model.layer_plan[{layer}] = {block} is out of range for model.num_blocks = {self.num_blocks}"
                    f" (expected 0..{self.num_blocks - 1})"
                )
        unused = sorted(set(range(self.num_blocks)) - set(self.layer_plan))
        if unused:
            raise UserError(f"model.layer_plan never uses block(s) {unused}: they would never train")
        if not math.isfinite(self.loop_gate_init):
            raise UserError(f"model.loop_gate_init = {self.loop_gate_init}: expected a finite number")
        if self.loop_gate_init != 1.0 and not self.loop_gates:
            raise UserError(
                f"model.loop_gate_init = {self.loop_gate_init} has no effect while model.loop_gates = false"
                " (set model.loop_gates = true)"
            )

        for name in ("q_rank", "rope_dims", "rope_train_seq_len", "xsa_last_n", "bigram_buckets", "value_embeds"):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name} = {getattr(self, name)}: expected 0 (off) or a positive integer")
        if self.q_rank >= self.model_dim:
            raise UserError(f"model.q_rank = {self.q_rank}: expected a rank below model_dim = {self.model_dim} "
                            "(at rank >= d the two factors hold more than the full c_q; 0 keeps it full)")
        if self.rope_dims and (self.rope_dims % 2 or self.rope_dims > self.head_dim):
            raise UserError(
                f"model.rope_dims = {self.rope_dims}: expected an even number of dims, at most head_dim ="
                f" {self.head_dim} (0 rotates all)"
            )
        if self.rope_train_seq_len and self.rope_width <= 2:
            raise UserError(
                f"model.rope_train_seq_len needs more than 2 rotated dims (the NTK exponent is rd/(rd-2));"
                f" model.rope_dims = {self.rope_dims}"
            )
        if self.bigram_buckets == 1:
            raise UserError("model.bigram_buckets = 1: expected 0 (off) or at least 2 (hashes go mod buckets-1)")
        if self.bigram_dim < 1:
            raise UserError(f"model.bigram_dim = {self.bigram_dim}: expected a positive integer")
        self._check_seed_parts()
        self._check_record_parts()
        if self.cross_repeat_skips and self.num_loops < 2:
            raise UserError(
                "model.cross_repeat_skips = true needs a plan that runs some block more than once"
                f" (model.layer_plan = {' '.join(map(str, self.layer_plan))} runs each block once)"
            )

    def _check_seed_parts(self) -> None:
        if self.loop_gate_style not in LOOP_GATE_STYLES:
            raise UserError(f"model.loop_gate_style = {self.loop_gate_style!r}: expected one of "
                            f"{', '.join(map(repr, LOOP_GATE_STYLES))}")
        if self.loop_gate_style != "every_loop":
            if not self.loop_gates:
                raise UserError(f"model.loop_gate_style = {self.loop_gate_style!r} has no effect while "
                                "model.loop_gates = false (set model.loop_gates = true)")
            if self.loop_gate_init != 1.0:
                raise UserError(f"model.loop_gate_init = {self.loop_gate_init} has no effect with model.loop_gate_style"
                                " = 'seed319' (its gates start at 1/num_loops)")
            if self.num_loops < 2:
                raise UserError("model.loop_gate_style = 'seed319' needs a plan that runs some block more than once"
                                " (it has no gate after the first loop)")
        for name in ("bigram_table_size", "ve_dim"):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name} = {getattr(self, name)}: expected 0 (off) or a positive integer")
        if self.ve_dim < 1:
            raise UserError(f"model.ve_dim = {self.ve_dim}: expected a positive integer")
        layers = parse_indices(self.ve_layers, "model.ve_layers", "effective layer", "9,10")
        # Canonical form, so equal specs compare (and serialise) equal (core.depth.truncated_spec drops the
        # layers a truncated plan no longer has).
        object.__setattr__(self, "ve_layers", ",".join(map(str, layers)))
        if layers and layers[-1] >= self.num_layers:
            raise UserError(f"model.ve_layers = {self.ve_layers!r}: layer {layers[-1]} is past the plan's "
                            f"{self.num_layers} effective layers (0..{self.num_layers - 1})")
        if self.value_residual and self.num_layers < 2:
            raise UserError("model.value_residual = true needs at least 2 effective layers (layer 0's V feeds the rest)")
        if self.resid_mix_phase and self.per_layer_scales:
            raise UserError("model.resid_mix_phase = true initialises the blocks' own resid_mix, which "
                            "model.per_layer_scales = true replaces; switch one off")

    def _check_record_parts(self) -> None:
        blocks = parse_indices(self.parallel_blocks, "model.parallel_blocks", "physical block", "7,8,9,10")
        object.__setattr__(self, "parallel_blocks", ",".join(map(str, blocks)))  # canonical, as ve_layers
        if blocks and blocks[-1] >= self.num_blocks:
            raise UserError(f"model.parallel_blocks = {self.parallel_blocks!r}: block {blocks[-1]} is past the "
                            f"model's {self.num_blocks} blocks (0..{self.num_blocks - 1})")
        if self.skip_gates and not self.unet_skips:
            raise UserError("model.skip_gates = true gates the U-Net skips, which model.unet_skips = false removes")

    def _check_sizes(self) -> None:
        """Refuse shapes whose training state or activations no machine holds, from the parameter table and
        the activation estimate (tools/train.py's memory estimate, in fp32), before anything is allocated.
        Run on every spec read from a table (a config, --set, a weight file's or artifact's metadata); not in
        __post_init__, where the table (~1 ms) would slow every derived spec fifteenfold."""
        from core.params import param_table  # core.params imports this module

        params = sum(math.prod(info.shape) for info in param_table(self))
        state = 16 * params  # fp32 weights and gradients, and at most two optimizer moments (Adam's m and v)
        if state > MAX_STATE_BYTES:
            raise UserError(f"model: {params:,} parameters (model_dim {self.model_dim:,}, vocab_size "
                            f"{self.vocab_size:,}, {self.num_blocks:,} blocks) need about {_size(state)} for weights, "
                            f"gradients and optimizer state; at most {_size(MAX_STATE_BYTES)} is accepted")
        per_token = 4 * (self.num_layers * (12 * self.model_dim + 2 * self.mlp_width) + 3 * self.vocab_size)
        if per_token > MAX_ACTIVATION_BYTES_PER_TOKEN:
            raise UserError(f"model: {self.num_layers:,} layers of width {self.model_dim:,} keep about "
                            f"{_size(per_token)} of activations per token for backward; at most "
                            f"{_size(MAX_ACTIVATION_BYTES_PER_TOKEN)} is accepted")

    # Derived shapes, named once so both backends agree.
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden size: model.mlp_hidden if set, else mlp_mult * model_dim."""
        return self.mlp_hidden or self.mlp_mult * self.model_dim

    @property
    def rope_width(self) -> int:
        """How many leading dims of each head RoPE rotates: model.rope_dims, or all of head_dim."""
        return self.rope_dims or self.head_dim

    def rope_base_at(self, seq_len: int) -> float:
        """RoPE's base at sequence length `seq_len`: rope_base, NTK-rescaled by (T/T_train)^(rd/(rd-2)) when
        rope_train_seq_len is set and T is longer than it (#1110's Rotary, in training and eval alike)."""
        if self.rope_train_seq_len and seq_len > self.rope_train_seq_len:
            rd = self.rope_width
            return self.rope_base * (seq_len / self.rope_train_seq_len) ** (rd / (rd - 2))
        return self.rope_base

    def uses_xsa(self, layer: int) -> bool:
        """XSA at effective layer `layer`: the last xsa_last_n layers of this plan (a truncated plan, as in
        progressive depth, moves them with its end, as #895's `l >= R*3 - XSA_LAST_N`)."""
        return layer >= self.num_layers - self.xsa_last_n

    @property
    def num_encoder_layers(self) -> int:
        """U-Net: the first L//2 effective layers push skips, the rest pop them (none without unet_skips)."""
        return self.num_layers // 2 if self.unet_skips else 0

    @property
    def num_skip_weights(self) -> int:
        return min(self.num_encoder_layers, self.num_layers - self.num_encoder_layers)

    # Per-iteration conditioning. Forward pass of effective layer l (block b = layer_plan[l]), with
    # x the residual stream and x0 the normed embedding; each line runs only when its option is on:
    #
    #   unet_skips, decoder l:    x = x + skip_weights[j] * skips.pop()             (U-Net, default on)
    #   l in loop_starts, loop r: x = x + loop_embeds[r]                           (#319; persists in x)
    #   h_in = x
    #   layer_gains:              h_in = layer_in_gains[l] * h_in                  (#1110 hc_alpha)
    #   iter_embeds:              h_in = h_in + iter_embeds[l]                     (#1110, #167, #895)
    #   value_embeds:             h_in = h_in + sum_e value_scales[l, e] * ve_e   (#895; ve_e = value_embeds.e[ids])
    #   cross_repeat_skips, r>0:  h_in = h_in + cross_repeat_scales[b, r-1] * prev_out[b]   (#895)
    #   out = Block_b(h_in, x0) with, if per_layer_scales, layer_attn_scales[l], layer_mlp_scales[l] and
    #         layer_resid_mixes[l] in place of the block's own (which then do not exist; #470, #167)
    #   iter_scales:              out = h_in + (out - h_in) * iter_scales[l]       (#1110)
    #   layer_gains:              x = x + layer_out_gains[l] * (out - h_in)        (#1110 hc_beta)
    #   otherwise:                x = out
    #   l in loop_ends, loop r:   x = loop_gates[r] * x + (1 - loop_gates[r]) * x0  (#319)
    #   cross_repeat_skips:       prev_out[b] = x                                  (gradient flows through it)
    #   unet_skips, encoder l:    skips.push(x)
    #
    # Here r = loop_index[l] (the block's use count so far) and prev_out[b] is the layer output x (the value
    # `collect` records) at block b's previous use. The cross-repeat term follows #895's order: after the
    # iteration embedding (#895's loop_embed), right before the block; with layer_gains off it stays in x.
    # Entries (b, r-1) for a use r the plan never reaches stay 0 and get no gradient. Inside the block the
    # MLP is proj(act(fc(h))) with act relu(h)^2 or, for mlp_activation = "leaky_relu2", leaky_relu(h, 0.5)^2.
    #
    # Variant notes (item 5). Input side, before the layers:
    #   x = tok_emb[ids]
    #   bigram_buckets:  x = x + bigram.scale * bigram.proj(bigram.embed[hash(ids)])   (#1110, #167; table init 0)
    #                    hash = (36313 t XOR 27191 t_prev) mod (buckets - 1), position 0 -> buckets - 1
    #   x = rms_norm(x)
    #   smear_gate:      x = x + smear.gate * (x_prev - x)      (x_prev: the previous position's, 0 at position 0)
    #   x0 = x
    # The seeds' SmearGate mixes with sigmoid(gate), 0.5 at their init 0; here the gate is the mixing weight
    # itself, so 0 is the identity and switching the option on leaves the step-0 output.
    # value_embeds, at every effective layer right after the iteration embedding (#895's order):
    #                    h_in = h_in + sum_e value_scales[l, e] * value_embeds.e[ids]  (tables N(0, 1), scales 0)
    # Inside attention: q_rank replaces c_q by c_q_up(c_q_down(h)); RoPE rotates the first rope_width dims of
    # each head (half-split within them) with base rope_base_at(T); XSA (uses_xsa(l)) subtracts from each
    # head's output y its projection onto that position's normalised value vector v (GQA: the head's kv
    # group): y = y - (y . v/|v|) v/|v|, |v| floored at 1e-12 as F.normalize. These three change the
    # function by design, so they are not identity at init.
    #
    # With layer_gains off the iteration embedding stays in the residual stream (#167, #895); with it on
    # only the block's change is added back, as #1110. The loop gate runs after EVERY loop, the first
    # included, so all num_loops gates train (#319 left its first gate unused; loop_gate_style = "seed319"
    # is its gating exactly, see `seed parts` below).
    @property
    def loop_index(self) -> tuple[int, ...]:
        """The loop each effective layer belongs to: how many times its block ran at earlier layers.
        For a cyclic plan "KxR" that is layer // K; for "0 1 2 3 4 5 4 5 6 7 8" it is
        0 0 0 0 0 0 1 1 0 0 0."""
        seen: dict[int, int] = {}
        out = []
        for b in self.layer_plan:
            out.append(seen.get(b, 0))
            seen[b] = out[-1] + 1
        return tuple(out)

    @property
    def num_loops(self) -> int:
        """The most times any block runs: R for "KxR", 1 for a flat plan."""
        return max(self.loop_index) + 1

    @property
    def loop_starts(self) -> tuple[int, ...]:
        """Layers where a loop starts: layer 0 and every layer whose loop index differs from the one before."""
        r = self.loop_index
        return tuple(i for i in range(self.num_layers) if i == 0 or r[i] != r[i - 1])

    @property
    def loop_ends(self) -> tuple[int, ...]:
        """Layers after which a loop ends: the last layer and every layer whose loop index differs from the next."""
        r = self.loop_index
        return tuple(i for i in range(self.num_layers) if i == self.num_layers - 1 or r[i] != r[i + 1])

    # Seed parts. Gating, #319: with loop_gate_style = "seed319" the gates start at 1/num_loops and
    # no gate runs after a loop of index 0 (the seed's g_0 existed but was never applied), so loop_gates holds
    # num_loops - 1 gates and the gate after loop r >= 1 is loop_gates[r - 1].
    # Input side, #470: bigram_table_size = N adds bigram_emb[(prev * 1619 + cur) mod N] (N, d), zero init, to
    # tok_emb[ids] before the norm, with prev = 0 at position 0 (no projection, no scale).
    # Inside block b at effective layer l (#1110):
    #   ln_scale:        the normed attention and MLP inputs are multiplied by 1/sqrt(b + 1)
    #   V = c_v(h)       the raw values; at layer 0 they are v0 (value_residual)
    #   l in ve_layers:  V = V + ve_layer_scales[i] * ve_shared.scale * ve_shared.proj(ve_shared.embed[ids])
    #   value_residual:  V = V + sigmoid(vrl_alphas[l - 1]) * v0, for l >= 1 (alphas init 0: half of v0)
    # then attention (and XSA) on V. #1110 computed v0 from layer 0's input without its iteration embedding,
    # which never trained there (always 0): here v0 is layer 0's own V, the same whenever iter_embeds[0] = 0.
    # Init: ortho_init draws every Muon matrix of at least 64 x 64 that upstream does not zero-initialise
    # (attn.proj, mlp.proj) as a (semi-)orthogonal matrix, those named ".proj." (bigram, VE) then scaled by
    # 1/sqrt(2 num_blocks); resid_mix_phase starts block b's resid_mix at [phase_b, 1 - phase_b] with
    # phase_b = sigmoid(3 (b / max(num_blocks - 1, 1) - 0.5)) (0.18, 0.5, 0.82 for 3 blocks).
    @property
    def ve_layer_list(self) -> tuple[int, ...]:
        """The effective layers whose V gets the shared value embedding (model.ve_layers), ascending."""
        return tuple(int(t) for t in self.ve_layers.split(",") if t)

    # Record parts (#1394, #1493). Block b with x_in = resid_mix[0] x + resid_mix[1] x0 (its input after the mix)
    # and s = ln_scale_factor(b):
    #   sequential:             h = x_in + attn_scale * attn(N(x_in) s);  out = h + mlp_scale * mlp(N(h) s)
    #   b in parallel_blocks:   out = x_in + attn_scale * attn(N(x_in) s) + mlp_scale * mlp(N(x_in) s)
    # (#1493's GPT-J-style parallel residual: one stream, no parameters), per physical block, so at every layer
    # the plan runs b. skip_gates, at decoder layer l with j = l - num_encoder_layers (the U-Net line above):
    #   x = lerp(w_j skip, x, sigmoid(g_j)) = w_j skip + sigmoid(g_j) (x - w_j skip)
    # with skip_gates g (num_skip_weights, d) init 0: half of each at step 0, the records' own init (not the
    # identity). The records' per-layer norm scale 1/sqrt(physical layer + 1) is ln_scale (#1110's, by block
    # index, so a repeated block keeps its own), and their QK_GAIN_INIT is qk_gain_init (q_gain per head).
    @property
    def parallel_block_list(self) -> tuple[int, ...]:
        """The physical blocks with a parallel residual (model.parallel_blocks), ascending."""
        return tuple(int(t) for t in self.parallel_blocks.split(",") if t)

    @property
    def num_loop_gates(self) -> int:
        """loop_gates' length: one per loop, or one per loop after the first with loop_gate_style 'seed319'."""
        return self.num_loops - 1 if self.loop_gate_style == "seed319" else self.num_loops

    def loop_gate_index(self, layer: int) -> int | None:
        """The row of loop_gates applied after effective layer `layer`, or None where no gate runs."""
        if layer not in self.loop_ends:
            return None
        index = self.loop_index[layer] - (self.num_loops - self.num_loop_gates)
        return index if index >= 0 else None

    def ln_scale_factor(self, block: int) -> float:
        """#1110's input scale of block `block`'s attention and MLP: 1/sqrt(block + 1), or 1 without ln_scale."""
        return 1.0 / math.sqrt(block + 1) if self.ln_scale else 1.0

    def resid_mix_phase_of(self, block: int) -> float:
        return 1.0 / (1.0 + math.exp(-3.0 * (block / max(self.num_blocks - 1, 1) - 0.5)))

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_plan"] = list(self.layer_plan)
        return d

    def to_json(self) -> str:
        """Canonical form: sorted keys, no whitespace. Stored in weight files and artifacts."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str = "spec") -> "ModelSpec":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: the model spec is not valid JSON ({e.msg})") from None
        return cls.from_table(table, where="model")

    @classmethod
    def from_table(cls, table: dict, where: str = "model") -> "ModelSpec":
        """Build from a TOML/JSON `[model]` table, expanding the depth shorthands."""
        if not isinstance(table, dict):
            raise UserError(f"'{where}' must be a table")
        table = dict(table)
        known = [f.name for f in dataclasses.fields(cls)] + ["depth"]
        check_known_keys(table, known, where)
        if "depth" in table:
            if "layer_plan" in table:
                raise UserError(f"give either {where}.depth or {where}.layer_plan, not both")
            table["layer_plan"] = table.pop("depth")
        # Resolved types, not the annotation text: a bundled, minified copy of this module may spell them otherwise.
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == "layer_plan":
                continue
            values[key] = coerce(value, hints[key], f"{where}.{key}")
        if "layer_plan" in table:
            plan, blocks = parse_layer_plan(table["layer_plan"], values.get("num_layers"), f"{where}.layer_plan")
            values["layer_plan"] = plan
            values.setdefault("num_blocks", blocks)
            values.setdefault("num_layers", len(plan))
        elif "num_layers" in values or "num_blocks" in values:
            # Flat model: one block per layer, as upstream's NUM_LAYERS.
            n = values.get("num_layers", values.get("num_blocks"))
            for name in ("num_layers", "num_blocks"):
                check_layers(values.get(name, 0), f"{where}.{name}")
            values.setdefault("num_layers", n)
            values.setdefault("num_blocks", n)
            values["layer_plan"] = tuple(range(values["num_blocks"]))[: values["num_layers"]]
        spec = cls(**values)
        spec._check_sizes()
        return spec

    @classmethod
    def from_toml(cls, path: str | Path) -> "ModelSpec":
        return cls.from_table(read_toml(path).get("model", {}), where="model")

    def describe(self) -> str:
        plan = " ".join(str(b) for b in self.layer_plan)
        return (
            f"{self.num_blocks} unique block(s) over {self.num_layers} effective layers [{plan}], "
            f"d={self.model_dim}, heads {self.num_heads}/{self.num_kv_heads} kv, "
            + (f"mlp {self.mlp_hidden}" if self.mlp_hidden else f"mlp {self.mlp_mult}x")
            + ("" if self.mlp_activation == "relu2" else f" {self.mlp_activation}")
            + f", vocab {self.vocab_size}"
            + "".join(f", {label}" for on, label in (
                (self.q_rank, f"q rank {self.q_rank}"), (self.rope_dims, f"rope {self.rope_dims}/{self.head_dim}"),
                (self.xsa_last_n, f"xsa last {min(self.xsa_last_n, self.num_layers)}"),
                (self.bigram_buckets, f"bigram {self.bigram_buckets}x{self.bigram_dim}"),
                (self.smear_gate, "smear"), (self.value_embeds, f"{self.value_embeds} value embeds"),
                (self.bigram_table_size, f"bigram table {self.bigram_table_size}"),
                (self.ve_layers, f"VE into V at {self.ve_layers}"), (self.value_residual, "VRL"),
                (self.ln_scale, "ln_scale"), (self.loop_gate_style != "every_loop", f"gates {self.loop_gate_style}"),
                (self.ortho_init, "orthogonal init"), (self.resid_mix_phase, "resid_mix phase init"),
                (self.parallel_blocks, f"parallel blocks {self.parallel_blocks}"), (self.skip_gates, "skip gates"))
                if on)
        )


def _size(n: int) -> str:
    return f"{n / 2**40:,.1f} TiB" if n >= 2**40 else f"{n / 2**30:,.1f} GiB"
