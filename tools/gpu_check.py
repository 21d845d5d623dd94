"""`loopgolf gpu-check` (scripts/gpu_check.sh): every fact about the CUDA path in one run on one GPU, written
as one JSON file and one markdown table.

GPU time comes in short slices, so the check is prepared and tested on a CPU (--cpu-smoke runs the same
parts at tiny sizes, in CI) and gathers everything in one call of at most --budget seconds (480 by
default, compilation included). Each part runs in a process of its own (tools/gpu_parts.py) under a
timeout: a part that fails or hangs records its one-line error and the rest still run.

Parts, in two phases:
  1. untimed, up to --jobs at once: parity (CUDA against the CPU on the same weights, fp32 with TF32 off
     and bf16 autocast, for demo and ut_3x4_iter at --small), depth (progressive_3x5: one compile per
     depth variant before the clock) and export (the exported train_gpt.py under torchrun, 20 steps,
     against loopgolf's trainer);
  2. timed, one at a time with the GPU to themselves: train:baseline_9x512, upstream (the user's
     train_gpt.py at the baseline config on the same GPU, tokens/s ratio), train:ut_3x4_iter (train: compiled
     at the record batch per GPU: ms/step, tok/s, MFU against a bf16 matmul peak measured in the same run,
     peak memory against the --dry-run estimate, compile time, compiles and graph breaks).
A part that the budget leaves no time for is recorded as skipped; `--parts` reruns it alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.config import load_config
from core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
RECORD_GPUS = 8  # the record track's machine: the record batch per GPU is the config's batch over 8 GPUs
MIN_START_S = 20.0  # a part is not started with less of the budget left than this


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("gpu-check", help="gather every CUDA fact in one run: parity, compiled speed, MFU, "
                                         "memory, compiles, upstream side by side, the exported script",
                       description="One command for a short GPU slice: writes gpu_check.json and gpu_check.md "
                                   "to --out. Refuses to start without CUDA unless --cpu-smoke.")
    p.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json and gpu_check.md "
                                                           "(default runs/gpu-check)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the same parts on the CPU at tiny sizes (CI's check that the command works)")
    p.add_argument("--upstream", metavar="PATH", help="your copy of upstream's train_gpt.py, run side by side "
                                                      "at the baseline config (as bench --vs-upstream)")
    p.add_argument("--data", metavar="DIR", help="shards and a tokenizer (a data root or dataset directory, e.g. "
                                                 "make_mini_shards --demo --out data), for upstream and export")
    p.add_argument("--parts", help="comma-separated part names or kinds to run (default: all), e.g. train,parity:demo")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per training part (default 40; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps before the clock (default 3; smoke 1)")
    p.add_argument("--rounds", type=int, default=1, help="upstream: alternating rounds of each (default 1)")
    p.add_argument("--jobs", type=int, default=None, help="parts of the untimed phase run at once (default 4; smoke 2)")
    return p


# ---- the plan -------------------------------------------------------------------------------------------

def _per_gpu_batch(config: str) -> list[str]:
    """The record batch per GPU: the config's batch over 8 GPUs, one micro-batch per step."""
    t = load_config(ROOT / "configs" / config).train
    return [f"train.batch_tokens={t.batch_tokens // RECORD_GPUS}", "train.grad_accum_steps=1"]


def _gpu_plan(part) -> list[dict]:
    return [
        part("parity:demo", "parity", "demo.toml", 1, small=True, cap=240),
        part("parity:ut_3x4_iter", "parity", "ut_3x4_iter.toml", 1, small=True, cap=300),
        part("depth:progressive_3x5", "depth", "progressive_3x5.toml", 1, sets=_per_gpu_batch("progressive_3x5.toml"),
             cap=360, steps=5),
        # one validation batch at the end (one eval graph), 20 steps
        part("export", "export", "demo.toml", 1, sets=["train.val_max_tokens=16384"], cap=360, steps=20),
        part("train:baseline_9x512", "train", "baseline_9x512.toml", 2, sets=_per_gpu_batch("baseline_9x512.toml"),
             cap=240),
        # Next, while inductor's cache holds the baseline's graphs (upstream's micro-batch is the same 65,536
        # tokens): the baseline's own batch, 8 micro-batches, as train_gpt.py runs on one GPU.
        part("upstream", "upstream", "baseline_9x512.toml", 2, cap=300, steps=30),
        part("train:ut_3x4_iter", "train", "ut_3x4_iter.toml", 2, sets=_per_gpu_batch("ut_3x4_iter.toml"), cap=300),
    ]


