"""Score-first TTT's optimizer for the MLX backend (core/ttt.py drives it), the mirror of
the torch backend's TTT optimizer: SGD with momentum over every weight (not Nesterov, no weight decay), on gradients
clipped to a global norm as torch's clip_grad_norm_ does. One rank: there is nothing to average.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class TTTOptimizer:
    def __init__(self, backend, momentum: float, grad_clip: float, token_losses):
        self.backend, self.momentum, self.grad_clip = backend, momentum, grad_clip
        self.loss_and_grad = mx.value_and_grad(lambda p, x, y, scale: token_losses(p, x, y).sum() * scale)
        # The momentum buffer, carried across chunks; zero at the start equals SGD's first-step copy of g.
        self.buffers = {k: mx.zeros_like(v) for k, v in backend.params.items()}

    def step(self, x: np.ndarray, y: np.ndarray, loss_scale: float, lr: float) -> None:
        b = self.backend
        _, grads = self.loss_and_grad(b.params, mx.array(x), mx.array(y), mx.array(loss_scale, mx.float32))
        if self.grad_clip > 0:
            norm = mx.sqrt(sum(mx.sum(mx.square(g)) for g in grads.values()))
            coef = mx.minimum(self.grad_clip / (norm + 1e-6), 1.0)
            grads = {k: g * coef for k, g in grads.items()}
        self.buffers = {k: self.buffers[k] * self.momentum + grads[k] for k in self.buffers}
        b.params = {k: p - lr * self.buffers[k] for k, p in b.params.items()}
        mx.eval(b.params, self.buffers)
