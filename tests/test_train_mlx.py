"""End to end: a tiny looped model trains on the demo shards with MLX and its val_bpb falls."""

import json

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from core.artifact import read_artifact  # noqa: E402
from core.weights import load_weights  # noqa: E402
from tools.cli import main  # noqa: E402

TINY = [
    "--set", "model.model_dim=32", "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "model.layer_plan='2x2'", "--set", "train.seq_len=64", "--set", "train.batch_tokens=2048",
    "--set", "train.val_every=40", "--set", "train.val_max_tokens=16384", "--set", "train.warmup_steps=1",
    "--set", "train.warmdown_iters=10", "--set", "train.log_every=10", "--set", "train.compute_dtype='float32'",
]


@pytest.fixture(scope="module")
def tiny_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--config", "configs/demo.toml", "--backend", "mlx", "--data", str(demo_data),
                 "--out", str(out), "--set", "train.iterations=40", *TINY])
    assert code == 0
    return out


def events(out, kind):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == kind]


@pytest.mark.slow
def test_val_bpb_falls_well_below_its_step0_value(tiny_run):
    vals = events(tiny_run, "val")
    assert [v["step"] for v in vals] == [0, 40]
    start, end = vals[0]["val_bpb"], vals[-1]["val_bpb"]
    assert start > 3.5  # an untrained model: about log2(1024) bits over ~2.5 bytes per token
    assert end < 0.8 * start, (start, end)


@pytest.mark.slow
def test_run_directory_holds_what_the_contract_says(tiny_run):
    for name in ("config.toml", "train.log", "metrics.jsonl", "model.safetensors", "model.int8-zlib.art"):
        assert (tiny_run / name).is_file(), name
    final = events(tiny_run, "final")[-1]
    for key in ("val_loss", "val_bpb", "roundtrip_val_bpb", "artifact_bytes", "total_bytes", "params", "steps"):
        assert key in final
    assert final["steps"] == 40
    assert final["total_bytes"] == final["artifact_bytes"] + final["code_bytes"]
    assert final["artifact_bytes"] == (tiny_run / "model.int8-zlib.art").stat().st_size
    # int8 per-row rounding costs a little: the round trip stays close to the float model.
    assert abs(final["roundtrip_val_bpb"] - final["val_bpb"]) < 0.05
    train = events(tiny_run, "train")
    assert all({"step", "train_loss", "tok_s"} <= set(e) for e in train)
    log = (tiny_run / "train.log").read_text()
    assert "step:40/40 val_loss:" in log and "final_int8_zlib_roundtrip_exact val_loss:" in log


@pytest.mark.slow
def test_saved_weights_and_artifact_describe_the_trained_model(tiny_run):
    spec, weights = load_weights(tiny_run / "model.safetensors")
    assert spec.layer_plan == (0, 1, 0, 1) and spec.model_dim == 32
    spec_json, deq, info = read_artifact(tiny_run / "model.int8-zlib.art")
    assert spec_json == spec.to_dict()
    # At this size every tensor has <= 65,536 elements, so upstream's rule stores it as fp16 (int8 per-row
    # quantization of large matrices is tested in test_quant.py): relative error within fp16's half-ulp.
    assert all(t.role == "passthrough" for t in info.tensors)
    for name, w in weights.items():
        np.testing.assert_allclose(deq[name], w, rtol=2**-11, atol=2**-24, err_msg=name)
