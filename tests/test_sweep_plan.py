"""The sweep's plan (core/sweep_plan.py) and its one-line errors; nothing is trained here."""

import json

import pytest

from core.errors import UserError
from core.sweep_plan import parse_grid, parse_seeds, parse_variants, plan_runs, split_values
from tools.cli import main


def test_grid_times_seeds_in_a_stable_order_with_readable_names():
    grid = parse_grid(["model.layer_plan=2x2,'0 1 2'", "optim.matrix_lr=0.04,0.08"])
    runs = plan_runs("demo", [1337, 7], grid, [])
    assert [r.name for r in runs[:4]] == ["layer_plan=2x2,matrix_lr=0.04-s1337", "layer_plan=2x2,matrix_lr=0.04-s7",
                                          "layer_plan=2x2,matrix_lr=0.08-s1337", "layer_plan=2x2,matrix_lr=0.08-s7"]
    assert runs[4].variant == "layer_plan=0_1_2,matrix_lr=0.04"  # spaces and quotes never reach a path
    assert runs[4].overrides == ("model.layer_plan='0 1 2'", "optim.matrix_lr=0.04", "train.seed=1337")
    assert len(runs) == 8 and runs == plan_runs("demo", [1337, 7], grid, [])


def test_no_grid_is_the_config_itself_and_shared_key_names_keep_their_section():
    assert [r.name for r in plan_runs("demo", [1, 2], [], [])] == ["demo-s1", "demo-s2"]
    runs = plan_runs("demo", [1], parse_grid(["train.seq_len=64", "eval.seq_len=0,128"]), [])
    assert [r.variant for r in runs] == ["train.seq_len=64,eval.seq_len=0", "train.seq_len=64,eval.seq_len=128"]


def test_variants_set_several_keys_and_commas_inside_quotes_do_not_split():
    variants = parse_variants(["base:", "gate_third: model.loop_gates=true model.loop_gate_init=0.3333333",
                               "progressive: train.depth_schedule='0.3:1,1.0:3' train.depth_schedule_by=step"])
    runs = plan_runs("demo", [1], parse_grid(["model.iter_embeds=false,true"]), variants)
    assert [r.variant for r in runs][:3] == ["base,iter_embeds=false", "base,iter_embeds=true",
                                             "gate_third,iter_embeds=false"]
    assert runs[4].overrides[:2] == ("train.depth_schedule=0.3:1,1.0:3", "train.depth_schedule_by=step")
    assert split_values("'a,b',[1, 2],c") == ["'a,b'", "[1, 2]", "c"]


@pytest.mark.parametrize("text, message", [
    ("", "the seed list is empty"), (" , ", "the seed list is empty"), ("1,x", "'x' is not an integer seed"),
    ("1,1", "a seed is listed twice")])
def test_bad_seed_lists(text, message):
    with pytest.raises(UserError, match=message):
        parse_seeds(text)


@pytest.mark.parametrize("items, message", [
    (["model.layer_pln=2x2"], "'model.layer_pln' is not a config key; did you mean 'model.layer_plan'?"),
    (["trian.iterations=5"], "did you mean 'train.iterations'?"),
    (["train.seed=1,2"], "seeds are given with --seeds"),
    (["model.layer_plan=2x2,"], "an empty value"),
    (["model.layer_plan"], "expected section.key=V1,V2"),
    (["model.layer_plan=2x2", "model.layer_plan=2x3"], "given twice"),
])
def test_bad_grids(items, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("(", r"\(")):
        parse_grid(items)


def test_bad_variants_and_conflicts():
    with pytest.raises(UserError, match="not a config key; did you mean 'model.loop_gates'"):
        parse_variants(["g: model.loop_gate=true"])
    with pytest.raises(UserError, match="expected 'NAME: section.key=value"):
        parse_variants(["model.loop_gates=true"])
    with pytest.raises(UserError, match="used twice"):
        parse_variants(["a:", "a: model.iter_embeds=true"])
    with pytest.raises(UserError, match="also a --grid key"):
        plan_runs("demo", [1], parse_grid(["train.iterations=5,6"]), [], ["train.iterations=4"])
    with pytest.raises(UserError, match="both make the run name"):
        plan_runs("demo", [1], parse_grid(["data.path='a b',a_b"]), [])


def _cli(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_reports_a_bad_grid_key_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, _, err = _cli(["sweep", "--config", "configs/demo.toml", "--out", str(out), "--grid",
                       "model.layer_pln=2x2,2x3"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "'model.layer_pln' is not a config key; did you mean 'model.layer_plan'?" in err
    assert not out.exists()
    rc, _, err = _cli(["sweep", "--config", "configs/demo.toml", "--out", str(out), "--seeds", ""], capsys)
    assert rc == 2 and "the seed list is empty" in err and err.count("\n") == 1 and not out.exists()


def test_cli_checks_every_runs_config_before_running_any(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, _, err = _cli(["sweep", "--config", "configs/demo.toml", "--out", str(out), "--seeds", "1",
                       "--grid", "model.layer_plan=2x2,banana"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "sweep run layer_plan=banana-s1: " in err
    assert not out.exists()


def test_dry_run_prints_each_runs_command(tmp_path, capsys):
    rc, out, _ = _cli(["sweep", "--config", "configs/demo.toml", "--out", str(tmp_path / "s"), "--seeds", "1,2",
                       "--grid", "model.layer_plan=2x2,2x3", "--small", "--dry-run"], capsys)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 5 and lines[-1] == "sweep: 4 runs planned, nothing run (--dry-run)"
    assert lines[0].startswith("layer_plan=2x2-s1: loopgolf train --config ")
    assert "--set model.layer_plan=2x2 --set train.seed=1" in lines[0] and "--small" in lines[0]
    assert not (tmp_path / "s").exists()


def test_a_sweep_directory_keeps_its_settings(tmp_path, capsys):
    """A rerun with other shared settings would mix two experiments in one directory."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"settings": {"config": "x", "set": [], "small": True,
                                                             "backend": "mlx", "data": None}, "runs": []}))
    rc, _, err = _cli(["sweep", "--config", "configs/demo.toml", "--out", str(out), "--seeds", "1",
                       "--backend", "mlx"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "this sweep was planned with config 'x'" in err


def test_a_directory_that_is_not_this_sweeps_run_is_never_touched(tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "demo-s1").mkdir(parents=True)
    (out / "demo-s1" / "notes.txt").write_text("mine")
    rc, _, err = _cli(["sweep", "--config", "configs/demo.toml", "--out", str(out), "--seeds", "1"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "demo-s1 exists and is not a run of this sweep" in err
    assert (out / "demo-s1" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("extra, message", [
    (["--jobs", "0"], "--jobs 0: expected 1 or more"),
    (["--set", "train.seed=3"], "seeds are given with --seeds"),
])
def test_other_bad_sweep_flags(tmp_path, capsys, extra, message):
    rc, _, err = _cli(["sweep", "--config", "configs/demo.toml", "--out", str(tmp_path / "s"), *extra], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err and not (tmp_path / "s").exists()
