"""`loopgolf quantize`: weights to an artifact that reads back to the same dequantized weights."""

import numpy as np
import pytest

from core.artifact import build_artifact, read_artifact
from core.params import init_weights
from core.spec import ModelSpec
from core.weights import save_weights
from tools.cli import main

SPEC = ModelSpec.from_table({"vocab_size": 512, "model_dim": 256, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x2"})


@pytest.mark.slow
def test_quantize_writes_the_artifact_a_run_would(tmp_path, capsys):
    weights = init_weights(SPEC, 7)
    save_weights(tmp_path / "w.safetensors", SPEC, weights)
    out = tmp_path / "m.art"
    assert main(["quantize", str(tmp_path / "w.safetensors"), "--out", str(out), "--codec", "zstd",
                 "--rule", "*.mlp.*=int5"]) == 0
    assert out.read_bytes() == build_artifact(SPEC.to_dict(), weights, scheme="int8;*.mlp.*=int5", codec="zstd")
    spec_json, deq, info = read_artifact(out)
    assert spec_json == SPEC.to_dict() and info.codec_label == "zstd-22"
    assert np.abs(deq["blocks.0.mlp.fc.weight"] - weights["blocks.0.mlp.fc.weight"]).max() > 0  # int5 is lossy
    assert "zstd-22" in capsys.readouterr().out


def test_quantize_refuses_bad_input(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.art")]) == 2
    assert "not found" in capsys.readouterr().err
    save_weights(tmp_path / "w.safetensors", SPEC, init_weights(SPEC, 7))
    assert main(["quantize", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "x.art"), "--codec", "rar"]) == 2
    assert "--codec 'rar'" in capsys.readouterr().err
    assert not (tmp_path / "x.art").exists()


def test_quantize_refuses_flags_that_would_do_nothing_before_any_work(tmp_path, capsys):
    """Each is one line, before Hessians or an eval (no config.toml is beside these weights, so reaching
    the model would fail differently), and writes nothing."""
    w = tmp_path / "w.safetensors"
    save_weights(w, SPEC, init_weights(SPEC, 7))
    tiny = ModelSpec.from_table({"vocab_size": 128, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2})
    save_weights(tmp_path / "tiny.safetensors", tiny, init_weights(tiny, 7))
    out = tmp_path / "x.art"
    cases = [
        ([str(w), "--out", str(tmp_path)], "--out " + str(tmp_path) + " is a directory"),
        ([str(tmp_path), "--out", str(out)], "is a directory; expected a .safetensors file"),
        ([str(w), "--out", str(out), "--eval-weights"], "add --eval"),
        ([str(w), "--out", str(out), "--eval", "--config", str(tmp_path)], "--config " + str(tmp_path) + " is a directory"),
        ([str(w), "--out", str(out), "--batches", "4"], "add --gptq"),
        ([str(w), "--out", str(out), "--gptq", "--damp", "2"], "--damp 2.0"),
        ([str(w), "--out", str(out), "--gptq", "--block", "0"], "--block 0: expected a positive integer"),
        ([str(w), "--out", str(out), "--level", "99"], "--level 99: codec zlib takes 0..9"),
        # ArtifactConfig's check on the scheme; the weights' own check below it (no tensor large enough)
        ([str(w), "--out", str(out), "--gptq", "--scheme", "fp16"], "--gptq, but no scheme here is one GPTQ applies to"),
        ([str(tmp_path / "tiny.safetensors"), "--out", str(out), "--gptq", "--scheme", "int6"], "65,536 elements"),
    ]
    for argv, expected in cases:
        assert main(["quantize", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors", "w.safetensors"]
