"""Distribution from torchrun's environment: NCCL on CUDA, gloo on CPU, explicit collectives.

No DDP wrapper: shared blocks run many times per step, so gradients are averaged explicitly after
accumulation, in one flat all-reduce. World size 1 (no torchrun, or torchrun with one process) makes
no process group and every collective is the identity.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def default_device() -> torch.device:
    _, _, local_rank = env_ranks()
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (if more than one process). Returns (rank, world_size)."""
    rank, world_size, _ = env_ranks()
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return rank, world_size


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def device_ids(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Token ids (any integer numpy array) as an int64 tensor on `device`: the one way batches reach it."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)


def _comm_device(device: torch.device) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: np.ndarray, device: torch.device) -> np.ndarray:
    if not active():
        return values
    t = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_reduce_max(value: float, device: torch.device) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_grads(tensors: list[torch.Tensor]) -> None:
    """Average `tensors` across ranks in place, through one flat buffer (one collective per step)."""
    if not active():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))
