"""`loopgolf train`: resolve the config and data, build a backend, run core's loop, export."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

from core import checkpoint as ckpt_io
from core.atomic import atomic_write_text
from core.config import RunConfig, load_config
from core.errors import UserError
from core.loop import Trainer, raise_batch_error
from core.manifest import resolve_data
from core.params import MATRIX, count_params, init_weights, param_table
from core.run import load_eval_data, log_header
from core.runlog import RunLog
from core.shards import read_shard
from core.weights import load_weights
from tools.backends import build_backend, resolve_backend, under_torchrun
from tools.script import submission_code_bytes
from tools.track import attach_tracker, check_available


def default_out_dir(cfg_path: str, stamp: float | None = None) -> Path:
    return Path("runs") / f"{Path(cfg_path).stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"


def load_run_config(args, profile_defaults: dict | None = None) -> RunConfig:
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f'data.path="{args.data}"')
    return load_config(args.config, overrides, small=args.small, profile=getattr(args, "profile", None),
                       profile_defaults=profile_defaults)


def _gpu_count() -> int:
    try:
        from backend_torch.launch import gpu_count
    except ImportError:
        return 0
    return gpu_count()


def resolve_launch(args) -> tuple[str, int, dict | None, str]:
    """(backend, ranks, machine-dependent profile defaults, a note) from --backend, --nproc and --profile.
    Under torchrun the ranks are its WORLD_SIZE."""
    backend, nproc, defaults, note = args.backend, args.nproc, None, ""
    if under_torchrun():
        nproc = int(os.environ["WORLD_SIZE"])
    if args.profile == "h100":
        backend = "torch" if backend == "auto" else backend
        if nproc is None:
            nproc = _gpu_count()
            if nproc == 0 and not args.dry_run:
                raise UserError("--profile h100: no CUDA GPU is visible (torch.cuda.device_count() is 0); "
                                "pass --nproc N to run N ranks anyway")
            if nproc == 0:
                nproc, note = 8, " (no GPU visible here: planned for 8; --nproc N to change)"
        if 8 % nproc == 0:  # upstream's grad_accum = 8 // world_size: 65,536 tokens per micro-batch
            defaults = {"train": {"grad_accum_steps": 8 // nproc}}
    nproc = 1 if nproc is None else nproc
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: expected 1 or more")
    if not (args.dry_run and backend != "auto"):
        backend = resolve_backend(backend)
    if nproc > 1 and backend != "torch":
        raise UserError(f"--nproc {nproc}: several ranks need --backend torch (this run resolves to {backend})")
    return backend, nproc, defaults, note


def memory_estimate(cfg: RunConfig, micro_tokens: int, act_bytes: int) -> dict[str, float]:
    """Bytes per GPU: fp32 weights and grads, optimizer state (Muon momentum for matrices, Adam m and v for
    the rest), and activations kept for backward: per token, per effective layer (12 d + 2 mlp_hidden)
    values in the compute dtype, plus 12 bytes per vocab entry for the fp32 logits and their gradient.
    Calibrated on upstream's baseline (9x512, 65,536 tokens per GPU: about 9.9 GiB against a measured
    10.2 GiB peak). An estimate, not a bound: allocator slack and compile workspaces come on top."""
    spec = cfg.model
    matrix = sum(i.numel for i in param_table(spec) if i.group == MATRIX)
    unique, _ = count_params(spec)
    per_layer = 12 * spec.model_dim + 2 * spec.mlp_width
    return {
        "weights": 4 * unique,
        "grads": 4 * unique,
        "optimizer": 4 * matrix + 8 * (unique - matrix),
        "activations": micro_tokens * (spec.num_layers * per_layer * act_bytes + 12 * spec.vocab_size),
    }


def micro_batch_tokens(t, nproc: int) -> int:
    """Tokens per micro-batch on each rank; an error unless the batch splits into whole sequences."""
    micro = t.batch_tokens // (nproc * t.grad_accum_steps)
    if micro < t.seq_len or micro % t.seq_len or micro * nproc * t.grad_accum_steps != t.batch_tokens:
        raise_batch_error(t.batch_tokens, nproc, t.grad_accum_steps, t.seq_len)
    return micro


def dry_run(args, cfg: RunConfig, backend: str, nproc: int, note: str) -> int:
    t, gib = cfg.train, 2**30
    per_rank, micro = t.batch_tokens // nproc, micro_batch_tokens(t, nproc)
    on_gpu = {"torch": lambda: _gpu_count() > 0, "mlx": lambda: sys.platform == "darwin"}[backend]
    gpu = args.profile == "h100" or on_gpu()
    act_bytes = {"float32": 4, "bfloat16": 2}.get(t.compute_dtype, 2 if gpu else 4)
    mem = memory_estimate(cfg, micro, act_bytes)
    unique, effective = count_params(cfg.model)
    print(f"dry run: {cfg.source}, nothing trained")
    print(f"backend: {backend}  world_size: {nproc}{note}  grad_accum_steps: {t.grad_accum_steps}")
    print(f"model: {cfg.model.describe()}")
    print(f"params: {unique:,} unique, {effective:,} effective")
    print(f"tokens per step: {t.batch_tokens:,} in all, {per_rank:,} per rank, {micro:,} per micro-batch "
          f"({micro // t.seq_len} sequences of {t.seq_len})")
    print(f"schedule: iterations {t.iterations}, warmup_steps {t.warmup_steps}, "
          f"max_wallclock_seconds {t.max_wallclock_seconds:g}, val_every {t.val_every}")
    print(f"data: {cfg.data.path} dataset {cfg.data.dataset or '(the only one)'}")
    size = lambda n: f"{n / gib:.2f} GiB" if n >= gib / 10 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"memory per {'GPU' if gpu else 'process'} (estimate, activations at {act_bytes} bytes/value): "
          + ", ".join(f"{k} {size(v)}" for k, v in mem.items()) + f"; total {size(sum(mem.values()))}")
    print("  counted: fp32 weights and grads; Muon momentum (matrices) and Adam m, v (the rest); activations of "
          "one micro-batch = tokens x (layers x (12 d + 2 mlp_hidden) values + 12 B x vocab for fp32 logits), "
          "calibrated on upstream's 9x512 baseline (~9.9 GiB est. vs 10.2 GiB measured); not allocator slack")
    return 0


def initial_weights(cfg: RunConfig, init_path: str | None):
    if not init_path:
        return init_weights(cfg.model, cfg.train.seed)
    spec, weights = load_weights(init_path)
    if spec != cfg.model:
        diff = [k for k, v in spec.to_dict().items() if cfg.model.to_dict()[k] != v]
        raise UserError(f"--init {init_path}: its spec differs from the config's [model] in {', '.join(diff)}")
    return weights


def resume_command(args, out_dir: Path, world_size: int) -> str:
    """The command line that continues this run: the same arguments, its --out and ranks, and --resume."""
    argv = [a for a in getattr(args, "argv", None) or ["train"] if a not in ("--resume", "--force")]
    if not args.out:
        argv += ["--out", str(out_dir)]
    if world_size > 1 and not any(a == "--nproc" or a.startswith("--nproc=") for a in argv):
        argv += ["--nproc", str(world_size)]  # under --nproc the ranks' own arguments lack it
    return shlex.join(["loopgolf", *argv, "--resume"])


def check_resume(args, cfg: RunConfig, train_files) -> Path | None:
    """--resume: the checkpoint to continue from. Without it, a run directory holding checkpoints is refused."""
    if not args.resume:
        if args.out:
            ckpt_io.refuse_fresh_run(args.out)
        return None
    if not args.out:
        raise UserError("--resume needs --out RUN_DIR: the run directory to continue")
    if args.init:
        raise UserError("--resume continues from the run's newest checkpoint and cannot be combined with --init")
    return ckpt_io.resolve_resume(args.out, cfg, train_files)


def claim_run_dir(args, nproc: int):
    """Lock the run directory for this run and, for a new run, make sure it holds no earlier run's files
    (core.rundir; --force deletes them). The process that starts the run does it: one process, or the --nproc
    launcher, whose ranks know through LOOPGOLF_RUN_LOCK; under an outside torchrun, rank 0 (with --out)."""
    from core import rundir

    if getattr(args, "force", False) and args.resume:
        raise UserError("--force starts a run afresh and --resume continues one: give one of them")
    rank = under_torchrun()
    if (args.resume and not args.out) or (rank and (os.environ.get(rundir.LOCK_ENV) or os.environ["RANK"] != "0"
                                                    or not args.out)):
        return None
    run_dir = Path(args.out) if args.out else default_out_dir(args.config)
    lock = rundir.acquire(run_dir)
    try:
        if not args.resume:
            removed = rundir.start_afresh(run_dir, getattr(args, "force", False), keep=[args.init] if args.init else [])
            if removed:
                print(f"loopgolf: --force: deleted {', '.join(p.name for p in removed)} in {run_dir}", file=sys.stderr)
    except BaseException:
        lock.release()
        raise
    if not args.out:
        args.run_dir = run_dir
        if nproc > 1:
            args.argv = [*args.argv, "--out", str(run_dir)]
    if nproc > 1 and not rank:
        os.environ[rundir.LOCK_ENV] = str(lock.path)
    return lock


def run_train(args) -> int:
    backend_name, nproc, profile_defaults, note = resolve_launch(args)
    cfg = load_run_config(args, profile_defaults)
    if args.dry_run:
        return dry_run(args, cfg, backend_name, nproc, note)
    check_available(getattr(args, "log_to", None))  # a missing tracker library fails before training
    lock = claim_run_dir(args, nproc)
    try:
        return train(args, cfg, backend_name, nproc)
    finally:
        if lock is not None:
            lock.release()


def train(args, cfg: RunConfig, backend_name: str, nproc: int) -> int:
    data = resolve_data(cfg.data.path, cfg.data.dataset or None, cfg.data.tokenizer or None)
    luts, val_tokens = load_eval_data(cfg, data)  # the tokenizer and val split checked before any rank starts
    # The first train shard's token ids before anything is written (the loader checks each shard it reaches).
    read_shard(data.train_files[0], cfg.model.vocab_size)
    resume_path = check_resume(args, cfg, data.train_files)
    if nproc > 1 and "RANK" not in os.environ:  # mistakes above are reported once, before any rank starts
        from backend_torch.launch import launch

        micro_batch_tokens(cfg.train, nproc)
        if resume_path:
            ckpt_io.load_checkpoint(resume_path, cfg.model)  # a damaged checkpoint: one error, not one per rank
        return launch(nproc, args.argv)  # the ranks run this same command under torchrun

    resume = ckpt_io.load_checkpoint(resume_path, cfg.model) if resume_path else None
    weights = resume.weights if resume else initial_weights(cfg, args.init)
    backend = build_backend(backend_name, cfg.model, weights, cfg.train, cfg.optim)
    if resume is not None and backend.world_size > 1:  # every rank continues from the same checkpoint
        s = float(resume.step)
        if backend.all_reduce_max(s) != s or backend.all_reduce_max(-s) != -s:
            raise UserError(f"--resume: the ranks found different newest checkpoints in {resume_path.parent}")
    stamp = backend.all_reduce_max(time.time())  # every rank names the same run directory
    out_dir = Path(args.out) if args.out else getattr(args, "run_dir", None) or default_out_dir(args.config, stamp)
    if backend.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", cfg.to_toml())
    log = RunLog(out_dir, backend.rank, progress_bar=args.progress)
    try:
        attach_tracker(log, getattr(args, "log_to", None), out_dir, cfg)
        t = cfg.train
        log_header(log, cfg, backend, data, val_tokens, f"loopgolf train: {args.config} -> {out_dir}")
        written = (resume.meta.get("backend"), resume.meta.get("world_size")) if resume else None
        if resume is not None and written != (backend.name, backend.world_size):
            log.line(f"note: {resume.path} was written by {written[0]} on {written[1]} rank(s); continuing with "
                     f"{backend.name} on {backend.world_size}: the same maths, not bit-exact")
        trainer = Trainer(cfg, backend, data.train_files, val_tokens, luts, log, out_dir=out_dir)
        try:
            result = trainer.run(resume)
        except ckpt_io.Interrupted as e:
            name = signal.Signals(e.signum).name
            log.line(f"stopped: {name} after step:{e.step}/{t.iterations} checkpoint:{e.checkpoint}")
            log.event("stopped", signal=name, step=e.step, checkpoint=str(e.checkpoint) if e.checkpoint else None)
            if backend.rank == 0:
                print(f"loopgolf: stopped by {name} after step {e.step}; checkpoint written to {e.checkpoint}\n"
                      f"resume with: {resume_command(args, out_dir, backend.world_size)}", file=sys.stderr, flush=True)
            return 128 + e.signum
        final = trainer.export(out_dir, result, submission_code_bytes(cfg))
        log.line(
            f"done: val_bpb {final['val_bpb']:.4f}, round trip {final['roundtrip_val_bpb']:.4f}, "
            f"{final['total_bytes']:,} of 16,000,000 bytes; run in {out_dir}"
        )
    finally:
        log.close()
        backend.close()  # torch: leave the process group
    return 0
