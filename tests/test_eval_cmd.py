"""`loopgolf eval` end to end, the sliding/Hedge numbers in a training run's final record, and the errors."""

import json

import numpy as np
import pytest

from core.config import config_from_dict
from core.errors import UserError
from core.params import init_weights
from core.spec import ModelSpec
from core.weights import save_weights
from tools.cli import main

pytest.importorskip("mlx.core")

VAL_TARGETS = 4096  # inside the Hedge mixer's 10,000-token warmup (tests/test_hedge.py checks the mixing)
TINY = [
    "--set", "model.model_dim=32", "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "model.layer_plan='2x2'", "--set", "train.seq_len=64", "--set", "train.batch_tokens=2048",
    "--set", "train.val_every=0", "--set", f"train.val_max_tokens={VAL_TARGETS}", "--set", "train.warmup_steps=1",
    "--set", "train.warmdown_iters=5", "--set", "train.compute_dtype='float32'", "--set", "train.iterations=6",
    "--set", "eval.stride=32", "--set", "eval.hedge=true",
]
EVAL = ["--seq-len", "64", "--stride", "32", "--max-tokens", str(VAL_TARGETS), "--dtype", "float32", "--no-progress",
        "--hedge", "--hedge-eta", "0.1"]


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", "configs/demo.toml", "--backend", "mlx", "--data", str(demo_data),
                 "--out", str(out), *TINY]) == 0
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [e for e in final if e["event"] == "final"][-1]


@pytest.mark.slow
def test_a_run_reports_sliding_and_hedge_beside_the_round_trip(run):
    out, final = run
    for key in ("roundtrip_val_bpb", "sliding_val_bpb", "hedge_val_bpb"):
        assert np.isfinite(final[key]), key
    assert final["sliding_seq_len"] == 64 and final["sliding_stride"] == 32
    # Before its warmup the mixer returns the model's own losses: the same number, reported beside.
    assert final["hedge_val_bpb"] == final["sliding_val_bpb"] and final["hedge_mixed_targets"] == 0
    log = (out / "train.log").read_text()
    assert f"so all {VAL_TARGETS:,} here were scored by the model alone" in log  # says why they are equal
    assert "final_int8_zlib_roundtrip_sliding val_loss:" in log and "final_int8_zlib_roundtrip_hedge val_loss:" in log


@pytest.mark.slow
def test_eval_of_the_artifact_reproduces_the_runs_numbers(run, demo_data, tmp_path, capsys):
    out, final = run
    report = tmp_path / "eval.json"
    assert main(["eval", "--artifact", str(out / "model.int8-zlib.art"), "--data", str(demo_data),
                 "--backend", "mlx", "--json", str(report), *EVAL]) == 0
    printed = capsys.readouterr().out
    assert "standard val_loss:" in printed and "sliding val_loss:" in printed and "hedge val_loss:" in printed
    r = json.loads(report.read_text())
    assert r["targets"] == VAL_TARGETS and r["windows"] == (VAL_TARGETS - 64) // 32 + 1
    # The same tokens, windows, batches and backend as the run's export: the same float64 sums.
    assert r["sliding_val_bpb"] == pytest.approx(final["sliding_val_bpb"], rel=1e-12)
    assert r["hedge_val_bpb"] == pytest.approx(final["hedge_val_bpb"], rel=1e-12)
    # The standard eval batches differently from the run's, whose batches of 16,384 losses are summed in fp32
    # on the device: rounding that random-walks to ~1e-6 relative (observed 2.2e-6).
    assert r["val_bpb"] == pytest.approx(final["roundtrip_val_bpb"], rel=2e-5)


@pytest.mark.slow
def test_eval_of_the_weights_with_torch(run, demo_data, tmp_path, capsys):
    out, final = run
    pytest.importorskip("torch")
    report = tmp_path / "eval.json"
    assert main(["eval", "--weights", str(out / "model.safetensors"), "--data", str(demo_data),
                 "--backend", "torch", "--json", str(report), *EVAL[:-3]]) == 0  # without --hedge
    r = json.loads(report.read_text())
    assert r["backend"] == "torch" and "weights" in r["source"]
    # The float weights score a little differently from their int8 round trip, in the same range.
    assert r["sliding_val_bpb"] != final["sliding_val_bpb"]
    assert r["sliding_val_bpb"] == pytest.approx(final["sliding_val_bpb"], rel=0.05)


