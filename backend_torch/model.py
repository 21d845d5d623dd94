"""The looped transformer in PyTorch, as a pure function of the spec and a flat {name: tensor} dict.

Mirrors the MLX backend's model.py line by line against core.spec: same names, weights (out, in) applied as
x @ W.T, same numerics. Weights stay float32; matrix products run in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.spec import ModelSpec


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype))


def rotary(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    # Half-split rotation by -angle, upstream train_gpt.py's convention: (x1 cos + x2 sin, -x1 sin + x2 cos),
    # of the first spec.rope_width dims (the rest pass through).
    # Angles are computed in float32 and cast to the compute dtype, as upstream's Rotary cache.
    rd = spec.rope_width
    half = rd // 2
    dims = torch.arange(0, rd, 2, dtype=torch.float32, device=x.device)
    inv_freq = 1.0 / spec.rope_base_at(x.size(-2)) ** (dims / rd)
    angles = torch.outer(torch.arange(x.size(-2), dtype=torch.float32, device=x.device), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rd], x[..., rd:]
    rotated = (x1 * cos + x2 * sin, -x1 * sin + x2 * cos)
    return torch.cat(rotated + (rest,) if rd < spec.head_dim else rotated, dim=-1)


def xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Remove from each head's output (batch, heads, seq, hd) its projection on the normalised value vector
    of its kv head (batch, kv_heads, seq, hd) at the same position (core.spec.ModelSpec's variant notes)."""
    batch, heads, seq, hd = y.shape
    kv_heads = v.size(1)
    y = y.reshape(batch, kv_heads, heads // kv_heads, seq, hd)
    norm = torch.sqrt(torch.sum(v * v, dim=-1, keepdim=True))
    vn = (v / torch.clamp_min(norm, 1e-12))[:, :, None]
    y = y - torch.sum(y * vn, dim=-1, keepdim=True) * vn
    return y.reshape(batch, heads, seq, hd)


def attention(spec: ModelSpec, p: dict, prefix: str, x: torch.Tensor, use_xsa: bool = False,
              v_embed: torch.Tensor | None = None, v_residual: torch.Tensor | None = None, v_first: dict | None = None) -> torch.Tensor:
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
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
    q = rotary(rms_norm(q, spec.norm_eps), spec)
    k = rotary(rms_norm(k, spec.norm_eps), spec)
    q = q * p[prefix + "q_gain"].to(q.dtype)[None, :, None, None]
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.head_dim**-0.5,
                                       enable_gqa=spec.num_kv_heads < spec.num_heads)
    if use_xsa:
        y = xsa(y, v)
    y = y.transpose(1, 2).reshape(batch, seq, spec.model_dim)
    return linear(y, p[prefix + "proj.weight"])


def mlp(p: dict, prefix: str, x: torch.Tensor, activation: str = "relu2") -> torch.Tensor:
    h = linear(x, p[prefix + "fc.weight"])
    h = F.leaky_relu(h, 0.5) if activation == "leaky_relu2" else torch.relu(h)
    return linear(h * h, p[prefix + "proj.weight"])


def block(spec: ModelSpec, p: dict, b: int, x: torch.Tensor, x0: torch.Tensor, layer: int | None = None,
          v_embed: torch.Tensor | None = None, v_residual: torch.Tensor | None = None, v_first: dict | None = None) -> torch.Tensor:
    """Block b on x. With spec.per_layer_scales, effective layer `layer`'s scales and resid_mix replace the
    block's own; with spec.ln_scale its normed inputs are scaled by 1/sqrt(b + 1); a block of
    spec.parallel_blocks runs attention and MLP on the same input (core.spec's record parts). The v_* arguments
    go to attention."""
    prefix = f"blocks.{b}."
    if spec.per_layer_scales:
        mix = p["layer_resid_mixes"][layer].to(x.dtype)
        attn_scale, mlp_scale = p["layer_attn_scales"][layer], p["layer_mlp_scales"][layer]
    else:
        mix = p[prefix + "resid_mix"].to(x.dtype)
        attn_scale, mlp_scale = p[prefix + "attn_scale"], p[prefix + "mlp_scale"]
    x = mix[0] * x + mix[1] * x0
    use_xsa = layer is not None and spec.uses_xsa(layer)
    h = rms_norm(x, spec.norm_eps)
    if spec.ln_scale:
        h = h * spec.ln_scale_factor(b)
    attn_out = attention(spec, p, prefix + "attn.", h, use_xsa, v_embed, v_residual, v_first)
    if spec.parallel_blocks and b in spec.parallel_block_list:  # #1493: the MLP reads the same normed input
        mlp_out = mlp(p, prefix + "mlp.", h, spec.mlp_activation)
        return x + attn_scale.to(x.dtype) * attn_out + mlp_scale.to(x.dtype) * mlp_out
    x = x + attn_scale.to(x.dtype) * attn_out
    h = rms_norm(x, spec.norm_eps)
    if spec.ln_scale:
        h = h * spec.ln_scale_factor(b)
    x = x + mlp_scale.to(x.dtype) * mlp(p, prefix + "mlp.", h, spec.mlp_activation)
    return x


