"""The README's commands work as written: every line of its ```bash blocks, pasted in order after the two
commands, in a tiny-iteration version.

The run starts where `bash scripts/demo.sh` leaves a fresh clone: data/ holds the demo shards, runs/demo the
demo run, and `. .venv/bin/activate` has put `loopgolf` and `make_mini_shards` on PATH. Each command then runs
unchanged from a directory holding the repository's configs/ and scripts/, except that training gets a few
iterations and a short validation and `loopgolf eval` a few thousand tokens. A command this machine cannot
run (an install, a download, a GPU) must be in NOT_RUN with its reason; anything else the README adds is run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Command prefixes the README shows but CI cannot run, with why.
NOT_RUN = {
    "bash scripts/demo.sh": "installs into .venv; the test starts from what it leaves (data/, runs/demo)",
    "bash scripts/test.sh": "the test suite itself",
    "bash scripts/setup.sh": "an install",
    "python3 -m venv": "an install",
    "pip install": "an install",
    "loopgolf data fetch": "downloads FineWeb from the Hub",
    "loopgolf train --config configs/ut_3x4.toml --backend torch": "trains on the fetched FineWeb data",
    "loopgolf train --config configs/ut_3x4.toml --small --set train.iterations=200": "trains on the fetched data",
    "loopgolf train --config configs/ut_3x4.toml --profile h100": "a GPU box and the fetched FineWeb data",
    "torchrun --standalone --nproc_per_node 8": "8 ranks on the fetched FineWeb data",
    "cd records/": "the exported script on 8 GPUs (torchrun --nproc_per_node=8)",
}
RUNNABLE = ("loopgolf", "make_mini_shards", ".venv/bin/make_mini_shards", "scripts/quant_table.sh")
# What stands for a run directory in the README's examples, and the run it names here.
PLACEHOLDERS = {"runs/X/": "runs/demo/", "RUN/": "/tmp/demo384/"}
# Two steps of 2,048 tokens and a 4,096-token validation; GPTQ's Hessians (quantize --gptq) come from
# artifact.gptq_batches batches of the run's config: two, not 16.
TINY_TRAIN = ["train.iterations=2", "train.batch_tokens=2048", "train.val_every=0", "train.val_max_tokens=4096",
              "train.warmup_steps=0", "artifact.gptq_batches=2"]


def readme_commands(text: str) -> list[list[str]]:
    """Every command of the ```bash blocks, in order, as argv (continuation lines joined, comments dropped)."""
    commands, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside and line.strip() in ("```bash", "```sh")
            continue
        if not inside:
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        argv = shlex.split(pending, comments=True)
        pending = ""
        if argv:
            commands.append(argv)
    return commands


def not_run_reason(argv: list[str]) -> str | None:
    command = shlex.join(argv)
    return next((reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)), None)


def test_every_readme_command_is_run_or_says_why_not():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) > 20, "the README's ```bash blocks were not found"
    for argv in commands:
        assert not_run_reason(argv) or argv[0] in RUNNABLE, f"not run and not in NOT_RUN: {shlex.join(argv)}"
    for prefix in NOT_RUN:  # a stale entry could hide a command added later
        assert any(shlex.join(a).startswith(prefix) for a in commands), f"NOT_RUN names no README command: {prefix}"


def tiny(argv: list[str], tmp: Path) -> list[str]:
    """The same command with a few training steps and a short eval, and /tmp/ inside the test's directory."""
    argv = [a.replace("/tmp/", f"{tmp}/") for a in argv]
    for placeholder, path in PLACEHOLDERS.items():
        argv = [path.replace("/tmp/", f"{tmp}/") + a[len(placeholder):] if a.startswith(placeholder) else a
                for a in argv]
    if argv[:2] in (["loopgolf", "train"], ["loopgolf", "sweep"], ["loopgolf", "export"]):  # export: the runs' config
        sets = TINY_TRAIN + (["train.checkpoint_every=1"] if any("checkpoint_every" in a for a in argv) else [])
        argv = argv + [x for s in sets for x in ("--set", s)]
    if argv[:2] == ["loopgolf", "eval"]:
        argv = argv + ["--max-tokens", "4096", "--no-progress"]
    return argv


@pytest.mark.slow
def test_the_readme_commands_run_in_order(demo_data, tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "loopgolf").exists():
        pytest.skip(f"the console scripts are not installed in {bin_dir} (pip install -e .)")
    clone = tmp_path / "clone"
    clone.mkdir()
    for folder in ("configs", "scripts"):
        shutil.copytree(ROOT / folder, clone / folder)
    (clone / ".venv").symlink_to(Path(sys.prefix))
    shutil.copytree(demo_data, clone / "data")
    # As `. .venv/bin/activate` does; and no Hub requests (CI has no network).
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}

    def run(argv):
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(argv)}\nexit {done.returncode}\n{done.stderr[-3000:]}"
        print(f"{time.perf_counter() - started:6.1f} s  {shlex.join(argv)}")  # shown with pytest -s

    # What the two commands leave, in the tiny version: the demo run.
    run(tiny(["loopgolf", "train", "--config", "configs/demo.toml", "--out", "runs/demo"], tmp_path))
    commands = [a for a in readme_commands((ROOT / "README.md").read_text()) if not not_run_reason(a)]
    # A placeholder stands for a run that some block makes (RUN: the demo384 run): those commands go last.
    last = [any(a.startswith(tuple(PLACEHOLDERS)) for a in argv) for argv in commands]
    for argv in [a for a, p in zip(commands, last) if not p] + [a for a, p in zip(commands, last) if p]:
        run(tiny(argv, tmp_path))
