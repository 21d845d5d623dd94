"""The backend-neutral training loop: data, schedules, accumulation, validation, wallclock cap, export.

A backend provides (see `Backend`): train_step, eval_loss_sum, get_weights/set_weights,
snapshot/restore, and all_reduce_sum/all_reduce_max (identity on one process). Everything else lives
here, so both trainers run the same schedule and report the same numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from core import artifact as artifact_io
from core.bpb import ByteLuts, bpb_from_sums, count_bytes
from core.config import RunConfig
from core.params import count_params
from core.runlog import RunLog
from core.schedule import lr_multiplier, muon_momentum
from core.shards import TokenStream, next_batch
from core.size import code_bytes
from core.weights import save_weights


class Backend(Protocol):
    name: str
    rank: int
    world_size: int
    device: str

    def train_step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], lr_scale: float, momentum: float) -> float: ...
    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float: ...
    def get_weights(self) -> dict[str, np.ndarray]: ...
    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...
    def snapshot(self) -> object: ...
    def restore(self, snap: object) -> None: ...
    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray: ...
    def all_reduce_max(self, value: float) -> float: ...


def evaluate(backend: Backend, val_tokens: np.ndarray, seq_len: int, batch_tokens: int, luts: ByteLuts) -> tuple[float, float]:
    """Upstream's standard eval: non-overlapping windows of seq_len over the whole val split, sequences
    split across ranks, float64 sums all-reduced. Returns (val_loss in nats, val_bpb)."""
    total_seqs = (len(val_tokens) - 1) // seq_len
    start = total_seqs * backend.rank // backend.world_size
    end = total_seqs * (backend.rank + 1) // backend.world_size
    batch_seqs = max(batch_tokens // (backend.world_size * seq_len), 1)
    sums = np.zeros(3, np.float64)  # loss nats, tokens, bytes
    for s in range(start, end, batch_seqs):
        e = min(s + batch_seqs, end)
        chunk = np.asarray(val_tokens[s * seq_len : e * seq_len + 1], dtype=np.int64)
        x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
        sums[0] += backend.eval_loss_sum(x, y)
        sums[1] += y.size
        sums[2] += count_bytes(x.reshape(-1), y.reshape(-1), luts)
    sums = backend.all_reduce_sum(sums)
    return bpb_from_sums(sums[0], sums[1], sums[2])


class Trainer:
    def __init__(self, cfg: RunConfig, backend: Backend, train_files: list, val_tokens: np.ndarray, luts: ByteLuts, log: RunLog):
        self.cfg, self.backend, self.train_files = cfg, backend, train_files
        self.val_tokens, self.luts, self.log = val_tokens, luts, log
        t = cfg.train
        per_rank = t.batch_tokens // (backend.world_size * t.grad_accum_steps)
        if per_rank < t.seq_len or per_rank % t.seq_len:
            raise_batch_error(t.batch_tokens, backend.world_size, t.grad_accum_steps, t.seq_len)

    def _batches(self, stream: TokenStream) -> list[tuple[np.ndarray, np.ndarray]]:
        t, b = self.cfg.train, self.backend
        return [
            next_batch(stream, t.batch_tokens, t.seq_len, t.grad_accum_steps, b.rank, b.world_size)
            for _ in range(t.grad_accum_steps)
        ]

    def _validate(self) -> tuple[float, float]:
        t = self.cfg.train
        return evaluate(self.backend, self.val_tokens, t.seq_len, t.val_batch_tokens, self.luts)

    def prime(self) -> None:
        """Upstream's warmup: real steps to compile and warm allocators, then restore the initial state."""
        t = self.cfg.train
        if t.warmup_steps <= 0:
            return
        snap = self.backend.snapshot()
        stream = TokenStream(self.train_files)
        for i in range(t.warmup_steps):
            self.backend.train_step(self._batches(stream), 1.0, muon_momentum(0, self.cfg.optim))
            if t.warmup_steps <= 20 or (i + 1) % 10 == 0 or i + 1 == t.warmup_steps:
                self.log.line(f"warmup_step:{i + 1}/{t.warmup_steps}")
        self.backend.restore(snap)

    def run(self) -> dict:
        cfg, t, b, log = self.cfg, self.cfg.train, self.backend, self.log
        self.prime()
        stream = TokenStream(self.train_files)
        cap_ms = t.max_wallclock_seconds * 1000.0 if t.max_wallclock_seconds > 0 else None
        train_ms, step, stop_after = 0.0, 0, None
        val_loss = val_bpb = float("nan")
        progress = log.progress(t.iterations)
        t0 = time.perf_counter()
        while True:
            last = step == t.iterations or (stop_after is not None and step >= stop_after)
            if last or (t.val_every > 0 and step % t.val_every == 0):
                train_ms += 1000 * (time.perf_counter() - t0)
                val_loss, val_bpb = self._validate()
                log.line(
                    f"step:{step}/{t.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms"
                )
                log.event("val", step=step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=train_ms)
                t0 = time.perf_counter()  # validation time is not training time
            if last:
                if stop_after is not None and step < t.iterations:
                    log.line(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{t.iterations}")
                break
            elapsed = train_ms + 1000 * (time.perf_counter() - t0)
            loss = b.train_step(self._batches(stream), lr_multiplier(step, elapsed, t), muon_momentum(step, cfg.optim))
            if not math.isfinite(loss):
                log.close_progress()
                raise FloatingPointError(f"train_loss is {loss} at step {step + 1}; lower the learning rates or check the data")
            step += 1
            now_ms = train_ms + 1000 * (time.perf_counter() - t0)
            tok_s = step * t.batch_tokens / max(now_ms / 1000, 1e-9)
            progress.update(loss, tok_s)
            if t.log_every > 0 and (step <= 10 or step % t.log_every == 0 or stop_after is not None):
                log.line(
                    f"step:{step}/{t.iterations} train_loss:{loss:.4f} train_time:{now_ms:.0f}ms "
                    f"step_avg:{now_ms / step:.2f}ms tok_s:{tok_s:.0f}"
                )
                log.event("train", step=step, train_loss=loss, tok_s=tok_s, train_time_ms=now_ms)
            reached = cap_ms is not None and now_ms >= cap_ms
            if b.world_size > 1 and cap_ms is not None:
                reached = b.all_reduce_max(float(reached)) > 0  # every rank stops at the same step
            if stop_after is None and reached:
                stop_after = step
        log.close_progress()
        return {"steps": step, "val_loss": val_loss, "val_bpb": val_bpb, "train_time_ms": train_ms,
                "tok_s": step * t.batch_tokens / max(train_ms / 1000, 1e-9)}

    def export(self, out_dir: Path, result: dict) -> dict:
        """Save weights and the artifact, evaluate the dequantized round trip, write the final record."""
        cfg, b, log = self.cfg, self.backend, self.log
        weights = b.get_weights()
        art_path = out_dir / f"model.{cfg.artifact.scheme}-{cfg.artifact.codec}.art"
        if b.rank == 0:
            save_weights(out_dir / "model.safetensors", cfg.model, weights)
            artifact_io.write_artifact(art_path, cfg.model.to_dict(), weights, scheme=cfg.artifact.scheme,
                                       codec=cfg.artifact.codec, level=cfg.artifact.level)
        b.all_reduce_max(0.0)  # barrier: the artifact exists before any rank reads it
        _, roundtrip_weights, info = artifact_io.read_artifact(art_path)
        b.set_weights(roundtrip_weights)
        t0 = time.perf_counter()
        rt_loss, rt_bpb = self._validate()
        label = f"final_{cfg.artifact.scheme}_{cfg.artifact.codec}_roundtrip"
        log.line(f"{label} val_loss:{rt_loss:.4f} val_bpb:{rt_bpb:.4f} eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")
        log.line(f"{label}_exact val_loss:{rt_loss:.8f} val_bpb:{rt_bpb:.8f}")
        code = code_bytes(b.name)
        total = code + info.total_bytes
        tag = f"{cfg.artifact.scheme}+{cfg.artifact.codec}"
        log.line(f"Serialized model {tag}: {info.total_bytes} bytes")
        log.line(f"Total submission size {tag}: {total} bytes")
        for line in artifact_io.size_report(info, code).splitlines():
            log.line(line)
        unique, effective = count_params(cfg.model)
        final = dict(val_loss=result["val_loss"], val_bpb=result["val_bpb"], roundtrip_val_loss=rt_loss,
                     roundtrip_val_bpb=rt_bpb, artifact_bytes=info.total_bytes, code_bytes=code,
                     total_bytes=total, params=unique, effective_params=effective, steps=result["steps"],
                     train_time_ms=result["train_time_ms"], tok_s=result["tok_s"], backend=b.name,
                     world_size=b.world_size, artifact=art_path.name)
        log.event("final", **final)
        return final


def raise_batch_error(batch_tokens: int, world: int, accum: int, seq_len: int):
    from core.errors import UserError

    raise UserError(
        f"train.batch_tokens = {batch_tokens} does not split into whole sequences: over {world} rank(s) x "
        f"{accum} micro-batch(es) each gets {batch_tokens / (world * accum):g} tokens, not a positive multiple "
        f"of train.seq_len = {seq_len}"
    )
