"""The recurrent records' model parts (issue 17 item 2; #1394, #1493 in ../shared/RECORDS.md), in both backends:
parallel residuals on chosen physical blocks (model.parallel_blocks) and sigmoid-gated U-Net skips
(model.skip_gates); the per-layer norm scale over physical layers and the QK gain are the existing
model.ln_scale and model.qk_gain_init, pinned here. core.spec.ModelSpec's "record parts" give the forward pass.

Here: validation, the parameter table and the records' logged parameter counts, what each part computes
(equivalences that name the formula) and truncated plans. `loopgolf parity` with them on is in
tests/test_seed_parts.py (every part at once); tests/test_model_runner.py runs each (and the records' stack
together) against the numpy float64 reference, MLX against torch, and checks that skip_gates gets a gradient
on every row, a group, and moves in one step; tests/test_export_features.py exports them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

import backend_mlx  # noqa: E402
from core.config import load_config  # noqa: E402
from core.depth import truncate_weights, truncated_spec  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.params import SCALAR, count_params, init_weights, param_table  # noqa: E402
from core.quant import ROLE_PASSTHROUGH, is_control_name, quantize_weights  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import REFERENCE_ATOL, TINY, reference_logits, spec_for, tokens  # noqa: E402
from tools import parity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = (backend_mlx, backend_torch)
MIDDLE = "0 1 2 1 2 3"  # blocks 1 and 2 run at layers 1-2 and again at 3-4


def logits_in_both(spec, w, x=None):
    x = tokens() if x is None else x
    return [b.forward_logits(spec, w, x) for b in BACKENDS]


# ---- the spec and the parameter table ---------------------------------------------------------------------

def test_defaults_validation_and_round_trip():
    s = ModelSpec()
    assert s.parallel_blocks == "" and s.parallel_block_list == () and not s.skip_gates
    on = spec_for(MIDDLE, parallel_blocks=" 3, 1 2", skip_gates=True)
    assert on.parallel_blocks == "1,2,3" and on.parallel_block_list == (1, 2, 3)  # canonical, as ve_layers
    assert ModelSpec.from_json(on.to_json()) == on and "parallel blocks 1,2,3, skip gates" in on.describe()
    bad = [({"parallel_blocks": "1,x"}, r"model.parallel_blocks = '1,x': expected physical block indices, e\.g\. '7,8"),
           ({"parallel_blocks": "²"}, "expected physical block indices"),  # a digit to isdigit(), not to int()
           ({"parallel_blocks": "9" * 5000}, "expected physical block indices"),
           ({"parallel_blocks": "1,1"}, "model.parallel_blocks = '1,1' names a block twice"),
           ({"parallel_blocks": "4"}, r"block 4 is past the model's 4 blocks \(0\.\.3\)"),
           ({"skip_gates": True, "unet_skips": False}, "model.skip_gates = true gates the U-Net skips"),
           ({"skip_gates": "yes"}, "model.skip_gates.*expected true or false")]
    for options, message in bad:
        with pytest.raises(UserError, match=message):
            spec_for(MIDDLE, **options)


def test_skip_gates_sit_beside_skip_weights():
    """(num_skip_weights, d) = 0 in Adam's scalar group, fp32 in the artifact as skip_weights; one row per skip
    pair of the plan (3 for 6 layers, 2 for 5: min(#encoder, #decoder)); no table without skips to gate."""
    d = TINY["model_dim"]
    for plan, rows in ((MIDDLE, 3), ("0 1 2 1 2", 2)):
        table = {i.name: i for i in param_table(spec_for(plan, skip_gates=True))}
        gates = table["skip_gates"]
        assert (gates.shape, gates.init, gates.group, gates.block) == ((rows, d), "zeros", SCALAR, None)
        assert table["skip_weights"].shape == gates.shape
    assert "skip_gates" not in {i.name for i in param_table(spec_for("flat", num_layers=1, skip_gates=True))}
    assert "skip_gates" not in {i.name for i in param_table(spec_for(MIDDLE))}
    assert is_control_name("skip_gates")
    w = init_weights(spec_for(MIDDLE, skip_gates=True))
    t = quantize_weights(w).tensors
    assert t["skip_gates"].role == ROLE_PASSTHROUGH and t["skip_gates"].data.dtype == t["skip_weights"].data.dtype
    assert t["skip_gates"].data.dtype == np.float32


RECORD = {"vocab_size": 8192, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 4,
          "mlp_activation": "leaky_relu2", "skip_gates": True}


def test_the_records_parameter_counts():
    """#1394's logged model_params 35,943,512 (= 11 x 2,885,640 + 8192 x 512 + 7 skip pairs x 2 x 512) and
    #1493's 35,944,536 (one skip pair more; parallel residuals add nothing), from the table alone."""
    a = ModelSpec.from_table({**RECORD, "layer_plan": "0 1 2 3 4 5 4 5 4 5 6 7 8 9 10"})
    b = ModelSpec.from_table({**RECORD, "layer_plan": "0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10",
                              "parallel_blocks": "7,8,9,10"})
    assert (a.num_layers, a.num_skip_weights, b.num_layers, b.num_skip_weights) == (15, 7, 17, 8)
    assert count_params(a)[0] == 35_943_512 == 11 * 2_885_640 + 8192 * 512 + 7 * 2 * 512
    assert count_params(b)[0] == 35_944_536
    flat = ModelSpec.from_table({**RECORD, "layer_plan": "0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10"})
    assert count_params(flat) == count_params(b)  # the parallel blocks hold no parameters


# ---- what each part computes ------------------------------------------------------------------------------

def test_parallel_blocks_read_one_input_at_every_use():
    """A parallel block is x_in + a*attn(N(x_in)) + m*mlp(N(x_in)), checked against the block's own attention
    and MLP; the sequential block's MLP reads the updated stream instead. Per physical block: block 1 of the
    middle-looped plan is parallel at both of its layers (1 and 3), block 2 at neither."""
    spec = spec_for(MIDDLE, parallel_blocks="1")
    w = parity.perturbed_weights(spec, 7)
    p = {k: torch.tensor(v) for k, v in w.items()}
    from backend_torch import model as tm

    rng = np.random.default_rng(1)
    x, x0 = (torch.tensor(rng.standard_normal((2, 8, TINY["model_dim"])).astype(np.float32)) for _ in range(2))
    with torch.no_grad():
        for b, layer in ((1, 1), (1, 3), (2, 2)):
            pre = f"blocks.{b}."
            mix = p[pre + "resid_mix"]
            x_in = mix[0] * x + mix[1] * x0
            h = tm.rms_norm(x_in, spec.norm_eps)
            attn = p[pre + "attn_scale"] * tm.attention(spec, p, pre + "attn.", h)
            parallel = x_in + attn + p[pre + "mlp_scale"] * tm.mlp(p, pre + "mlp.", h)
            got = tm.block(spec, p, b, x, x0, layer)
            want = parallel if b == 1 else (x_in + attn) + p[pre + "mlp_scale"] * tm.mlp(
                p, pre + "mlp.", tm.rms_norm(x_in + attn, spec.norm_eps))
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0, err_msg=f"block {b}")
            if b == 2:
                assert np.abs(got.numpy() - parallel.numpy()).max() > 1e-3  # the two forms differ here
    # A block whose MLP is zero computes the same either way: the parallel path changes only what the MLP reads.
    w0 = {**w, **{f"blocks.{b}.mlp.proj.weight": np.zeros_like(w[f"blocks.{b}.mlp.proj.weight"]) for b in range(4)}}
    for a, c in zip(logits_in_both(spec, w0), logits_in_both(spec_for(MIDDLE), w0)):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=0)


