"""The backends' Hessian hooks for GPTQ (backend_*/hessian.py), and a run that exports a GPTQ artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backend_torch import model as torch_model  # noqa: E402
from backend_torch.trainer import TorchBackend  # noqa: E402
from core.artifact import load_quantized, read_artifact  # noqa: E402
from core.config import OptimConfig, TrainConfig  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from tests.helpers import perturbed  # noqa: E402
from tools.cli import main  # noqa: E402

BASE = {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2}
SHARED = ModelSpec.from_table({**BASE, "layer_plan": "2x2"})  # blocks 0 1 0 1
UNROLLED = ModelSpec.from_table({**BASE, "layer_plan": "0 1 2 3"})  # one block per application
TRAIN = TrainConfig(compute_dtype="float32")
MATRICES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight",
            "mlp.proj.weight")


def batches(n=3, batch=2, seq=16, vocab=64, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, (batch, seq)).astype(np.int32), None) for _ in range(n)]


def torch_hessians(spec, weights, data):
    return TorchBackend(spec, weights, TRAIN, OptimConfig(), device="cpu").hessians(data)


def test_a_shared_block_hessian_is_the_sum_over_its_applications():
    shared = perturbed(SHARED, init_seed=3)
    # The same function unrolled: blocks 2 and 3 are copies of 0 and 1, so each application has its own weights.
    unrolled = dict(shared)
    for b in (0, 1):
        for k, v in shared.items():
            if k.startswith(f"blocks.{b}."):
                unrolled[k.replace(f"blocks.{b}.", f"blocks.{b + 2}.", 1)] = v
    data = batches()
    h_shared, h_unrolled = torch_hessians(SHARED, shared, data), torch_hessians(UNROLLED, unrolled, data)
    expected = {f"blocks.{b}.{m}" for b in (0, 1) for m in MATRICES} | {"tok_emb.weight"}  # the tied head
    assert set(h_shared) == expected
    for b in (0, 1):
        for m in MATRICES:
            total = h_unrolled[f"blocks.{b}.{m}"] + h_unrolled[f"blocks.{b + 2}.{m}"]
            assert not np.allclose(h_unrolled[f"blocks.{b}.{m}"], h_unrolled[f"blocks.{b + 2}.{m}"])
            # fp32 forward in both; the unrolled model is the same arithmetic, the sum only reassociates.
            np.testing.assert_allclose(h_shared[f"blocks.{b}.{m}"], total, rtol=1e-9, atol=1e-9 * np.abs(total).max())
    np.testing.assert_allclose(h_shared["tok_emb.weight"], h_unrolled["tok_emb.weight"], rtol=1e-9)


def test_hessian_of_a_query_projection_is_x_transpose_x_of_its_inputs():
    spec = ModelSpec.from_table({**BASE, "layer_plan": "2x2", "unet_skips": False})
    weights = perturbed(spec, init_seed=3)
    data = batches(n=2)
    h = torch_hessians(spec, weights, data)["blocks.0.attn.c_q.weight"]
    # By hand: block 0's attention input at layer 0 and at layer 2 (its second application), in float64.
    p = {k: torch.tensor(v) for k, v in weights.items()}
    expected = np.zeros_like(h)
    for x, _ in data:
        collect = []
        tokens = torch.as_tensor(x, dtype=torch.int64)
        torch_model.hidden_states(spec, p, tokens, collect=collect)
        x0 = torch_model.rms_norm(torch.nn.functional.embedding(tokens, p["tok_emb.weight"]), spec.norm_eps)
        mix = p["blocks.0.resid_mix"]
        for stream in (x0, collect[1]):
            a = torch_model.rms_norm(mix[0] * stream + mix[1] * x0, spec.norm_eps).reshape(-1, 32).double()
            expected += (a.T @ a).numpy()
    # The same float32 activations; only the float64 sums' order differs.
    np.testing.assert_allclose(h, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


def test_mlx_and_torch_hessians_agree():
    pytest.importorskip("mlx.core")
    from backend_mlx.trainer import MLXBackend

    weights, data = perturbed(SHARED, 4, init_seed=3), batches(seed=5)
    h_torch = torch_hessians(SHARED, weights, data)
    h_mlx = MLXBackend(SHARED, weights, TRAIN, OptimConfig()).hessians(data)
    assert set(h_mlx) == set(h_torch)
    for name, h in h_torch.items():
        # Both fp32 forwards (~1e-6 relative apart); MLX forms each product in fp32, torch in fp64.
        np.testing.assert_allclose(h_mlx[name], h, rtol=1e-4, atol=1e-5 * np.abs(h).max(), err_msg=name)


@pytest.mark.slow
def test_a_torch_run_exports_a_gptq_artifact_that_round_trips(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([
        "train", "--config", "configs/demo.toml", "--backend", "torch", "--data", str(demo_data), "--out", str(out),
        "--small", "--set", "train.iterations=2", "--set", "train.warmup_steps=0", "--set", "train.val_max_tokens=2048",
        "--set", "model.model_dim=64", "--set", "model.mlp_hidden=1088",  # MLP matrices of 69,632 elements: quantized
        "--set", "artifact.scheme='int6'", "--set", "artifact.codec='zstd'", "--set", "artifact.gptq=true",
        "--set", "artifact.gptq_batches=2",
    ])
    assert code == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    _, qw, info = load_quantized(out / final["artifact"])
    assert qw.gptq["tensors"] == [f"blocks.{b}.mlp.{m}.weight" for b in (0, 1) for m in ("fc", "proj")]
    assert qw.gptq["calibration"]["batches"] == 2 and info.codec_label == "zstd-22"
    assert np.isfinite(final["roundtrip_val_bpb"])
    log = (out / "train.log").read_text()
    assert "gptq: tensors:4" in log and final["gptq_tensors"] == 4
    # The codes are int6 and dequantize to close to the trained weights (GPTQ moves each by a few steps at most).
    _, deq, _ = read_artifact(out / final["artifact"])
    from core.weights import load_weights

    _, trained = load_weights(out / "model.safetensors")
    t = qw.tensors["blocks.0.mlp.fc.weight"]
    assert np.abs(t.data.astype(int)).max() <= 31
    step = t.scale.astype(np.float32)[:, None]
    assert np.all(np.abs(deq["blocks.0.mlp.fc.weight"] - trained["blocks.0.mlp.fc.weight"]) <= 64 * step)

    # `loopgolf quantize --gptq` on the run's weights (settings from RUN/config.toml) rebuilds the same artifact
    # (the same calibration batches, backend and weights), and --eval reports the run's round trip.
    capsys.readouterr()
    again = tmp_path / "again.art"
    assert main(["quantize", str(out / "model.safetensors"), "--out", str(again), "--scheme", "int6", "--codec", "zstd",
                 "--gptq", "--batches", "2", "--eval"]) == 0
    assert again.read_bytes() == (out / final["artifact"]).read_bytes()
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("row: scheme=int6 codec=zstd-22 gptq=yes")
    assert abs(float(row.split("roundtrip_val_bpb=")[1].split()[0]) - final["roundtrip_val_bpb"]) <= 5e-5  # printed .4f


@pytest.mark.slow
def test_a_run_too_small_for_gptq_says_so_and_rounds(demo_data, tmp_path):
    """At --small width every block matrix is under the passthrough size: no Hessians, plain rounding."""
    out = tmp_path / "run"
    assert main([
        "train", "--config", "configs/demo.toml", "--backend", "torch", "--data", str(demo_data), "--out", str(out),
        "--small", "--set", "train.iterations=1", "--set", "train.warmup_steps=0", "--set", "train.val_max_tokens=512",
        "--set", "artifact.scheme='int6'", "--set", "artifact.gptq=true",
    ]) == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    log = (out / "train.log").read_text()
    assert "gptq: off: no tensor here is one GPTQ solves" in log and "gptq: hessians" not in log
    assert final["gptq_tensors"] == 0 and load_quantized(out / final["artifact"])[1].gptq is None


def test_quantize_gptq_needs_a_run_config(tmp_path, capsys):
    from core.weights import save_weights

    wide = ModelSpec.from_table({**BASE, "layer_plan": "2x2", "mlp_hidden": 2080})  # MLP matrices GPTQ applies to
    save_weights(tmp_path / "w.safetensors", wide, perturbed(wide, init_seed=3))
    assert main(["quantize", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "x.art"), "--scheme", "int6",
                 "--gptq"]) == 2
    assert "config.toml" in capsys.readouterr().err and not (tmp_path / "x.art").exists()
