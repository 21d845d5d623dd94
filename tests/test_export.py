"""`loopgolf export`: the generated train_gpt.py, run where loopgolf cannot be imported, reproduces loopgolf's
own torch trainer step for step, and writes the artifact loopgolf writes for its weights."""

from __future__ import annotations

import ast
import base64
import json
import lzma
import os
import re
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from backend_torch.launch import rank_threads
from core.artifact import read_artifact, write_artifact
from core.config import load_config
from core.weights import load_weights
from tools.cli import main as cli
from tools.script import build_script, bundle_source, minify

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
STEPS = 8


def overrides(data: Path, name: str) -> list[str]:
    """8 logged steps on the demo shards, a step-based schedule (a wallclock one depends on the machine's
    speed, so two runs would differ), a short validation."""
    sets = [f"train.iterations={STEPS}", "train.val_every=4", "train.log_every=1", "train.warmup_steps=1",
            "train.val_max_tokens=4096", "train.max_wallclock_seconds=0", f'data.path="{data}"',
            'data.dataset="shakespeare_sp1024"', "model.vocab_size=1024"]
    cfg = load_config(ROOT / "configs" / name)
    if cfg.train.depth_schedule:  # progressive depth, the records' loop switch-on
        sets.append('train.depth_schedule_by="step"')
    if cfg.artifact.gptq:  # two batches of Hessians, not the config's 64 or 256: the same code, a test's time
        sets.append("artifact.gptq_batches=2")
    return sets


def set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def isolated_env(**extra) -> dict:
    """An environment in which `python -S` finds numpy and torch but not loopgolf: no site processing (so no
    editable-install hook), site-packages on PYTHONPATH, the repository nowhere on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RANK", "WORLD", "LOCAL_", "MASTER"))}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    env.update(**extra)  # the thread count as in this process (core count over local ranks): same sums
    return env


def run_script(folder: Path, run_id: str, ranks: int = 1, timeout: int = 240) -> Path:
    """Run folder/train_gpt.py as upstream's organisers would (one process, or `ranks` gloo processes as
    torchrun starts them); returns its run directory."""
    if ranks == 1:
        procs = [subprocess.Popen([sys.executable, "-S", "train_gpt.py"], cwd=folder, env=isolated_env(RUN_ID=run_id),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # the thread count `loopgolf train --nproc` gives its ranks: OMP_NUM_THREADS also sizes the BLAS pools,
        # so the script's own torch.set_num_threads is not the same run
        threads = os.environ.get("OMP_NUM_THREADS", str(rank_threads(ranks)))
        procs = [subprocess.Popen([sys.executable, "-S", "train_gpt.py"], cwd=folder, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=isolated_env(RUN_ID=run_id, OMP_NUM_THREADS=threads, RANK=str(r), LOCAL_RANK=str(r),
                                                   WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                                                   MASTER_PORT=str(port)))
                 for r in range(ranks)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return folder / "logs" / run_id


def train_losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["train_loss"] for e in events if e["event"] == "train"]


def final_record(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "final"][-1]


def artifact_of(run_dir: Path) -> Path:
    (art,) = run_dir.glob("*.art")
    return art


def export(tmp_path: Path, config: str, sets: list[str], out: Path, runs=(), pack="none", extra=()) -> int:
    args = ["export", "--config", str(ROOT / "configs" / config), "--small", *set_args(sets), "--out", str(out),
            "--pack", pack, *extra]
    for r in runs:
        args += ["--run", str(r)]
    return cli(args)


def train(config: str, sets: list[str], out: Path) -> int:
    return cli(["train", "--config", str(ROOT / "configs" / config), "--small", "--backend", "torch",
                *set_args(sets), "--out", str(out), "--no-progress"])


def eval_printed_bpb(capsys, artifact: Path, data: Path, seq_len: int) -> str:
    capsys.readouterr()
    rc = cli(["eval", "--artifact", str(artifact), "--data", str(data), "--dataset", "shakespeare_sp1024",
              "--seq-len", str(seq_len), "--max-tokens", "4096", "--backend", "torch"])
    assert rc == 0
    return capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_exported_script_reproduces_the_trainer(config, demo_data, tmp_path, capsys):
    """Every shipped config at --small: the script, with loopgolf not importable, trains as loopgolf's torch
    trainer does, bit for bit, writes the trainer's artifact, and reports the score `loopgolf eval` gives it."""
    sets = overrides(demo_data, config)
    run = tmp_path / "run"
    assert train(config, sets, run) == 0
    folder = tmp_path / "records" / "sub"
    assert export(tmp_path, config, sets, folder, runs=[run]) == 0
    script_run = run_script(folder, "a")

    ours, theirs = train_losses(run), train_losses(script_run)
    assert len(theirs) == STEPS
    assert theirs == ours  # the same code on the same data, seed and thread count
    assert artifact_of(script_run).read_bytes() == artifact_of(run).read_bytes()
    spec, weights = load_weights(script_run / "model.safetensors")
    cfg = load_config(script_run / "config.toml")
    if not cfg.artifact.gptq:  # GPTQ's artifact depends on Hessians of training batches, not only on the weights
        again = tmp_path / "again.art"  # what loopgolf writes for the script's final weights
        write_artifact(again, spec.to_dict(), weights, scheme=cfg.artifact.quant_scheme, codec=cfg.artifact.codec,
                       level=cfg.artifact.level)
        assert again.read_bytes() == artifact_of(script_run).read_bytes()
    final = final_record(script_run)
    assert final["code_bytes"] == (folder / "train_gpt.py").stat().st_size
    assert final["roundtrip_val_bpb"] == final_record(run)["roundtrip_val_bpb"]
    printed = eval_printed_bpb(capsys, artifact_of(script_run), demo_data, cfg.train.seq_len)
    (bpb,) = re.findall(r"^standard val_loss:\S+ val_bpb:(\S+)", printed, re.M)
    assert float(bpb) == pytest.approx(final["roundtrip_val_bpb"], abs=5e-9)  # printed to 8 decimals
    record = json.loads((folder / "submission.json").read_text())
    assert record["bytes_code"] == final["code_bytes"] and (folder / f"train_seed{cfg.train.seed}.log").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["demo.toml", "ut_3x4_iter.toml"])
