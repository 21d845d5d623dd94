"""The looped transformer in MLX, as a pure function of the spec and a flat {name: array} dict.

Mirrors backend_torch/model.py line by line against core.spec: same names, weights (out, in) applied as
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


def mlp(p: dict, prefix: str, x: mx.array) -> mx.array:
    h = mx.maximum(linear(x, p[prefix + "fc.weight"]), 0)
    return linear(h * h, p[prefix + "proj.weight"])


def block(spec: ModelSpec, p: dict, b: int, x: mx.array, x0: mx.array) -> mx.array:
    prefix = f"blocks.{b}."
    mix = p[prefix + "resid_mix"].astype(x.dtype)
    x = mix[0] * x + mix[1] * x0
    x = x + p[prefix + "attn_scale"].astype(x.dtype) * attention(spec, p, prefix + "attn.", rms_norm(x, spec.norm_eps))
    x = x + p[prefix + "mlp_scale"].astype(x.dtype) * mlp(p, prefix + "mlp.", rms_norm(x, spec.norm_eps))
    return x


def hidden_states(spec: ModelSpec, p: dict, tokens: mx.array, dtype=mx.float32,
                  collect: list | None = None) -> mx.array:
    """Final-normed hidden states (batch, seq, dim). U-Net skips run over effective layers.
    `collect`, if given, receives each effective layer's output (before the final norm), for parity."""
    x = rms_norm(p["tok_emb.weight"][tokens], spec.norm_eps).astype(dtype)
    x0 = x
    skips = []
    for layer, b in enumerate(spec.layer_plan):
        if layer >= spec.num_encoder_layers and skips:
            skip_w = p["skip_weights"][layer - spec.num_encoder_layers].astype(dtype)
            x = x + skip_w * skips.pop()
        x = block(spec, p, b, x, x0)
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
