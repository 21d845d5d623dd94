"""The part of core.loop.Backend that the tests' numpy stand-ins share: one rank, weights and optimizer
state held as numpy copies, snapshots that are just the state. Each stand-in adds its own train_step,
eval_loss_sum and whatever it records."""

from __future__ import annotations

import numpy as np


class StandInBackend:
    name, rank, world_size, device = "fake", 0, 1, "cpu"

    def __init__(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray] | None = None):
        self.weights, self.optimizer = weights, optimizer or {}

    def get_weights(self):
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights):
        self.weights = {k: np.array(v) for k, v in weights.items()}

    def get_state(self):
        return self.get_weights(), {k: v.copy() for k, v in self.optimizer.items()}

    def set_state(self, weights, optimizer):
        self.set_weights(weights)
        self.optimizer = {k: np.array(v) for k, v in optimizer.items()}

    def snapshot(self):
        return self.get_state()

    def restore(self, snap):
        self.set_state(*snap)

    def all_reduce_sum(self, values):
        return values

    def all_reduce_max(self, value):
        return value
