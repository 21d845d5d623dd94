"""`loopgolf size` (--config before training, --run after) and `loopgolf budget`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from core.artifact import build_artifact, encode_artifact, write_artifact
from core.config import load_config
from core.params import count_params, init_weights, param_table
from core.quant import quantize_weights
from core.size import CHALLENGE_LIMIT
from tools.script import submission_code_bytes
from tools.budget import estimate_artifact_bytes, search
from tools.cli import main

DEMO = "configs/demo.toml"


def run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr().out
    return code, out


def number(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return int(m.group(1).replace(",", ""))


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_size_config_matches_the_artifact_it_would_build(capsys, codec):
    sets = ["--set", f"artifact.codec={codec}", "--set", "artifact.scheme=int6",
            "--set", "artifact.rules=['tok_emb.weight=int8']"]
    code, out = run(capsys, ["size", "--config", DEMO, *sets])
    assert code == 0
    cfg = load_config(DEMO, sets[1::2])
    unique, _ = count_params(cfg.model)
    assert f"model_params:{unique}" in out
    _, info = encode_artifact(cfg.model.to_dict(), quantize_weights(init_weights(cfg.model, cfg.train.seed),
                                                                      cfg.artifact.quant_scheme), codec)
    art = number(r"artifact \(int6;tok_emb.weight=int8, " + codec + r"-\d+\): ([\d,]+) B", out)
    assert art == info.total_bytes
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("blocks.", "tok_emb", "all "))}
    assert rows["tok_emb"][2] == "int8" and rows["tok_emb"][3] == f"{1024 * 128 * 4:,}"
    assert number(r"all tensors\s+\d+\s+([\d,]+)", out) == sum(t.raw_bytes for t in info.tensors)
    code_t = submission_code_bytes(cfg)
    assert f"code: {code_t:,} B (train_gpt.py, lzma" in out and "INITIAL weights" in out
    total = number(r"total, init artifact \+ code: ([\d,]+) B", out)
    assert total == code_t + info.total_bytes and f"margin {CHALLENGE_LIMIT - total:,}" in out
    est = estimate_artifact_bytes(cfg.model, cfg.artifact.quant_scheme, codec, cfg.artifact.level).artifact_bytes
    assert number(r"estimate for trained weights.*?: ([\d,]+) B", out) == est


@pytest.mark.slow
def test_size_run_on_a_hand_built_run(tmp_path, capsys):
    cfg = load_config(DEMO)
    w = init_weights(cfg.model, 1)
    info = write_artifact(tmp_path / "model.int6-zstd.art", cfg.model.to_dict(), w, "int6", "zstd")
    final = {"event": "final", "val_bpb": 2.5, "roundtrip_val_bpb": 2.51, "artifact_bytes": info.total_bytes,
             "code_bytes": 1234, "backend": "torch", "artifact": "model.int6-zstd.art"}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "step", "step": 1}) + "\n" + json.dumps(final) + "\n")
    code, out = run(capsys, ["size", "--run", str(tmp_path)])
    assert code == 0
    assert f"artifact (int6, zstd-22): {info.total_bytes:,} B" in out
    assert "roundtrip_val_bpb=2.51" in out and "WARNING" not in out
    assert f"as the run counted it: {info.total_bytes + 1234:,} B" in out
    assert "no config.toml" in out  # the code bytes now need the run's config
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    code, out = run(capsys, ["size", "--run", str(tmp_path)])
    now = submission_code_bytes(load_config(tmp_path / "config.toml"))
    assert f"(the script export writes now): {info.total_bytes + now:,} B" in out
    (tmp_path / "metrics.jsonl").write_text("")
    code, out = run(capsys, ["size", "--run", str(tmp_path)])
    assert code == 0 and "no final record" in out


def test_size_argument_errors(tmp_path, capsys):
    assert main(["size"]) == 2
    assert main(["size", "--config", DEMO, "--run", str(tmp_path)]) == 2
    assert main(["size", "--run", str(tmp_path)]) == 2  # no artifact there
    assert "expected one artifact" in capsys.readouterr().err


@pytest.mark.slow
def test_estimate_tracks_exact_bytes_on_gaussian_weights():
    cfg = load_config("configs/ut_3x4.toml", ["model.model_dim=256"])
    rng = np.random.default_rng(0)
    w = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in param_table(cfg.model)}
    for scheme in ["int6", "int6;*.attn.*=int7;*.mlp.*=int5", "int8"]:
        exact = len(build_artifact(cfg.model.to_dict(), w, scheme, "zstd", 3))
        est = estimate_artifact_bytes(cfg.model, scheme, "zstd", 3).artifact_bytes
        assert abs(est - exact) / exact < 0.03, (scheme, est, exact)


def test_budget_search_fits_and_sorts():
    cfg = load_config("configs/ut_3x4.toml")
    cands = search(cfg.model, ["int8", "int6", "int5"], "zlib", 9, 8_000_000, 50_000,
                   widths=[256, 384, 512, 640, 768], blocks=[1, 2, 3, 4, 5])
    assert cands and all(c.total_bytes <= 8_000_000 for c in cands)
    assert all(c.total_bytes == c.artifact_bytes + 50_000 for c in cands)
    keys = [(-c.unique_params, -c.artifact_bytes) for c in cands]
    assert keys == sorted(keys)
    assert all(c.plan.endswith("x4") for c in cands)  # the loop count is kept
    for c in cands[:3]:
        spec = load_config("configs/ut_3x4.toml", [f"model.model_dim={c.model_dim}",
                                                   f"model.layer_plan='{c.plan}'"]).model
        assert count_params(spec) == (c.unique_params, c.effective_params)
    int5 = [c for c in cands if c.scheme == "int5"]
    int8 = [c for c in cands if c.scheme == "int8"]
    assert max(c.unique_params for c in int5) > max(c.unique_params for c in int8)


@pytest.mark.slow
def test_budget_command(capsys):
    code, out = run(capsys, ["budget", "--config", DEMO, "--bytes", "1000000", "--widths", "128,256,384",
                             "--blocks", "1,2,3", "--schemes", "int8,int6", "--top", "0"])
    assert code == 0 and "candidates fit" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+\dx3\s", line)]
    assert rows
    totals = [int(r[6].replace(",", "")) for r in rows]
    uniques = [int(r[3].replace(",", "")) for r in rows]
    assert all(t <= 1_000_000 for t in totals) and uniques == sorted(uniques, reverse=True)
    code, out = run(capsys, ["budget", "--config", DEMO, "--bytes", "1000", "--widths", "128"])
    assert code == 1 and "no candidate fits" in out
    assert main(["budget", "--config", DEMO, "--schemes", "int3"]) == 2
    assert main(["budget", "--config", DEMO, "--bytes", "0"]) == 2