def layer_step(spec: ModelSpec, p: dict, layer: int, x: torch.Tensor, x0: torch.Tensor, dtype,
               prev_out: dict | None = None, ve: list | None = None) -> torch.Tensor:
    """Effective layer `layer` on the residual stream x, with the per-iteration conditioning the spec
    switches on (core.spec.ModelSpec gives the forward pass); the U-Net skip is added by the caller.
    `prev_out` carries state across layers and is updated: each block's layer output at its previous use
    (cross_repeat_skips) and, under "v0", layer 0's values (value_residual). `ve` holds the batch's value-
    embedding lookups from `input_features` (the value_embeds tables, then the shared VE of ve_layers)."""
    if spec.loop_embeds and layer in spec.loop_starts:
        x = x + p["loop_embeds"][spec.loop_index[layer]].to(dtype)
    h_in = x
    if spec.layer_gains:
        h_in = p["layer_in_gains"][layer].to(dtype) * h_in
    if spec.iter_embeds:
        h_in = h_in + p["iter_embeds"][layer].to(dtype)
    for e in range(spec.value_embeds):
        h_in = h_in + p["value_scales"][layer, e].to(dtype) * ve[e]
    b, r = spec.layer_plan[layer], spec.loop_index[layer]
    if spec.cross_repeat_skips and r > 0:
        h_in = h_in + p["cross_repeat_scales"][b, r - 1].to(dtype) * prev_out[b]
    v_embed = v_residual = v_first = None
    if spec.ve_layers and layer in spec.ve_layer_list:
        v_embed = p["ve_layer_scales"][spec.ve_layer_list.index(layer)].to(dtype) * ve[-1]
    if spec.value_residual and layer > 0:
        v_residual = torch.sigmoid(p["vrl_alphas"][layer - 1].to(dtype)) * prev_out["v0"]
    if spec.value_residual and layer == 0:
        v_first = prev_out
    out = block(spec, p, spec.layer_plan[layer], h_in, x0, layer, v_embed, v_residual, v_first)
    if spec.iter_scales:
        out = h_in + (out - h_in) * p["iter_scales"][layer].to(dtype)
    if spec.layer_gains:
        x = x + p["layer_out_gains"][layer].to(dtype) * (out - h_in)
    else:
        x = out
    if spec.loop_gates and spec.loop_gate_index(layer) is not None:
        g = p["loop_gates"][spec.loop_gate_index(layer)].to(dtype)
        x = g * x + (1 - g) * x0
    if spec.cross_repeat_skips:
        prev_out[b] = x
    return x


def bigram_hash(spec: ModelSpec, tokens: torch.Tensor) -> torch.Tensor:
    """#1110's XOR bucket of (previous, current) token, in int64 (upstream's int32 gives the same buckets for
    ids below 59,139); position 0, with no previous token, gets the last bucket."""
    t = tokens.to(torch.int64)
    mod = spec.bigram_buckets - 1
    h = torch.remainder(torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]), mod)
    return torch.cat([torch.full_like(t[:, :1], mod), h], dim=1)