# --cpu-smoke: every kind of part once, on the demo config at --small with one loop of its 2 blocks (dynamo
# traces that in a second or two), compiled with dynamo alone (the "eager" backend: inductor's C++ code
# generation takes minutes on a small CPU). Which graphs the big configs compile is proven by the compile
# tests (tests/test_compile.py); the smoke proves the command, its parts and its report.
TINY = ["train.compile='on'", "train.val_max_tokens=4096"]


def _smoke_plan(part) -> list[dict]:
    demo, one_loop = "demo.toml", 'model.layer_plan="2x1"'
    return [
        part("parity:demo", "parity", demo, 1, sets=[one_loop, *TINY]),
        part("depth:demo", "depth", demo, 1, sets=['model.layer_plan="2x2"', 'train.depth_schedule="0.5:1,1.0:2"',
                                                   'train.depth_schedule_by="step"', *TINY]),
        # not compiled: its train and train_gpt.py processes would compile with inductor (the subprocesses
        # do not take this process's dynamo-only backend); on a GPU they compile as they train
        part("export", "export", demo, 1, sets=[one_loop, "train.val_max_tokens=4096"], steps=3),
        part("train:demo", "train", demo, 2, sets=[one_loop, *TINY]),
        part("upstream", "upstream", demo, 2, sets=["model.layer_plan=flat", "model.num_layers=2"]),
    ]


def plan_parts(args, smoke: bool) -> list[dict]:
    """Every part's description (tools/gpu_parts.py reads it), in the order they run."""
    steps = args.steps if args.steps is not None else (2 if smoke else 40)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    common = {"device": "cpu" if smoke else "cuda", "compile_backend": "eager" if smoke else "inductor",
              "warmup": warmup, "data": str(Path(args.data).resolve()) if args.data else None,
              "upstream": str(Path(args.upstream).resolve()) if args.upstream else None, "rounds": args.rounds,
              "peak_n": 128 if smoke else 8192, "peak_seconds": 0.05 if smoke else 1.0, "compile": True,
              "env": {"OMP_NUM_THREADS": "1"} if smoke else {}}

    def part(name, kind, config, phase, sets=(), small=False, cap=300, **extra):
        return {**common, "name": name, "kind": kind, "config": str(ROOT / "configs" / config), "phase": phase,
                "sets": list(sets), "small": small or smoke, "steps": steps, "cap": cap, **extra}

    parts = _smoke_plan(part) if smoke else _gpu_plan(part)
    if args.parts:
        wanted = {w.strip() for w in args.parts.split(",") if w.strip()}
        known = {p["name"] for p in parts} | {p["kind"] for p in parts}
        unknown = sorted(wanted - known)
        if unknown:
            raise UserError(f"--parts {args.parts}: unknown {', '.join(unknown)}; expected names or kinds from "
                            f"{', '.join(sorted(known))}")
        parts = [p for p in parts if p["name"] in wanted or p["kind"] in wanted]
    return parts


# ---- running the parts ----------------------------------------------------------------------------------

