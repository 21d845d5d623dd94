"""Attention and input variants (issue 5, item 5), in both backends: q_rank (#167), partial RoPE with #1110's
NTK rescale, XSA on the last N effective layers (#1110, #895), BigramHash and SmearGate (#1110, #167), and
value embeddings into the residual (#895). core.spec.ModelSpec's variant notes give the forward pass.

BigramHash, SmearGate and the value embeddings start as the identity, so switching them on leaves the step-0
logits. q_rank, partial RoPE and XSA change the function by design (no init makes a rank-r Q full rank, or
leaves the rotated dims or the attention output alone), so for them the test is an equivalence each one must
satisfy. For all: parameter counts against the seeds' formulas, fp32 control tensors in the artifact,
and `loopgolf parity` with them on; tests/test_model_runner.py runs each (and all together) against the
numpy float64 reference, MLX against torch, and checks the gradients and optimizer groups.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

import backend_mlx  # noqa: E402
from backend_mlx import model as mm  # noqa: E402
from backend_torch import model as tm  # noqa: E402
from core.config import load_config  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.flops import flops_per_token  # noqa: E402
from core.params import EMBED, MATRIX, SCALAR, count_params, init_weights, param_table  # noqa: E402
from core.quant import ROLE_PASSTHROUGH, is_control_name, quantize_weights  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import ALL_ON, PLANS, TINY, spec_for, tokens  # noqa: E402
from tools import parity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IDENTITY = {  # start as the identity; the tensors each adds
    "bigram": ({"bigram_buckets": 16, "bigram_dim": 8}, {"bigram.embed.weight", "bigram.proj.weight", "bigram.scale"}),
    "bigram_full_width": ({"bigram_buckets": 16, "bigram_dim": 32}, {"bigram.embed.weight", "bigram.scale"}),
    "smear": ({"smear_gate": True}, {"smear.gate"}),
    "value_embeds": ({"value_embeds": 2}, {"value_embeds.0.weight", "value_embeds.1.weight", "value_scales"}),
}
EVERYTHING = {"q_rank": 8, "rope_dims": 6, "rope_train_seq_len": 8, "xsa_last_n": 3, "bigram_buckets": 16,
              "bigram_dim": 8, "smear_gate": True, "value_embeds": 2}


# ---- the spec and the parameter table ---------------------------------------------------------------------

def test_defaults_validation_and_round_trip():
    s = ModelSpec()
    assert (s.q_rank, s.rope_dims, s.rope_train_seq_len, s.xsa_last_n, s.bigram_buckets, s.value_embeds) == (0,) * 6
    assert not s.smear_gate and s.rope_width == s.head_dim and s.rope_base_at(10**6) == s.rope_base
    assert not any(s.uses_xsa(layer) for layer in range(s.num_layers))
    on = spec_for("2x3", **EVERYTHING)
    assert ModelSpec.from_json(on.to_json()) == on
    bad = [({"rope_dims": 5}, "rope_dims = 5: expected an even number"),
           ({"rope_dims": 10}, "at most head_dim = 8"),
           ({"rope_dims": 2, "rope_train_seq_len": 8}, "more than 2 rotated dims"),
           ({"q_rank": -1}, "q_rank = -1: expected 0 .off. or a positive integer"),
           ({"xsa_last_n": -2}, "xsa_last_n = -2"),
           ({"bigram_buckets": 1}, "bigram_buckets = 1"),
           ({"bigram_dim": 0}, "bigram_dim = 0"),
           ({"value_embeds": -1}, "value_embeds = -1"),
           ({"smear_gate": "yes"}, "expected true or false")]
    for options, message in bad:
        with pytest.raises(UserError, match=message):
            ModelSpec.from_table({**TINY, **options})


def test_rope_base_and_xsa_layers():
    s = spec_for("2x3", rope_dims=16 // 4, rope_train_seq_len=1024)
    assert s.rope_base_at(1024) == 10000.0  # no rescale up to the training length, as #1110's Rotary
    assert s.rope_base_at(2048) == pytest.approx(10000.0 * 2 ** (4 / 2))  # base * (T/1024)^(rd/(rd-2))
    x = spec_for("2x3", xsa_last_n=2)
    assert [x.uses_xsa(layer) for layer in range(6)] == [False] * 4 + [True] * 2
    assert all(spec_for("2x3", xsa_last_n=99).uses_xsa(layer) for layer in range(6))  # more than L: all


def test_parameter_table_against_the_reference_formulas():
    d = TINY["model_dim"]
    base = spec_for("3x4")
    table = {i.name: i for i in param_table(spec_for("3x4", **EVERYTHING))}
    # q_rank: c_q (d, d) becomes c_q_down (r, d) and c_q_up (d, r), per block, both Muon matrices.
    assert "blocks.0.attn.c_q.weight" not in table
    assert table["blocks.2.attn.c_q_down.weight"].shape == (8, d)
    assert table["blocks.2.attn.c_q_up.weight"].shape == (d, 8)
    assert count_params(spec_for("3x4", q_rank=8))[0] - count_params(base)[0] == 3 * (2 * 8 * d - d * d)
    # Partial RoPE, NTK and XSA add nothing.
    for options in ({"rope_dims": 4}, {"rope_dims": 6, "rope_train_seq_len": 8}, {"xsa_last_n": 3}):
        assert count_params(spec_for("3x4", **options)) == count_params(base)
    # BigramHash: table (B, b) zero, projection (d, b), scale 0.05; #1110: (2048, 128) at d 512
    # is 327,681 parameters. Smear: d (#1110: 512).
    ref = ModelSpec.from_table({"layer_plan": "3x4", "bigram_buckets": 2048, "bigram_dim": 128, "smear_gate": True})
    extra = {i.name: i.numel for i in param_table(ref)}
    assert extra["bigram.embed.weight"] + extra["bigram.proj.weight"] + extra["bigram.scale"] == 327_681
    assert extra["smear.gate"] == 512
    # Value embeddings: #895 (d 832, 15 layers, 2 tables): VE 1,703,936 and value_scales 24,960.
    seed895 = ModelSpec.from_table({"model_dim": 832, "layer_plan": "3x5", "value_embeds": 2})
    ve = {i.name: i.numel for i in param_table(seed895)}
    assert ve["value_embeds.0.weight"] + ve["value_embeds.1.weight"] == 1_703_936 and ve["value_scales"] == 24_960
    # Groups, inits, and what the artifact keeps in fp32.
    want = {"bigram.embed.weight": ((16, 8), EMBED, "zeros"), "bigram.proj.weight": ((d, 8), MATRIX, "uniform_fan_in"),
            "bigram.scale": ((1,), SCALAR, "const"), "smear.gate": ((d,), SCALAR, "zeros"),
            "value_embeds.1.weight": ((TINY["vocab_size"], d), EMBED, "normal"),
            "value_scales": ((12, 2, d), SCALAR, "zeros")}
    for name, (shape, group, init) in want.items():
        info = table[name]
        assert (info.shape, info.group, info.init, info.block) == (shape, group, init, None), name
        assert is_control_name(name) == (group == SCALAR), name
    assert not is_control_name("blocks.0.attn.c_q_down.weight")
    w = init_weights(spec_for("3x4", **EVERYTHING))
    assert (w["bigram.embed.weight"] == 0).all() and w["bigram.scale"][0] == np.float32(0.05)
    assert (w["smear.gate"] == 0).all() and (w["value_scales"] == 0).all()
    assert 0.9 < w["value_embeds.0.weight"].std() < 1.1  # nn.Embedding's default N(0, 1), as #895
    # In the artifact (int8, all small tensors fp16 else): the control tensors stay exactly fp32.
    stored = quantize_weights(parity.perturbed_weights(spec_for("3x4", **EVERYTHING), 1), "int8").tensors
    for name in ("bigram.scale", "smear.gate", "value_scales"):
        assert stored[name].role == ROLE_PASSTHROUGH and stored[name].data.dtype == np.float32, name
    assert stored["value_embeds.0.weight"].data.dtype != np.float32  # a table: not a control tensor
    # No projection when the table is already model_dim wide (as upstream).
    assert "bigram.proj.weight" not in {i.name for i in param_table(spec_for("3x4", bigram_buckets=16, bigram_dim=d))}


def test_flops():
    """q_rank counts its two factors and BigramHash its projection; the rest is elementwise (core.flops)."""
    base, T = spec_for("3x4"), 16
    d = TINY["model_dim"]
    assert flops_per_token(spec_for("3x4", q_rank=8), T).per_layer["q"] == 2 * d * 8 + 2 * 8 * d
    big = flops_per_token(spec_for("3x4", bigram_buckets=16, bigram_dim=8), T)
    assert big.forward - flops_per_token(base, T).forward == 2 * 8 * d == big.inputs
    for options in ({"rope_dims": 4}, {"xsa_last_n": 3}, {"smear_gate": True}, {"value_embeds": 2}):
        assert flops_per_token(spec_for("3x4", **options), T) == flops_per_token(base, T)


# ---- identity at init ------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("variant", IDENTITY)
def test_switching_an_identity_variant_on_leaves_the_initial_logits(variant, plan):
    options, new = IDENTITY[variant]
    off, on = spec_for(plan, **ALL_ON), spec_for(plan, **ALL_ON, **options)
    w_off = parity.perturbed_weights(off, 3)
    w_on = {**w_off, **{k: v for k, v in init_weights(on, 3).items() if k in new}}
    assert set(w_on) - set(w_off) == new
    x = tokens()
    for backend in (backend_mlx, backend_torch):  # adding an exact zero: bit for bit
        np.testing.assert_array_equal(backend.forward_logits(on, w_on, x), backend.forward_logits(off, w_off, x))
    # Live: moving the zero-initialised tensor moves the logits (BigramHash's table, the gate, the scales).
    zero_init = {k for k in new if not k.endswith(("proj.weight", "bigram.scale")) and "value_embeds." not in k}
    moved = {k: (v + 0.1 if k in zero_init else v) for k, v in w_on.items()}
    assert np.abs(backend_torch.forward_logits(on, moved, x) - backend_torch.forward_logits(on, w_on, x)).max() > 1e-3


def test_bigram_hash_buckets():
    """#1110's hash: (36313 t XOR 27191 t_prev) mod (B-1), the last bucket at position 0, the same in both."""
    t = np.array([[5, 1023, 0, 77, 77], [3, 2, 1, 0, 1000]])
    spec = spec_for("2x3", vocab_size=1024, bigram_buckets=2048)
    want = [[2047] + [(36313 * int(r[i]) ^ 27191 * int(r[i - 1])) % 2047 for i in range(1, 5)] for r in t]
    assert np.array(mm.bigram_hash(spec, mx.array(t))).tolist() == want
    assert tm.bigram_hash(spec, torch.tensor(t)).tolist() == want


