"""Muon for block matrices, Adam for the rest, as pure functions over explicit state (compile-friendly).

Mirrors the torch backend's optim.py. Upstream's maths: Newton-Schulz with 5 quintic steps, Nesterov
momentum, update scaled by sqrt(max(1, rows/cols)); Adam with bias correction. On MLX the
Newton-Schulz iteration runs in float32, as upstream's MLX script does. Decoupled weight decay
(optim.<group>_weight_decay, core.schedule.weight_decays) scales a parameter by 1 - lr * wd with its
group's lr, before the step or, with optim.weight_decay_after_step, after it. MuonEq-R
(optim.muon_row_normalize, #1394/#1493): each row of the Nesterov update is divided by its L2 norm (at
least 1e-7) before Newton-Schulz.
"""

from __future__ import annotations

import mlx.core as mx

from core.config import OptimConfig
from core.params import MATRIX, param_table
from core.spec import ModelSpec
from core.schedule import group_base_lrs, weight_decays

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: mx.array, steps: int, eps: float = 1e-7) -> mx.array:
    """Approximately orthogonalise g (the zeroth power of its singular values)."""
    a, b, c = NS_COEFFS
    x = g.astype(mx.float32)
    x = x / (mx.sqrt(mx.sum(x * x)) + eps)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if transposed else x


def normalize_rows(g: mx.array, eps: float = 1e-7) -> mx.array:
    """MuonEq-R: each row of g divided by its L2 norm, clamped below at eps."""
    return g / mx.maximum(mx.sqrt(mx.sum(g * g, axis=-1, keepdims=True)), eps)


def init_state(spec: ModelSpec) -> dict:
    """{"step": Adam's step count, "muon": {name: momentum}, "adam": {name: {"m", "v"}}}."""
    state = {"step": mx.array(0.0), "muon": {}, "adam": {}}
    for info in param_table(spec):
        zeros = mx.zeros(info.shape, mx.float32)
        if info.group == MATRIX:
            state["muon"][info.name] = zeros
        else:
            state["adam"][info.name] = {"m": zeros, "v": mx.zeros_like(zeros)}
    return state


def clip_by_global_norm(grads: dict, max_norm: float) -> dict:
    if max_norm <= 0:
        return grads
    total = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for g in grads.values()))
    factor = mx.minimum(max_norm / (total + 1e-6), 1.0)
    return {k: g * factor for k, g in grads.items()}


def apply_step(p: mx.array, delta: mx.array, lr: mx.array, wd: float, after: bool) -> mx.array:
    """p - delta with decoupled weight decay wd: p * (1 - lr wd) - delta, or (p - delta) * (1 - lr wd) after it."""
    if not wd:
        return p - delta
    if after:
        return (p - delta) * (1 - lr * wd)
    return p * (1 - lr * wd) - delta


def make_update(spec: ModelSpec, optim: OptimConfig):
    """update(params, state, grads, lr_scale, momentum) -> (params, state), with lr_scale and momentum as
    0-d arrays so a compiled update is traced once."""
    groups = {info.name: info.group for info in param_table(spec)}
    base_lr = group_base_lrs(spec, optim)
    decay, after = weight_decays(spec, optim), optim.weight_decay_after_step

    def muon_direction(p, buf, g, momentum):
        """(Muon's direction for p, the new momentum buffer): torch's muon_direction, returning the buffer
        torch updates in place."""
        buf = momentum * buf + g
        g = g + momentum * buf
        if optim.muon_row_normalize:
            g = normalize_rows(g)
        u = newton_schulz(g, optim.muon_backend_steps)
        return u * max(1.0, p.shape[0] / p.shape[1]) ** 0.5, buf

    def adam(params: dict, state: dict, grads: dict, lr_scale: mx.array):
        """Adam on every tensor that is not a matrix: (those tensors stepped, the new step count, the moments)."""
        step = state["step"] + 1
        bias1 = 1 - optim.beta1**step
        bias2 = 1 - optim.beta2**step
        stepped, moments = {}, {}
        for name, p in params.items():
            if groups[name] == MATRIX:
                continue
            s, g = state["adam"][name], grads[name]
            lr = base_lr[groups[name]] * lr_scale
            m = optim.beta1 * s["m"] + (1 - optim.beta1) * g
            v = optim.beta2 * s["v"] + (1 - optim.beta2) * (g * g)
            stepped[name] = apply_step(p, lr * (m / bias1) / (mx.sqrt(v / bias2) + optim.adam_eps), lr,
                                       decay.get(name, 0.0), after)
            moments[name] = {"m": m, "v": v}
        return stepped, step, moments

    def update(params: dict, state: dict, grads: dict, lr_scale: mx.array, momentum: mx.array):
        grads = clip_by_global_norm(grads, optim.grad_clip_norm)
        stepped, muon = {}, {}
        for name, p in params.items():
            if groups[name] == MATRIX:
                lr = base_lr[MATRIX] * lr_scale
                u, muon[name] = muon_direction(p, state["muon"][name], grads[name], momentum)
                stepped[name] = apply_step(p, lr * u, lr, decay.get(name, 0.0), after)
        adam_stepped, step, moments = adam(params, state, grads, lr_scale)
        stepped.update(adam_stepped)
        return {name: stepped[name] for name in params}, {"step": step, "muon": muon, "adam": moments}

    return update