class _Running:
    def __init__(self, part: dict, work: Path, timeout: float, env: dict):
        self.part, self.timeout = part, timeout
        slug = part["name"].replace(":", "_")
        self.dir = work / slug
        self.dir.mkdir(parents=True, exist_ok=True)
        part = {**part, "workdir": str(self.dir), "timeout": timeout}
        (self.dir / "part.json").write_text(json.dumps(part, indent=1))
        self.result_path, self.log_path = self.dir / "result.json", self.dir / "log.txt"
        self.log = open(self.log_path, "w")
        self.started = time.monotonic()
        # A session of its own, so a timeout ends the part with everything it started (compile workers, torchrun).
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.gpu_parts", str(self.dir / "part.json"),
                                      str(self.result_path)], cwd=ROOT, env={**env, **part["env"]}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> dict | None:
        """The result once the part has ended (or been stopped at its timeout), else None."""
        elapsed = time.monotonic() - self.started
        if self.proc.poll() is None:
            if elapsed <= self.timeout:
                return None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.log.close()
            return {"status": "timeout", "error": f"stopped after its {self.timeout:.0f} s timeout", "checks": [],
                    "seconds": elapsed}
        self.log.close()
        if self.result_path.is_file():
            return json.loads(self.result_path.read_text())
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return {"status": "error", "checks": [], "seconds": elapsed,
                "error": f"exited {self.proc.returncode} without a result: {lines[-1][:300] if lines else '(no output)'}"}


def run_parts(parts: list[dict], work: Path, budget: float, jobs: int, progress=print,
              timed_jobs: int = 1) -> dict[str, dict]:
    """Phase 1 up to `jobs` parts at once, then phase 2 `timed_jobs` at a time (1 on a GPU: its parts time
    steps and need the device to themselves)."""
    deadline = time.monotonic() + budget
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    results: dict[str, dict] = {}

    def start(part) -> _Running | None:
        left = deadline - time.monotonic()
        if left < MIN_START_S:
            results[part["name"]] = {"status": "skipped", "checks": [], "seconds": 0.0,
                                     "error": f"the --budget of {budget:.0f} s ran out before this part started"}
            progress(f"gpu-check: {part['name']}: skipped (budget)")
            return None
        progress(f"gpu-check: {part['name']}: started")
        return _Running(part, work, min(part["cap"], left), env)

    for phase, width in ((1, jobs), (2, timed_jobs)):
        pending = [p for p in parts if p["phase"] == phase]
        running: list[_Running] = []
        while pending or running:
            while pending and len(running) < width:
                r = start(pending.pop(0))
                if r is not None:
                    running.append(r)
            for r in list(running):
                res = r.poll()
                if res is not None:
                    running.remove(r)
                    results[r.part["name"]] = res
                    why = f": {res['error']}" if res.get("error") else ""
                    progress(f"gpu-check: {r.part['name']}: {res['status']} in {res.get('seconds', 0):.0f} s{why}")
            time.sleep(0.2)
    return results


# ---- the command ----------------------------------------------------------------------------------------

def machine_facts(smoke: bool) -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
             "cpus": os.cpu_count()}
    if torch.cuda.is_available() and not smoke:
        facts.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0),
                     gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    return facts


def run_gpu_check(args) -> int:
    try:
        import torch
    except ImportError:
        raise UserError("gpu-check needs torch (pip install torch; see README)") from None
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise UserError("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); --cpu-smoke runs the "
                        "same parts on the CPU at tiny sizes")
    for flag, value in (("--budget", args.budget), ("--steps", args.steps), ("--warmup", args.warmup),
                        ("--rounds", args.rounds), ("--jobs", args.jobs)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value:g}: expected a positive number")
    if args.upstream and not Path(args.upstream).is_file():
        raise UserError(f"--upstream {args.upstream}: file not found")
    if args.data and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: not a directory")
    parts = plan_parts(args, smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs if args.jobs is not None else (2 if smoke else 4)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loopgolf-gpu-check-") as tmp:
        # --cpu-smoke times nothing that matters, so its timed phase runs in parallel too
        results = run_parts(parts, Path(tmp), args.budget, jobs, timed_jobs=jobs if smoke else 1)
        logs = {name: _log_tail(Path(tmp) / name.replace(":", "_") / "log.txt") for name in results}
    from tools.gpu_report import build_report, write_report

    report = build_report(parts, results, logs, machine_facts(smoke), smoke=smoke, budget=args.budget,
                          wall=time.monotonic() - started, argv=getattr(args, "argv", None),
                          date=dt.datetime.now().isoformat(timespec="seconds"))
    json_path, md_path = write_report(report, out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


def _log_tail(path: Path, lines: int = 40) -> list[str]:
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]
