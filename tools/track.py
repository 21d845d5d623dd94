"""Optional experiment tracking (`--log-to tensorboard|wandb`, the `loopgolf[track]` extra).

A tracker receives every metrics.jsonl record from core.runlog.RunLog on rank 0 and forwards the numbers:
`train` as train/loss and train/tok_s, `val` as val/loss and val/bpb, each at its step; the `final`
record's numbers as final/<key> (wandb: the run summary). metrics.jsonl stays the record of truth: a
tracker that fails mid-run is dropped with one line and training goes on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from core.errors import UserError

INSTALL = "pip install 'loopgolf[track]'"
KINDS = ("tensorboard", "wandb")


def _scalars(record: dict) -> tuple[int | None, dict[str, float]]:
    kind = record.get("event")
    numbers = {k: float(v) for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    if kind == "train":
        return record.get("step"), {f"train/{k.removeprefix('train_')}": v for k, v in numbers.items()
                                    if k in ("train_loss", "tok_s")}
    if kind == "val":
        return record.get("step"), {f"val/{k.removeprefix('val_')}": v for k, v in numbers.items()
                                    if k in ("val_loss", "val_bpb")}
    if kind == "final":
        return record.get("steps"), {f"final/{k}": v for k, v in numbers.items()}
    return None, {}


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir SWEEP_DIR` shows a whole sweep)."""

    name = "tensorboard"

    def __init__(self, out_dir: Path, run_name: str, config: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {line}" for line in config_lines(config)))

    def event(self, record: dict) -> None:
        step, scalars = _scalars(record)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step or 0)
        if scalars:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run named after the run directory, resumed in place by `--resume` (its id is derived from the
    directory), grouped by WANDB_RUN_GROUP (set by `loopgolf sweep`), offline when WANDB_MODE=offline."""

    name = "wandb"

    def __init__(self, out_dir: Path, run_name: str, config: dict):
        import wandb

        run_id = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "loopgolf"), name=run_name, id=run_id,
                              resume="allow", dir=str(out_dir), config=config,
                              group=os.environ.get("WANDB_RUN_GROUP"))

    def event(self, record: dict) -> None:
        step, scalars = _scalars(record)
        if not scalars:
            return
        if record.get("event") == "final":
            self.run.summary.update(scalars)
        else:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def config_lines(config: dict) -> list[str]:
    return [f"{section}.{k} = {v!r}" for section, table in config.items() if isinstance(table, dict)
            for k, v in table.items()]


def check_available(kind: str | None) -> None:
    """Before training starts: the library for --log-to is installed (it is never required otherwise)."""
    if kind is None:
        return
    module = {"tensorboard": "tensorboardX", "wandb": "wandb"}[kind]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"--log-to {kind}: {module} is not installed; {INSTALL}")


def make_tracker(kind: str, out_dir: Path, config: dict):
    cls = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}[kind]
    try:
        return cls(out_dir, out_dir.name, config)
    except ImportError:
        raise UserError(f"--log-to {kind}: its library is not installed; {INSTALL}") from None


def attach_tracker(log, kind: str | None, out_dir: Path, cfg) -> None:
    """`loopgolf train --log-to KIND`: rank 0 forwards its metrics records to a tracker."""
    if kind is None or not log.enabled:
        return
    from core.results import tomllib

    try:
        tracker = make_tracker(kind, out_dir, tomllib.loads(cfg.to_toml()))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. wandb online without a login: the run matters more
        log.line(f"tracking: {kind} could not start ({type(e).__name__}: {e}); training without it")
        return
    log.add_sink(tracker)
    log.line(f"tracking: {kind} in {out_dir / kind}")  # both write their files there
