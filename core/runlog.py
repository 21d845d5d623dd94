"""Run output: upstream-style lines to the terminal and train.log, one JSON object per event in
metrics.jsonl, and a progress bar on a terminal. Only rank 0 writes anything."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


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
            out_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(out_dir / "train.log", "a", encoding="utf-8")
            self._metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.echo:
            if isinstance(self._bar, _Progress):
                self._bar.bar.write(text, file=sys.stdout)
            else:
                print(text, flush=True)
        if self._log:
            self._log.write(text + "\n")
            self._log.flush()

    def event(self, kind: str, **fields) -> None:
        if self.enabled and self._metrics:
            record = {"event": kind, **{k: _jsonable(v) for k, v in fields.items()}}
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
                f.close()
