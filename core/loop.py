"""The backend-neutral training loop: data, schedules, accumulation, validation, wallclock cap,
checkpoints and resume, SIGTERM/SIGINT, export.

A backend provides (see `Backend`): train_step, eval_loss_sum, get_weights/set_weights,
get_state/set_state (weights and flat optimizer state, for checkpoints), snapshot/restore, and
all_reduce_sum/all_reduce_max (identity on one process), close. Everything else lives here, so both trainers
run the same schedule and report the same numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from core import artifact as artifact_io
from core import checkpoint as ckpt_io
from core import gptq
from core.averaging import WeightAverager
from core.bpb import ByteLuts, bpb_from_sums, count_bytes
from core.clock import TrainClock
from core.config import RunConfig
from core.depth import depth_schedule
from core.errors import UserError
from core.params import count_params
from core.runlog import RunLog, TrainReport
from core.schedule import lr_multiplier, muon_momentum
from core.shards import TokenStream, open_train_stream, train_micro_batch
from core.sliding import final_sliding_eval
from core.ttt import final_ttt_eval
from core.spec import ModelSpec
from core.weights import save_weights


class Backend(Protocol):
    name: str
    rank: int
    world_size: int
    device: str
    spec: ModelSpec  # the full model the backend was built for (set_depth trains a stage of it: core.depth)

    def train_step(self, micro_batches: list[tuple[np.ndarray, np.ndarray]], lr_scale: float, momentum: float) -> float: ...
    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float: ...
    def eval_token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...  # (batch, seq) float32 nats
    def get_weights(self) -> dict[str, np.ndarray]: ...
    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...
    # (weights, optimizer) as numpy; the optimizer flat: muon.<p>, adam_m.<p>, adam_v.<p>, adam.step. On
    # several ranks get_state is a collective and returns the full state on every rank.
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]: ...
    def set_state(self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray]) -> None: ...
    def snapshot(self) -> object: ...
    def restore(self, snap: object) -> None: ...
    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray: ...
    # {matrix name: H = sum x^T x, float64} of each linear's inputs over these batches, summed over ranks and
    # over every application of a shared block (core.gptq). A collective: every rank calls it.
    def hessians(self, batches) -> dict[str, np.ndarray]: ...
    def all_reduce_max(self, value: float) -> float: ...
    # Depth schedules: train and evaluate the schedule's stage of `layers` effective layers (core.depth.depth_variant).
    def set_depth(self, layers: int) -> None: ...
    # QAT (artifact.qat): train and evaluate through fake quantization for a scheme; None switches it off.
    def set_qat(self, scheme: str | None, noise: bool = False) -> None: ...
    # EMA on the device (core.averaging): one step, start (None: the current weights), read.
    def average_update(self, decay: float) -> None: ...
    def set_average(self, weights: dict[str, np.ndarray] | None) -> None: ...
    def get_average(self) -> dict[str, np.ndarray]: ...
    # Score-first TTT (core.ttt): SGD with momentum over every weight at the active depth, gradients averaged
    # over ranks and clipped; its step(x, y, loss_scale, lr) takes one step.
    def ttt_optimizer(self, momentum: float, grad_clip: float) -> object: ...
    # Release what the backend holds beyond the process (torch: leave the process group). Callers call it once,
    # in a finally.
    def close(self) -> None: ...


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
    def __init__(self, cfg: RunConfig, backend: Backend, train_files: list, val_tokens: np.ndarray, luts: ByteLuts,
                 log: RunLog, out_dir: Path | None = None, checkpoints: bool = True):
        self.cfg, self.backend, self.train_files = cfg, backend, train_files
        self.val_tokens, self.luts, self.log = val_tokens, luts, log
        # Checkpoints go to out_dir/checkpoints (none without a run directory). checkpoints=False (an exported
        # submission, which never resumes): none at all, and SIGTERM/SIGINT keep their default handlers.
        self.checkpoints = checkpoints and out_dir is not None
        if not checkpoints and cfg.train.checkpoint_every > 0:
            log.line(f"checkpoints: none here (train.checkpoint_every = {cfg.train.checkpoint_every} is not "
                     "followed: this script never resumes)")
        self.checkpoint_root = Path(out_dir) / ckpt_io.DIR_NAME if self.checkpoints else None
        self.last_checkpoint: Path | None = None
        self._signal = 0
        self.at_full_depth = True  # False while a progressive-depth schedule trains fewer layers
        self.qat_on = False  # artifact.qat: the backend trains through fake quantization
        self.averager: WeightAverager | None = None  # [average], made when training starts
        self.depth_schedule = depth_schedule(cfg)  # core.depth; None: full depth throughout
        self.layers = cfg.model.num_layers  # the backend's active depth
        t = cfg.train
        per_rank = t.batch_tokens // (backend.world_size * t.grad_accum_steps)
        if per_rank < t.seq_len or per_rank % t.seq_len:
            raise_batch_error(t.batch_tokens, backend.world_size, t.grad_accum_steps, t.seq_len)

    def _batches(self, stream) -> list[tuple[np.ndarray, np.ndarray]]:
        b = self.backend
        return [train_micro_batch(self.cfg, stream, b.rank, b.world_size) for _ in range(self.cfg.train.grad_accum_steps)]

    def _open_stream(self):
        """A fresh training stream from the start ([data] order: core.shards.open_train_stream)."""
        return open_train_stream(self.cfg, self.train_files, self.backend.rank, self.backend.world_size)

    def _validate(self) -> tuple[float, float]:
        t = self.cfg.train
        return evaluate(self.backend, self.val_tokens, t.seq_len, t.val_batch_tokens, self.luts)

    def prime(self, steps: int | None = None) -> None:
        """Upstream's warmup: real steps to compile and warm allocators, then restore the initial state."""
        t = self.cfg.train
        steps = t.warmup_steps if steps is None else steps
        if steps <= 0:
            return
        snap = self.backend.snapshot()
        stream = self._open_stream()
        for i in range(steps):
            self.backend.train_step(self._batches(stream), 1.0, muon_momentum(0, self.cfg.optim))
            if steps <= 20 or (i + 1) % 10 == 0 or i + 1 == steps:
                self.log.line(f"warmup_step:{i + 1}/{steps}")
        if self.depth_schedule is not None:
            # One step at every other depth of the schedule, so each variant is compiled before the clock runs.
            for layers in sorted(set(self.depth_schedule.layer_counts) - {self.layers}):
                self.backend.set_depth(layers)
                self.backend.train_step(self._batches(stream), 1.0, muon_momentum(0, self.cfg.optim))
                self.log.line(f"warmup_depth: layers:{layers}")
            self.backend.set_depth(self.layers)
        if self.cfg.artifact.qat == "late" and not self.qat_on:  # compile the QAT variant before the clock too
            self._set_qat(True)
            self.backend.train_step(self._batches(stream), 1.0, muon_momentum(0, self.cfg.optim))
            self._set_qat(False)
            self.log.line("warmup_qat: 1 step")
        self.backend.restore(snap)

    # ---- QAT -------------------------------------------------------------------------------------------

    def _set_qat(self, on: bool) -> None:
        a = self.cfg.artifact
        self.backend.set_qat(a.quant_scheme if on else None, a.qat_noise)
        self.qat_on = on

    def _start_qat(self, step: int, lr_scale: float) -> None:
        """Switch QAT on from `step` (the first step trained with it), with a log line and a `qat` event."""
        a = self.cfg.artifact
        self._set_qat(True)
        self.log.line(f"qat: on from step:{step} lr_scale:{lr_scale:.4f} scheme:{a.quant_scheme}"
                      f"{' noise' if a.qat_noise else ''}")
        self.log.event("qat", step=step, lr_scale=lr_scale, scheme=a.quant_scheme, noise=a.qat_noise)

    # ---- progressive depth -----------------------------------------------------------------------------

    def _set_layers(self, layers: int, step: int, why: str = "") -> None:
        """Switch the backend's active depth, with a log line and a `depth` event in metrics.jsonl."""
        if layers == self.layers:
            return
        self.backend.set_depth(layers)
        self.layers = layers
        self.at_full_depth = layers == self.cfg.model.num_layers
        self.log.line(f"depth: step:{step} layers:{layers}/{self.cfg.model.num_layers}{why}")
        self.log.event("depth", step=step, layers=layers)

    def _follow_depth_schedule(self, step: int, elapsed_ms: float, last: bool) -> None:
        """The scheduled depth before `step`; every rank switches at the same step (step-based: the step count
        is the same everywhere; wallclock: the elapsed time is all-reduced with MAX, as #895)."""
        t = self.cfg.train
        if self.depth_schedule is None:
            return
        if last:  # the final evaluation and the export run at full depth
            self._set_layers(self.cfg.model.num_layers, step, " (full depth for the final evaluation)")
            return
        if self.depth_schedule.by == "wallclock" and self.backend.world_size > 1:
            elapsed_ms = self.backend.all_reduce_max(elapsed_ms)
        fraction = self.depth_schedule.fraction(step, t.iterations, elapsed_ms, t.train_wallclock_seconds * 1000.0)
        self._set_layers(self.depth_schedule.layers_at(fraction), step)

    # ---- signals and checkpoints -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM/SIGINT ask the loop to stop after the current step with a checkpoint; a second one acts
        as it would have without this handler (SIGINT: KeyboardInterrupt; SIGTERM: terminate)."""
        if not self.checkpoints or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        sigs = [s for s, h in previous.items() if h is not signal.SIG_IGN]  # e.g. SIGINT in a background job

        def handler(signum, frame):
            if self._signal:
                signal.signal(signum, previous[signum])
                if callable(previous[signum]):
                    previous[signum](signum, frame)
                else:
                    os.kill(os.getpid(), signum)
                return
            self._signal = signum
            if self.backend.rank == 0:
                os.write(2, f"loopgolf: {signal.Signals(signum).name} received: finishing this step, then writing "
                            "a checkpoint (send it again to stop at once)\n".encode())

        for s in sigs:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s in sigs:
                signal.signal(s, previous[s])

    def _checkpoint(self, step: int, train_ms: float, stream: TokenStream, stop_after: int | None) -> Path | None:
        """Write a checkpoint of the state after `step` (rank 0 writes; every rank takes part in get_state)."""
        if not self.checkpoints:
            return None
        cfg, b = self.cfg, self.backend
        path = self.checkpoint_root / f"step_{step:06d}"
        if self.last_checkpoint == path:  # already written (or resumed from) at this step
            return path
        t0 = time.perf_counter()
        weights, optimizer = b.get_state()
        bad = ckpt_io.nonfinite(weights, optimizer)
        if bad:
            self.log.close_progress()
            self.log.line(f"stopped: non-finite weights or optimizer state at step:{step}")
            self.log.event("nonfinite", step=step, tensors=bad[:10],
                           checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
            raise FloatingPointError(f"non-finite weights or optimizer state after step {step} "
                                     f"({', '.join(bad[:3])}); not checkpointed. {self._nan_hint()}")
        if b.rank == 0:
            schedule = {"lr_multiplier": lr_multiplier(step, train_ms, cfg.train),
                        "muon_momentum": muon_momentum(step, cfg.optim),
                        "wallclock_based": cfg.train.warmdown_start_step <= 0 and cfg.train.max_wallclock_seconds > 0}
            schedule["layers"] = self.layers  # the active depth (progressive depth)
            if cfg.data.order == "shuffled":  # each rank reads its own shards; all ranks have drawn as many
                shards, position, drawn = ckpt_io.shard_record(self.train_files), (0, 0), stream.drawn
            else:
                shards, position, drawn = [[f.name, n] for f, n in zip(stream.files, stream.sizes)], stream.tell(), None
            meta = ckpt_io.checkpoint_meta(train_ms, stop_after, position, shards, cfg, b.name, b.world_size,
                                           schedule, drawn)
            path = ckpt_io.write_checkpoint(self.checkpoint_root, step, cfg.model, weights, optimizer, meta,
                                            keep=cfg.train.keep_checkpoints,
                                            average=self.averager.state() if self.averager else None)
            ms = 1000 * (time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.iterdir())
            self.log.line(f"checkpoint: step:{step} {path} bytes:{size} write_time:{ms:.0f}ms")
            self.log.event("checkpoint", step=step, path=str(path), bytes=size, write_ms=ms)
        self.last_checkpoint = path
        return path

    def _nan_hint(self) -> str:
        if self.last_checkpoint is None:
            return ("No checkpoint was written (train.checkpoint_every = 0 or not reached yet); lower the learning "
                    "rates or check the data")
        return (f"The last good checkpoint is {self.last_checkpoint}: lower the learning rates or check the data, "
                f"then start a new run from its weights with --init {self.last_checkpoint / ckpt_io.WEIGHTS_FILE}")

    def _agree_stop(self, reached: bool) -> tuple[int, bool]:
        """(signal to stop on or 0, wallclock cap reached), the same on every rank: one MAX all-reduce of
        2*signal + reached (with a signal anywhere, every rank stops on it; else any rank's cap stops all)."""
        sig = self._signal
        if self.backend.world_size > 1:
            code = int(self.backend.all_reduce_max(float(2 * sig + reached)))
            if code >= 2:
                return code // 2, reached  # stopping on the signal; the cap no longer matters
            return 0, code == 1
        return sig, reached

    def run(self, resume: ckpt_io.Checkpoint | None = None) -> dict:
        """Train to train.iterations (or the wallclock cap), from scratch or from `resume`. Raises
        ckpt_io.Interrupted after SIGTERM/SIGINT (with a checkpoint) and FloatingPointError on a NaN."""
        with self._stop_signals():
            return self._run(resume)

    def _run(self, resume: ckpt_io.Checkpoint | None) -> dict:
        cfg, t, b = self.cfg, self.cfg.train, self.backend
        report = TrainReport(self.log, t.iterations, with_layers=self.depth_schedule is not None)
        stream = self._open_stream()
        # train.gptq_reserve_seconds comes off the cap: the Hessians are collected in the time it leaves
        cap_ms = t.train_wallclock_seconds * 1000.0 if t.max_wallclock_seconds > 0 else None
        step, train_ms, stop_after = self._start(resume, stream, report)
        self.averager = WeightAverager(cfg.average, b, resume.average if resume else None)
        val_loss = val_bpb = float("nan")
        progress = self.log.progress(t.iterations)
        clock = TrainClock(train_ms)
        while True:
            last = step == t.iterations or (stop_after is not None and step >= stop_after)
            self._follow_depth_schedule(step, clock.ms(), last)
            if last or (t.val_every > 0 and step % t.val_every == 0):
                with clock.paused() as train_ms:  # validation time is not training time
                    val_loss, val_bpb = self._validate()
                    report.val(step, val_loss, val_bpb, train_ms, self.layers)
            if last:
                self._stop_at_the_end(step, clock.banked_ms, stream, stop_after, report)
                break
            lr_scale = lr_multiplier(step, clock.ms(), t)
            if cfg.artifact.qat == "late" and not self.qat_on and lr_scale < cfg.artifact.qat_lr_threshold:
                self._start_qat(step + 1, lr_scale)  # #1110's late QAT
            loss = b.train_step(self._batches(stream), lr_scale, muon_momentum(step, cfg.optim))
            if not math.isfinite(loss):
                report.nonfinite(step + 1, loss, self.last_checkpoint)
                raise FloatingPointError(
                    f"train_loss is {loss} at step {step + 1}, nothing exported. {self._nan_hint()}")
            step += 1
            self.averager.after_step(step, lr_scale, self.at_full_depth)
            now_ms = clock.ms()
            tok_s = step * t.batch_tokens / max(now_ms / 1000, 1e-9)
            progress.update(loss, tok_s)
            if t.log_every > 0 and (step <= 10 or step % t.log_every == 0 or stop_after is not None):
                report.train(step, loss, now_ms, tok_s)
            # Every rank stops at the same step, for the wallclock cap and for a signal.
            sig, reached = self._agree_stop(cap_ms is not None and now_ms >= cap_ms)
            if stop_after is None and reached:
                stop_after = step
            if sig or (t.checkpoint_every > 0 and step % t.checkpoint_every == 0):
                with clock.paused() as train_ms:  # checkpoint time is not training time
                    path = self._checkpoint(step, train_ms, stream, stop_after)
                if sig:
                    self.log.close_progress()
                    raise ckpt_io.Interrupted(sig, step, path)
        self.log.close_progress()
        train_ms = clock.banked_ms
        return {"steps": step, "val_loss": val_loss, "val_bpb": val_bpb, "train_time_ms": train_ms,
                "tok_s": step * t.batch_tokens / max(train_ms / 1000, 1e-9)}

    def _start(self, resume: ckpt_io.Checkpoint | None, stream: TokenStream, report: TrainReport):
        """Prime the compiled steps and, when resuming, restore the checkpoint's state: (step, train_ms,
        stop_after) to continue from."""
        t = self.cfg.train
        if self.cfg.artifact.qat == "start":  # before the priming steps, which compile the QAT forward
            self._start_qat(resume.step + 1 if resume else 1, 1.0)
        if resume is None:
            self.prime()
            return 0, 0.0, None
        # The priming steps only warm compilation here (their effect is undone), so one is enough.
        self.prime(min(t.warmup_steps, 1))
        self.backend.set_state(resume.weights, resume.optimizer)
        if self.cfg.data.order == "shuffled":
            stream.skip(resume.drawn)
        else:
            stream.seek(*resume.position)
        self.last_checkpoint = resume.path
        report.resume(resume.step, resume.train_time_ms, resume.path)
        if self.depth_schedule is not None:  # continue at the checkpoint's depth; the schedule moves it on
            self._set_layers(resume.layers, resume.step, " (from the checkpoint)")
        return resume.step, resume.train_time_ms, resume.stop_after

    def _stop_at_the_end(self, step: int, train_ms: float, stream: TokenStream, stop_after: int | None,
                         report: TrainReport) -> None:
        """After the final validation: say why the run stopped early, and stop resumably on a signal that came
        during that validation (before the export)."""
        if stop_after is not None and step < self.cfg.train.iterations:
            report.stopping_early(step, train_ms)
        sig, _ = self._agree_stop(False)
        if sig:
            self.log.close_progress()
            raise ckpt_io.Interrupted(sig, step, self._checkpoint(step, train_ms, stream, stop_after))

    def _apply_average(self, result: dict) -> tuple[dict, dict]:
        """Put the averaged weights ([average]) on the backend for the export and score them. Returns the
        result with their val_loss/val_bpb and the final record's averaging fields (the score before too)."""
        avg = self.averager
        if avg is None or avg.kind is None:
            return result, {"averaging": "none"}
        weights = avg.finish(result["steps"])
        self.backend.set_weights(weights)
        val_loss, val_bpb = self._validate()
        self.log.line(f"averaging: {avg.kind} count:{avg.count} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                      f"(before averaging val_bpb:{result['val_bpb']:.4f})")
        fields = {"averaging": avg.kind, "average_count": avg.count, "val_loss_before_averaging": result["val_loss"],
                  "val_bpb_before_averaging": result["val_bpb"]}
        return {**result, "val_loss": val_loss, "val_bpb": val_bpb}, fields

    def _report_reserve(self, train_ms: float, hessian_ms: float) -> None:
        """train.gptq_reserve_seconds: whether training plus the Hessians stayed within max_wallclock_seconds."""
        t = self.cfg.train
        if t.gptq_reserve_seconds <= 0 or t.max_wallclock_seconds <= 0:
            return
        total, cap = train_ms + hessian_ms, t.max_wallclock_seconds * 1000.0
        verdict = "within the cap" if total <= cap else f"OVER the cap by {total - cap:.0f}ms: raise the reserve"
        self.log.line(f"gptq_reserve: {1000 * t.gptq_reserve_seconds:.0f}ms train_time:{train_ms:.0f}ms + "
                      f"hessians:{hessian_ms:.0f}ms = {total:.0f}ms of max_wallclock {cap:.0f}ms, {verdict}")

    def _gptq_applies(self, weights: dict[str, np.ndarray]) -> bool:
        """artifact.gptq: whether any tensor is one GPTQ solves; at a small width (--small) none may be, and
        the export then rounds as without it rather than collecting Hessians for nothing."""
        scheme = self.cfg.artifact.quant_scheme
        if gptq.gptq_applies(weights, scheme, self.cfg.artifact.gptq_embedding):
            return True
        self.log.line(f"gptq: off: no tensor here is one GPTQ solves under {scheme!r} ({gptq.NO_TARGETS}); "
                      "exported by plain rounding")
        return False

    def export(self, out_dir: Path, result: dict, code_bytes: int) -> dict:
        """Save weights and the artifact, evaluate the dequantized round trip, write the final record.
        `code_bytes` is what the submission's code counts (the exported train_gpt.py: tools/export.py)."""
        cfg, b, log = self.cfg, self.backend, self.log
        self._set_layers(cfg.model.num_layers, result.get("steps", 0), " (full depth for the export)")
        result, averaging = self._apply_average(result)
        weights = b.get_weights()
        bad = ckpt_io.nonfinite(weights)
        if bad:
            raise FloatingPointError(f"non-finite weights ({', '.join(bad[:3])}); nothing exported. {self._nan_hint()}")
        art_path = out_dir / f"model.{cfg.artifact.scheme}-{cfg.artifact.codec}.art"
        art = cfg.artifact
        use_gptq = art.gptq and self._gptq_applies(weights)
        hessian_ms = 0.0
        if use_gptq:  # every rank: the Hessians are summed across ranks
            t0 = time.perf_counter()
            hessians, record = gptq.collect_training_hessians(b, self.train_files, cfg, art.gptq_batches)
            hessian_ms = 1000 * (time.perf_counter() - t0)
            log.line(f"gptq: hessians:{len(hessians)} batches:{art.gptq_batches} time:{hessian_ms:.0f}ms")
            self._report_reserve(result["train_time_ms"], hessian_ms)
        if b.rank == 0:
            save_weights(out_dir / "model.safetensors", cfg.model, weights)
            if use_gptq:
                t0 = time.perf_counter()
                qw = gptq.quantize_weights_gptq(weights, art.quant_scheme, hessians, art.gptq_damp, art.gptq_block,
                                                record, embedding=art.gptq_embedding)
                artifact_io.write_quantized(art_path, cfg.model.to_dict(), qw, codec=art.codec, level=art.level,
                                            byte_shuffle=art.byte_shuffle)
                log.line(f"gptq: tensors:{len(qw.gptq['tensors'])} damp:{art.gptq_damp} block:{art.gptq_block} "
                         f"solve_time:{1000 * (time.perf_counter() - t0):.0f}ms")
            else:
                artifact_io.write_artifact(art_path, cfg.model.to_dict(), weights, scheme=art.quant_scheme,
                                           codec=art.codec, level=art.level, byte_shuffle=art.byte_shuffle)
        b.all_reduce_max(0.0)  # barrier: the artifact exists before any rank reads it
        _, roundtrip_weights, info = artifact_io.read_artifact(art_path)
        if self.qat_on:  # the round trip's weights are quantized already: evaluate them as they are
            self._set_qat(False)
        b.set_weights(roundtrip_weights)
        t0 = time.perf_counter()
        rt_loss, rt_bpb = self._validate()
        label = f"final_{cfg.artifact.scheme}_{cfg.artifact.codec}_roundtrip"
        log.line(f"{label} val_loss:{rt_loss:.4f} val_bpb:{rt_bpb:.4f} eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")
        log.line(f"{label}_exact val_loss:{rt_loss:.8f} val_bpb:{rt_bpb:.8f}")
        sliding = final_sliding_eval(b, self.val_tokens, cfg, self.luts, log, label)  # {} unless eval.stride > 0
        ttt = {}
        if cfg.eval.ttt:  # on a copy: the round trip's weights are put back
            ttt = final_ttt_eval(b, self.val_tokens, cfg, self.luts, log, label)
        code = code_bytes
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
                     world_size=b.world_size, artifact=art_path.name, qat=cfg.artifact.qat, **averaging, **sliding,
                     **ttt)
        if art.gptq:
            final["gptq_tensors"] = len((info.gptq or {}).get("tensors", []))
            final["gptq_hessian_ms"] = hessian_ms
        log.event("final", **final)
        return final


def raise_batch_error(batch_tokens: int, world: int, accum: int, seq_len: int):
    raise UserError(
        f"train.batch_tokens = {batch_tokens} does not split into whole sequences: over {world} rank(s) x "
        f"{accum} micro-batch(es) each gets {batch_tokens / (world * accum):g} tokens, not a positive multiple "
        f"of train.seq_len = {seq_len}"
    )
