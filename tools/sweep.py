"""`loopgolf sweep`: every variant x seed of a config, one `loopgolf train` each, resumably.

Each run is a child process writing SWEEP_DIR/NAME (its output also in SWEEP_DIR/NAME/output.log).
SWEEP_DIR/sweep.json records the plan and each run's state; rerunning the same command skips finished
runs, resumes a killed run from its newest checkpoint and retries failed ones.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from core import checkpoint as ckpt_io
from core.atomic import atomic_write_text
from core.config import load_config
from core.errors import UserError
from core.results import SWEEP_FILE, read_run
from core.sweep_plan import DEFAULT_SEEDS, PlannedRun, parse_grid, parse_seeds, parse_variants, plan_runs

OUTPUT_FILE = "output.log"
LOCK_FILE = ".sweep.lock"
_CHILD = "from tools.cli import console_main; console_main()"  # `loopgolf` itself, from this interpreter


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train every grid value / variant x seed of a config, resumably, into one directory")
    p.add_argument("--config", required=True, help="run config TOML (see configs/)")
    p.add_argument("--out", required=True, metavar="SWEEP_DIR", help="the sweep's directory (sweep.json, one run each)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="comma-separated train.seed values (default %(default)s)")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="values of one config key; several --grid give their cross product (commas inside quotes "
                        "or brackets do not split)")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME: SECTION.KEY=VALUE ...'",
                   help="a named variant setting several keys at once ('NAME:' alone: the config as it is)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key in every run (repeatable)")
    p.add_argument("--small", action="store_true", help="shrink every run as `loopgolf train --small`")
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"])
    p.add_argument("--data", help="data root or dataset directory (overrides data.path)")
    p.add_argument("--profile", metavar="NAME", help="every run with `loopgolf train --profile NAME` (e.g. h100)")
    p.add_argument("--nproc", type=int, metavar="N", help="every run with `loopgolf train --nproc N` (torch ranks)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at a time (default 1)")
    p.add_argument("--log-to", choices=["tensorboard", "wandb"], help="also log each run there (loopgolf[track])")
    p.add_argument("--dry-run", action="store_true", help="print the plan and each run's command; write nothing")


def settings_of(args) -> dict:
    """What every run shares; a sweep directory keeps one set of these."""
    return {"config": str(Path(args.config).resolve()), "set": list(args.set), "small": bool(args.small),
            "backend": args.backend, "data": str(Path(args.data).resolve()) if args.data else None,
            "profile": args.profile, "nproc": args.nproc}


def train_argv(settings: dict, run: PlannedRun, run_dir: Path, log_to: str | None, resume: bool) -> list[str]:
    argv = ["train", "--config", settings["config"], "--out", str(run_dir), "--backend", settings["backend"],
            "--no-progress"]
    if settings["small"]:
        argv.append("--small")
    if settings["data"]:
        argv += ["--data", settings["data"]]
    if settings.get("profile"):
        argv += ["--profile", settings["profile"]]
    if settings.get("nproc"):
        argv += ["--nproc", str(settings["nproc"])]
    for value in [*settings["set"], *run.overrides]:
        argv += ["--set", value]
    if log_to:
        argv += ["--log-to", log_to]
    return argv + (["--resume"] if resume else [])


def check_plan(settings: dict, runs: list[PlannedRun]) -> None:
    """Every run's config loads (bad values fail here, before anything runs), and the backend exists."""
    from tools.backends import resolve_backend

    resolve_backend(settings["backend"])
    data = [f'data.path="{settings["data"]}"'] if settings["data"] else []
    for run in runs:
        try:
            load_config(settings["config"], [*settings["set"], *data, *run.overrides], small=settings["small"],
                        profile=settings.get("profile"))
        except UserError as e:
            raise UserError(f"sweep run {run.name}: {e}") from None


