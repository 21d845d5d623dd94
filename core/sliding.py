"""Sliding-window evaluation: every validation target scored exactly once, with the longest context its
window allows.

Target j (0 <= j < n) is tokens[j + 1], predicted after tokens[..j]. A window of length L starting at
p reads tokens[p : p + L], predicts tokens[p + 1 : p + L + 1] and scores the targets at offsets
[score_from, L), i.e. targets p + score_from .. p + L - 1. The plan:
  - windows at p = 0, S, 2S, ... while p + L <= n; the first scores all L targets, the others their
    last S (each after at least L - S tokens of context);
  - if those stop short of n, one right-aligned window (p = n - L) scores only the targets left over.
The seeds skip that tail (#1110) or score it several times (#895); here the scored targets are exactly
0..n-1, in order. S = L gives upstream's standard non-overlapping eval. Windows are split across ranks
in contiguous runs, batched (eval.batch_seqs windows per forward) and the float64 sums all-reduced.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.bpb import ByteLuts, bpb_from_sums, count_bytes
from core.errors import UserError
from core.hedge import WARMUP_TOKENS, HedgeMixer

GATHER_CHUNK = 1 << 22  # targets per all-reduce when the Hedge pass gathers per-token losses to rank 0


@dataclass(frozen=True)
class WindowPlan:
    starts: np.ndarray  # int64 (W,): first input position of each window
    score_from: np.ndarray  # int64 (W,): offset in the window of its first scored target
    window_len: int
    n_targets: int

    def __len__(self) -> int:
        return len(self.starts)

    def scored_targets(self, lo: int, hi: int) -> tuple[int, int]:
        """The target range [first, last + 1) that windows lo..hi-1 score (contiguous by construction)."""
        if lo >= hi:
            return 0, 0
        return int(self.starts[lo] + self.score_from[lo]), int(self.starts[hi - 1] + self.window_len)


def plan_windows(n_targets: int, window_len: int, stride: int) -> WindowPlan:
    """The windows for n_targets targets (len(tokens) - 1). A window never exceeds the split: with fewer
    targets than window_len, one window covers them all."""
    if n_targets < 1:
        raise UserError(f"sliding eval needs at least 2 validation tokens, got {n_targets + 1}")
    if window_len < 1 or stride < 1:
        raise UserError(f"sliding eval: window length {window_len} and stride {stride} must be positive")
    if stride > window_len:
        raise UserError(f"sliding eval: stride {stride} is longer than the window ({window_len} tokens); "
                        "the targets between windows would go unscored")
    length = min(window_len, n_targets)
    step = min(stride, length)
    full = (n_targets - length) // step + 1  # windows at k * step that end inside the split
    starts = np.arange(full, dtype=np.int64) * step
    score_from = np.full(full, length - step, dtype=np.int64)
    score_from[0] = 0
    covered = int(starts[-1]) + length
    if covered < n_targets:  # the tail: one right-aligned window scores only what is left
        starts = np.append(starts, n_targets - length)
        score_from = np.append(score_from, length - (n_targets - covered))
    return WindowPlan(starts, score_from, length, n_targets)


def rank_windows(num_windows: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous run of window indices [lo, hi)."""
    return num_windows * rank // world_size, num_windows * (rank + 1) // world_size


