"""Score-first test-time training (record #1493's legal TTT, RECORDS.md): the validation split in chunks,
each scored before the model trains on it, so no target is ever scored by a model that has seen it.

Chunks: the sliding windows (core/sliding.py) go to chunk `first scored target // chunk_tokens`, so chunk c
scores a contiguous run of targets that starts at its first window's first target (exactly
[c * C, (c + 1) * C) when C and the window are multiples of the stride, as in the record: 32,768 = 16 x 2048
with stride 64). For each chunk in order: score its windows (no gradient, split across ranks), then, except
after the last chunk, train on that chunk's own targets: its non-overlapping window-length sequences split
across ranks in contiguous runs, `epochs` passes of steps of at most `batch_seqs` sequences per rank, each
step one forward/backward, gradients averaged over all the step's tokens on all ranks, clipped to a global
norm, then SGD with momentum over every weight, the buffer carried across chunks, the learning rate cosine
over the chunk index. The score is the sum of the scored-before-trained losses only. The backend trains a
copy: its weights are put back at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.bpb import ByteLuts, bpb_from_sums
from core.errors import UserError
from core.sliding import WindowPlan, eval_window_len, plan_windows, rank_windows, sliding_sums, window_batch


@dataclass(frozen=True)
class TTTSettings:
    """The [eval] table's ttt_* keys (validated there, core/config.py EvalConfig)."""

    chunk_tokens: int = 32768
    epochs: int = 3
    lr: float = 0.005
    momentum: float = 0.9
    grad_clip: float = 1.0  # global gradient norm; 0: no clipping
    batch_seqs: int = 32  # training sequences per rank per step

    @classmethod
    def from_eval(cls, ev) -> "TTTSettings":
        return cls(ev.ttt_chunk_tokens, ev.ttt_epochs, ev.ttt_lr, ev.ttt_momentum, ev.ttt_grad_clip,
                   ev.ttt_batch_seqs)


@dataclass(frozen=True)
class TTTPlan:
    windows: WindowPlan
    chunk_windows: np.ndarray  # int64 (n_chunks + 1,): chunk c scores windows [chunk_windows[c], chunk_windows[c + 1])
    chunk_targets: np.ndarray  # int64 (n_chunks + 1,): ... which score targets [chunk_targets[c], chunk_targets[c + 1])

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_windows) - 1

    def chunk_plan(self, c: int) -> WindowPlan:
        """Chunk c's windows as a plan of their own (sliding_sums splits them across ranks)."""
        lo, hi = int(self.chunk_windows[c]), int(self.chunk_windows[c + 1])
        w = self.windows
        return WindowPlan(w.starts[lo:hi], w.score_from[lo:hi], w.window_len, w.n_targets)

    def train_starts(self, c: int) -> np.ndarray:
        """First input positions of chunk c's non-overlapping training sequences: sequence s reads tokens
        [s, s + L] and so predicts targets s .. s + L - 1, all of them scored in chunk c (a remainder shorter
        than L is not trained on)."""
        first, end = int(self.chunk_targets[c]), int(self.chunk_targets[c + 1])
        L = self.windows.window_len
        return first + L * np.arange((end - first) // L, dtype=np.int64)


def plan_ttt(n_targets: int, window_len: int, stride: int, chunk_tokens: int) -> TTTPlan:
    windows = plan_windows(n_targets, window_len, stride)
    if chunk_tokens < windows.window_len:
        raise UserError(f"eval.ttt_chunk_tokens = {chunk_tokens} is shorter than the sliding window "
                        f"({windows.window_len} tokens): a chunk must hold at least one training sequence")
    first_scored = windows.starts + windows.score_from
    chunk_of = first_scored // chunk_tokens
    n_chunks = int(chunk_of[-1]) + 1
    bounds = np.searchsorted(chunk_of, np.arange(n_chunks + 1), side="left").astype(np.int64)
    # Windows' first targets rise by at most one stride <= window <= chunk: no chunk is left empty.
    assert np.all(np.diff(bounds) > 0), "every chunk has a window"
    targets = np.append(first_scored[bounds[:-1]], n_targets).astype(np.int64)
    return TTTPlan(windows, bounds, targets)


def chunk_lr(lr: float, c: int, n_chunks: int) -> float:
    """Cosine from lr at chunk 0 to 0 at the last chunk (which is never trained on)."""
    if n_chunks <= 1:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * c / (n_chunks - 1)))


@dataclass(frozen=True)
class TTTStep:
    starts: np.ndarray  # this rank's sequences in the step (possibly none)
    step_tokens: int  # the step's target count over all ranks: the gradient is the mean over these


