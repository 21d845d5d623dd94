"""Score-first TTT's optimizer for the torch backend (core/ttt.py drives it): plain SGD with momentum over
every weight, on gradients averaged across ranks and clipped to a global norm, as the record's
torch.optim.SGD (not Nesterov, no weight decay) after clip_grad_norm_. Eager, under the backend's autocast.
"""

from __future__ import annotations

import numpy as np
import torch

from backend_torch import dist


class TTTOptimizer:
    def __init__(self, backend, momentum: float, grad_clip: float, token_losses):
        self.backend, self.momentum, self.grad_clip = backend, momentum, grad_clip
        self.token_losses = token_losses  # (params, x, y) -> per-token losses, differentiable
        # The momentum buffer, carried across chunks; zero at the start equals SGD's first-step copy of g.
        self.buffers = [torch.zeros_like(p) for p in backend.params.values()]

    def step(self, x: np.ndarray, y: np.ndarray, loss_scale: float, lr: float) -> None:
        b = self.backend
        params = list(b.params.values())
        for p in params:
            p.grad = None
        if len(x):  # a rank with no sequence in this step still joins the all-reduce, with zeros
            with b.autocast():
                losses = self.token_losses(b.params, dist.device_ids(x, b.torch_device), dist.device_ids(y, b.torch_device))
            # all_reduce_grads averages over ranks; times world_size, that is the sum the step asks for.
            (losses.float().sum() * (loss_scale * b.world_size)).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dist.all_reduce_grads(grads)
        with torch.no_grad():
            if self.grad_clip > 0:  # clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when below 1
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                torch._foreach_mul_(grads, torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
            torch._foreach_mul_(self.buffers, self.momentum)
            torch._foreach_add_(self.buffers, grads)
            torch._foreach_add_(params, self.buffers, alpha=-lr)
        for p in params:
            p.grad = None
