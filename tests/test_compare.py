"""`loopgolf compare` over run directories written here by hand (the end-to-end sweep is tests/test_sweep.py)."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from core.errors import UserError
from core.results import collect, curves, read_events
from core.stats import welch_improvement
from tests.helpers import write_run
from tools.cli import main
from tools.compare import compare

LN2 = math.log(2)


BASE = [3.90, 3.91, 3.905]
BETTER = [3.87, 3.875, 3.872]
WIDE = {"model": {"layer_plan": "2x4"}}


@pytest.fixture
def two_variants(tmp_path):
    for seed, v in zip((1, 2, 3), BASE):
        write_run(tmp_path / "runs", f"base-s{seed}", seed, final=v)
    for seed, v in zip((1, 2, 3), BETTER):
        write_run(tmp_path / "runs", f"wide-s{seed}", seed, final=v, config=WIDE)
    return tmp_path / "runs"


def welch_by_hand(base, variant, delta):
    """One-sided Welch's t-test written out: t, Welch-Satterthwaite df, p = P(T > t)."""
    b, v = np.array(base), np.array(variant)
    sb, sv = b.var(ddof=1) / b.size, v.var(ddof=1) / v.size
    t = (b.mean() - v.mean() - delta) / math.sqrt(sb + sv)
    df = (sb + sv) ** 2 / (sb**2 / (b.size - 1) + sv**2 / (v.size - 1))
    return t, df, stats.t.sf(t, df)


def test_the_table_is_the_direct_computation(two_variants):
    result = compare(collect([two_variants]), "roundtrip_val_bpb", "base", 0.005)
    base, wide = result["variants"]
    bpb = lambda xs: [x / LN2 / 3 for x in xs]  # noqa: E731
    assert base["variant"] == "base" and wide["variant"] == "wide" and wide["seeds"] == [1, 2, 3]
    assert wide["mean"] == pytest.approx(np.mean(bpb(BETTER)), rel=1e-12)
    assert wide["std"] == pytest.approx(np.std(bpb(BETTER), ddof=1), rel=1e-12)
    assert (wide["min"], wide["max"]) == pytest.approx((min(bpb(BETTER)), max(bpb(BETTER))), rel=1e-12)
    assert wide["diff_nats"] == pytest.approx(np.mean(BETTER) - np.mean(BASE), rel=1e-12)
    assert wide["diff_bpb"] == pytest.approx(np.mean(bpb(BETTER)) - np.mean(bpb(BASE)), rel=1e-12)
    t, df, p = welch_by_hand(BASE, BETTER, 0.005)
    assert (wide["t"], wide["df"], wide["p"]) == pytest.approx((t, df, p), rel=1e-9)
    assert wide["clears"] == (p < 0.01)
    assert wide["total_bytes"] == 9002 and wide["tok_s"] == 902 and wide["params"] == 100
    assert result["test_metric"] == "roundtrip_val_loss" and "p" not in base


def test_the_margin_changes_the_verdict(two_variants):
    """~0.03 nats better: clears a 0.005-nat margin, not a 0.04-nat one."""
    runs = collect([two_variants])
    assert compare(runs, "roundtrip_val_bpb", "base", 0.005)["variants"][1]["clears"]
    strict = compare(runs, "roundtrip_val_bpb", "base", 0.04)["variants"][1]
    assert not strict["clears"] and strict["p"] > 0.5


def test_welch_needs_two_runs_and_some_spread():
    assert math.isnan(welch_improvement([1.0], [0.9, 0.8]).p)
    assert "no spread" in welch_improvement([1.0, 1.0], [0.9, 0.9]).why


def test_an_unfinished_run_is_listed_not_averaged(two_variants):
    write_run(two_variants, "wide-s4", 4, final=None, train=((1, 6.0),), config=WIDE)
    result = compare(collect([two_variants]), "roundtrip_val_bpb", None, 0.005)
    wide = result["variants"][1]
    assert wide["runs"] == 3 and wide["seeds"] == [1, 2, 3]
    assert result["not_averaged"] == [{"run": "wide-s4", "variant": "wide", "status": "unfinished",
                                       "note": "stopped at step 1 of 2", "path": str(two_variants / "wide-s4")}]
    assert result["baseline"] == "base"  # the first variant when none is named


