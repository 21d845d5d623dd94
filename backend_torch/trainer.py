"""The PyTorch backend behind core.loop: explicit gradients, Muon/Adam over plain tensors, torchrun ranks.

CUDA: the loss and the optimizer update are torch.compile'd (fullgraph, static shapes: compiled.py) under
bf16 autocast, flash attention, TF32: one graph per depth and QAT variant, none recompiled across steps.
CPU: eager float32, for parity tests and small runs (train.compile = "on" compiles there too). Each rank
trains on its own slice of every batch (core.loop slices by rank); gradients and the loss are averaged
across ranks once per step.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.distributed as tdist

from backend_torch import dist
from backend_torch.compiled import compile_graph
from backend_torch.fused_loss import fused_token_losses
from backend_torch.model import logits, token_losses
from backend_torch.optim import init_state, make_update, muon_owners
from backend_torch.qat import fake_quant
from core.fakequant import fake_quant_plan
from core.config import OptimConfig, TrainConfig
from core.depth import DepthVariant, depth_variant, row_selectors
from core.params import param_table
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


def per_token_losses(compiled: bool, dtype: torch.dtype):
    """The per-token loss function: eager float32 (the CPU) fuses the head, softcap and cross-entropy into one
    chunked pass (fused_loss.py); compiled (CUDA), inductor fuses the written-out loss itself."""
    return fused_token_losses if not compiled and dtype == torch.float32 else token_losses


def _clone(tree):
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree.detach().clone()


def rows_view(rows):
    """The weights as a depth stage reads them (core.depth.DepthVariant.rows): each listed table cut to the
    stage's rows (core.depth.row_selectors); autograd sends the gradients back into the full tables."""
    if not rows:
        return lambda p: p
    selectors = row_selectors(rows)

    def view(p):
        p = dict(p)
        for name, sel in selectors:
            p[name] = p[name][sel]
        return p

    return view


def _copy_into(dst, src) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _copy_into(dst[k], v)
        else:
            dst[k].copy_(v)