def window_batch(tokens: np.ndarray, starts: np.ndarray, window_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int64 (len(starts), window_len) for windows at `starts`."""
    chunk = np.asarray(tokens)[starts[:, None] + np.arange(window_len + 1)].astype(np.int64)
    return chunk[:, :-1], chunk[:, 1:]


@dataclass
class LocalSums:
    """One rank's part: float64 [loss nats, tokens, bytes] and, if asked, its targets' losses in order."""

    sums: np.ndarray
    target_range: tuple[int, int]
    token_nll: np.ndarray | None = None


def sliding_sums(backend, tokens: np.ndarray, plan: WindowPlan, batch_seqs: int, luts: ByteLuts,
                 keep_token_nll: bool = False, progress: Callable[[int, int], None] | None = None) -> LocalSums:
    """Score this rank's windows (backend.eval_token_losses per batch). No collective here."""
    lo, hi = rank_windows(len(plan), backend.rank, backend.world_size)
    length = plan.window_len
    offsets = np.arange(length)
    sums = np.zeros(3, np.float64)
    parts = []
    for s in range(lo, hi, batch_seqs):
        e = min(s + batch_seqs, hi)
        starts = plan.starts[s:e]
        # The last batch is padded with copies of its last window, so every forward has one shape (one
        # compiled graph); the copies' losses are dropped.
        padded = np.concatenate([starts, np.repeat(starts[-1:], batch_seqs - (e - s))])
        x, y = window_batch(tokens, padded, length)
        losses = np.asarray(backend.eval_token_losses(x, y))[: e - s]
        mask = offsets[None, :] >= plan.score_from[s:e, None]
        scored = losses[mask]
        sums[0] += scored.sum(dtype=np.float64)
        sums[1] += scored.size
        sums[2] += count_bytes(x[: e - s][mask], y[: e - s][mask], luts)
        if keep_token_nll:
            parts.append(scored.astype(np.float32))
        if progress is not None:
            progress(e - lo, hi - lo)
    target_range = plan.scored_targets(lo, hi)
    nll = None
    if keep_token_nll:
        nll = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        assert nll.size == target_range[1] - target_range[0], "windows score contiguous targets"
    return LocalSums(sums, target_range, nll)


def gather_token_nll(backend, local: LocalSums, n_targets: int) -> np.ndarray | None:
    """Every target's loss in order, on rank 0 (None on the others): chunked SUM all-reduces in which each
    rank fills its own range with its losses and the rest with zeros."""
    if backend.world_size == 1:
        return local.token_nll
    first, end = local.target_range
    out = np.empty(n_targets, np.float32) if backend.rank == 0 else None
    for a in range(0, n_targets, GATHER_CHUNK):
        b = min(a + GATHER_CHUNK, n_targets)
        buf = np.zeros(b - a, np.float64)
        lo, hi = max(a, first), min(b, end)
        if lo < hi:
            buf[lo - a : hi - a] = local.token_nll[lo - first : hi - first]
        buf = backend.all_reduce_sum(buf)
        if out is not None:
            out[a:b] = buf
    return out


@dataclass
class SlidingResult:
    val_loss: float
    val_bpb: float
    windows: int
    targets: int
    window_len: int
    stride: int
    hedge_val_loss: float | None = None
    hedge_val_bpb: float | None = None
    hedge_weights: list[float] | None = None  # the mixer's final expert weights (neural, unigram, bigram, trigram)
    hedge_mixed_targets: int | None = None  # targets past the mixer's warmup (before it, the model's loss counts)

    def hedge_note(self) -> str:
        """Says so when the stream was too short for the mixer to start (the Hedge bpb is then the sliding one)."""
        if self.hedge_mixed_targets:
            return ""
        return (f"; the mixer starts after {WARMUP_TOKENS:,} targets, so all {self.targets:,} here were scored by "
                "the model alone")


def sliding_eval(backend, tokens: np.ndarray, window_len: int, stride: int, batch_seqs: int, luts: ByteLuts,
                 hedge_eta: float | None = None, vocab_size: int | None = None,
                 progress: Callable[[int, int], None] | None = None, hedge_options: dict | None = None,
                 ) -> SlidingResult:
    """Sliding-window (val_loss, val_bpb) over all of `tokens`; with hedge_eta, also the Hedge mixer's
    (core/hedge.py) over the same targets and bytes, mixed on rank 0 and shared with the other ranks.
    hedge_options: further HedgeMixer arguments (tests shorten its warmup)."""
    plan = plan_windows(len(tokens) - 1, window_len, stride)
    hedge = hedge_eta is not None
    local = sliding_sums(backend, tokens, plan, batch_seqs, luts, keep_token_nll=hedge, progress=progress)
    sums = backend.all_reduce_sum(local.sums)
    if int(sums[1]) != plan.n_targets:  # a broken plan would silently change the number
        raise AssertionError(f"sliding eval scored {int(sums[1])} targets, expected {plan.n_targets}")
    loss, bpb = bpb_from_sums(sums[0], sums[1], sums[2])
    result = SlidingResult(loss, bpb, len(plan), plan.n_targets, plan.window_len, min(stride, plan.window_len))
    if hedge:
        nll = gather_token_nll(backend, local, plan.n_targets)
        hedge_sum = np.zeros(3, np.float64)  # mixed loss nats, the neural loss as a cross-check, mixed targets
        weights = np.zeros(4, np.float64)
        if backend.rank == 0:
            mixer = HedgeMixer(vocab_size or int(np.max(tokens)) + 1, eta=hedge_eta, **(hedge_options or {}))
            hedge_sum[0] = mixer.run_stream(np.asarray(tokens), nll)
            hedge_sum[1] = nll.sum(dtype=np.float64)
            hedge_sum[2] = mixer.mixed
            weights = mixer.weights
        hedge_sum = backend.all_reduce_sum(hedge_sum)
        weights = backend.all_reduce_sum(weights)
        result.hedge_val_loss, result.hedge_val_bpb = bpb_from_sums(hedge_sum[0], sums[1], sums[2])
        result.hedge_weights = [float(w) for w in weights]
        result.hedge_mixed_targets = int(hedge_sum[2])
        # The gathered losses must add up to the sliding sum (float32 per token, so a relative tolerance).
        if not math.isclose(hedge_sum[1], sums[0], rel_tol=1e-5, abs_tol=1e-3):
            raise AssertionError(f"gathered per-token losses sum to {hedge_sum[1]}, the sliding sum is {sums[0]}")
    return result


def eval_window_len(cfg) -> int:
    """eval.seq_len, or train.seq_len when it is 0."""
    return cfg.eval.seq_len or cfg.train.seq_len


def final_sliding_eval(backend, val_tokens: np.ndarray, cfg, luts: ByteLuts, log, label: str) -> dict:
    """For Trainer.export: with eval.stride > 0, the sliding (and Hedge) eval of the weights the backend
    holds, logged after `label`; returns the final record's extra fields ({} when eval.stride is 0)."""
    ev = cfg.eval
    if ev.stride <= 0:
        return {}
    t0 = time.perf_counter()
    r = sliding_eval(backend, val_tokens, eval_window_len(cfg), ev.stride, ev.batch_seqs, luts,
                     hedge_eta=ev.hedge_eta if ev.hedge else None, vocab_size=cfg.model.vocab_size)
    ms = 1000 * (time.perf_counter() - t0)
    log.line(f"{label}_sliding val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} seq_len:{r.window_len} "
             f"stride:{r.stride} windows:{r.windows} eval_time:{ms:.0f}ms")
    log.line(f"{label}_sliding_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    extra = {"sliding_val_loss": r.val_loss, "sliding_val_bpb": r.val_bpb, "sliding_seq_len": r.window_len,
             "sliding_stride": r.stride}
    if ev.hedge:
        log.line(f"{label}_hedge val_loss:{r.hedge_val_loss:.4f} val_bpb:{r.hedge_val_bpb:.4f} "
                 f"(beside the sliding bpb, not instead; no entropy expert{r.hedge_note()}) weights:"
                 + ",".join(f"{w:.3f}" for w in r.hedge_weights))
        extra.update(hedge_val_loss=r.hedge_val_loss, hedge_val_bpb=r.hedge_val_bpb,
                     hedge_mixed_targets=r.hedge_mixed_targets)
    return extra