def test_cli_table_markdown_and_json(two_variants, capsys):
    write_run(two_variants, "wide-s9", 9, final=None, config=WIDE)
    assert main(["compare", str(two_variants), "--baseline", "base"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:4] == ["variant", "runs", "mean", "std"]
    assert "not averaged: wide-s9 (unfinished: stopped at step 2 of 2)" in text
    assert "one-sided Welch t-test on roundtrip_val_loss in nats" in text
    assert main(["compare", str(two_variants), "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| variant | runs | mean |") and md[1].startswith("|---|---:|")
    assert md[2].endswith("| baseline |") and md[3].endswith("| yes |")
    assert main(["compare", str(two_variants), "--json", "--metric", "val_bpb"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metric"] == "val_bpb" and data["test_metric"] == "val_loss" and data["variants"][0]["std"] > 0


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_metric_some_runs_lack_is_one_line(two_variants, capsys):
    extra = [{"event": "final", "roundtrip_val_bpb": 1.0, "roundtrip_val_loss": 2.0, "sliding_val_bpb": 1.1,
              "sliding_val_loss": 2.1}]
    write_run(two_variants, "slide-s1", 1, extra=extra, config={"eval": {"stride": 32}})
    err = _error(["compare", str(two_variants), "--metric", "sliding_val_bpb"], capsys)
    assert "6 of 7 finished runs have no sliding_val_bpb" in err and "metrics every run has: roundtrip_val_bpb" in err


def test_runs_scored_on_other_validation_tokens_are_refused(two_variants, capsys):
    write_run(two_variants, "short-s1", 1, final=3.0, config={"train": {"val_max_tokens": 4096}})
    assert "different validation tokens" in _error(["compare", str(two_variants)], capsys)


def test_a_baseline_that_is_not_a_variant(two_variants, capsys):
    err = _error(["compare", str(two_variants), "--baseline", "bse"], capsys)
    assert "--baseline 'bse' is not a variant here; variants with finished runs: base, wide" in err
    write_run(two_variants, "ghost-s1", 1)
    assert "'ghost' has no finished run" in _error(["compare", str(two_variants), "--baseline", "ghost"], capsys)


def test_runs_of_one_name_with_different_configs_are_refused(two_variants, capsys):
    write_run(two_variants, "base-s4", 4, final=3.9, config={"optim": {"matrix_lr": 0.08}})
    err = _error(["compare", str(two_variants)], capsys)
    assert "grouped as variant 'base' but differ in optim.matrix_lr" in err


def test_paths_that_hold_no_run(tmp_path, capsys):
    assert "not a directory" in _error(["compare", str(tmp_path / "nope")], capsys)
    assert "holds no run" in _error(["compare", str(tmp_path)], capsys)
    write_run(tmp_path, "a-s1", 1)
    assert "no finished run among the 1 given" in _error(["compare", str(tmp_path / "a-s1")], capsys)


def test_metrics_lines_a_crash_cut_or_a_resume_repeated(tmp_path):
    d = write_run(tmp_path, "r", 1, train=((1, 6.0), (2, 5.0), (3, 4.0)), val=((0, 7.0), (2, 5.5)),
                  extra=[{"event": "resume", "step": 2}, {"event": "val", "step": 2, "val_loss": 5.4},
                         {"event": "train", "step": 3, "train_loss": 3.9}])
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "st')  # the kill cut the last line
    train, val, _ = curves(read_events(d / "metrics.jsonl"))
    assert [(t["step"], t["train_loss"]) for t in train] == [(1, 6.0), (2, 5.0), (3, 3.9)]
    assert [(v["step"], v["val_loss"]) for v in val] == [(0, 7.0), (2, 5.4)]
    text = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join([text[0], "{oops", *text[1:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON object"):
        read_events(d / "metrics.jsonl")