def test_skip_gates_lerp_toward_the_stream():
    """x = lerp(w*skip, x, sigmoid(g)): gates far above 0 keep the stream (the model with skip weights 0), far
    below 0 replace it by the weighted skip, and at init (0) they give half of each: not the identity, the
    records' own choice, so switching the option on changes the step-0 function."""
    plain, gated = spec_for(MIDDLE), spec_for(MIDDLE, skip_gates=True)
    w = parity.perturbed_weights(plain, 8)
    shape = w["skip_weights"].shape
    kept = {**w, "skip_gates": np.full(shape, 40.0, np.float32)}
    no_skips = {**w, "skip_weights": np.zeros(shape, np.float32)}
    for a, c in zip(logits_in_both(gated, kept), logits_in_both(plain, no_skips)):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=0)
    replaced = {**w, "skip_gates": np.full(shape, -40.0, np.float32)}
    np.testing.assert_allclose(backend_torch.forward_logits(gated, replaced, tokens()),
                               reference_logits(gated, replaced, tokens()), atol=REFERENCE_ATOL, rtol=0)
    assert np.abs(backend_torch.forward_logits(gated, replaced, tokens())
                  - backend_torch.forward_logits(plain, w, tokens())).max() > 1e-2
    at_init = {**w, "skip_gates": init_weights(gated)["skip_gates"]}
    assert not at_init["skip_gates"].any()
    for a, c in zip(logits_in_both(gated, at_init), logits_in_both(plain, w)):
        assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("parallel", ["", "2"])