def merge_plan(path: Path, settings: dict, runs: list[PlannedRun]) -> list[dict]:
    """The runs of sweep.json: the stored ones (kept, in their order) plus this command's new ones. The
    same directory must keep the same shared settings, and a run name the same overrides. A new run's
    directory must not exist yet: it would be someone else's (never skipped, resumed or deleted)."""
    if not path.is_file():
        _refuse_foreign(path.parent, runs, set())
        return [r.to_json() for r in runs]
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        old_settings, old_runs = stored["settings"], stored["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a sweep plan written by loopgolf sweep ({e}); choose another --out") from None
    for key, value in settings.items():
        if old_settings.get(key) != value:  # a key that an older sweep.json lacks reads as unset (None)
            raise UserError(f"{path}: this sweep was planned with {key} {old_settings.get(key)!r}, this command gives "
                            f"{value!r}; rerun it with the same settings or choose another --out")
    by_name = {r["name"]: r for r in old_runs}
    _refuse_foreign(path.parent, runs, set(by_name))
    merged = list(old_runs)
    for run in runs:
        old = by_name.get(run.name)
        if old is None:
            merged.append(run.to_json())
        elif list(old.get("overrides", [])) != list(run.overrides):
            raise UserError(f"{path}: run {run.name} was planned with {old.get('overrides')}, now {list(run.overrides)}")
    return merged


def _refuse_foreign(out: Path, runs: list[PlannedRun], ours: set[str]) -> None:
    for run in runs:
        if run.name not in ours and (out / run.name).exists():
            raise UserError(f"{out / run.name} exists and is not a run of this sweep (not in {out / SWEEP_FILE}); "
                            "move it or choose another --out")


class Sweep:
    def __init__(self, out: Path, settings: dict, entries: list[dict], plan_info: dict):
        self.out, self.settings, self.entries, self.plan_info = out, settings, entries, plan_info
        self.path = out / SWEEP_FILE

    def save(self) -> None:
        record = {"format": "loopgolf-sweep", "version": 1, "settings": self.settings, **self.plan_info,
                  "runs": self.entries}
        atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")

    def set(self, entry: dict, **fields) -> None:
        entry.update(fields)
        self.save()


def _lock(out: Path):
    import fcntl

    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UserError(f"{out}: another loopgolf sweep is running in it (pid {pid}); wait for it or stop it") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the run gets SIGTERM (checkpoint, then exit) if the sweep dies, rather than running on
    unsupervised into a directory the next sweep resumes."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def disk_state(run_dir: Path) -> str:
    """done (a final record and its artifact), resume (a complete checkpoint) or fresh."""
    if run_dir.is_dir():
        run = read_run(run_dir)
        if run.final is not None and (run_dir / str(run.final.get("artifact", ""))).is_file():
            return "done"
        if ckpt_io.latest(run_dir / ckpt_io.DIR_NAME) is not None:
            return "resume"
    return "fresh"


def _summary(run_dir: Path) -> str:
    final = read_run(run_dir).final or {}
    if "roundtrip_val_bpb" not in final:
        return ""
    return (f"val_bpb {final['val_bpb']:.4f}, round trip {final['roundtrip_val_bpb']:.4f}, "
            f"{final.get('total_bytes', 0):,} B")


def run_sweep(args) -> int:
    seeds = parse_seeds(args.seeds)
    grid, variants = parse_grid(args.grid), parse_variants(args.variant)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected 1 or more")
    for value in args.set:
        if value.split("=", 1)[0].strip() == "train.seed":
            raise UserError(f"--set {value!r}: seeds are given with --seeds")
    runs = plan_runs(Path(args.config).stem, seeds, grid, variants, args.set)
    settings = settings_of(args)
    check_plan(settings, runs)
    out = Path(args.out)
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: {shlex.join(['loopgolf', *train_argv(settings, run, out / run.name, args.log_to, False)])}")
        print(f"sweep: {len(runs)} runs planned, nothing run (--dry-run)")
        return 0
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        entries = merge_plan(out / SWEEP_FILE, settings, runs)
        plan_info = {"seeds": seeds, "grid": dict(grid), "variants": dict(variants)}
        sweep = Sweep(out, settings, entries, plan_info)
        sweep.save()
        return _execute(sweep, runs, args)
    finally:
        lock.close()


