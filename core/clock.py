"""The training clock: milliseconds of training, as upstream counts them (validation and checkpoints excluded)."""

from __future__ import annotations

import contextlib
import time


class TrainClock:
    """Runs from construction (on top of `ms` already trained, for a resumed run) and stands still inside
    `with clock.paused():`, which yields the training time at the pause."""

    def __init__(self, ms: float = 0.0):
        self.banked_ms = ms  # training time up to the last pause
        self._since = time.perf_counter()

    def ms(self) -> float:
        return self.banked_ms + 1000 * (time.perf_counter() - self._since)

    @contextlib.contextmanager
    def paused(self):
        self.banked_ms = self.ms()
        try:
            yield self.banked_ms
        finally:
            self._since = time.perf_counter()