def bigram_table_index(spec: ModelSpec, tokens: torch.Tensor) -> torch.Tensor:
    """#470's row of (previous, current) token: (prev * 1619 + cur) mod bigram_table_size, prev = 0 at position 0."""
    t = tokens.to(torch.int64)
    prev = torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1)
    return torch.remainder(prev * 1619 + t, spec.bigram_table_size)


def input_features(spec: ModelSpec, p: dict, tokens: torch.Tensor, dtype) -> tuple[torch.Tensor, list]:
    """(x0, value-embedding lookups): the normed embedding with the input variants the spec switches on
    (the bigram tables before the norm, SmearGate after it; core.spec.ModelSpec's variant notes and seed parts)."""
    x = F.embedding(tokens, p["tok_emb.weight"])
    if spec.bigram_table_size:
        x = x + F.embedding(bigram_table_index(spec, tokens), p["bigram_emb.weight"])
    if spec.bigram_buckets:
        h = F.embedding(bigram_hash(spec, tokens), p["bigram.embed.weight"])
        if spec.bigram_dim != spec.model_dim:
            h = linear(h, p["bigram.proj.weight"])
        x = x + p["bigram.scale"] * h
    x = rms_norm(x, spec.norm_eps).to(dtype)
    if spec.smear_gate:
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        x = x + p["smear.gate"].to(dtype) * (prev - x)
    ve = [F.embedding(tokens, p[f"value_embeds.{e}.weight"]).to(dtype) for e in range(spec.value_embeds)]
    if spec.ve_layers:
        h = F.embedding(tokens, p["ve_shared.embed.weight"]).to(dtype)
        if spec.ve_dim != spec.kv_dim:
            h = linear(h, p["ve_shared.proj.weight"])
        ve.append(h * p["ve_shared.scale"].to(dtype))
    return x, ve


def hidden_states(spec: ModelSpec, p: dict, tokens: torch.Tensor, dtype=torch.float32,
                  collect: list | None = None, prev_out: dict | None = None) -> torch.Tensor:
    """Final-normed hidden states (batch, seq, dim). U-Net skips (if spec.unet_skips) run over effective layers.
    `collect`, if given, receives each effective layer's output (before the final norm), for parity;
    `prev_out`, the state carried across layers (layer_step), for eval-time extra loops to continue from."""
    x, ve = input_features(spec, p, tokens, dtype)
    x0 = x
    skips = []
    prev_out = {} if prev_out is None else prev_out
    for layer, b in enumerate(spec.layer_plan):
        if layer >= spec.num_encoder_layers and skips:
            skip_w = p["skip_weights"][layer - spec.num_encoder_layers].to(dtype)
            skip = skip_w * skips.pop()
            if spec.skip_gates:  # #1394: lerp(skip, x, sigmoid(g)), written out the same in both backends
                gate = torch.sigmoid(p["skip_gates"][layer - spec.num_encoder_layers].to(dtype))
                x = skip + gate * (x - skip)
            else:
                x = x + skip
        x = layer_step(spec, p, layer, x, x0, dtype, prev_out, ve)
        if collect is not None:
            collect.append(x)
        if layer < spec.num_encoder_layers:
            skips.append(x)
    return rms_norm(x, spec.norm_eps)


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(z / cap)


def head(spec: ModelSpec, p: dict) -> torch.Tensor:
    """The output projection: the token embedding when tied, else lm_head."""
    return p["tok_emb.weight"] if spec.tie_embeddings else p["lm_head.weight"]


def logits(spec: ModelSpec, p: dict, tokens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Soft-capped float32 logits (batch, seq, vocab)."""
    z = linear(hidden_states(spec, p, tokens, dtype), head(spec, p)).to(torch.float32)
    return softcap(z, spec.logit_softcap)


def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats of float32 logits (batch, seq, vocab) against ids (batch, seq)."""
    return torch.logsumexp(z, dim=-1) - torch.gather(z, -1, y[..., None].long())[..., 0]


def token_losses(spec: ModelSpec, p: dict, x: torch.Tensor, y: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Per-token cross-entropy in nats, float32 (batch, seq)."""
    return cross_entropy(logits(spec, p, x, dtype), y)


def mean_loss(spec: ModelSpec, p: dict, x: torch.Tensor, y: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return token_losses(spec, p, x, y, dtype).mean()
