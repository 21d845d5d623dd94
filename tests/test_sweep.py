"""End to end: a tiny sweep on the demo shards (2 variants x 3 seeds, 4 steps at --small), its compare table
against a direct computation from metrics.jsonl, a sweep stopped by SIGTERM and resumed, its plot, and
failing runs."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.helpers import C0, C1, colour_share, pixels, png_size
from tools.cli import main
from tools.compare import compare
from core.results import collect

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BACKEND = "mlx" if importlib.util.find_spec("mlx") else "torch"
TINY = ["--small", "--set", "train.iterations=4", "--set", "train.val_every=2", "--set", "train.val_max_tokens=512",
        "--set", "train.warmup_steps=0", "--set", "train.log_every=1", "--set", "train.checkpoint_every=1"]
VARIANTS = ["tied_embed_lr=0.05", "tied_embed_lr=0.3"]  # a 4-step run feels the embedding rate
SEEDS = [1337, 42, 2025]


def sweep_argv(data, out, *extra) -> list[str]:
    return ["sweep", "--config", str(ROOT / "configs/demo.toml"), "--data", str(data), "--out", str(out),
            "--backend", BACKEND, "--seeds", ",".join(map(str, SEEDS)), "--grid", "optim.tied_embed_lr=0.05,0.3",
            "--jobs", "2", *TINY, *extra]


@pytest.fixture(scope="module")
def one_thread():
    """One thread per run: the same float sums in every run, so two sweeps agree bit for bit (and two jobs
    share 2 cores instead of fighting over them)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield dict(os.environ)
    if old is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def sweep_a(demo_data, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("sweep") / "a"
    assert main(sweep_argv(demo_data, out)) == 0
    return out


def finals_by_hand(sweep_dir: Path) -> dict[str, list[dict]]:
    """Each variant's final records, read from metrics.jsonl without loopgolf's reader."""
    out: dict[str, list[dict]] = {}
    for variant in VARIANTS:
        for seed in SEEDS:
            lines = (sweep_dir / f"{variant}-s{seed}" / "metrics.jsonl").read_text().splitlines()
            out.setdefault(variant, []).append([json.loads(x) for x in lines if '"final"' in x][-1])
    return out


def test_the_compare_table_is_a_direct_computation_from_metrics_jsonl(sweep_a, capsys):
    assert main(["compare", str(sweep_a), "--json", "--baseline", "tied_embed_lr=0.3"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = {r["variant"]: r for r in table["variants"]}
    finals = finals_by_hand(sweep_a)
    assert list(rows) == VARIANTS and table["not_averaged"] == []
    for variant, records in finals.items():
        bpb = np.array([r["roundtrip_val_bpb"] for r in records])
        row = rows[variant]
        assert row["runs"] == 3 and row["seeds"] == SEEDS
        assert row["mean"] == pytest.approx(bpb.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(bpb.std(ddof=1), rel=1e-12) and row["std"] > 0  # the seeds differ
        assert (row["min"], row["max"]) == (bpb.min(), bpb.max())
        assert row["total_bytes"] == pytest.approx(np.mean([r["total_bytes"] for r in records]))
        assert row["params"] == records[0]["params"]
    base = np.array([r["roundtrip_val_loss"] for r in finals["tied_embed_lr=0.3"]])
    var = np.array([r["roundtrip_val_loss"] for r in finals["tied_embed_lr=0.05"]])
    sb, sv = base.var(ddof=1) / 3, var.var(ddof=1) / 3  # Welch's t and df, written out
    t = (base.mean() - var.mean() - 0.005) / math.sqrt(sb + sv)
    df = (sb + sv) ** 2 / (sb**2 / 2 + sv**2 / 2)
    row = rows["tied_embed_lr=0.05"]
    assert row["p"] == pytest.approx(stats.t.sf(t, df), rel=1e-9) and row["t"] == pytest.approx(t, rel=1e-9)
    assert row["diff_nats"] == pytest.approx(var.mean() - base.mean(), rel=1e-9, abs=1e-12)
    assert row["clears"] is (row["p"] < 0.01)


def test_a_rerun_skips_every_finished_run(sweep_a, demo_data, capsys):
    before = (sweep_a / "sweep.json").read_text()
    assert main(sweep_argv(demo_data, sweep_a)) == 0
    printed = capsys.readouterr().out
    assert "6 runs in " in printed and "6 finished, 0 to resume, 0 to start" in printed and "started" not in printed
    assert json.loads((sweep_a / "sweep.json").read_text())["runs"] == json.loads(before)["runs"]


def _table(sweep_dir: Path) -> list[dict]:
    """The compare rows less tok/s: throughput is timing, and the only column two identical sweeps may differ in."""
    rows = compare(collect([sweep_dir]), "roundtrip_val_bpb", None, 0.005)["variants"]
    return [{k: v for k, v in r.items() if k != "tok_s"} for r in rows]


def test_a_sweep_stopped_by_sigterm_and_resumed_gives_the_same_table(sweep_a, demo_data, tmp_path, one_thread):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "tools.cli", *sweep_argv(demo_data, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=one_thread, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # stop it once 2 runs are done and a third checkpointed
        try:
            runs = json.loads((out / "sweep.json").read_text())["runs"]
        except (OSError, ValueError):
            runs = []
        done = [r for r in runs if r.get("status") == "done"]
        started = [r for r in runs if r.get("status") == "running"
                   and list((out / r["name"] / "checkpoints").glob("step_*/checkpoint.json"))]
        if len(done) >= 2 and started:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    first, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, first
    assert "stopped by SIGTERM" in first and "stopped (exit 143); resumes on the next sweep" in first
    stopped = [r["name"] for r in json.loads((out / "sweep.json").read_text())["runs"] if r["status"] == "stopped"]
    finished_first = first.count(": done in ")

    second = subprocess.run(cmd, cwd=ROOT, env=one_thread, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{finished_first} finished, " in second.stdout and "(resuming from step_" in second.stdout
    resumed = [n for n in stopped if any(json.loads(x)["event"] == "resume"
                                         for x in (out / n / "metrics.jsonl").read_text().splitlines())]
    assert resumed  # a stopped run continued from its checkpoint, not from scratch
    assert _table(out) == _table(sweep_a)


def test_the_plot_of_a_sweep(sweep_a, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main(["plot", str(sweep_a), "--out", str(png)]) == 0
    assert png_size(png) == (1500, 450)
    img = pixels(png)
    for third in np.array_split(img, 3, axis=1):  # both variants' colours in each panel
        assert colour_share(third, C0) > 1e-4 and colour_share(third, C1) > 1e-4
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    records = sum(sum(1 for x in (sweep_a / f"{v}-s{s}" / "metrics.jsonl").read_text().splitlines()
                      if x.startswith(('{"event": "train"', '{"event": "val"', '{"event": "final"')))
                  for v in VARIANTS for s in SEEDS)
    assert len(rows) == 1 + records == 1 + 6 * (4 + 3 + 1)  # header; 4 train, 3 val (steps 0, 2, 4), 1 final


def test_failing_runs_are_recorded_with_their_last_line_and_do_not_stop_the_others(demo_data, tmp_path, capsys,
                                                                                  one_thread):
    out = tmp_path / "bad"
    argv = ["sweep", "--config", str(ROOT / "configs/demo.toml"), "--data", str(demo_data), "--out", str(out),
            "--backend", BACKEND, "--seeds", "1", "--variant", "vocab: model.vocab_size=512",
            "--variant", "nodata: data.dataset=nope", *TINY]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["name"], r["status"], r["rc"]) for r in runs] == [("vocab-s1", "failed", 2), ("nodata-s1", "failed", 2)]
    assert all(r["last_line"].startswith("loopgolf: error: ") for r in runs)
    assert "model.vocab_size is 512" in runs[0]["last_line"] and "nope" in runs[1]["last_line"]
    assert f"vocab-s1: FAILED (exit 2): {runs[0]['last_line']}" in printed
    assert "0 of 2 finished, 2 failed" in printed
    assert main(["compare", str(out)]) == 2
    assert "no finished run among the 2 given (nothing to average): vocab-s1 failed, nodata-s1 failed" in \
        capsys.readouterr().err
