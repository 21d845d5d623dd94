"""The MLX backend behind core.loop: compiled gradient and update steps over explicit state."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from core.config import OptimConfig, TrainConfig
from core.spec import ModelSpec
from backend_mlx.model import mean_loss, token_losses
from backend_mlx.optim import init_state, make_update


def resolve_dtype(name: str):
    if name == "auto":
        # bf16 on Metal; on CPU fp32, since MLX's CPU bf16 matrix products get no BLAS.
        return mx.bfloat16 if mx.metal.is_available() else mx.float32
    return {"float32": mx.float32, "bfloat16": mx.bfloat16}[name]


class MLXTrainer:
    name = "mlx"
    rank = 0
    world_size = 1

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], train: TrainConfig, optim: OptimConfig):
        self.spec = spec
        self.dtype = resolve_dtype(train.compute_dtype)
        self.device = f"{'metal' if mx.metal.is_available() else 'cpu'} ({str(self.dtype).split('.')[-1]})"
        self.params = {k: mx.array(v, dtype=mx.float32) for k, v in weights.items()}
        self.state = init_state(spec, self.params)
        dtype = self.dtype
        update = make_update(spec, optim)
        loss_and_grad = mx.value_and_grad(lambda p, x, y: mean_loss(spec, p, x, y, dtype))

        def fused_step(params, state, x, y, lr_scale, momentum):
            loss, grads = loss_and_grad(params, x, y)
            params, state = update(params, state, grads, lr_scale, momentum)
            return loss, params, state

        # One compiled step when a step is one micro-batch; otherwise compiled gradients per micro-batch
        # (forced at each boundary so memory stays bounded on small Macs) and a compiled update.
        self._fused = mx.compile(fused_step)
        self._grad = mx.compile(loss_and_grad)
        self._update = mx.compile(update)
        self._loss_sum = mx.compile(lambda p, x, y: token_losses(spec, p, x, y, dtype).sum())

    def train_step(self, micro_batches, lr_scale: float, momentum: float) -> float:
        lr, mom = mx.array(lr_scale, mx.float32), mx.array(momentum, mx.float32)
        if len(micro_batches) == 1:
            (x, y), = micro_batches
            loss, self.params, self.state = self._fused(self.params, self.state, mx.array(x), mx.array(y), lr, mom)
            mx.eval(loss, self.params, self.state)
            return loss.item()
        total = sum(x.size for x, _ in micro_batches)
        acc, loss_sum = None, 0.0
        for x, y in micro_batches:
            w = x.size / total  # weight each micro-batch by its share of the tokens
            loss, grads = self._grad(self.params, mx.array(x), mx.array(y))
            acc = {k: g * w for k, g in grads.items()} if acc is None else {k: acc[k] + g * w for k, g in grads.items()}
            mx.eval(acc, loss)
            loss_sum += loss.item() * w
        self.params, self.state = self._update(self.params, self.state, acc, lr, mom)
        mx.eval(self.params, self.state)
        return loss_sum

    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self._loss_sum(self.params, mx.array(x), mx.array(y)).item())

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.params.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.params = {k: mx.array(weights[k], dtype=mx.float32) for k in self.params}

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(weights, optimizer state) as numpy, the optimizer flat with canonical names (core.checkpoint)."""
        opt = {"adam.step": np.array(self.state["step"], dtype=np.float32)}
        opt.update({f"muon.{k}": np.array(v) for k, v in self.state["muon"].items()})
        for k, s in self.state["adam"].items():
            opt[f"adam_m.{k}"], opt[f"adam_v.{k}"] = np.array(s["m"]), np.array(s["v"])
        return self.get_weights(), opt

    def set_state(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray]) -> None:
        self.set_weights(weights)
        arr = lambda a: mx.array(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.state = {
            "step": arr(optimizer["adam.step"]),
            "muon": {k: arr(optimizer[f"muon.{k}"]) for k in self.state["muon"]},
            "adam": {k: {"m": arr(optimizer[f"adam_m.{k}"]), "v": arr(optimizer[f"adam_v.{k}"])}
                     for k in self.state["adam"]},
        }

    def snapshot(self):
        return self.params, self.state  # MLX arrays are immutable: holding references is a copy

    def restore(self, snap) -> None:
        self.params, self.state = snap

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def all_reduce_max(self, value: float) -> float:
        return value
