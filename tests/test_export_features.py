"""The records' recipe (#1394/#1493, issue 17) reaches the exported train_gpt.py: with the shuffled loader,
MuonEq-R, std-clip GPTQ on the matrices and the tied embedding, brotli behind a byte shuffle and a GPTQ reserve
switched on by --set, the script (loopgolf not importable) trains as `loopgolf train` does with the same
options, step for step, writes the same artifact and reports the same score-first TTT bpb.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from core.artifact import load_quantized
from core.config import load_config
from tools.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
RECIPE = [
    "model.model_dim=128", "model.mlp_mult=5",  # the MLP matrices and the embedding have > 65,536 values: quantized
    'data.order="shuffled"', "optim.muon_row_normalize=true",
    'artifact.scheme="int6_std12.85"', 'artifact.rules=["tok_emb.weight=int8_std20"]', "artifact.gptq=true",
    "artifact.gptq_embedding=true", "artifact.gptq_batches=1", 'artifact.codec="brotli"', "artifact.byte_shuffle=2",
    # the records' model parts (tests/test_record_parts.py): block 1 (twice once looping is on) parallel, gated skips
    'model.parallel_blocks="1"', "model.skip_gates=true", "model.ln_scale=true", "model.qk_gain_init=5.25",
    "train.warmdown_fraction=0.5",  # of the 8 steps here (no cap); the records' is of the wallclock
    # the records' loop switch-on (core/depth.py): blocks 0-2 flat, then block 1 twice, from half the steps
    'model.layer_plan="0 1 1 2"', 'train.depth_schedule="0.5:flat,1.0:full"', 'train.depth_schedule_by="step"',
    # #1493's score-first TTT (core/ttt.py) over standard windows: 2 chunks of the 4,096 val targets, one step
    "eval.stride=64", "eval.ttt=true", "eval.ttt_chunk_tokens=2048", "eval.ttt_epochs=1",
]


def overrides(data: Path) -> list[str]:
    """A few logged steps on the demo shards, step-based (a wallclock schedule depends on the machine)."""
    return [f"train.iterations={STEPS}", "train.val_every=4", "train.log_every=1", "train.warmup_steps=1",
            "train.val_max_tokens=4096", "train.max_wallclock_seconds=0", f'data.path="{data}"',
            'data.dataset="shakespeare_sp1024"', "model.vocab_size=1024", *RECIPE]


def set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def isolated_env(**extra) -> dict:
    """`python -S` finds numpy, torch and brotli but not loopgolf (as tests/test_export.py runs its scripts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RANK", "WORLD", "LOCAL_", "MASTER"))}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    env.update(**extra)
    return env


def run_script(folder: Path, run_id: str, **env) -> Path:
    proc = subprocess.run([sys.executable, "-S", "train_gpt.py"], cwd=folder, env=isolated_env(RUN_ID=run_id, **env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return folder / "logs" / run_id


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == kind]


def train(sets: list[str], out: Path) -> int:
    return cli(["train", "--config", str(ROOT / "configs" / "demo.toml"), "--small", "--backend", "torch",
                *set_args(sets), "--out", str(out), "--no-progress"])


def script_source(folder: Path) -> str:
    """The bundled source inside the lzma-packed train_gpt.py (its one base64 literal, unpacked)."""
    import base64
    import lzma
    import re

    packed = re.search(r"b85decode\((b?['\"])(.*?)\1\)", (folder / "train_gpt.py").read_text(), re.S)
    return lzma.decompress(base64.b85decode(packed.group(2))).decode()


def artifact_of(run_dir: Path) -> Path:
    (art,) = run_dir.glob("*.art")
    return art


@pytest.mark.slow
def test_the_records_options_reach_the_exported_script(demo_data, tmp_path):
    sets = overrides(demo_data)
    run = tmp_path / "run"
    assert train(sets, run) == 0
    folder = tmp_path / "records" / "sub"
    assert cli(["export", "--config", str(ROOT / "configs" / "demo.toml"), "--small", *set_args(sets),
                "--out", str(folder), "--pack", "lzma", "--run", str(run)]) == 0
    script = (folder / "train_gpt.py").read_text()
    assert script.startswith("import lzma,base64\n")  # the packed script, as submitted
    script_run = run_script(folder, "a")

    ours, theirs = ([e["train_loss"] for e in events(r, "train")] for r in (run, script_run))
    assert len(theirs) == STEPS and theirs == ours  # same options, data order, seed and thread count
    switches = [[(e["step"], e["layers"]) for e in events(r, "depth")] for r in (run, script_run)]
    assert switches[0] == switches[1] == [(0, 3), (4, 4)]
    art = artifact_of(script_run)
    assert art.read_bytes() == artifact_of(run).read_bytes()
    finals = [events(r, "final")[-1] for r in (run, script_run)]
    assert finals[0]["ttt_chunks"] == 2 and finals[0]["ttt_val_bpb"] == finals[1]["ttt_val_bpb"]
    assert finals[0]["ttt_val_bpb"] != finals[0]["sliding_val_bpb"]
    assert "_roundtrip_ttt val_loss:" in (script_run / "train.log").read_text()
    _, qw, info = load_quantized(art)
    assert info.codec_label == "bs2+brotli-11" and info.scheme == "int6_std12.85;tok_emb.weight=int8_std20"
    assert "tok_emb.weight" in info.gptq["tensors"] and any(".mlp." in n for n in info.gptq["tensors"])
    cfg = load_config(script_run / "config.toml")
    assert cfg.data.order == "shuffled" and cfg.optim.muon_row_normalize and cfg.artifact.gptq_embedding
    assert cfg.model.parallel_blocks == "1" and cfg.model.skip_gates and cfg.model.ln_scale
    assert qw.tensors["skip_gates"].data.dtype.name == "float32"  # trained (not its zero init), kept fp32
    assert qw.tensors["skip_gates"].data.any()
    assert "parallel_block_list" in script_source(folder)  # folded away (unused, dropped) when no block is parallel

    # The reserve through the script's knob: a 30 s cap less 29.999 s leaves 1 ms, so the script stops after
    # one step, whose loss (taken before its update) is the first of the run above; the Hessians come after.
    env = {"MAX_WALLCLOCK_SECONDS": "30", "GPTQ_RESERVE_SECONDS": "29.999", "WARMDOWN_ITERS": "0", "TTT_EPOCHS": "2"}
    reserved = run_script(folder, "reserved", **env)
    log = (reserved / "train.log").read_text()
    assert "stopping_early: wallclock_cap" in log and "gptq_reserve: 29999ms" in log, log[-2000:]
    assert "steps:2 epochs:2 " in log  # #1493's TTT_EPOCHS knob: one trained chunk, two epochs of one step
    assert events(reserved, "final")[-1]["steps"] == 1
    assert [e["train_loss"] for e in events(reserved, "train")] == ours[:1]
