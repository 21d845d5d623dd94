"""The MLX backend behind core.loop: compiled gradient and update steps over explicit state."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from core.config import OptimConfig, TrainConfig
from core.depth import DepthVariant, depth_variant, row_selectors
from core.spec import ModelSpec
from backend_mlx.model import logits, mean_loss, token_losses
from backend_mlx.optim import init_state, make_update
from backend_mlx.qat import fake_quant
from core.fakequant import fake_quant_plan


def resolve_dtype(name: str):
    if name == "auto":
        # bf16 on Metal; on CPU fp32, since MLX's CPU bf16 matrix products get no BLAS.
        return mx.bfloat16 if mx.metal.is_available() else mx.float32
    return {"float32": mx.float32, "bfloat16": mx.bfloat16}[name]


def rows_view(rows):
    """The weights as a depth stage reads them (core.depth.DepthVariant.rows): each listed table cut to the
    stage's rows (core.depth.row_selectors); the gradients go back into the full tables."""
    if not rows:
        return lambda p: p
    selectors = row_selectors(rows)

    def view(p):
        p = dict(p)
        for name, sel in selectors:
            p[name] = p[name][sel if isinstance(sel, slice) else mx.array(sel)]
        return p

    return view


class MLXBackend:
    name = "mlx"
    rank = 0
    world_size = 1

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], train: TrainConfig, optim: OptimConfig):
        self.spec = spec
        self.dtype = resolve_dtype(train.compute_dtype)
        self.device = f"{'metal' if mx.metal.is_available() else 'cpu'} ({str(self.dtype).split('.')[-1]})"
        self.params = {k: mx.array(v, dtype=mx.float32) for k, v in weights.items()}
        self.state = init_state(spec)
        self._update_fn = make_update(spec, optim)
        self._update = mx.compile(self._update_fn)
        self._qat = None  # (plan, noise) while QAT is on: see set_qat
        self._qat_settings: dict = {}  # (scheme, noise) -> (plan, noise), each built once
        self._eval_fns: dict = {}  # (kind, layers) -> eval function, built on first use
        self._depth_schedule = train.depth_schedule  # the stages set_depth switches between (core.depth)
        self._average = None  # the EMA, on the device: see average_update
        self._depth_variants: dict[tuple, tuple] = {}  # (layers, QAT setting) -> (fused, grad, loss_sum), compiled once
        self.set_depth(spec.num_layers)

    def _build_steps(self, variant: DepthVariant) -> tuple:
        dtype, update, spec, rows = self.dtype, self._update_fn, variant.spec, rows_view(variant.rows)
        qat = self._qat  # QAT transforms the full params, then the stage takes its rows (backend_mlx/qat.py)
        train_view = (lambda p: rows(fake_quant(p, qat[0], noise=qat[1]))) if qat else rows
        eval_view = (lambda p: rows(fake_quant(p, qat[0]))) if qat else rows
        loss_and_grad = mx.value_and_grad(lambda p, x, y: mean_loss(spec, train_view(p), x, y, dtype))

        def fused_step(params, state, x, y, lr_scale, momentum):
            loss, grads = loss_and_grad(params, x, y)
            params, state = update(params, state, grads, lr_scale, momentum)
            return loss, params, state

        # One compiled step when a step is one micro-batch; otherwise compiled gradients per micro-batch
        # (forced at each boundary so memory stays bounded on small Macs) and a compiled update.
        # Noisy QAT draws random numbers inside the compiled step: MLX needs the generator state passed along.
        random = {"inputs": mx.random.state, "outputs": mx.random.state} if qat and qat[1] else {}
        return (mx.compile(fused_step, **random), mx.compile(loss_and_grad, **random),
                mx.compile(lambda p, x, y: token_losses(spec, eval_view(p), x, y, dtype).sum()))

    def set_depth(self, layers: int) -> None:
        """Train and evaluate the depth schedule's stage of `layers` effective layers (core.depth.depth_variant:
        the first `layers` layers, or an earlier plan reading its rows of the full tables) over the same weights
        and optimizer state (a tensor the depth never reads gets a zero gradient)."""
        key = (layers, self._qat and id(self._qat))  # one compiled set per depth and QAT setting
        if key not in self._depth_variants:
            self._depth_variants[key] = self._build_steps(depth_variant(self.spec, layers, self._depth_schedule))
        self._fused, self._grad, self._loss_sum = self._depth_variants[key]
        self.layers = layers

    def set_qat(self, scheme: str | None, noise: bool = False) -> None:
        """Train and evaluate through straight-through fake quantization for `scheme` (None: off). Each
        setting compiles once and is kept, so a late switch costs one extra compile, not one per step."""
        key = (scheme, noise)
        plans = self._qat_settings
        if scheme is not None and key not in plans:
            shapes = {k: tuple(v.shape) for k, v in self.params.items()}
            plans[key] = (fake_quant_plan(shapes, scheme), noise)
        self._qat = plans[key] if scheme is not None else None
        self.set_depth(self.layers)

    # ---- weight averaging (core.averaging) -----------------------------------------------------------

    def average_update(self, decay: float) -> None:
        """One EMA step, e <- decay * e + (1 - decay) * w, on the device: it runs after every step, and a
        copy of every weight to the host per step would cost more than the update itself."""
        if self._average is None:
            self.set_average(None)
        d = mx.array(decay, mx.float32)
        self._average = self._ema_step(self._average, self.params, d)
        mx.eval(self._average)

    @staticmethod
    @mx.compile
    def _ema_step(avg, params, d):
        return {k: avg[k] * d + params[k] * (1 - d) for k in avg}

    def set_average(self, weights: dict[str, np.ndarray] | None) -> None:
        """Start the EMA at `weights` (a checkpoint's), or at the current weights when None."""
        if weights is None:
            self._average = dict(self.params)  # MLX arrays are immutable: references are a copy
        else:
            self._average = {k: mx.array(np.asarray(weights[k], dtype=np.float32)) for k in self.params}

    def get_average(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._average.items()}

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

    def _eval_fn(self, kind: str, make):
        """An eval function for the active depth, built (and compiled) on first use."""
        cache, layers = self._eval_fns, self.layers
        if (kind, layers) not in cache:
            variant = depth_variant(self.spec, layers, self._depth_schedule)
            fn, rows = make(variant.spec, self.dtype), rows_view(variant.rows)
            cache[kind, layers] = (lambda p, *args: fn(rows(p), *args)) if variant.rows else fn
        return cache[kind, layers]

    def eval_token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-token cross-entropy in nats, float32 (batch, seq): the sliding-window eval's input."""
        def make(spec, dtype):
            return mx.compile(lambda p, x, y: token_losses(spec, p, x, y, dtype))

        fn = self._eval_fn("token_losses", make)
        return np.array(fn(self.params, mx.array(x), mx.array(y)), dtype=np.float32)

    def ttt_optimizer(self, momentum: float, grad_clip: float):
        """Score-first TTT's SGD over every weight (core/ttt.py) at the active depth."""
        from backend_mlx.ttt import TTTOptimizer

        def make(spec, dtype):
            return lambda p, x, y: token_losses(spec, p, x, y, dtype)

        return TTTOptimizer(self, momentum, grad_clip, self._eval_fn("ttt_token_losses", make))

    def eval_log_probs(self, x: np.ndarray) -> np.ndarray:
        """Log-softmax of the soft-capped logits, float32 (batch, seq, vocab): the neural expert's full
        distribution (for checks; the Hedge eval needs only the targets' losses)."""
        def make(spec, dtype):
            def log_probs(p, x):
                z = logits(spec, p, x, dtype)
                return z - mx.logsumexp(z, axis=-1, keepdims=True)

            return log_probs

        fn = self._eval_fn("log_probs", make)
        return np.array(fn(self.params, mx.array(x)), dtype=np.float32)

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

    def hessians(self, batches) -> dict[str, np.ndarray]:
        """{matrix name: H = sum x^T x (float64)} of each linear's inputs over `batches` (core.gptq)."""
        from backend_mlx.hessian import collect_hessians

        return collect_hessians(self.spec, self.params, batches, self.dtype)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def all_reduce_max(self, value: float) -> float:
        return value

    def close(self) -> None:
        """Nothing to release: MLX runs on one process."""
