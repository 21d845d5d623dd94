"""Helpers shared by the tests (imported as `from tests.helpers import ...`; no test file imports another).

- tiny specs, token batches and perturbed weights;
- the numpy float64 reference of the model's forward pass, written from core.spec.ModelSpec's notes;
- one backward pass and one optimizer step in both backends (MLX and torch are imported only when called);
- StandInBackend, the part of core.loop.Backend that the numpy stand-ins of the loop tests share;
- run directories written by hand and PNG probes, for the sweep, compare and plot tests.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from core.params import GROUPS, init_weights, param_table
from core.spec import ModelSpec

TINY = {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2}
# The seeds' remaining parts (tests/test_seed_parts.py), each on its own. At TINY (d 32, 4/2 heads) kv_dim is
# 16, so a VE table of width 8 has a projection; the plans have 6 layers.
SEED_PART_OPTIONS = {
    "bigram_table": {"bigram_table_size": 32},
    "ve": {"ve_layers": "1,4", "ve_dim": 8},
    "ve_full_width": {"ve_layers": "5", "ve_dim": 16},
    "vrl": {"value_residual": True},
    "ln_scale": {"ln_scale": True},
    "seed319": {"loop_gates": True, "loop_gate_style": "seed319"},
    "phase": {"resid_mix_phase": True},
}
# The per-iteration conditioning switches (core.spec.ModelSpec), all on: identity at init.
ALL_ON = {o: True for o in ("iter_embeds", "loop_embeds", "per_layer_scales", "iter_scales", "layer_gains",
                            "loop_gates")}
PLANS = ("2x3", "0 1 2 1 2 3")  # cyclic, and a middle-looped plan whose loop index goes 0 0 0 1 1 0
# fp32 parity of the whole model. Both backends run the same ops in float32; they differ only in summation
# order inside matmuls/SDPA and in how RoPE frequencies are formed (MLX's fast rope uses base**(-2i/d), torch
# 1/base**(2i/d)): eps-level per op, observed <= 4e-7 on logits of size ~2 over 6 layers. 2e-5 leaves room for
# other BLAS builds; a convention slip (RoPE sign, skip order, GQA layout, softcap) moves logits by 1e-2 or more.
LOGIT_ATOL = 2e-5
# fp32 against the float64 reference through a few layers of O(1) activations: errors sit near 1e-6; 1e-4
# leaves room for summation order while still catching any wrong formula (those show up at 1e-2 or more).
REFERENCE_ATOL = 1e-4


def spec_for(plan: str, **options) -> ModelSpec:
    """A TINY spec with this layer plan ("flat" takes num_layers from the options) and [model] options."""
    return ModelSpec.from_table({**TINY, "layer_plan": plan, **options})


def tokens(seed: int = 1, batch: int = 2, seq: int = 16, vocab: int = TINY["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def perturbed(spec: ModelSpec, seed: int = 0, scale: float = 0.05,
              init_seed: int | None = None) -> dict[str, np.ndarray]:
    """init_weights(spec, init_seed or seed) with N(0, scale) noise on every tensor: zero-initialised projections
    would make every block the identity and hide attention/MLP bugs. scale=0 gives the plain init."""
    rng = np.random.default_rng(seed)
    init = init_weights(spec, seed if init_seed is None else init_seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init.items()}


# ---- the numpy float64 reference ---------------------------------------------------------------------------

def reference_logits(spec, w, tokens):
    """The spec's forward pass written out in numpy float64, independently of any framework: the logits
    (batch, seq, vocab) of `tokens` under weights `w`."""
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
            skip = w["skip_weights"][layer - enc] * skips.pop()
            if spec.skip_gates:  # #1394: torch.lerp(skip, x, sigmoid(g)) = (1 - sigma) skip + sigma x
                sigma = 1 / (1 + np.exp(-w["skip_gates"][layer - enc]))
                x = (1 - sigma) * skip + sigma * x
            else:
                x = x + skip
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
        if blk in [int(t) for t in spec.parallel_blocks.split(",") if t]:  # #1493: both read the mixed input
            u = u + a * out + m * mlp(p + "mlp.", rms(u) * f)
        else:
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
    head = w["tok_emb.weight"] if spec.tie_embeddings else w["lm_head.weight"]
    z = rms(x) @ head.T
    return spec.logit_softcap * np.tanh(z / spec.logit_softcap)


# ---- gradients and one optimizer step in both backends ------------------------------------------------------

def grads_in_both(spec: ModelSpec, w: dict[str, np.ndarray], seed: int = 4):
    """One backward pass of the mean loss on a fixed batch from weights `w`: (MLX grads, torch grads)."""
    import mlx.core as mx
    import torch

    from backend_mlx import model as mm
    from backend_torch import model as tm

    t = tokens(seed, seq=17, vocab=spec.vocab_size)
    x, y = t[:, :-1], t[:, 1:]
    gm = mx.grad(lambda p: mm.mean_loss(spec, p, mx.array(x), mx.array(y)))({k: mx.array(v) for k, v in w.items()})
    pt = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    tm.mean_loss(spec, pt, torch.tensor(x), torch.tensor(y)).backward()
    return gm, {k: v.grad for k, v in pt.items()}


def checked_grads(spec: ModelSpec, w: dict[str, np.ndarray]):
    """(MLX grads, torch grads) as numpy, after checking that every parameter of the table, and nothing else,
    gets a nonzero gradient in each backend, the same in both (to 1e-4 of its largest entry: fp32 sums in
    different orders), and names an optimizer group."""
    gm, gt = grads_in_both(spec, w)
    table = param_table(spec)
    names = {i.name for i in table}
    assert set(gm) == names and {k for k, v in gt.items() if v is not None} == names
    gm = {k: np.array(v) for k, v in gm.items()}
    gt = {k: v.numpy() for k, v in gt.items()}
    for info in table:
        g_m, g_t = gm[info.name], gt[info.name]
        assert np.isfinite(g_m).all() and np.isfinite(g_t).all(), info.name
        assert np.abs(g_m).max() > 0, f"{info.name} gets no gradient in MLX"
        assert np.abs(g_t).max() > 0, f"{info.name} gets no gradient in torch"
        np.testing.assert_allclose(g_m, g_t, atol=1e-6 + 1e-4 * np.abs(g_t).max(), rtol=0, err_msg=info.name)
        assert info.group in GROUPS, info.name
    return gm, gt


def one_step_in_both(spec: ModelSpec, w: dict[str, np.ndarray], mlx_grads: dict, torch_grads: dict, optim=None):
    """Assert every parameter sits in exactly one optimizer group of each backend (Muon for matrices, Adam for
    the rest), then take one update in each from weights `w` (with `optim`, default OptimConfig()); return the
    weights after it as numpy, (MLX, torch)."""
    import mlx.core as mx
    import torch

    from backend_mlx.optim import init_state as mlx_init_state, make_update as mlx_make_update
    from backend_torch.optim import init_state as torch_init_state, make_update as torch_make_update
    from core.config import OptimConfig

    optim = optim or OptimConfig()
    for state in (mlx_init_state(spec), torch_init_state(spec)):
        for info in param_table(spec):
            assert (info.name in state["muon"]) + (info.name in state["adam"]) == 1, info.name
            assert (info.name in state["adam"]) == (info.group != "matrix"), info.name
    mp = {k: mx.array(v) for k, v in w.items()}
    mlx_grads = {k: mx.array(np.asarray(v)) for k, v in mlx_grads.items()}
    mp2, _ = mlx_make_update(spec, optim)(mp, mlx_init_state(spec), mlx_grads, mx.array(1.0), mx.array(0.95))
    tp = {k: torch.tensor(v) for k, v in w.items()}
    torch_grads = {k: torch.as_tensor(np.asarray(v)) for k, v in torch_grads.items()}
    torch_make_update(spec, optim)(tp, torch_init_state(spec), torch_grads, torch.tensor(1.0), torch.tensor(0.95))
    return {k: np.array(v) for k, v in mp2.items()}, {k: v.numpy() for k, v in tp.items()}


# ---- trainers and a stand-in for core.loop.Backend --------------------------------------------------------

def trainer(backend: str, spec: ModelSpec, weights: dict[str, np.ndarray], seq_len: int = 16):
    """A float32 CPU trainer of `backend` ("mlx" or "torch") with batches of one sequence; skipped when that
    framework is not installed."""
    import pytest

    from core.config import OptimConfig, TrainConfig

    train = TrainConfig(seq_len=seq_len, batch_tokens=seq_len, compute_dtype="float32")
    if backend == "mlx":
        pytest.importorskip("mlx.core")
        from backend_mlx.trainer import MLXBackend

        return MLXBackend(spec, weights, train, OptimConfig())
    pytest.importorskip("torch")
    from backend_torch.trainer import TorchBackend

    return TorchBackend(spec, weights, train, OptimConfig(), device="cpu")


class StandInBackend:
    """The part of core.loop.Backend that the tests' numpy stand-ins share: one rank, weights and optimizer state
    held as numpy copies, snapshots that are just the state. Each stand-in adds its own train_step,
    eval_loss_sum and whatever it records."""

    name, rank, world_size, device = "fake", 0, 1, "cpu"

    def __init__(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray] | None = None):
        self.weights, self.optimizer = weights, optimizer or {}

    def get_weights(self):
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights):
        self.weights = {k: np.array(v) for k, v in weights.items()}

    def get_state(self):
        return self.get_weights(), {k: v.copy() for k, v in self.optimizer.items()}

    def set_state(self, weights, optimizer):
        self.set_weights(weights)
        self.optimizer = {k: np.array(v) for k, v in optimizer.items()}

    def snapshot(self):
        return self.get_state()

    def restore(self, snap):
        self.set_state(*snap)

    def all_reduce_sum(self, values):
        return values

    def all_reduce_max(self, value):
        return value

    def close(self):
        pass


# ---- run directories and plots -----------------------------------------------------------------------

LN2 = math.log(2)


def assert_optimizer_option_resumes_exactly(backend: str, spec: ModelSpec, optim, names=None) -> None:
    """An optimizer option survives a resume: 3 steps, then the state set into a fresh backend (other weights)
    and 2 more steps in both give identical losses and weights; the same 2 steps with the default optimizer
    end elsewhere in at least one of `names` (all parameters by default), so the option was live."""
    from core.config import OptimConfig, TrainConfig
    from tools import parity
    from tools.backends import build_backend

    train = TrainConfig(seq_len=16, batch_tokens=64, compute_dtype="float32")
    rng = np.random.default_rng(3)
    batches = [[tuple(rng.integers(0, spec.vocab_size, (2, 2, 16)).astype(np.int32))] for _ in range(5)]
    a = build_backend(backend, spec, parity.perturbed_weights(spec, 1), train, optim)
    for mbs in batches[:3]:
        a.train_step(mbs, 0.7, 0.9)
    weights, optimizer = a.get_state()
    b = build_backend(backend, spec, parity.perturbed_weights(spec, 2), train, optim)
    b.set_state(weights, optimizer)
    for mbs in batches[3:]:
        assert a.train_step(mbs, 0.5, 0.9) == b.train_step(mbs, 0.5, 0.9)
    (wa, _), (wb, _) = a.get_state(), b.get_state()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    c = build_backend(backend, spec, weights, train, OptimConfig())
    c.set_state(weights, optimizer)
    for mbs in batches[3:]:
        c.train_step(mbs, 0.5, 0.9)
    assert any(not np.array_equal(wa[k], c.get_state()[0][k]) for k in (names or wa))


def write_run(root, name, seed, final=None, val=((0, 6.9),), train=((1, 6.8), (2, 6.5)), config=None, extra=()):
    """A run directory as `loopgolf train` writes it: config.toml and metrics.jsonl."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"model": {"layer_plan": "2x3"}, "train": {"seed": seed, "iterations": 2, "val_max_tokens": 0}}
    for section, table in (config or {}).items():
        cfg.setdefault(section, {}).update(table)
    (d / "config.toml").write_text("".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items())
                                           for s, t in cfg.items()))
    records = [{"event": "start", "params": 100}]
    records += [{"event": "train", "step": s, "train_loss": v, "train_time_ms": 100.0 * s, "tok_s": 1000.0}
                for s, v in train]
    records += [{"event": "val", "step": s, "val_loss": v, "val_bpb": v / LN2 / 3, "train_time_ms": 100.0 * s}
                for s, v in val]
    records += list(extra)
    if final is not None:
        loss = final
        records.append({"event": "final", "val_loss": loss + 0.001, "val_bpb": (loss + 0.001) / LN2 / 3,
                        "roundtrip_val_loss": loss, "roundtrip_val_bpb": loss / LN2 / 3, "artifact_bytes": 5000,
                        "total_bytes": 9000 + seed, "params": 100, "steps": 2, "train_time_ms": 200.0,
                        "tok_s": 900.0 + seed, "artifact": "model.int8-zlib.art"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours: the two variants


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def colour_share(img: np.ndarray, rgb) -> float:
    return float((np.abs(img - np.array(rgb)).sum(axis=2) < 40).mean())