@pytest.mark.slow
def test_eval_defaults_to_the_runs_own_seq_len(run, demo_data, tmp_path, capsys):
    """Without --seq-len, an artifact in its run directory is scored at the run's train.seq_len (64 here), and
    one with no config.toml beside it at upstream's 1024, saying so."""
    out, final = run
    common = ["--data", str(demo_data), "--backend", "mlx", "--max-tokens", str(VAL_TARGETS), "--no-progress"]
    report = tmp_path / "eval.json"
    assert main(["eval", "--artifact", str(out / "model.int8-zlib.art"), *common, "--json", str(report)]) == 0
    assert json.loads(report.read_text())["seq_len"] == 64
    assert f"seq_len:64 (train.seq_len of {out / 'config.toml'})" in capsys.readouterr().out
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "a.art").write_bytes((out / "model.int8-zlib.art").read_bytes())
    assert main(["eval", "--artifact", str(alone / "a.art"), *common, "--json", str(report)]) == 0
    assert json.loads(report.read_text())["seq_len"] == 1024
    assert f"seq_len:1024 (default; no {alone / 'config.toml'}" in capsys.readouterr().out


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopgolf: error: "), err
    return err[0]


def test_bad_input_is_one_line(demo_data, tmp_path, capsys):
    spec = ModelSpec.from_table({"vocab_size": 1024, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2,
                                 "layer_plan": "2x2"})
    weights = tmp_path / "w.safetensors"
    save_weights(weights, spec, init_weights(spec, 0))
    small = ModelSpec.from_table({"vocab_size": 512, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2})
    save_weights(tmp_path / "small.safetensors", small, init_weights(small, 0))
    from core.artifact import write_artifact

    write_artifact(tmp_path / "a.art", spec.to_dict(), init_weights(spec, 0))
    (tmp_path / "junk.bin").write_bytes(b"\x07" * 64)
    data = ["--data", str(demo_data), "--backend", "mlx"]
    cases = [
        (["--weights", str(tmp_path / "none.safetensors"), *data], "not found"),
        (["--artifact", str(tmp_path / "none.art"), *data], "not found"),
        (["--weights", str(tmp_path / "a.art"), *data], "is a loopgolf artifact; pass it with --artifact"),
        (["--artifact", str(weights), *data], "not a loopgolf artifact"),
        (["--weights", str(tmp_path / "junk.bin"), *data], "junk.bin"),
        (["--weights", str(tmp_path / "small.safetensors"), *data], "vocab 1024 but model.vocab_size is 512"),
        (["--weights", str(weights), "--data", str(tmp_path / "nodata")], "nodata"),
        (["--weights", str(weights), *data, "--stride", "65", "--seq-len", "64"], "--stride 65"),
        # EvalConfig's own checks, naming the flags
        (["--weights", str(weights), *data, "--hedge"], "--hedge needs --stride > 0: the mixer runs over the sliding"),
        (["--weights", str(weights), *data, "--stride", "-1"], "--stride -1: expected 0 or more"),
        (["--weights", str(weights), *data, "--batch-seqs", "0"], "--batch-seqs 0: expected a positive integer"),
        (["--weights", str(weights), *data, "--hedge-eta", "nan"], "--hedge-eta nan: expected a positive number"),
        (["--weights", str(weights), *data, "--json", str(tmp_path / "no" / "r.json")], "--json"),
        (["--weights", str(weights), *data, "--nproc", "2"], "--nproc 2"),
        (["--weights", str(tmp_path), *data], "is a directory; expected a file"),
        (["--artifact", str(tmp_path), *data], "is a directory; expected a file"),
        (["--weights", str(weights), *data, "--json", str(tmp_path)], "--json"),  # not a traceback from the rename
        (["--weights", str(weights), *data, "--max-loops", "5"], "--max-loops needs --converge"),
    ]
    for argv, expected in cases:
        assert expected in one_error_line(capsys, ["eval", *argv]), argv


def test_eval_config_checks():
    with pytest.raises(UserError, match="eval.hedge = true needs eval.stride"):
        config_from_dict({"eval": {"hedge": True}})
    with pytest.raises(UserError, match="eval.stride = 300 is longer than the sliding window"):
        config_from_dict({"train": {"seq_len": 256}, "eval": {"stride": 300}})
    cfg = config_from_dict({"train": {"seq_len": 256}, "eval": {"stride": 300, "seq_len": 512}})
    assert cfg.eval.stride == 300  # a longer window than training's is fine
    small = config_from_dict({"eval": {"stride": 256, "seq_len": 2048}}, small=True)
    assert small.eval.seq_len == small.train.seq_len and small.eval.stride <= small.eval.seq_len
