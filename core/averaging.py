"""Weight averaging during training ([average]): EMA of the full state (#1110) or SWA (#895).

EMA: e_0 = the weights when training starts, then after every step e <- decay * e + (1 - decay) * w. It
updates every step, so the running average lives on the device (the backends' average_update /
get_average / set_average): copying every weight to the host once per step would cost more than the
step's own update.

SWA: a snapshot of the weights every `swa_every` steps while the step's LR scale is below
`swa_lr_threshold` and the model trains at full depth (Trainer.at_full_depth: a shallower model is not
the one exported), plus the final weights (once, when the last snapshot was not already of them), averaged
with equal weights. Snapshots are rare, so SWA runs here in numpy, summing in float64 so that a resumed
run adds exactly the numbers an uninterrupted one would.

Either way the averaged weights are what the run exports, quantizes and evaluates. The state goes into
checkpoints (`state()` -> tensors and a small JSON record; `WeightAverager(..., saved)` continues it).
"""

from __future__ import annotations

import numpy as np

from core.config import AverageConfig
from core.errors import UserError

EMA, SWA = "ema", "swa"
PREFIX = "average."  # tensor names in a checkpoint's average file


def method(cfg: AverageConfig) -> str | None:
    if cfg.ema_decay > 0:
        return EMA
    if cfg.swa_every > 0:
        return SWA
    return None


def ema_update(avg: dict[str, np.ndarray], weights: dict[str, np.ndarray], decay: float) -> dict[str, np.ndarray]:
    """One EMA step in numpy (the backends do the same on the device): decay * avg + (1 - decay) * w."""
    return {k: avg[k] * decay + weights[k] * (1.0 - decay) for k in avg}


class SwaSum:
    """The equal-weight average of snapshots, as a float64 sum and a count."""

    def __init__(self, sums: dict[str, np.ndarray] | None = None, count: int = 0):
        self.sums = sums or {}
        self.count = count

    def add(self, weights: dict[str, np.ndarray]) -> None:
        if not self.sums:
            self.sums = {k: np.zeros(np.shape(v), np.float64) for k, v in weights.items()}
        for k, v in weights.items():
            self.sums[k] += np.asarray(v, dtype=np.float64)
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no SWA snapshot to average")
        return {k: (s / self.count).astype(np.float32) for k, s in self.sums.items()}


class WeightAverager:
    """The averaging policy of one run over a backend (see the module docstring). `saved`: the
    (tensors, record) of a checkpoint's `state()` to continue from, or None to start at the backend's
    current weights."""

    def __init__(self, cfg: AverageConfig, backend, saved: tuple[dict, dict] | None = None):
        self.cfg, self.backend, self.kind = cfg, backend, method(cfg)
        self.last_snapshot = -1  # SWA: the step of the newest snapshot
        self.ema_steps = 0
        self.swa = SwaSum()
        if self.kind is None:
            return
        if saved is not None:
            tensors, record = saved
            if record.get("kind") != self.kind:
                raise UserError(f"checkpoint averaging state is {record.get('kind')!r}, the config asks for {self.kind!r}")
            weights = {k[len(PREFIX):]: v for k, v in tensors.items()}
            if self.kind == EMA:
                backend.set_average(weights)
                self.ema_steps = int(record["count"])
            else:
                self.swa = SwaSum({k: np.asarray(v, np.float64) for k, v in weights.items()} if record["count"] else {},
                                  int(record["count"]))
                self.last_snapshot = int(record["last_snapshot"])
        elif self.kind == EMA:
            backend.set_average(None)  # e_0: the current weights

    def after_step(self, step: int, lr_scale: float, at_full_depth: bool) -> bool:
        """Call after every optimizer step (`step` counts steps done). True when an SWA snapshot was taken."""
        if self.kind == EMA:
            self.backend.average_update(self.cfg.ema_decay)
            self.ema_steps += 1
        elif (self.kind == SWA and step % self.cfg.swa_every == 0 and lr_scale < self.cfg.swa_lr_threshold
              and at_full_depth):
            self.swa.add(self.backend.get_weights())
            self.last_snapshot = step
            return True
        return False

    def finish(self, step: int) -> dict[str, np.ndarray] | None:
        """The averaged weights after the last step (None without averaging). SWA adds the final weights
        unless its newest snapshot is of them."""
        if self.kind == EMA:
            return self.backend.get_average()
        if self.kind == SWA:
            if self.last_snapshot != step:
                self.swa.add(self.backend.get_weights())
                self.last_snapshot = step
            return self.swa.mean()
        return None

    @property
    def count(self) -> int:
        """EMA: steps averaged; SWA: snapshots averaged."""
        return self.ema_steps if self.kind == EMA else self.swa.count

    def state(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """(tensors named average.<param>, JSON record) for a checkpoint; None without averaging."""
        if self.kind == EMA:
            tensors = {PREFIX + k: v for k, v in self.backend.get_average().items()}
            return tensors, {"kind": EMA, "count": self.ema_steps}
        if self.kind == SWA:
            tensors = {PREFIX + k: v for k, v in self.swa.sums.items()}
            return tensors, {"kind": SWA, "count": self.swa.count, "last_snapshot": self.last_snapshot}
        return None