def test_ln_scale_is_per_physical_block(parallel):
    """The records' norm scale 1/sqrt(physical layer + 1) is model.ln_scale, by block index: attention is
    linear in its input's scale s through V (q and k are normed) and the squared (leaky) ReLU MLP quadratic,
    so block b with ln_scale is the plain block with attn_scale * s_b and mlp_scale * s_b^2. In the
    middle-looped plan blocks 1 and 2 run again at layers 3 and 4: a scale by effective layer there (1/2,
    1/sqrt 5) would not be that model. With parallel residuals the same holds (both branches read N(x) s)."""
    spec = spec_for(MIDDLE, ln_scale=True, mlp_activation="leaky_relu2", parallel_blocks=parallel, xsa_last_n=2)
    plain = spec_for(MIDDLE, mlp_activation="leaky_relu2", parallel_blocks=parallel, xsa_last_n=2)
    w = parity.perturbed_weights(plain, 9)

    def rescaled(factor):
        out = dict(w)
        for b in range(plain.num_blocks):
            s = factor(b)
            out[f"blocks.{b}.attn_scale"] = (w[f"blocks.{b}.attn_scale"] * s).astype(np.float32)
            out[f"blocks.{b}.mlp_scale"] = (w[f"blocks.{b}.mlp_scale"] * s * s).astype(np.float32)
        return out

    assert [spec.ln_scale_factor(b) for b in range(4)] == [1 / np.sqrt(b + 1) for b in range(4)]
    physical = rescaled(lambda b: 1 / np.sqrt(b + 1))
    for a, c in zip(logits_in_both(spec, w), logits_in_both(plain, physical)):
        np.testing.assert_allclose(a, c, atol=2e-5, rtol=0)  # q/k norms' eps sees the scale: ~1e-6 here
    # The equivalence is sharp: a one-block slip of the factor (what indexing by layer would give) breaks it.
    shifted = rescaled(lambda b: 1 / np.sqrt(b + 2))
    assert np.abs(backend_torch.forward_logits(spec, w, tokens())
                  - backend_torch.forward_logits(plain, shifted, tokens())).max() > 1e-3


def test_qk_gain_init_is_the_records_qk_gain():
    """QK_GAIN_INIT (#1493: 5.25) is model.qk_gain_init: every block's per-head q_gain starts there, and q is
    multiplied by it after QK-norm and RoPE (so doubling q_gain doubles the attention logits)."""
    spec = spec_for(MIDDLE, qk_gain_init=5.25)
    w = init_weights(spec)
    for b in range(spec.num_blocks):
        assert w[f"blocks.{b}.attn.q_gain"].shape == (TINY["num_heads"],)
        assert (w[f"blocks.{b}.attn.q_gain"] == np.float32(5.25)).all()
    cfg = load_config(ROOT / "configs" / "demo.toml", ["model.qk_gain_init=5.25"])
    assert cfg.model.qk_gain_init == 5.25


# ---- truncated plans ---------------------------------------------------------------------------

def test_truncated_plans_keep_both_parts():
    """Progressive depth's truncated model keeps the parallel blocks (physical) and gates its fewer skips with
    the leading rows of skip_gates, as of skip_weights."""
    spec = spec_for("2x3", parallel_blocks="1", skip_gates=True)
    w = parity.perturbed_weights(spec, 6)
    sub = truncated_spec(spec, 4)
    assert sub.parallel_blocks == "1" and sub.skip_gates and sub.num_skip_weights == 2
    ws = truncate_weights(spec, w, 4)
    np.testing.assert_array_equal(ws["skip_gates"], w["skip_gates"][:2])
    np.testing.assert_allclose(backend_mlx.forward_logits(sub, ws, tokens()), reference_logits(sub, ws, tokens()),
                               atol=REFERENCE_ATOL, rtol=0)


def test_size_and_budget_count_the_gates():
    """`loopgolf size`/`budget` estimate from the table: the gates add their fp32 bytes and one header entry;
    the parallel blocks add nothing."""
    from tools.budget import estimate_artifact_bytes, header_bytes_per_tensor

    off, on = spec_for(MIDDLE), spec_for(MIDDLE, skip_gates=True, parallel_blocks="1")
    a, b = (estimate_artifact_bytes(s, "int8", "zlib", 9) for s in (off, on))
    gates = 3 * TINY["model_dim"]
    assert b.passthrough_params - a.passthrough_params == gates and b.quantized_params == a.quantized_params
    assert abs(b.artifact_bytes - a.artifact_bytes - (4 * gates + header_bytes_per_tensor("zlib", 9))) <= 1
    assert estimate_artifact_bytes(spec_for(MIDDLE, parallel_blocks="1"), "int8", "zlib", 9) == a
