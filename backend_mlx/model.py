"""The looped transformer in MLX, as a pure function of the spec and a flat {name: array} dict.

Mirrors the torch backend's model.py line by line against core.spec: same names, weights (out, in) applied as
x @ W.T, same numerics. Weights stay float32; matrix products run in the compute dtype.
"""

from __future__ import annotations

import mlx.core as mx

from core.spec import ModelSpec


def rms_norm(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


def linear(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.astype(x.dtype).T


def rotary(x: mx.array, spec: ModelSpec) -> mx.array:
    # Half-split rotation by -angle, upstream train_gpt.py's convention: (x1 cos + x2 sin, -x1 sin + x2 cos),
    # of the first spec.rope_width dims (the rest pass through). mx.fast.rope rotates by +angle, so negate
    # the positions.
    base = spec.rope_base_at(x.shape[-2])
    return mx.fast.rope(x, spec.rope_width, traditional=False, base=base, scale=-1.0, offset=0)


def xsa(y: mx.array, v: mx.array) -> mx.array:
    """Remove from each head's output (batch, heads, seq, hd) its projection on the normalised value vector
    of its kv head (batch, kv_heads, seq, hd) at the same position (core.spec.ModelSpec's variant notes)."""
    batch, heads, seq, hd = y.shape
    kv_heads = v.shape[1]
    y = y.reshape(batch, kv_heads, heads // kv_heads, seq, hd)
    norm = mx.sqrt(mx.sum(v * v, axis=-1, keepdims=True))
    vn = (v / mx.maximum(norm, 1e-12))[:, :, None]
    y = y - mx.sum(y * vn, axis=-1, keepdims=True) * vn
    return y.reshape(batch, heads, seq, hd)


def attention(spec: ModelSpec, p: dict, prefix: str, x: mx.array, use_xsa: bool = False,
              v_embed: mx.array | None = None, v_residual: mx.array | None = None, v_first: dict | None = None) -> mx.array:
    """Causal self-attention. v_embed and v_residual are added to the values (#1110's VE and VRL, core.spec's
    seed parts); v_first, if given, receives the raw values under "v0" (layer 0's, for VRL)."""
    batch, seq, _ = x.shape
    if spec.q_rank:
        q = linear(linear(x, p[prefix + "c_q_down.weight"]), p[prefix + "c_q_up.weight"])
    else:
        q = linear(x, p[prefix + "c_q.weight"])
    q = q.reshape(batch, seq, spec.num_heads, spec.head_dim)
    k = linear(x, p[prefix + "c_k.weight"]).reshape(batch, seq, spec.num_kv_heads, spec.head_dim)
    v = linear(x, p[prefix + "c_v.weight"])
    if v_first is not None:
        v_first["v0"] = v
    if v_embed is not None:
        v = v + v_embed
    if v_residual is not None:
        v = v + v_residual
    v = v.reshape(batch, seq, spec.num_kv_heads, spec.head_dim)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (batch, heads, seq, head_dim)
    q = rotary(rms_norm(q, spec.norm_eps), spec)
    k = rotary(rms_norm(k, spec.norm_eps), spec)
    q = q * p[prefix + "q_gain"].astype(q.dtype)[None, :, None, None]
    y = mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.head_dim**-0.5, mask="causal")
    if use_xsa:
        y = xsa(y, v)
    y = y.transpose(0, 2, 1, 3).reshape(batch, seq, spec.model_dim)
    return linear(y, p[prefix + "proj.weight"])


def mlp(p: dict, prefix: str, x: mx.array, activation: str = "relu2") -> mx.array:
    h = linear(x, p[prefix + "fc.weight"])
    h = mx.maximum(h, 0.5 * h) if activation == "leaky_relu2" else mx.maximum(h, 0)
    return linear(h * h, p[prefix + "proj.weight"])


def block(spec: ModelSpec, p: dict, b: int, x: mx.array, x0: mx.array, layer: int | None = None,
          v_embed: mx.array | None = None, v_residual: mx.array | None = None, v_first: dict | None = None) -> mx.array:
    """Block b on x. With spec.per_layer_scales, effective layer `layer`'s scales and resid_mix replace the
    block's own; with spec.ln_scale its normed inputs are scaled by 1/sqrt(b + 1); a block of
    spec.parallel_blocks runs attention and MLP on the same input (core.spec's record parts). The v_* arguments
    go to attention."""
    prefix = f"blocks.{b}."
    if spec.per_layer_scales:
        mix = p["layer_resid_mixes"][layer].astype(x.dtype)
        attn_scale, mlp_scale = p["layer_attn_scales"][layer], p["layer_mlp_scales"][layer]
    else:
        mix = p[prefix + "resid_mix"].astype(x.dtype)
        attn_scale, mlp_scale = p[prefix + "attn_scale"], p[prefix + "mlp_scale"]
    x = mix[0] * x + mix[1] * x0
    use_xsa = layer is not None and spec.uses_xsa(layer)
    h = rms_norm(x, spec.norm_eps)
    if spec.ln_scale:
        h = h * spec.ln_scale_factor(b)
    attn_out = attention(spec, p, prefix + "attn.", h, use_xsa, v_embed, v_residual, v_first)
    if spec.parallel_blocks and b in spec.parallel_block_list:  # #1493: the MLP reads the same normed input
        mlp_out = mlp(p, prefix + "mlp.", h, spec.mlp_activation)
        return x + attn_scale.astype(x.dtype) * attn_out + mlp_scale.astype(x.dtype) * mlp_out
    x = x + attn_scale.astype(x.dtype) * attn_out
    h = rms_norm(x, spec.norm_eps)
    if spec.ln_scale:
        h = h * spec.ln_scale_factor(b)
    x = x + mlp_scale.astype(x.dtype) * mlp(p, prefix + "mlp.", h, spec.mlp_activation)
    return x


def layer_step(spec: ModelSpec, p: dict, layer: int, x: mx.array, x0: mx.array, dtype,
               prev_out: dict | None = None, ve: list | None = None) -> mx.array:
    """Effective layer `layer` on the residual stream x, with the per-iteration conditioning the spec
    switches on (core.spec.ModelSpec gives the forward pass); the U-Net skip is added by the caller.
    `prev_out` carries state across layers and is updated: each block's layer output at its previous use
    (cross_repeat_skips) and, under "v0", layer 0's values (value_residual). `ve` holds the batch's value-
    embedding lookups from `input_features` (the value_embeds tables, then the shared VE of ve_layers)."""
    if spec.loop_embeds and layer in spec.loop_starts:
        x = x + p["loop_embeds"][spec.loop_index[layer]].astype(dtype)
    h_in = x
    if spec.layer_gains:
        h_in = p["layer_in_gains"][layer].astype(dtype) * h_in
    if spec.iter_embeds:
        h_in = h_in + p["iter_embeds"][layer].astype(dtype)
    for e in range(spec.value_embeds):
        h_in = h_in + p["value_scales"][layer, e].astype(dtype) * ve[e]
    b, r = spec.layer_plan[layer], spec.loop_index[layer]
    if spec.cross_repeat_skips and r > 0:
        h_in = h_in + p["cross_repeat_scales"][b, r - 1].astype(dtype) * prev_out[b]
    v_embed = v_residual = v_first = None
    if spec.ve_layers and layer in spec.ve_layer_list:
        v_embed = p["ve_layer_scales"][spec.ve_layer_list.index(layer)].astype(dtype) * ve[-1]
    if spec.value_residual and layer > 0:
        v_residual = mx.sigmoid(p["vrl_alphas"][layer - 1].astype(dtype)) * prev_out["v0"]
    if spec.value_residual and layer == 0:
        v_first = prev_out
    out = block(spec, p, spec.layer_plan[layer], h_in, x0, layer, v_embed, v_residual, v_first)
    if spec.iter_scales:
        out = h_in + (out - h_in) * p["iter_scales"][layer].astype(dtype)
    if spec.layer_gains:
        x = x + p["layer_out_gains"][layer].astype(dtype) * (out - h_in)
    else:
        x = out
    if spec.loop_gates and spec.loop_gate_index(layer) is not None:
        g = p["loop_gates"][spec.loop_gate_index(layer)].astype(dtype)
        x = g * x + (1 - g) * x0
    if spec.cross_repeat_skips:
        prev_out[b] = x
    return x


def bigram_hash(spec: ModelSpec, tokens: mx.array) -> mx.array:
    """#1110's XOR bucket of (previous, current) token, in int64 (upstream's int32 gives the same buckets for
    ids below 59,139); position 0, with no previous token, gets the last bucket."""
    t = tokens.astype(mx.int64)
    mod = spec.bigram_buckets - 1
    h = mx.remainder(mx.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]), mod)
    return mx.concatenate([mx.full((t.shape[0], 1), mod, mx.int64), h], axis=1)


