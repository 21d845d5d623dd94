"""The PyTorch backend behind core.loop: explicit gradients, Muon/Adam over plain tensors, torchrun ranks.

CUDA: the loss is torch.compile'd (fullgraph, static shapes) under bf16 autocast, flash attention,
TF32. CPU: eager float32, for parity tests and small runs. Each rank trains on its own slice of every
batch (core.loop slices by rank); gradients and the loss are averaged across ranks once per step.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from backend_torch import dist
from backend_torch.model import mean_loss, token_losses
from backend_torch.optim import init_state, make_update
from core.config import OptimConfig, TrainConfig
from core.spec import ModelSpec


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def configure_cpu_threads() -> None:
    """One process per core share: torchrun runs several ranks on one machine."""
    if "OMP_NUM_THREADS" in os.environ:
        return  # the user's (or the launcher's) choice
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def configure_cuda(dtype: torch.dtype) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if dtype == torch.bfloat16:  # flash attention only, as upstream (it has no float32 kernel)
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)


def _clone(tree):
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree.detach().clone()


def _copy_into(dst, src) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _copy_into(dst[k], v)
        else:
            dst[k].copy_(v)


class TorchTrainer:
    name = "torch"

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], train: TrainConfig, optim: OptimConfig,
                 device=None):
        self.spec = spec
        self.torch_device = torch.device(device) if device is not None else dist.default_device()
        self.rank, self.world_size = dist.setup(self.torch_device)
        cuda = self.torch_device.type == "cuda"
        self.dtype = resolve_dtype(train.compute_dtype, self.torch_device)
        self.device = f"{self.torch_device} ({str(self.dtype).split('.')[-1]})"
        if cuda:
            configure_cuda(self.dtype)
        else:
            configure_cpu_threads()
        # bf16 autocast on CUDA around the explicit casts in the model (upstream's setting).
        autocast = cuda and self.dtype == torch.bfloat16
        self._autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        self.params = {k: torch.tensor(v, dtype=torch.float32, device=self.torch_device).requires_grad_(True)
                       for k, v in weights.items()}
        self.state = init_state(spec, self.torch_device)
        self._update = make_update(spec, optim, self.rank, self.world_size,
                                   ns_dtype=torch.bfloat16 if cuda else torch.float32, compile=cuda)
        dtype = self.dtype

        def loss_fn(p, x, y):
            return mean_loss(spec, p, x, y, dtype)

        def loss_sum_fn(p, x, y):
            return token_losses(spec, p, x, y, dtype).sum()

        compile_fn = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if cuda else (lambda f: f)
        self._loss = compile_fn(loss_fn)
        self._loss_sum = compile_fn(loss_sum_fn)
        self._lr = torch.zeros((), dtype=torch.float32, device=self.torch_device)
        self._momentum = torch.zeros((), dtype=torch.float32, device=self.torch_device)

    def train_step(self, micro_batches, lr_scale: float, momentum: float) -> float:
        total = sum(x.size for x, _ in micro_batches)
        for p in self.params.values():
            p.grad = None
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.torch_device)
        for x, y in micro_batches:
            w = x.size / total  # weight each micro-batch by its share of the tokens
            with self._autocast():
                loss = self._loss(self.params, _to_device(x, self.torch_device), _to_device(y, self.torch_device))
            (loss * w).backward()
            loss_sum += loss.detach() * w
        grads = {k: p.grad for k, p in self.params.items()}
        dist.all_reduce_grads([*grads.values(), loss_sum])  # the mean over ranks, the loss with them
        self._lr.fill_(lr_scale)
        self._momentum.fill_(momentum)
        self._update(self.params, self.state, grads, self._lr, self._momentum)
        return loss_sum.item()

    @torch.no_grad()
    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = _to_device(x, self.torch_device), _to_device(y, self.torch_device)
        with self._autocast():
            return float(self._loss_sum(self.params, x, y).item())

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in self.params.items()}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        for k, p in self.params.items():
            p.copy_(torch.as_tensor(np.asarray(weights[k], dtype=np.float32)))

    def snapshot(self):
        return _clone(self.params), _clone(self.state)

    @torch.no_grad()
    def restore(self, snap) -> None:
        params, state = snap
        _copy_into(self.params, params)  # in place: compiled graphs keep their inputs
        _copy_into(self.state, state)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return dist.all_reduce_sum(values, self.torch_device)

    def all_reduce_max(self, value: float) -> float:
        return dist.all_reduce_max(value, self.torch_device)

    def close(self) -> None:
        dist.shutdown()
