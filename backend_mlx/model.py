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
    # Half-split rotation by -angle, upstream train_gpt.py's convention: (x1 cos + x2 sin, -x1 sin + x2 cos).
    # mx.fast.rope rotates by +angle, so negate the positions.
    return mx.fast.rope(x, spec.head_dim, traditional=False, base=spec.rope_base, scale=-1.0, offset=0)


def attention(spec: ModelSpec, p: dict, prefix: str, x: mx.array) -> mx.array:
    batch, seq, _ = x.shape
    q = linear(x, p[prefix + "c_q.weight"]).reshape(batch, seq, spec.num_heads, spec.head_dim)
    k = linear(x, p[prefix + "c_k.weight"]).reshape(batch, seq, spec.num_kv_heads, spec.head_dim)
    v = linear(x, p[prefix + "c_v.weight"]).reshape(batch, seq, spec.num_kv_heads, spec.head_dim)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (batch, heads, seq, head_dim)
    q = rotary(rms_norm(q, spec.norm_eps), spec)
    k = rotary(rms_norm(k, spec.norm_eps), spec)
    q = q * p[prefix + "q_gain"].astype(q.dtype)[None, :, None, None]
    y = mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.head_dim**-0.5, mask="causal")
    y = y.transpose(0, 2, 1, 3).reshape(batch, seq, spec.model_dim)
    return linear(y, p[prefix + "proj.weight"])


def mlp(p: dict, prefix: str, x: mx.array, activation: str = "relu2") -> mx.array:
    h = linear(x, p[prefix + "fc.weight"])
    h = mx.maximum(h, 0.5 * h) if activation == "leaky_relu2" else mx.maximum(h, 0)
    return linear(h * h, p[prefix + "proj.weight"])


def block(spec: ModelSpec, p: dict, b: int, x: mx.array, x0: mx.array, layer: int | None = None) -> mx.array:
    """Block b on x. With spec.per_layer_scales, effective layer `layer`'s scales and resid_mix replace the
    block's own."""
    prefix = f"blocks.{b}."
    if spec.per_layer_scales:
        mix = p["layer_resid_mixes"][layer].astype(x.dtype)
        attn_scale, mlp_scale = p["layer_attn_scales"][layer], p["layer_mlp_scales"][layer]
    else:
        mix = p[prefix + "resid_mix"].astype(x.dtype)
        attn_scale, mlp_scale = p[prefix + "attn_scale"], p[prefix + "mlp_scale"]
    x = mix[0] * x + mix[1] * x0
    x = x + attn_scale.astype(x.dtype) * attention(spec, p, prefix + "attn.", rms_norm(x, spec.norm_eps))
    x = x + mlp_scale.astype(x.dtype) * mlp(p, prefix + "mlp.", rms_norm(x, spec.norm_eps), spec.mlp_activation)
    return x


def layer_step(spec: ModelSpec, p: dict, layer: int, x: mx.array, x0: mx.array, dtype,
               prev_out: dict | None = None) -> mx.array:
    """Effective layer `layer` on the residual stream x, with the per-iteration conditioning the spec
    switches on (core.spec.ModelSpec gives the forward pass); the U-Net skip is added by the caller.
    `prev_out` maps each block to the layer output at its previous use (cross_repeat_skips), and is updated."""
    if spec.loop_embeds and layer in spec.loop_starts:
        x = x + p["loop_embeds"][spec.loop_index[layer]].astype(dtype)
    h_in = x
    if spec.layer_gains:
        h_in = p["layer_in_gains"][layer].astype(dtype) * h_in
    if spec.iter_embeds:
        h_in = h_in + p["iter_embeds"][layer].astype(dtype)
    b, r = spec.layer_plan[layer], spec.loop_index[layer]
    if spec.cross_repeat_skips and r > 0:
        h_in = h_in + p["cross_repeat_scales"][b, r - 1].astype(dtype) * prev_out[b]
    out = block(spec, p, spec.layer_plan[layer], h_in, x0, layer)
    if spec.iter_scales:
        out = h_in + (out - h_in) * p["iter_scales"][layer].astype(dtype)
    if spec.layer_gains:
        x = x + p["layer_out_gains"][layer].astype(dtype) * (out - h_in)
    else:
        x = out
    if spec.loop_gates and layer in spec.loop_ends:
        g = p["loop_gates"][spec.loop_index[layer]].astype(dtype)
        x = g * x + (1 - g) * x0
    if spec.cross_repeat_skips:
        prev_out[b] = x
    return x


def hidden_states(spec: ModelSpec, p: dict, tokens: mx.array, dtype=mx.float32,
                  collect: list | None = None) -> mx.array:
    """Final-normed hidden states (batch, seq, dim). U-Net skips (if spec.unet_skips) run over effective layers.
    `collect`, if given, receives each effective layer's output (before the final norm), for parity."""
    x = rms_norm(p["tok_emb.weight"][tokens], spec.norm_eps).astype(dtype)
    x0 = x
    skips, prev_out = [], {}
    for layer, b in enumerate(spec.layer_plan):
        if layer >= spec.num_encoder_layers and skips:
            skip_w = p["skip_weights"][layer - spec.num_encoder_layers].astype(dtype)
            x = x + skip_w * skips.pop()
        x = layer_step(spec, p, layer, x, x0, dtype, prev_out)
        if collect is not None:
            collect.append(x)
        if layer < spec.num_encoder_layers:
            skips.append(x)
    return rms_norm(x, spec.norm_eps)


def softcap(z: mx.array, cap: float) -> mx.array:
    return cap * mx.tanh(z / cap)


def logits(spec: ModelSpec, p: dict, tokens: mx.array, dtype=mx.float32) -> mx.array:
    """Soft-capped float32 logits (batch, seq, vocab)."""
    head = p["tok_emb.weight"] if spec.tie_embeddings else p["lm_head.weight"]
    z = linear(hidden_states(spec, p, tokens, dtype), head).astype(mx.float32)
    return softcap(z, spec.logit_softcap)


def cross_entropy(z: mx.array, y: mx.array) -> mx.array:
    """Per-token cross-entropy in nats of float32 logits (batch, seq, vocab) against ids (batch, seq)."""
    return mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, y[..., None], axis=-1)[..., 0]


def token_losses(spec: ModelSpec, p: dict, x: mx.array, y: mx.array, dtype=mx.float32) -> mx.array:
    """Per-token cross-entropy in nats, float32 (batch, seq)."""
    return cross_entropy(logits(spec, p, x, dtype), y)


def mean_loss(spec: ModelSpec, p: dict, x: mx.array, y: mx.array, dtype=mx.float32) -> mx.array:
    return token_losses(spec, p, x, y, dtype).mean()