class TorchBackend:
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
        # bf16 autocast on CUDA around the explicit casts in the model (upstream's setting). Public: code that
        # runs the model outside the trainer (depth_eval, hessians) must run it under the same context.
        autocast = cuda and self.dtype == torch.bfloat16
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        # In the parameter table's order, never the order of `weights`: gradients are all-reduced through one
        # flat buffer in this order, so it must be the same on every rank (a dict loaded from safetensors
        # comes in a different order in every process).
        self.params = {info.name: torch.tensor(weights[info.name], dtype=torch.float32, device=self.torch_device)
                       .requires_grad_(True) for info in param_table(spec)}
        self.state = init_state(spec, self.torch_device)
        self._owners = muon_owners(spec, self.world_size)
        self._compile = train.compile == "on" or (train.compile == "auto" and cuda)
        # Newton-Schulz in bf16 on CUDA (upstream's choice) unless the run asks for float32 throughout.
        ns_dtype = torch.bfloat16 if cuda and self.dtype == torch.bfloat16 else torch.float32
        self._update = make_update(spec, optim, self.rank, self.world_size, ns_dtype=ns_dtype, compile=self._compile)
        self._qat = None  # (plan, noise) while QAT is on: see set_qat
        self._qat_settings: dict = {}  # (scheme, noise) -> (plan, noise), each built once
        self._eval_fns: dict = {}  # (kind, layers) -> eval function, built on first use
        self._depth_schedule = train.depth_schedule  # the stages set_depth switches between (core.depth)
        self._average = None  # the EMA, on the device: see average_update
        self._depth_variants: dict[tuple, tuple] = {}  # (layers, QAT setting) -> (loss, loss_sum), compiled once
        self.set_depth(spec.num_layers)
        self._lr = torch.zeros((), dtype=torch.float32, device=self.torch_device)
        self._momentum = torch.zeros((), dtype=torch.float32, device=self.torch_device)

    def _build_steps(self, variant: DepthVariant) -> tuple:
        dtype, spec, rows = self.dtype, variant.spec, rows_view(variant.rows)
        qat = self._qat  # QAT transforms the full params, then the stage takes its rows (backend_torch/qat.py)
        train_view = (lambda p: rows(fake_quant(p, qat[0], noise=qat[1]))) if qat else rows
        eval_view = (lambda p: rows(fake_quant(p, qat[0]))) if qat else rows

        per_token = per_token_losses(self._compile, dtype)

        def loss_fn(p, x, y):
            return per_token(spec, train_view(p), x, y, dtype).mean()

        def loss_sum_fn(p, x, y):
            return per_token(spec, eval_view(p), x, y, dtype).sum()

        if not self._compile:
            return loss_fn, loss_sum_fn
        # Each depth and QAT setting is its own graph of the same functions (compiled.py keeps them all).
        return compile_graph(loss_fn), compile_graph(loss_sum_fn)

    def set_depth(self, layers: int) -> None:
        """Train and evaluate the depth schedule's stage of `layers` effective layers (core.depth.depth_variant:
        the first `layers` layers, or an earlier plan reading its rows of the full tables) over the same weights
        and optimizer state; each depth's compiled graphs are kept, so switching back costs nothing."""
        key = (layers, self._qat and id(self._qat))  # one compiled pair per depth and QAT setting
        if key not in self._depth_variants:
            self._depth_variants[key] = self._build_steps(depth_variant(self.spec, layers, self._depth_schedule))
        self._loss, self._loss_sum = self._depth_variants[key]
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

    @torch.no_grad()
    def average_update(self, decay: float) -> None:
        """One EMA step, e <- decay * e + (1 - decay) * w, on the device: it runs after every step, and a
        copy of every weight to the host per step would cost more than the update itself. Every rank holds
        the same weights, so every rank keeps the same average."""
        if self._average is None:
            self.set_average(None)
        avg = list(self._average.values())
        torch._foreach_mul_(avg, decay)
        torch._foreach_add_(avg, [self.params[k] for k in self._average], alpha=1.0 - decay)

    @torch.no_grad()
    def set_average(self, weights: dict[str, np.ndarray] | None) -> None:
        """Start the EMA at `weights` (a checkpoint's), or at the current weights when None."""
        if weights is None:
            self._average = {k: p.detach().clone() for k, p in self.params.items()}
        else:
            self._average = {k: torch.tensor(np.asarray(weights[k], dtype=np.float32), device=self.torch_device)
                             for k in self.params}

    def get_average(self) -> dict[str, np.ndarray]:
        return {k: v.to("cpu", torch.float32).numpy().copy() for k, v in self._average.items()}

    def train_step(self, micro_batches, lr_scale: float, momentum: float) -> float:
        total = sum(x.size for x, _ in micro_batches)
        for p in self.params.values():
            p.grad = None
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.torch_device)
        for x, y in micro_batches:
            w = x.size / total  # weight each micro-batch by its share of the tokens
            with self.autocast():
                loss = self._loss(self.params, dist.device_ids(x, self.torch_device), dist.device_ids(y, self.torch_device))
            (loss * w).backward()
            loss_sum += loss.detach() * w
        # A tensor the active depth never reads (e.g. cross_repeat_scales at one loop) gets no grad: zero.
        grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in self.params.items()}
        dist.all_reduce_grads([*grads.values(), loss_sum])  # the mean over ranks, the loss with them
        self._lr.fill_(lr_scale)
        self._momentum.fill_(momentum)
        self._update(self.params, self.state, grads, self._lr, self._momentum)
        return loss_sum.item()

    @torch.no_grad()
    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = dist.device_ids(x, self.torch_device), dist.device_ids(y, self.torch_device)
        with self.autocast():
            return float(self._loss_sum(self.params, x, y).item())

    def _eval_fn(self, kind: str, make):
        """An eval function for the active depth, built (and compiled) on first use."""
        cache, layers = self._eval_fns, self.layers
        if (kind, layers) not in cache:
            variant = depth_variant(self.spec, layers, self._depth_schedule)
            fn, rows = make(variant.spec, self.dtype), rows_view(variant.rows)
            cache[kind, layers] = (lambda p, *args: fn(rows(p), *args)) if variant.rows else fn
        return cache[kind, layers]

    @torch.no_grad()
    def eval_token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-token cross-entropy in nats, float32 (batch, seq): the sliding-window eval's input."""
        def make(spec, dtype):
            per_token = per_token_losses(self._compile, dtype)
            fn = lambda p, x, y: per_token(spec, p, x, y, dtype)  # noqa: E731
            return compile_graph(fn) if self._compile else fn

        fn = self._eval_fn("token_losses", make)
        x, y = dist.device_ids(x, self.torch_device), dist.device_ids(y, self.torch_device)
        with self.autocast():
            return fn(self.params, x, y).float().cpu().numpy()

    def ttt_optimizer(self, momentum: float, grad_clip: float):
        """Score-first TTT's SGD over every weight (core/ttt.py), eager at the active depth."""
        from backend_torch.ttt import TTTOptimizer

        def make(spec, dtype):
            per_token = per_token_losses(False, dtype)
            return lambda p, x, y: per_token(spec, p, x, y, dtype)

        return TTTOptimizer(self, momentum, grad_clip, self._eval_fn("ttt_token_losses", make))

    @torch.no_grad()
    def eval_log_probs(self, x: np.ndarray) -> np.ndarray:
        """Log-softmax of the soft-capped logits, float32 (batch, seq, vocab): the neural expert's full
        distribution (for checks; the Hedge eval needs only the targets' losses)."""
        def make(spec, dtype):
            return lambda p, x: torch.log_softmax(logits(spec, p, x, dtype), dim=-1)

        fn = self._eval_fn("log_probs", make)
        with self.autocast():
            return fn(self.params, dist.device_ids(x, self.torch_device)).float().cpu().numpy()

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in self.params.items()}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        for k, p in self.params.items():
            p.copy_(torch.as_tensor(np.asarray(weights[k], dtype=np.float32)))

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(weights, optimizer state) as numpy, the optimizer flat with canonical names. With several ranks a
        Muon momentum buffer lives only on its owner rank: each is broadcast from its owner (a collective:
        every rank calls this), so every rank returns the full state."""
        numpy = lambda t: t.detach().to("cpu", torch.float32).numpy().copy()  # noqa: E731
        opt = {"adam.step": numpy(self.state["step"])}
        for name, buf in self.state["muon"].items():
            if self.world_size > 1:
                buf = buf.detach().clone()
                tdist.broadcast(buf, src=self._owners[name])
            opt[f"muon.{name}"] = numpy(buf)
        for name, s in self.state["adam"].items():
            opt[f"adam_m.{name}"], opt[f"adam_v.{name}"] = numpy(s["m"]), numpy(s["v"])
        return self.get_weights(), opt

    @torch.no_grad()
    def set_state(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray]) -> None:
        """In place (compiled graphs keep their inputs). Every rank gets the full set and keeps the Muon
        buffers it owns; the others stay zero, as in a run that never stopped."""
        self.set_weights(weights)
        tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.state["step"].copy_(tensor(optimizer["adam.step"]))
        for name, buf in self.state["muon"].items():
            if self._owners[name] == self.rank:
                buf.copy_(tensor(optimizer[f"muon.{name}"]))
            else:
                buf.zero_()
        for name, s in self.state["adam"].items():
            s["m"].copy_(tensor(optimizer[f"adam_m.{name}"]))
            s["v"].copy_(tensor(optimizer[f"adam_v.{name}"]))

    def snapshot(self):
        return _clone(self.params), _clone(self.state)

    @torch.no_grad()
    def restore(self, snap) -> None:
        params, state = snap
        _copy_into(self.params, params)  # in place: compiled graphs keep their inputs
        _copy_into(self.state, state)

    def hessians(self, batches) -> dict[str, np.ndarray]:
        """{matrix name: H = sum x^T x (float64)} of each linear's inputs over `batches` (core.gptq), summed
        over ranks: a collective, every rank calls it with its own slice of the batches."""
        from backend_torch.hessian import collect_hessians

        local = collect_hessians(self.spec, self.params, batches, self.dtype, self.autocast)
        return {name: self.all_reduce_sum(h) for name, h in local.items()}

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return dist.all_reduce_sum(values, self.torch_device)

    def all_reduce_max(self, value: float) -> float:
        return dist.all_reduce_max(value, self.torch_device)

    def close(self) -> None:
        dist.shutdown()