def test_packed_script_on_two_gloo_ranks_is_the_trainer_on_two(config, demo_data, tmp_path):
    """Two gloo ranks: the lzma-packed script trains as `loopgolf train --nproc 2` does. (Two ranks do not
    see one process's batches: as upstream, each rank's slice of the stream is one token longer.)"""
    sets = overrides(demo_data, config)
    run = tmp_path / "run"
    assert cli(["train", "--config", str(ROOT / "configs" / config), "--small", "--backend", "torch", "--nproc", "2",
                *set_args(sets), "--out", str(run), "--no-progress"]) == 0
    packed = tmp_path / "packed"
    assert export(tmp_path, config, sets, packed, pack="lzma") == 0
    text = (packed / "train_gpt.py").read_text()
    assert text.startswith("import lzma,base64\nexec(lzma.decompress(") and text.count("\n") == 2
    script_run = run_script(packed, "two", ranks=2)
    assert train_losses(script_run) == train_losses(run)
    assert artifact_of(script_run).read_bytes() == artifact_of(run).read_bytes()
    assert final_record(script_run)["code_bytes"] == len(text.encode())


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_bundles_to_one_self_contained_file(config):
    cfg = load_config(ROOT / "configs" / config, small=True)
    source = bundle_source(cfg)
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"core", "backend_torch", "backend_mlx", "tools"}, imported
    assert "torch" in imported and "numpy" in imported
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(getattr(n, "value", None),
                                                                                      ast.Constant)
                and isinstance(n.value.value, str)], "docstrings are stripped"
    packed = build_script(cfg, "lzma")  # the minified bundle, cached on disk like `loopgolf size` does
    blob = packed.split('b85decode("')[1].split('")')[0]
    mini = lzma.decompress(base64.b85decode(blob)).decode()
    compile(mini, "train_gpt.py", "exec")
    assert "LOOPGOLF_CONFIG_TABLES" not in mini + source  # the config's tables are written in


def test_packed_scripts_carry_the_minified_bundle(tmp_path):
    from tools.script import pack

    source = "import os\nprint(os.sep)\n"
    for how, decompress in (("lzma", lzma.decompress), ("brotli", None)):
        text = pack(source, how)
        blob = text.split('b85decode("')[1].split('")')[0]
        if decompress is None:
            import brotli

            decompress = brotli.decompress
        assert decompress(base64.b85decode(blob)).decode() == minify(source)
        script = tmp_path / f"packed_{how}.py"  # not lzma.py: it would import itself
        script.write_text(text)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
        assert out.strip() == os.sep


