"""`loopgolf gpu-check`: the one-call GPU check. On a CPU: --cpu-smoke end to end (every kind of part, the
JSON and the markdown), the refusal without CUDA, the GPU plan's configs, a part that fails or hangs
costing only itself, and the report. The GPU run itself is what the check is for (docs/benchmarks.md)."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from core.config import load_config
from tools.cli import main as loopgolf
from tools.gpu_check import ROOT, plan_parts, run_parts
from tools.gpu_report import build_report, render_markdown

torch = pytest.importorskip("torch")

FAKE_UPSTREAM = """\
import os, sys, time
n = int(os.environ["ITERATIONS"])
print("compute_dtype:torch.float32 compile:True")
for step in range(1, n + 1):
    t = 500 + 250 * (step - 1)
    print(f"step:{step}/{n} train_loss:{7 - step / 10:.4f} train_time:{t}ms step_avg:{t / step:.2f}ms")
sys.stdout.flush()
time.sleep(120)  # upstream's final validation: the check stops it after its last step
"""


class Args:
    def __init__(self, **kw):
        self.steps = self.warmup = self.data = self.upstream = self.parts = self.jobs = None
        self.rounds, self.budget = 1, 480.0
        self.__dict__.update(kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_start_without_cuda(tmp_path, capsys):
    assert loopgolf(["gpu-check", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--cpu-smoke" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--parts", "train,nonsense"], "--parts train,nonsense: unknown nonsense"),
    (["--jobs", "0"], "--jobs 0: expected a positive number"),
    (["--budget", "-5"], "--budget -5: expected a positive number"),
    (["--upstream", "/nowhere/train_gpt.py"], "--upstream /nowhere/train_gpt.py: file not found"),
    (["--data", "/nowhere"], "--data /nowhere: not a directory"),
])
def test_bad_arguments_are_one_error(args, message, tmp_path, capsys):
    assert loopgolf(["gpu-check", "--cpu-smoke", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_gpu_plan_runs_the_issue_configs_at_the_record_batch_per_gpu():
    parts = {p["name"]: p for p in plan_parts(Args(), smoke=False)}
    assert list(parts) == ["parity:demo", "parity:ut_3x4_iter", "depth:progressive_3x5", "export",
                           "train:baseline_9x512", "upstream", "train:ut_3x4_iter"]
    assert all(p["device"] == "cuda" and p["compile_backend"] == "inductor" for p in parts.values())
    for name, per_gpu in (("train:baseline_9x512", 65_536), ("train:ut_3x4_iter", 98_304),
                          ("depth:progressive_3x5", 65_536)):
        p = parts[name]
        cfg = load_config(p["config"], p["sets"], small=p["small"])
        full = load_config(p["config"]).train.batch_tokens
        assert cfg.train.batch_tokens == per_gpu == full // 8 and cfg.train.grad_accum_steps == 1, name
        assert cfg.train.batch_tokens % cfg.train.seq_len == 0
        assert not p["small"]
    assert parts["train:baseline_9x512"]["steps"] == 40 and parts["upstream"]["steps"] == 30
    assert parts["export"]["steps"] == 20 and parts["parity:ut_3x4_iter"]["small"]
    assert {p["phase"] for p in parts.values() if p["kind"] in ("train", "upstream")} == {2}  # timed alone
    # --parts picks by name or kind
    picked = plan_parts(Args(parts="train,export"), smoke=False)
    assert [p["name"] for p in picked] == ["export", "train:baseline_9x512", "train:ut_3x4_iter"]


def _bogus(tmp_path, name, kind, cap=60.0, phase=1):
    return {"name": name, "kind": kind, "phase": phase, "cap": cap, "env": {}, "config": str(ROOT / "configs" / "demo.toml"),
            "sets": [], "small": True, "device": "cpu", "compile_backend": "eager", "steps": 1, "warmup": 1,
            "data": None, "upstream": None, "rounds": 1, "peak_n": 64, "peak_seconds": 0.01, "compile": True}


@pytest.mark.slow
def test_a_failing_or_hung_part_costs_only_itself(tmp_path):
    parts = [_bogus(tmp_path, "hangs", "train", cap=0.5),  # stopped long before its first step
             _bogus(tmp_path, "unknown", "no_such_kind"),
             _bogus(tmp_path, "upstream", "upstream", phase=2)]  # no --upstream: skipped, not failed
    t0 = time.monotonic()
    results = run_parts(parts, tmp_path, budget=120, jobs=2, progress=lambda msg: None)
    assert time.monotonic() - t0 < 60
    assert results["hangs"]["status"] == "timeout" and "timeout" in results["hangs"]["error"]
    assert results["unknown"]["status"] == "error" and results["unknown"]["error"].startswith("KeyError")
    assert results["upstream"]["status"] == "skipped" and "--upstream" in results["upstream"]["error"]
    # and a budget spent before a part starts skips it, with the reason
    late = run_parts([_bogus(tmp_path, "late", "train")], tmp_path, budget=1, jobs=1, progress=lambda msg: None)
    assert late["late"]["status"] == "skipped" and "budget" in late["late"]["error"]


def test_the_report_has_one_row_per_part_and_the_goals():
    parts = [{"name": n, "kind": k, "config": f"/x/{c}", "sets": [], "small": False}
             for n, k, c in (("train:baseline_9x512", "train", "baseline_9x512.toml"),
                             ("train:ut_3x4_iter", "train", "ut_3x4_iter.toml"), ("export", "export", "demo.toml"))]
    train = {"status": "ok", "seconds": 60.0, "ms_per_step": 40.0, "tokens_per_s": 1.6e6, "mfu": 0.40,
             "peak": {"flops_per_s": 7.8e14, "dtype": "bfloat16", "n": 8192}, "peak_memory_bytes": 11 * 2**30,
             "memory_estimate_bytes": 10 * 2**30, "memory_ratio": 1.1, "compile_s": 41.0,
             "graphs_before_clock": 2, "graph_breaks": 0, "graphs_in_timed_steps": 0, "checks": [],
             "goals": [{"check": "peak memory within 15% of the --dry-run estimate", "ok": True, "detail": "+10%"}]}
    results = {"train:baseline_9x512": train, "train:ut_3x4_iter": {**train, "mfu": 0.35, "goals": []},
               "export": {"status": "error", "seconds": 3.0, "error": "UserError: loopgolf export is not available",
                          "checks": []}}
    report = build_report(parts, results, {}, {"gpu": "NVIDIA H200", "torch": "2.11", "cuda": "13.0",
                                               "python": "3.12"}, smoke=False, budget=480, wall=300,
                          argv=["gpu-check"], date="2026-12-01T00:00:00")
    md = render_markdown(report)
    assert md.startswith("# loopgolf gpu-check: NVIDIA H200, 2026-12-01")
    assert "| train:baseline_9x512 | ok | 60 | 40.0 ms/step, 1,600,000 tok/s, MFU 40.0%" in md
    assert "| export | error | 3 | UserError: loopgolf export is not available |" in md
    goals = {g["check"]: g for g in report["goals"]}
    assert goals["ut_3x4_iter at no worse MFU than the baseline"]["ok"] is False
    assert "| ut_3x4_iter at no worse MFU than the baseline | train | 35.0% vs 40.0% | NO |" in md


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_end_to_end(demo_data, tmp_path, capsys):
    upstream = tmp_path / "train_gpt.py"
    upstream.write_text(textwrap.dedent(FAKE_UPSTREAM))
    out = tmp_path / "check"
    rc = loopgolf(["gpu-check", "--cpu-smoke", "--out", str(out), "--data", str(demo_data),
                   "--upstream", str(upstream)])
    printed = capsys.readouterr().out
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert rc == 0, {k: (v["status"], v.get("error"), v.get("log_tail", [])[-5:]) for k, v in parts.items()}
    assert report["mode"] == "cpu-smoke" and set(parts) == {"parity:demo", "depth:demo", "export", "train:demo",
                                                              "upstream"}
    assert all(p["status"] == "ok" and all(c["ok"] for c in p["checks"]) for p in parts.values())

    # parity: both dtypes, every row within its tolerance
    assert set(parts["parity:demo"]["dtypes"]) == {"float32", "bfloat16"}
    assert all(r["ok"] for rows in parts["parity:demo"]["dtypes"].values() for r in rows)
    # compiled training: the loss and the update before the clock, nothing after, no graph break
    t = parts["train:demo"]
    assert (t["graphs_before_clock"], t["graphs_in_timed_steps"], t["graph_breaks"]) == (2, 0, 0)
    assert t["tokens_per_s"] > 0 and 0 < t["mfu"] and t["compile_s"] is not None
    # progressive depth: one compile per depth variant (the first with the update), none once timed
    d = parts["depth:demo"]
    assert [v["graphs"] for v in d["variants"]] == [2, 1] and [v["graphs_timed"] for v in d["variants"]] == [0, 0]
    # the exported script under torchrun: the trainer's losses, step for step (same code, threads, data)
    e = parts["export"]
    assert e["identical"] and len(e["script_losses"]) == e["steps"] == 3
    # upstream side by side: the fake script's 250 ms/step
    assert parts["upstream"]["upstream_ms"] == pytest.approx(250.0) and parts["upstream"]["ratio"] > 0

    md = (out / "gpu_check.md").read_text()
    assert "| part | status | s | result |" in md and md in printed
    for name in parts:
        assert f"| {name} | ok |" in md
