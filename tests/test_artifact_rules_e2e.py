"""A training run exports with its [artifact] rules (per-pattern schemes) and codec, not only the default."""

import json

import pytest

from core.artifact import load_quantized
from tools.cli import main


@pytest.mark.slow
def test_run_exports_with_configured_rules_and_codec(demo_data, tmp_path):
    out = tmp_path / "run"
    code = main([
        "train", "--config", "configs/demo.toml", "--backend", "torch", "--data", str(demo_data), "--out", str(out),
        "--small", "--set", "train.iterations=2", "--set", "train.warmup_steps=0", "--set", "train.val_max_tokens=2048",
        "--set", "model.model_dim=256",  # MLP matrices of 131,072 elements: above the fp16 passthrough size
        "--set", "artifact.codec='zstd'", "--set", "artifact.rules=['*.mlp.*=int5']",
    ])
    assert code == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    _, qw, info = load_quantized(out / final["artifact"])
    assert info.codec_label == "zstd-22"
    assert "*.mlp.*=int5" in info.scheme
    mlp = qw.tensors["blocks.0.mlp.fc.weight"]
    assert mlp.data.dtype.name == "int8" and abs(mlp.data.astype(int)).max() <= 15  # int5 codes: +/-15