# ---- bad input -----------------------------------------------------------------------------------------

def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_pack_is_one_line(tmp_path, capsys):
    out = tmp_path / "sub"
    assert export(tmp_path, "demo.toml", [], out, pack="zip") == 2
    assert "--pack 'zip'" in _error_line(capsys) and not out.exists()


def test_existing_out_needs_force(tmp_path, capsys):
    out = tmp_path / "sub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export(tmp_path, "demo.toml", [], out) == 2
    assert "--force" in _error_line(capsys)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temporary folder left


def test_run_with_another_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[model]\nmodel_dim = 96\nnum_heads = 4\nnum_kv_heads = 2\nlayer_plan = '2x3'\n")
    (run / "metrics.jsonl").write_text("")
    (run / "train.log").write_text("")
    out = tmp_path / "sub"
    assert export(tmp_path, "demo.toml", [], out, runs=[run]) == 2
    line = _error_line(capsys)
    assert "model.model_dim" in line and str(run) in line and not out.exists()


def test_unfinished_run_is_refused(tmp_path, capsys):
    cfg = load_config(ROOT / "configs" / "demo.toml", small=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(cfg.to_toml())
    (run / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    (run / "train.log").write_text("")
    assert export(tmp_path, "demo.toml", [], tmp_path / "sub", runs=[run]) == 2
    assert "has not finished" in _error_line(capsys)


@pytest.fixture
def fake_core(tmp_path, monkeypatch):
    """fake_core({"a.py": source, ...}): a package `core` of these modules under tmp_path, which the bundler
    reads in place of the repository's."""
    from tools import bundle

    def make(modules: dict[str, str]) -> None:
        pkg = tmp_path / "core"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for name, source in modules.items():
            (pkg / name).write_text(source)
        monkeypatch.setattr(bundle, "ROOT", tmp_path)

    return make


def test_unbundlable_code_names_file_and_line(fake_core):
    """A module the bundler cannot inline (here `import *`) is refused with its file and line."""
    from tools import bundle

    fake_core({"a.py": "from core.b import *\n", "b.py": "X = 1\n"})
    with pytest.raises(bundle.BundleError, match=r"core/a.py:1: 'import \*'"):
        bundle.Bundle("core.a").flatten()


def test_bundler_renames_clashing_globals_and_resolves_module_attributes(fake_core):
    from tools import bundle
    from tools.prune import prune

    fake_core({
        "a.py": "def helper():\n    return 'a'\n\ndef use_a():\n    return helper()\n",
        "b.py": "def helper():\n    return 'b'\n",
        "main.py": "from core import b as bee\nfrom core.a import use_a\n\n"
                   "def run(helper='local'):\n    return use_a() + bee.helper() + helper\n\nRESULT = run()\n"})
    source = ast.unparse(prune(bundle.Bundle("core.main").flatten()))
    namespace: dict = {}
    exec(compile(source, "bundle", "exec"), namespace)
    assert namespace["RESULT"] == "ablocal"
    assert "import" not in source.replace("from __future__ import annotations", "")


def test_script_config_is_the_resolved_config_and_knobs_are_typed():
    """The exported script rebuilds its config from the tables without the TOML path (config_from_tables):
    the same RunConfig, its environment knobs read as their keys' types, a bad one refused in one line."""
    from core.config import config_from_tables, load_config
    from core.errors import UserError
    from tools.script import config_tables

    cfg = load_config(ROOT / "configs" / "record_1493.toml", small=True)
    assert config_from_tables(config_tables(cfg), source=cfg.source) == cfg
    knobbed = config_from_tables(config_tables(cfg), {"train.iterations": "12", "eval.ttt_lr": "0.5"})
    assert (knobbed.train.iterations, knobbed.eval.ttt_lr) == (12, 0.5)
    with pytest.raises(UserError, match=r"^train.iterations = 'ten': expected an integer$"):
        config_from_tables(config_tables(cfg), {"train.iterations": "ten"})
    with pytest.raises(UserError, match="train.iterations = -3: expected a positive integer"):
        config_from_tables(config_tables(cfg), {"train.iterations": "-3"})