def _execute(sweep: Sweep, runs: list[PlannedRun], args) -> int:
    by_name = {e["name"]: e for e in sweep.entries}
    todo, done = [], 0
    for run in runs:
        entry, run_dir = by_name[run.name], sweep.out / run.name
        state = disk_state(run_dir)
        if state == "done":
            done += 1
            if entry.get("status") != "done":
                sweep.set(entry, status="done", rc=0, last_line="")
        else:
            todo.append((run, state))
    print(f"sweep: {len(runs)} runs in {sweep.out}: {done} finished, "
          f"{sum(s == 'resume' for _, s in todo)} to resume, {sum(s == 'fresh' for _, s in todo)} to start; "
          f"{args.jobs} at a time", flush=True)

    stopping: list[int] = []
    running: dict = {}  # Popen -> (run, its sweep.json entry, start time, progress tag)
    passed_on: dict = {}  # Popen -> how many of the signals in `stopping` it has been sent

    def pass_on(proc) -> None:
        """The runs are in their own sessions (a terminal's Ctrl-C reaches only the sweep): send each signal
        once, so a run sees one (checkpoint and stop) or two (stop now) as `loopgolf train` would."""
        while passed_on.get(proc, 0) < len(stopping):
            if proc.poll() is None:
                proc.send_signal(stopping[passed_on.get(proc, 0)])
            passed_on[proc] = passed_on.get(proc, 0) + 1

    def on_signal(signum, frame):
        stopping.append(signum)
        for proc in list(running):
            pass_on(proc)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // args.jobs))
    failed = stopped = 0
    queue, total, index = list(todo), len(runs), done
    try:
        while (queue and not stopping) or running:
            while queue and not stopping and len(running) < args.jobs:
                run, state = queue.pop(0)
                index += 1
                tag = f"[{index}/{total}]"
                proc = _start(sweep, run, state, by_name[run.name], env, args.log_to, tag)
                running[proc] = (run, by_name[run.name], time.perf_counter(), tag)
                pass_on(proc)  # a signal that came while it was starting
            time.sleep(0.05)
            for proc in [p for p in running if p.poll() is not None]:
                outcome = _finish(sweep, proc, running.pop(proc), stopping)
                failed += outcome == "failed"
                stopped += outcome == "stopped"
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stopping:
        left = len(queue) + stopped
        print(f"sweep: stopped by {signal.Signals(stopping[0]).name}; {left} run(s) left. Rerun the same command "
              "to continue (finished runs are skipped, stopped ones resume from their checkpoint)", file=sys.stderr)
        return 128 + stopping[0]
    finished = sum(e.get("status") == "done" for e in (by_name[r.name] for r in runs))
    print(f"sweep: {finished} of {total} finished" + (f", {failed} failed (see sweep.json)" if failed else "")
          + f"; compare them: loopgolf compare {sweep.out}")
    return 1 if failed else 0


def _start(sweep: Sweep, run: PlannedRun, state: str, entry: dict, env: dict, log_to: str | None, tag: str):
    run_dir = sweep.out / run.name
    if state == "fresh" and run_dir.exists():  # a run killed before its first checkpoint: start it over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = train_argv(sweep.settings, run, run_dir, log_to, resume=state == "resume")
    note = ""
    if state == "resume":
        note = f" (resuming from {ckpt_io.latest(run_dir / ckpt_io.DIR_NAME).name})"
    print(f"{tag} {run.name}: started{note}", flush=True)
    child_env = dict(env, WANDB_RUN_GROUP=f"{sweep.out.name}/{run.variant}") if log_to == "wandb" else env
    output = open(run_dir / OUTPUT_FILE, "a", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], stdout=output, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=child_env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    output.close()  # the child holds its own copy
    sweep.set(entry, status="running", command=shlex.join(["loopgolf", *argv]), rc=None, last_line="")
    return proc


def _finish(sweep: Sweep, proc, info: tuple, stopping: list[int]) -> str:
    run, entry, started, tag = info
    run_dir = sweep.out / run.name
    rc, seconds = proc.returncode, time.perf_counter() - started
    line = last_line(run_dir / OUTPUT_FILE)
    if rc == 0 and disk_state(run_dir) == "done":
        sweep.set(entry, status="done", rc=0, last_line="", seconds=round(seconds, 1))
        print(f"{tag} {run.name}: done in {seconds:.1f} s: {_summary(run_dir)}", flush=True)
        return "done"
    if stopping and rc in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT):
        sweep.set(entry, status="stopped", rc=rc, last_line=line)
        print(f"{tag} {run.name}: stopped (exit {rc}); resumes on the next sweep", flush=True)
        return "stopped"
    if rc == 0:
        line = line or "exited 0 without a final record"
    sweep.set(entry, status="failed", rc=rc, last_line=line, seconds=round(seconds, 1))
    print(f"{tag} {run.name}: FAILED (exit {rc}): {line}", flush=True)
    return "failed"
