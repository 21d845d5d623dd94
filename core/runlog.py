"""Run output: upstream-style lines to the terminal and train.log, one JSON object per event in
metrics.jsonl, and a progress bar on a terminal. Only rank 0 writes anything."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

from core.errors import os_error


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null says "not measured"
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return v


class _NoProgress:
    def update(self, loss: float, tok_s: float) -> None:
        pass

    def close(self) -> None:
        pass


class _Progress:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, loss: float, tok_s: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f} {tok_s:,.0f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class RunLog:
    def __init__(self, out_dir: Path | None, rank: int = 0, echo: bool = True, progress_bar: bool | None = None):
        self.enabled = rank == 0
        self.echo = echo
        self.out_dir = out_dir
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self._bar: _Progress | _NoProgress = _NoProgress()
        self._log = self._metrics = None
        self.sinks: list = []  # trackers (tools/track.py): each gets every record, on rank 0 only
        if self.enabled and out_dir is not None:
            with self._writing(out_dir):
                out_dir.mkdir(parents=True, exist_ok=True)
                self._log = open(out_dir / "train.log", "a", encoding="utf-8")
                self._metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")

    @staticmethod
    @contextlib.contextmanager
    def _writing(path):
        """A full disk or a read-only run directory stops the run with one line naming the file."""
        try:
            yield
        except OSError as e:
            raise os_error(e, path) from None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.echo:
            if isinstance(self._bar, _Progress):
                self._bar.bar.write(text, file=sys.stdout)
            else:
                print(text, flush=True)
        if self._log:
            with self._writing(self._log.name):
                self._log.write(text + "\n")
                self._log.flush()

    def event(self, kind: str, **fields) -> None:
        if self.enabled and self._metrics:
            record = {"event": kind, **{k: _jsonable(v) for k, v in fields.items()}}
            with self._writing(self._metrics.name):
                self._metrics.write(json.dumps(record) + "\n")
                self._metrics.flush()
            self._send(record)

    def add_sink(self, sink) -> None:
        if self.enabled:
            self.sinks.append(sink)

    def _send(self, record: dict) -> None:
        for sink in list(self.sinks):
            try:
                sink.event(record)
            except Exception as e:  # noqa: BLE001 - tracking is optional: it never stops a run
                self.sinks.remove(sink)
                self.line(f"tracking: {getattr(sink, 'name', sink)} failed ({type(e).__name__}: {e}); "
                          "continuing without it (metrics.jsonl has everything)")

    def progress(self, total: int):
        if self.enabled and self.progress_bar:
            self._bar = _Progress(total)
        return self._bar

    def close_progress(self) -> None:
        self._bar.close()
        self._bar = _NoProgress()

    def close(self) -> None:
        self.close_progress()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                self.line(f"tracking: {getattr(sink, 'name', sink)} did not close cleanly ({type(e).__name__}: {e})")
        self.sinks = []
        for f in (self._log, self._metrics):
            if f:
                with contextlib.suppress(OSError):  # a failed write was reported already
                    f.close()


class TrainReport:
    """The training loop's lines in upstream's train.log format (which people parse), each with its
    metrics.jsonl event."""

    def __init__(self, log: RunLog, iterations: int, with_layers: bool):
        self.log, self.iterations, self.with_layers = log, iterations, with_layers

    def resume(self, step: int, train_ms: float, path) -> None:
        self.log.line(f"resume: step:{step}/{self.iterations} train_time:{train_ms:.0f}ms from {path}")
        self.log.event("resume", step=step, train_time_ms=train_ms, checkpoint=str(path))

    def val(self, step: int, val_loss: float, val_bpb: float, train_ms: float, layers: int) -> None:
        self.log.line(f"step:{step}/{self.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                      f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
        self.log.event("val", step=step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=train_ms,
                       **({"layers": layers} if self.with_layers else {}))

    def train(self, step: int, loss: float, train_ms: float, tok_s: float) -> None:
        self.log.line(f"step:{step}/{self.iterations} train_loss:{loss:.4f} train_time:{train_ms:.0f}ms "
                      f"step_avg:{train_ms / step:.2f}ms tok_s:{tok_s:.0f}")
        self.log.event("train", step=step, train_loss=loss, tok_s=tok_s, train_time_ms=train_ms)

    def stopping_early(self, step: int, train_ms: float) -> None:
        self.log.line(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{self.iterations}")

    def nonfinite(self, step: int, loss: float, checkpoint) -> None:
        self.log.close_progress()
        self.log.line(f"stopped: train_loss:{loss} at step:{step}")
        self.log.event("nonfinite", step=step, train_loss=str(loss), checkpoint=str(checkpoint) if checkpoint else None)