def bigram_table_index(spec: ModelSpec, tokens: mx.array) -> mx.array:
    """#470's row of (previous, current) token: (prev * 1619 + cur) mod bigram_table_size, prev = 0 at position 0."""
    t = tokens.astype(mx.int64)
    prev = mx.concatenate([mx.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
    return mx.remainder(prev * 1619 + t, spec.bigram_table_size)


def input_features(spec: ModelSpec, p: dict, tokens: mx.array, dtype) -> tuple[mx.array, list]:
    """(x0, value-embedding lookups): the normed embedding with the input variants the spec switches on
    (the bigram tables before the norm, SmearGate after it; core.spec.ModelSpec's variant notes and seed parts)."""
    x = p["tok_emb.weight"][tokens]
    if spec.bigram_table_size:
        x = x + p["bigram_emb.weight"][bigram_table_index(spec, tokens)]
    if spec.bigram_buckets:
        h = p["bigram.embed.weight"][bigram_hash(spec, tokens)]
        if spec.bigram_dim != spec.model_dim:
            h = linear(h, p["bigram.proj.weight"])
        x = x + p["bigram.scale"] * h
    x = rms_norm(x, spec.norm_eps).astype(dtype)
    if spec.smear_gate:
        prev = mx.concatenate([mx.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
        x = x + p["smear.gate"].astype(dtype) * (prev - x)
    ve = [p[f"value_embeds.{e}.weight"][tokens].astype(dtype) for e in range(spec.value_embeds)]
    if spec.ve_layers:
        h = p["ve_shared.embed.weight"][tokens].astype(dtype)
        if spec.ve_dim != spec.kv_dim:
            h = linear(h, p["ve_shared.proj.weight"])
        ve.append(h * p["ve_shared.scale"].astype(dtype))
    return x, ve


def hidden_states(spec: ModelSpec, p: dict, tokens: mx.array, dtype=mx.float32,
                  collect: list | None = None, prev_out: dict | None = None) -> mx.array:
    """Final-normed hidden states (batch, seq, dim). U-Net skips (if spec.unet_skips) run over effective layers.
    `collect`, if given, receives each effective layer's output (before the final norm), for parity;
    `prev_out`, the state carried across layers (layer_step), for eval-time extra loops to continue from."""
    x, ve = input_features(spec, p, tokens, dtype)
    x0 = x
    skips = []
    prev_out = {} if prev_out is None else prev_out
    for layer, b in enumerate(spec.layer_plan):
        if layer >= spec.num_encoder_layers and skips:
            skip_w = p["skip_weights"][layer - spec.num_encoder_layers].astype(dtype)
            skip = skip_w * skips.pop()
            if spec.skip_gates:  # #1394: lerp(skip, x, sigmoid(g)), written out the same in both backends
                gate = mx.sigmoid(p["skip_gates"][layer - spec.num_encoder_layers].astype(dtype))
                x = skip + gate * (x - skip)
            else:
                x = x + skip
        x = layer_step(spec, p, layer, x, x0, dtype, prev_out, ve)
        if collect is not None:
            collect.append(x)
        if layer < spec.num_encoder_layers:
            skips.append(x)
    return rms_norm(x, spec.norm_eps)


def softcap(z: mx.array, cap: float) -> mx.array:
    return cap * mx.tanh(z / cap)


def head(spec: ModelSpec, p: dict) -> mx.array:
    """The output projection: the token embedding when tied, else lm_head."""
    return p["tok_emb.weight"] if spec.tie_embeddings else p["lm_head.weight"]


def logits(spec: ModelSpec, p: dict, tokens: mx.array, dtype=mx.float32) -> mx.array:
    """Soft-capped float32 logits (batch, seq, vocab)."""
    z = linear(hidden_states(spec, p, tokens, dtype), head(spec, p)).astype(mx.float32)
    return softcap(z, spec.logit_softcap)


def cross_entropy(z: mx.array, y: mx.array) -> mx.array:
    """Per-token cross-entropy in nats of float32 logits (batch, seq, vocab) against ids (batch, seq)."""
    return mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, y[..., None], axis=-1)[..., 0]


def token_losses(spec: ModelSpec, p: dict, x: mx.array, y: mx.array, dtype=mx.float32) -> mx.array:
    """Per-token cross-entropy in nats, float32 (batch, seq)."""
    return cross_entropy(logits(spec, p, x, dtype), y)


def mean_loss(spec: ModelSpec, p: dict, x: mx.array, y: mx.array, dtype=mx.float32) -> mx.array:
    return token_losses(spec, p, x, y, dtype).mean()
