"""Kill a training run and resume it: the final val_loss (and the weight file) equal an uninterrupted run's.

Each case runs `loopgolf train` in a subprocess on the demo shards: once uninterrupted (the reference), once
killed after it has written a checkpoint but before the end, then once more with --resume. CPU fp32, one
thread per process, the iteration-based warmdown (max_wallclock_seconds = 0): bit-exact equality is the
contract, so the comparisons are ==, never approx.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
ITERATIONS = 16
TINY = [
    "--small", "--set", "model.model_dim=32", "--set", "train.seq_len=32", "--set", f"train.iterations={ITERATIONS}",
    "--set", "train.val_every=0", "--set", "train.val_max_tokens=2048", "--set", "train.max_wallclock_seconds=0",
    "--set", "train.warmup_steps=1", "--set", "train.warmdown_iters=6", "--set", "train.log_every=1",
    "--set", "train.compute_dtype='float32'", "--set", "train.checkpoint_every=2",
]
# The console script, as a user runs it (for MLX on Linux it re-execs itself with OpenBLAS, keeping its pid).
LOOPGOLF = Path(sys.executable).with_name("loopgolf")
PROGRAM = [str(LOOPGOLF)] if LOOPGOLF.exists() else [sys.executable, "-m", "tools.cli"]


def command(backend, demo_data, out, *extra):
    return [*PROGRAM, "train", "--config", "configs/demo.toml", "--backend", backend,
            "--data", str(demo_data), "--out", str(out), *TINY, *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def events(out, kind=None):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if kind is None or e["event"] == kind]


def descendants(pid):
    """pid and every process below it (torchrun's ranks run in their own sessions, so no process group
    reaches them: walk /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def start_and_stop(cmd, out, sig, min_step):
    """Start a run, wait until it has a complete checkpoint at step >= min_step, then send `sig`: SIGKILL to
    every process of the run at once (a pod dying), SIGTERM to the top process only (as a scheduler does).
    Returns (exit code, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not any(s >= min_step for s, _ in list_checkpoints(out / "checkpoints")):
            assert proc.poll() is None, "the run ended before writing a checkpoint:\n" + proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.005)
        for pid in descendants(proc.pid) if sig == signal.SIGKILL else [proc.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("backend, extra", [("mlx", ()), ("torch", ()), ("torch", ("--nproc", "2"))],
                         ids=["mlx", "torch", "torch-2ranks"])
def test_sigterm_sigkill_and_resume_match_an_uninterrupted_run(backend, extra, demo_data, tmp_path):
    """SIGTERM: a checkpoint at the step it stopped, exit 143 and the command that resumes. That resume is
    then killed with SIGKILL after its next checkpoint, and resumed again to the end. The result equals an
    uninterrupted run's, bit for bit."""
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    ref = tmp_path / "reference"
    run(command(backend, demo_data, ref, *extra))
    out = tmp_path / "run"

    code, err = start_and_stop(command(backend, demo_data, out, *extra), out, signal.SIGTERM, min_step=2)
    # One process exits 128+15; torchrun's launcher reports the signal it got as an interruption (130).
    assert code == (130 if extra else 143), err[-2000:]
    (stopped,) = events(out, "stopped")
    assert stopped["signal"] == "SIGTERM" and 2 <= stopped["step"] < ITERATIONS
    newest_step, newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest_step == stopped["step"] and stopped["checkpoint"] == str(newest)
    hint = next(line for line in err.splitlines() if line.startswith("resume with: "))
    assert hint.startswith("resume with: loopgolf train ") and hint.endswith(" --resume")
    assert f"--out {out}" in hint and ("--nproc 2" in hint) == bool(extra)

    resume = command(backend, demo_data, out, *extra, "--resume")
    code, err = start_and_stop(resume, out, signal.SIGKILL, min_step=stopped["step"] + 1)
    assert code == -signal.SIGKILL, err[-2000:]
    assert not events(out, "final"), "the run finished before it was killed; the test proves nothing"

    run(resume)
    final, want = events(out, "final")[-1], events(ref, "final")[-1]
    assert final["steps"] == want["steps"] == ITERATIONS
    assert final["val_loss"] == want["val_loss"]  # exact: same batches, state, schedule and step count
    assert final["roundtrip_val_loss"] == want["roundtrip_val_loss"]
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    # metrics.jsonl and train.log continue across the three processes
    resumed_at = [e["step"] for e in events(out, "resume")]
    assert len(resumed_at) == 2 and resumed_at[0] == stopped["step"] < resumed_at[1] < ITERATIONS
    trained = [e["step"] for e in events(out, "train")]
    assert trained[-1] == ITERATIONS and set(trained) == set(range(1, ITERATIONS + 1))
    assert (out / "train.log").read_text().count("resume: step:") == 2
