"""The MLX model against a plain numpy float64 reference of the spec, and gradient coverage."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backend_mlx import forward_logits  # noqa: E402
from backend_mlx.model import mean_loss  # noqa: E402
from core.params import init_weights, param_table  # noqa: E402
from core.spec import ModelSpec  # noqa: E402

SPEC = ModelSpec.from_table({"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x3"})


def perturbed(spec, seed=0):
    """Init weights with every tensor nudged off its init (zero-init projections would hide bugs)."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in init_weights(spec, seed).items()}


def reference_logits(spec, w, tokens):
    """The spec's forward pass written out in numpy float64, independently of any framework."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def rms(x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.norm_eps)

    def rope(x):  # x: (B, H, T, hd); upstream's rotation by -angle of the first rd dims (#1110's partial RoPE)
        t = x.shape[2]
        rd = spec.rope_dims or spec.head_dim
        base = spec.rope_base
        if spec.rope_train_seq_len and t > spec.rope_train_seq_len:  # #1110's NTK rescale
            base = base * (t / spec.rope_train_seq_len) ** (rd / (rd - 2))
        inv = 1.0 / base ** (np.arange(0, rd, 2) / rd)
        ang = np.arange(t)[:, None] * inv[None]
        c, s = np.cos(ang), np.sin(ang)
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 : rd]
        return np.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c, x[..., rd:]], -1)

    def attn(p, x, use_xsa=False, v_extra=()):
        """(output, raw values): v_extra are added to the values in order (#1110's VE, then VRL)."""
        b, t, d = x.shape
        h, kvh, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        if spec.q_rank:
            q = x @ w[p + "c_q_down.weight"].T @ w[p + "c_q_up.weight"].T
        else:
            q = x @ w[p + "c_q.weight"].T
        q = q.reshape(b, t, h, hd).transpose(0, 2, 1, 3)
        k = (x @ w[p + "c_k.weight"].T).reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
        v_raw = x @ w[p + "c_v.weight"].T
        v = v_raw
        for extra in v_extra:
            v = v + extra
        v = v.reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
        q, k = rope(rms(q)), rope(rms(k))
        q = q * w[p + "q_gain"][None, :, None, None]
        k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        y = (s / s.sum(-1, keepdims=True)) @ v
        if use_xsa:  # each head's output minus its projection on its own (repeated) value vector, per position
            vn = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
            y = y - (y * vn).sum(-1, keepdims=True) * vn
        return y.transpose(0, 2, 1, 3).reshape(b, t, d) @ w[p + "proj.weight"].T, v_raw

    def mlp(p, x):
        h = x @ w[p + "fc.weight"].T
        h = np.where(h > 0, h, 0.5 * h if spec.mlp_activation == "leaky_relu2" else 0.0)
        return (h**2) @ w[p + "proj.weight"].T

    # The per-iteration conditioning options (core.spec.ModelSpec), written from the plan directly: the
    # loop of a layer is how often its block ran before it; a loop starts or ends where that changes.
    plan = list(spec.layer_plan)
    loop = [plan[:i].count(b) for i, b in enumerate(plan)]
    x = w["tok_emb.weight"][tokens]
    if spec.bigram_table_size:  # #470's multiplicative hash, written out per position (prev = 0 at position 0)
        ids = [[(1619 * (int(row[i - 1]) if i else 0) + int(row[i])) % spec.bigram_table_size for i in range(len(row))]
               for row in tokens]
        x = x + w["bigram_emb.weight"][np.array(ids)]
    if spec.bigram_buckets:  # #1110's XOR hash, written out per position
        m = spec.bigram_buckets - 1
        ids = [[m] + [(36313 * int(row[i]) ^ 27191 * int(row[i - 1])) % m for i in range(1, len(row))]
               for row in tokens]
        hb = w["bigram.embed.weight"][np.array(ids)]
        if spec.bigram_dim != spec.model_dim:
            hb = hb @ w["bigram.proj.weight"].T
        x = x + w["bigram.scale"] * hb
    x = rms(x)
    if spec.smear_gate:
        shifted = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], 1)
        x = x + w["smear.gate"] * (shifted - x)
    ve = [w[f"value_embeds.{e}.weight"][tokens] for e in range(spec.value_embeds)]
    ve_layers = [int(t) for t in spec.ve_layers.split(",") if t]
    if ve_layers:  # #1110's shared value embedding, into V at ve_layers
        shared = w["ve_shared.embed.weight"][tokens]
        if "ve_shared.proj.weight" in w:
            shared = shared @ w["ve_shared.proj.weight"].T
        shared = shared * w["ve_shared.scale"]
    x0, skips, prev, v0 = x, [], {}, None
    enc = spec.num_layers // 2 if spec.unet_skips else 0
    for layer, blk in enumerate(plan):
        p = f"blocks.{blk}."
        if layer >= enc and skips:
            x = x + w["skip_weights"][layer - enc] * skips.pop()
        if spec.loop_embeds and (layer == 0 or loop[layer] != loop[layer - 1]):
            x = x + w["loop_embeds"][loop[layer]]
        h = w["layer_in_gains"][layer] * x if spec.layer_gains else x
        if spec.iter_embeds:
            h = h + w["iter_embeds"][layer]
        for e, table in enumerate(ve):
            h = h + w["value_scales"][layer, e] * table
        if spec.cross_repeat_skips and loop[layer] > 0:
            h = h + w["cross_repeat_scales"][blk, loop[layer] - 1] * prev[blk]
        if spec.per_layer_scales:
            mix, a, m = w["layer_resid_mixes"][layer], w["layer_attn_scales"][layer], w["layer_mlp_scales"][layer]
        else:
            mix, a, m = w[p + "resid_mix"], w[p + "attn_scale"], w[p + "mlp_scale"]
        u = mix[0] * h + mix[1] * x0
        f = 1 / np.sqrt(blk + 1) if spec.ln_scale else 1.0
        extra = []
        if layer in ve_layers:
            extra.append(w["ve_layer_scales"][ve_layers.index(layer)] * shared)
        if spec.value_residual and layer > 0:
            extra.append(1 / (1 + np.exp(-w["vrl_alphas"][layer - 1])) * v0)
        out, v_raw = attn(p + "attn.", rms(u) * f, layer >= len(plan) - spec.xsa_last_n, extra)
        v0 = v_raw if layer == 0 else v0
        u = u + a * out
        u = u + m * mlp(p + "mlp.", rms(u) * f)
        if spec.iter_scales:
            u = h + (u - h) * w["iter_scales"][layer]
        x = x + w["layer_out_gains"][layer] * (u - h) if spec.layer_gains else u
        if spec.loop_gates and (layer == len(plan) - 1 or loop[layer] != loop[layer + 1]):
            if spec.loop_gate_style == "seed319":  # #319: no gate after a first loop, loop r's is gates[r - 1]
                if loop[layer] > 0:
                    g = w["loop_gates"][loop[layer] - 1]
                    x = g * x + (1 - g) * x0
            else:
                g = w["loop_gates"][loop[layer]]
                x = g * x + (1 - g) * x0
        prev[blk] = x
        if layer < enc:
            skips.append(x)
    z = rms(x) @ w["tok_emb.weight"].T
    return spec.logit_softcap * np.tanh(z / spec.logit_softcap)


@pytest.mark.parametrize("plan", ["2x3", "flat", "0 1 1 0 1"])
def test_logits_match_numpy_reference(plan):
    table = {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": plan}
    if plan == "flat":
        table["num_layers"] = 3
    spec = ModelSpec.from_table(table)
    w = perturbed(spec)
    tokens = np.random.default_rng(1).integers(0, 64, (2, 16))
    got = forward_logits(spec, w, tokens)
    want = reference_logits(spec, w, tokens)
    assert got.dtype == np.float32 and got.shape == (2, 16, 64)
    # fp32 against float64 through a few layers of O(1) activations: errors sit near 1e-6; 1e-4 leaves
    # room for summation order while still catching any wrong formula (those show up at 1e-2 or more).
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_every_parameter_receives_a_gradient():
    w = {k: mx.array(v) for k, v in perturbed(SPEC).items()}
    tokens = mx.array(np.random.default_rng(2).integers(0, 64, (2, 17)))
    grads = mx.grad(lambda p: mean_loss(SPEC, p, tokens[:, :-1], tokens[:, 1:]))(w)
    assert set(grads) == {p.name for p in param_table(SPEC)}
    for name, g in grads.items():
        assert float(mx.abs(g).max()) > 0, f"{name} gets no gradient"