def epoch_steps(starts: np.ndarray, seq_len: int, rank: int, world_size: int, batch_seqs: int) -> list[TTTStep]:
    """One epoch over a chunk's sequences: each rank takes a contiguous run and goes through it in steps
    of at most batch_seqs; every rank takes the same number of steps (each ends in an all-reduce)."""
    runs = [rank_windows(len(starts), r, world_size) for r in range(world_size)]
    counts = np.array([hi - lo for lo, hi in runs], dtype=np.int64)
    n_steps = -(-int(counts.max()) // batch_seqs) if len(starts) else 0
    lo, hi = runs[rank]
    steps = []
    for s in range(n_steps):
        a, b = min(lo + s * batch_seqs, hi), min(lo + (s + 1) * batch_seqs, hi)
        global_seqs = int(np.clip(counts - s * batch_seqs, 0, batch_seqs).sum())
        steps.append(TTTStep(starts[a:b], global_seqs * seq_len))
    return steps


@dataclass
class TTTResult:
    val_loss: float
    val_bpb: float
    chunks: int
    steps: int  # optimizer steps taken
    chunk_sums: np.ndarray  # float64 (chunks, 3): [loss nats, targets, bytes] scored in each chunk, all ranks
    token_nll: np.ndarray | None = None  # this rank's scored targets' losses in order (keep_token_nll)


def score_chunk(backend, tokens, plan: TTTPlan, c: int, batch_seqs: int, luts: ByteLuts, keep_token_nll: bool):
    """Chunk c's [loss, targets, bytes] summed over ranks, and this rank's per-target losses (or None)."""
    local = sliding_sums(backend, tokens, plan.chunk_plan(c), batch_seqs, luts, keep_token_nll=keep_token_nll)
    return backend.all_reduce_sum(local.sums), local.token_nll


def train_chunk(backend, optimizer, tokens, plan: TTTPlan, c: int, lr: float, settings: TTTSettings) -> int:
    """`settings.epochs` passes over chunk c's sequences; returns the number of steps taken."""
    L = plan.windows.window_len
    steps = epoch_steps(plan.train_starts(c), L, backend.rank, backend.world_size, settings.batch_seqs)
    for _ in range(settings.epochs):
        for step in steps:
            x, y = window_batch(tokens, step.starts, L)
            optimizer.step(x, y, 1.0 / step.step_tokens, lr)
    return settings.epochs * len(steps)


def ttt_eval(backend, tokens: np.ndarray, window_len: int, stride: int, batch_seqs: int, luts: ByteLuts,
             settings: TTTSettings, keep_token_nll: bool = False,
             progress: Callable[[int, int], None] | None = None) -> TTTResult:
    """Score-first TTT over all of `tokens`. `backend` needs eval_token_losses, all_reduce_sum,
    get/set_weights and ttt_optimizer(momentum, grad_clip) -> an object whose step(x, y, loss_scale, lr) takes
    one SGD step on the gradient of loss_scale * (the summed token losses of x, y), summed over ranks
    (backend_*/ttt.py). batch_seqs: windows per scoring forward, as the sliding eval's."""
    plan = plan_ttt(len(tokens) - 1, window_len, stride, settings.chunk_tokens)
    n = plan.n_chunks
    start_weights = backend.get_weights()
    chunk_sums = np.zeros((n, 3), np.float64)
    nll_parts, steps = [], 0
    try:
        optimizer = backend.ttt_optimizer(settings.momentum, settings.grad_clip)
        for c in range(n):
            chunk_sums[c], nll = score_chunk(backend, tokens, plan, c, batch_seqs, luts, keep_token_nll)
            if nll is not None:
                nll_parts.append(nll)
            if c < n - 1:  # after scoring, never before: the next chunk is scored by a model that saw this one
                steps += train_chunk(backend, optimizer, tokens, plan, c, chunk_lr(settings.lr, c, n), settings)
            if progress is not None:
                progress(c + 1, n)
    finally:
        backend.set_weights(start_weights)
    total = chunk_sums.sum(axis=0)
    if int(total[1]) != plan.windows.n_targets:  # a broken plan would silently change the number
        raise AssertionError(f"TTT eval scored {int(total[1])} targets, expected {plan.windows.n_targets}")
    loss, bpb = bpb_from_sums(total[0], total[1], total[2])
    token_nll = np.concatenate(nll_parts) if keep_token_nll else None
    return TTTResult(loss, bpb, n, steps, chunk_sums, token_nll)


def final_ttt_eval(backend, val_tokens: np.ndarray, cfg, luts: ByteLuts, log, label: str) -> dict:
    """For Trainer.export, when eval.ttt is on: the score-first TTT eval of the weights the backend holds,
    logged after `label`; returns the final record's extra fields."""
    ev = cfg.eval
    settings = TTTSettings.from_eval(ev)
    t0 = time.perf_counter()
    r = ttt_eval(backend, val_tokens, eval_window_len(cfg), ev.stride, ev.batch_seqs, luts, settings)
    ms = 1000 * (time.perf_counter() - t0)
    log.line(f"{label}_ttt val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} chunks:{r.chunks} steps:{r.steps} "
             f"epochs:{settings.epochs} lr:{settings.lr:g} eval_time:{ms:.0f}ms")
    log.line(f"{label}_ttt_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    return {"ttt_val_loss": r.val_loss, "ttt_val_bpb": r.val_bpb, "ttt_chunks": r.chunks}