# ---- structural variants: equivalences ------------------------------------------------------------------

def test_q_rank_is_the_product_of_its_factors():
    """A rank-r Q with c_q = c_q_up @ c_q_down computes exactly the full-rank model with that c_q."""
    low = spec_for("2x3", q_rank=8)
    w = parity.perturbed_weights(low, 4)
    full_w = {k: v for k, v in w.items() if "c_q_" not in k}
    for b in range(2):
        p = f"blocks.{b}.attn."
        full_w[p + "c_q.weight"] = w[p + "c_q_up.weight"] @ w[p + "c_q_down.weight"]
    x = tokens()
    got = backend_torch.forward_logits(low, w, x)
    np.testing.assert_allclose(got, backend_torch.forward_logits(spec_for("2x3"), full_w, x), atol=1e-5, rtol=0)


def test_rope_dims_equal_to_head_dim_and_short_sequences_change_nothing():
    x = tokens()
    plain = spec_for("2x3")
    w = parity.perturbed_weights(plain, 4)
    for backend in (backend_mlx, backend_torch):
        ref = backend.forward_logits(plain, w, x)
        for options in ({"rope_dims": 8}, {"rope_train_seq_len": 16}):  # all 8 dims; T = 16 is not longer
            np.testing.assert_array_equal(backend.forward_logits(spec_for("2x3", **options), w, x), ref)
        assert np.abs(backend.forward_logits(spec_for("2x3", rope_train_seq_len=8), w, x) - ref).max() > 1e-3


