"""Reading finished (and unfinished) runs back: metrics.jsonl, config.toml and a sweep's sweep.json.

Shared by `loopgolf compare` and `loopgolf plot`. A run is one directory written by `loopgolf train`; a
sweep is a directory with sweep.json (tools/sweep.py) whose runs are its subdirectories; any other
directory is read as a collection of the run directories directly inside it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from core.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SWEEP_FILE = "sweep.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"

# Keys that do not change what a run learns: runs that differ only in these are seeds of one variant.
NOT_THE_EXPERIMENT = {
    "train.seed", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.compile",
    "train.val_every", "data.path", "data.tokenizer",
}
_SEED_SUFFIX = re.compile(r"[-_](?:s|seed)(\d+)$")


@dataclasses.dataclass
class Run:
    path: Path
    name: str
    variant: str
    seed: int | None
    config: dict  # config.toml as nested tables ({} when the run has none yet)
    train: list[dict]  # `train` events in step order, after undoing what a resume logged twice
    val: list[dict]
    final: dict | None
    status: str  # "finished", "unfinished", "failed", "not started"
    note: str = ""  # why it is not finished: the last step reached, or a failed run's last line

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train + self.val]
        return max(steps) if steps else 0

    @property
    def iterations(self) -> int | None:
        return self.config.get("train", {}).get("iterations")


def read_events(path: Path) -> list[dict]:
    """metrics.jsonl as records. A cut last line (a crash mid-write) is dropped; a bad line elsewhere is
    an error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}:{i + 1}: not a JSON object; expected one metrics record per line") from None
        if not isinstance(record, dict) or "event" not in record:
            raise UserError(f"{path}:{i + 1}: expected a JSON object with an \"event\" key")
        records.append(record)
    return records


def curves(records: list[dict]) -> tuple[list[dict], list[dict], dict | None]:
    """(train, val, final). After a `resume` record at step S the run continued from S, so what the killed
    process logged after S (train steps past S, validation at S and past) is dropped: each step once."""
    train, val, final = [], [], None
    for r in records:
        kind = r["event"]
        if kind == "resume":
            s = r.get("step", 0)
            train = [x for x in train if x["step"] <= s]
            val = [x for x in val if x["step"] < s]
        elif kind == "train" and "step" in r:
            train.append(r)
        elif kind == "val" and "step" in r:
            val.append(r)
        elif kind == "final":
            final = r
    return train, val, final


def read_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable config ({e})") from None


def default_variant(name: str) -> str:
    """A run's variant when no sweep names it: its directory name less a seed suffix (-s1337, _seed7)."""
    stripped = _SEED_SUFFIX.sub("", name)
    return stripped or name


def read_run(run_dir: Path, variant: str | None = None, planned: dict | None = None) -> Run:
    """One run directory. `planned` is its sweep.json entry, when it belongs to a sweep."""
    config = read_config(run_dir)
    metrics = run_dir / METRICS_FILE
    train, val, final = curves(read_events(metrics)) if metrics.is_file() else ([], [], None)
    seed = config.get("train", {}).get("seed", (planned or {}).get("seed"))
    run = Run(run_dir, run_dir.name, variant or default_variant(run_dir.name), seed, config, train, val, final,
              "finished" if final is not None else "unfinished")
    if final is None:
        if planned and planned.get("status") == "failed":
            run.status, run.note = "failed", planned.get("last_line") or f"exit {planned.get('rc')}"
        elif not metrics.is_file():
            run.status, run.note = "not started", ""
        else:
            total = run.iterations
            run.note = f"stopped at step {run.last_step}" + (f" of {total}" if total else "")
    return run


def read_sweep_file(sweep_dir: Path) -> dict:
    path = sweep_dir / SWEEP_FILE
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable sweep plan ({e})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list):
        raise UserError(f"{path}: expected a JSON object with a \"runs\" list (written by loopgolf sweep)")
    return plan


def _looks_like_run(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / CONFIG_FILE).is_file()


def collect(paths: list[str | Path]) -> list[Run]:
    """Every run under the given run, sweep or collection directories, each once, in the order given (a
    sweep's in its planned order)."""
    runs, seen = [], set()

    def add(run: Run) -> None:
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)

    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p}: not a directory; expected a run directory (with {METRICS_FILE}), a sweep "
                            f"directory (with {SWEEP_FILE}) or a directory of runs")
        if (p / SWEEP_FILE).is_file():
            for entry in read_sweep_file(p)["runs"]:
                add(read_run(p / entry["name"], entry.get("variant"), entry))
        elif _looks_like_run(p):
            parent = p.parent / SWEEP_FILE
            entry = None
            if parent.is_file():  # one run of a sweep: keep the sweep's variant name
                entry = next((e for e in read_sweep_file(p.parent)["runs"] if e.get("name") == p.name), None)
            add(read_run(p, entry.get("variant") if entry else None, entry))
        else:
            children = sorted(c for c in p.iterdir() if c.is_dir() and _looks_like_run(c))
            if not children:
                raise UserError(f"{p}: holds no run: expected {METRICS_FILE} or {SWEEP_FILE} in it or in its "
                                "subdirectories")
            for c in children:
                add(read_run(c))
    return runs


def flat_config(config: dict) -> dict[str, object]:
    return {f"{section}.{k}": v for section, table in config.items() if isinstance(table, dict)
            for k, v in table.items()}


def check_same_experiment(runs: list[Run]) -> None:
    """Runs grouped into one variant must differ only in the seed (and keys that do not change training)."""
    by_variant: dict[str, list[Run]] = {}
    for r in runs:
        if r.config:
            by_variant.setdefault(r.variant, []).append(r)
    for variant, members in by_variant.items():
        first = flat_config(members[0].config)
        for other in members[1:]:
            flat = flat_config(other.config)
            diff = sorted(k for k in set(first) | set(flat) if k not in NOT_THE_EXPERIMENT and first.get(k) != flat.get(k))
            if diff:
                k = diff[0]
                raise UserError(
                    f"runs {members[0].path} and {other.path} are grouped as variant {variant!r} but differ in "
                    f"{', '.join(diff[:4])} ({k} = {first.get(k)!r} vs {flat.get(k)!r}); seeds of one variant "
                    "differ only in train.seed: give each variant its own directory name")
