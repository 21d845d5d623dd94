"""Muon for block matrices, Adam for the rest, as functions over explicit state (plain tensors).

Mirrors the MLX backend's optim.py. Upstream's maths: Newton-Schulz with 5 quintic steps, Nesterov
momentum, update scaled by sqrt(max(1, rows/cols)); Adam with bias correction. Newton-Schulz runs in
bfloat16 on CUDA (upstream) and float32 on CPU (as MLX), chosen by the caller.

Distributed (upstream's Muon): the gradients are already averaged, so every rank holds the same ones.
Muon matrix i (param_table order) is orthogonalised only on rank i % world_size; each rank writes its
updates into one flat buffer (zeros elsewhere), a single all_reduce(SUM) shares them, and every rank
applies all of them. A rank's Muon buffers for matrices it does not own stay zero: to checkpoint them,
take each from its owner (or all_reduce_sum the buffers). Adam is replicated on every rank. Decoupled
weight decay (optim.<group>_weight_decay, core.schedule.weight_decays) scales a parameter by 1 - lr * wd
with its group's lr, before the step or, with optim.weight_decay_after_step, after it. MuonEq-R
(optim.muon_row_normalize, #1394/#1493): each row of the Nesterov update is divided by its L2 norm (at
least 1e-7) before Newton-Schulz.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from backend_torch.compiled import compile_graph
from core.config import OptimConfig
from core.params import MATRIX, param_table
from core.spec import ModelSpec
from core.schedule import group_base_lrs, weight_decays

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int, eps: float = 1e-7, dtype=torch.float32) -> torch.Tensor:
    """Approximately orthogonalise g (the zeroth power of its singular values)."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if transposed else x


def normalize_rows(g: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """MuonEq-R: each row of g divided by its L2 norm, clamped below at eps."""
    return g / torch.sqrt(torch.sum(g * g, dim=-1, keepdim=True)).clamp_min(eps)


def init_state(spec: ModelSpec, device="cpu") -> dict:
    """{"step": Adam's step count, "muon": {name: momentum}, "adam": {name: {"m", "v"}}}."""
    state = {"step": torch.zeros((), dtype=torch.float32, device=device), "muon": {}, "adam": {}}
    for info in param_table(spec):
        zeros = torch.zeros(info.shape, dtype=torch.float32, device=device)
        if info.group == MATRIX:
            state["muon"][info.name] = zeros
        else:
            state["adam"][info.name] = {"m": zeros, "v": torch.zeros_like(zeros)}
    return state


def muon_owners(spec: ModelSpec, world_size: int) -> dict[str, int]:
    """The rank that orthogonalises (and holds the momentum of) each Muon matrix: i % world_size."""
    matrices = [info.name for info in param_table(spec) if info.group == MATRIX]
    return {name: i % world_size for i, name in enumerate(matrices)}


def clip_by_global_norm(grads: dict, max_norm: float) -> dict:
    if max_norm <= 0:
        return grads
    total = torch.sqrt(sum(torch.sum(g.to(torch.float32) ** 2) for g in grads.values()))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {k: g * factor for k, g in grads.items()}


def apply_step_(p: torch.Tensor, delta: torch.Tensor, lr: torch.Tensor, wd: float, after: bool) -> None:
    """p -= delta in place with decoupled weight decay wd: p * (1 - lr wd) - delta, or (p - delta) * (1 - lr wd)."""
    if wd and not after:
        p.mul_(1 - lr * wd)
    p.sub_(delta)
    if wd and after:
        p.mul_(1 - lr * wd)


def make_update(spec: ModelSpec, optim: OptimConfig, rank: int = 0, world_size: int = 1,
                ns_dtype=torch.float32, compile: bool = False):
    """update(params, state, grads, lr_scale, momentum) updates params and state in place (no_grad), with
    lr_scale and momentum as 0-d tensors so a compiled update is traced once. compile: the whole update is
    one graph (clip, every Muon matrix, Adam); with several ranks, one graph before the all-reduce of the
    Muon updates and one after it (a collective inside a graph would tie it to the process group)."""
    infos = param_table(spec)
    groups = {info.name: info.group for info in infos}
    base_lr = group_base_lrs(spec, optim)
    decay, after = weight_decays(spec, optim), optim.weight_decay_after_step
    matrices = [info.name for info in infos if info.group == MATRIX]
    owned = [name for name, owner in muon_owners(spec, world_size).items() if owner == rank]

    def muon_direction(p, buf, g, momentum):
        buf.mul_(momentum).add_(g)  # buf = momentum * buf + g
        g = g + momentum * buf
        if optim.muon_row_normalize:
            g = normalize_rows(g)
        u = newton_schulz(g, optim.muon_backend_steps, dtype=ns_dtype)
        return u * max(1.0, p.shape[0] / p.shape[1]) ** 0.5

    def adam(params: dict, state: dict, grads: dict, lr_scale: torch.Tensor):
        state["step"].add_(1)
        step = state["step"]
        bias1 = 1 - optim.beta1**step
        bias2 = 1 - optim.beta2**step
        for name, s in state["adam"].items():
            p, g = params[name], grads[name]
            lr = base_lr[groups[name]] * lr_scale
            m = optim.beta1 * s["m"] + (1 - optim.beta1) * g
            v = optim.beta2 * s["v"] + (1 - optim.beta2) * (g * g)
            apply_step_(p, lr * (m / bias1) / (torch.sqrt(v / bias2) + optim.adam_eps), lr, decay.get(name, 0.0), after)
            s["m"].copy_(m)
            s["v"].copy_(v)

    def local_update(params: dict, state: dict, grads: dict, lr_scale: torch.Tensor, momentum: torch.Tensor):
        """All of the update but the all-reduce. One rank: applies Muon to every matrix. Several: returns this
        rank's Muon updates in one flat buffer (zeros for the matrices it does not own)."""
        grads = clip_by_global_norm(grads, optim.grad_clip_norm)
        flat = None
        if world_size == 1:
            lr = base_lr[MATRIX] * lr_scale
            for name in matrices:
                p = params[name]
                u = muon_direction(p, state["muon"][name], grads[name], momentum).to(p.dtype)
                apply_step_(p, lr * u, lr, decay.get(name, 0.0), after)
        else:
            sizes = [params[name].numel() for name in matrices]
            flat = torch.zeros(sum(sizes), dtype=ns_dtype, device=params[matrices[0]].device)
            chunks = dict(zip(matrices, flat.split(sizes)))
            for name in owned:
                p = params[name]
                chunks[name].copy_(muon_direction(p, state["muon"][name], grads[name], momentum).reshape(-1))
        adam(params, state, grads, lr_scale)  # Adam's tensors are not Muon's: the order does not matter
        return flat

    def apply_shared(params: dict, flat: torch.Tensor, lr_scale: torch.Tensor) -> None:
        lr = base_lr[MATRIX] * lr_scale
        sizes = [params[name].numel() for name in matrices]
        for name, chunk in zip(matrices, flat.split(sizes)):
            p = params[name]
            apply_step_(p, lr * chunk.view_as(p).to(p.dtype), lr, decay.get(name, 0.0), after)

    if compile:
        local_update, apply_shared = compile_graph(local_update), compile_graph(apply_shared)

    @torch.no_grad()
    def update(params: dict, state: dict, grads: dict, lr_scale: torch.Tensor, momentum: torch.Tensor) -> None:
        flat = local_update(params, state, grads, lr_scale, momentum)
        if world_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            apply_shared(params, flat, lr_scale)

    return update