def test_xsa_changes_only_the_last_n_layers():
    spec, plain = spec_for("2x3", xsa_last_n=2), spec_for("2x3")
    w, x = parity.perturbed_weights(spec, 4), mx.array(tokens())
    on, off = [], []
    mm.hidden_states(spec, w_m := {k: mx.array(v) for k, v in w.items()}, x, collect=on)
    mm.hidden_states(plain, w_m, x, collect=off)
    same = [np.array_equal(np.array(a), np.array(b)) for a, b in zip(on, off)]
    assert same == [True] * 4 + [False] * 2


def test_xsa_output_is_orthogonal_to_its_value_vector():
    rng = np.random.default_rng(0)
    y, v = rng.normal(size=(2, 4, 5, 8)).astype(np.float32), rng.normal(size=(2, 2, 5, 8)).astype(np.float32)
    for out in (np.array(mm.xsa(mx.array(y), mx.array(v))), tm.xsa(torch.tensor(y), torch.tensor(v)).numpy()):
        dots = (out.reshape(2, 2, 2, 5, 8) * v[:, :, None]).sum(-1)  # query heads 0,1 share kv head 0; 2,3 kv 1
        assert np.abs(dots).max() < 1e-5 and np.abs(out - y).max() > 0.1


# ---- parity ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_parity_with_the_variants_on():
    """`loopgolf parity --config configs/demo.toml --small --set model.q_rank=8 --set ...` (demo: a few
    seconds; configs/ut_3x4.toml passes too, in ~20 s, see the README)."""
    sets = [f"model.{k}={str(v).lower()}" for k, v in EVERYTHING.items()] + ["model.layer_plan='2x3'"]
    cfg = load_config(ROOT / "configs" / "demo.toml", sets, small=True, small_vocab=True)
    assert cfg.model.q_rank == 8 and cfg.model.smear_gate and cfg.model.value_embeds == 2
    rows = parity.parity_rows(cfg, "float32", 11)
    assert not [r.check for r in rows if not r.ok], "\n" + parity.format_report(rows)
    grads = {r.check[5:] for r in rows if r.check.startswith("grad ")}
    assert {"bigram.embed.weight", "smear.gate", "value_scales", "blocks.0.attn.c_q_up.weight"} <= grads
