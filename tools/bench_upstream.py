"""`loopgolf bench --vs-upstream`: the user's own copy of upstream's train_gpt_mlx.py / train_gpt.py run
side by side with loopgolf on the same shards and settings (upstream's environment variables), its log
parsed for steady-state step time. Nothing of the upstream script is part of loopgolf."""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from core.config import RunConfig
from core.errors import UserError
from core.spec import ModelSpec

UPSTREAM_FORWARDED = {  # upstream env var -> (section, key) of the run config
    "MATRIX_LR": ("optim", "matrix_lr"), "SCALAR_LR": ("optim", "scalar_lr"),
    "TIED_EMBED_LR": ("optim", "tied_embed_lr"), "EMBED_LR": ("optim", "embed_lr"), "HEAD_LR": ("optim", "head_lr"),
    "BETA1": ("optim", "beta1"), "BETA2": ("optim", "beta2"), "ADAM_EPS": ("optim", "adam_eps"),
    "MUON_MOMENTUM": ("optim", "muon_momentum"), "MUON_MOMENTUM_WARMUP_START": ("optim", "muon_momentum_warmup_start"),
    "MUON_MOMENTUM_WARMUP_STEPS": ("optim", "muon_momentum_warmup_steps"),
    "MUON_BACKEND_STEPS": ("optim", "muon_backend_steps"), "GRAD_CLIP_NORM": ("optim", "grad_clip_norm"),
    "WARMDOWN_ITERS": ("train", "warmdown_iters"), "SEED": ("train", "seed"),
    "VAL_BATCH_SIZE": ("train", "val_batch_tokens"),
}
UPSTREAM_SPEC_KEYS = {"vocab_size", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "num_layers", "num_blocks",
                      "layer_plan", "tie_embeddings", "tied_embed_init_std", "rope_base", "logit_softcap",
                      "qk_gain_init"}  # the spec fields upstream's environment variables (or the flat plan) express
TORCH_UPSTREAM_ACCUM = 8  # upstream train_gpt.py: grad_accum_steps = 8 // world_size, one process here


def check_upstream_comparable(cfg: RunConfig, backend: str) -> None:
    """Upstream's scripts run flat models only: refuse what they cannot express, before any work."""
    spec = cfg.model
    if spec.layer_plan != tuple(range(spec.num_layers)) or spec.num_blocks != spec.num_layers:
        plan = " ".join(map(str, spec.layer_plan))
        raise UserError(
            f"--vs-upstream compares flat plans only (upstream has no weight sharing); this config's "
            f"model.layer_plan is [{plan}] over {spec.num_blocks} block(s). Use a flat config, or e.g. "
            f"--set model.layer_plan=flat --set model.num_layers={spec.num_layers}")
    # Every other spec field (norm_eps, the per-iteration options, any added later) has no upstream
    # environment variable: it must be at its default, which is upstream's behaviour.
    defaults = ModelSpec()
    differ = [f.name for f in dataclasses.fields(ModelSpec)
              if f.name not in UPSTREAM_SPEC_KEYS and getattr(spec, f.name) != getattr(defaults, f.name)]
    if differ:
        raise UserError(f"--vs-upstream: upstream's script cannot express model.{', model.'.join(differ)} "
                        f"(not at the default); compare a config without them")
    if backend == "mlx" and not spec.tie_embeddings:
        raise UserError("--vs-upstream with --backend mlx: upstream train_gpt_mlx.py supports tied embeddings only "
                        "(model.tie_embeddings = true)")


TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:([0-9.]+)ms step_avg:([0-9.]+)ms")
DTYPE_LINE = re.compile(r"^compute_dtype:(\S+)")


def parse_train_lines(text: str) -> list[dict]:
    """Upstream's training log lines: `step:N/M train_loss:L train_time:Tms step_avg:Ams ...`."""
    out = []
    for line in text.splitlines():
        m = TRAIN_LINE.match(line.strip())
        if m:
            out.append({"step": int(m.group(1)), "total": int(m.group(2)), "train_loss": float(m.group(3)),
                        "train_time_ms": float(m.group(4)), "step_avg_ms": float(m.group(5))})
    return out


def steady_state(records: list[dict], skip: int = 1) -> dict:
    """Steady-state ms/step from cumulative train_time: the median of per-step differences between
    consecutive logged steps after the first `skip` steps (upstream logs whole milliseconds), and the
    mean over that span."""
    recs = sorted(records, key=lambda r: r["step"])
    base = [r for r in recs if r["step"] >= skip] if skip > 0 else [{"step": 0, "train_time_ms": 0.0}, *recs]
    if len(base) < 2:
        raise UserError(f"upstream logged {len(recs)} training step line(s); need at least {skip + 2} "
                        "(step:N/M train_loss:... train_time:...ms) to measure a steady state")
    per_step = [(b["train_time_ms"] - a["train_time_ms"]) / (b["step"] - a["step"]) for a, b in zip(base, base[1:])]
    span = (base[-1]["train_time_ms"] - base[0]["train_time_ms"]) / (base[-1]["step"] - base[0]["step"])
    return {"median_ms": statistics.median(per_step), "mean_ms": span, "steps": base[-1]["step"] - base[0]["step"],
            "first_step": base[0]["step"], "last_step": base[-1]["step"]}


def upstream_env(cfg: RunConfig, data, backend: str, steps: int, warmup: int, workdir: Path,
                 extra: list[str] = ()) -> dict[str, str]:
    """Upstream's environment variables for the same model, batch, sequence, data and schedule."""
    spec, t = cfg.model, cfg.train
    env = {
        "DATA_PATH": str(Path(data.dataset_dir).resolve()),
        "TOKENIZER_PATH": str(Path(data.tokenizer_path).resolve()),
        "VOCAB_SIZE": str(spec.vocab_size),
        "NUM_LAYERS": str(spec.num_layers),
        "MODEL_DIM": str(spec.model_dim),
        "NUM_HEADS": str(spec.num_heads),
        "NUM_KV_HEADS": str(spec.num_kv_heads),
        "MLP_MULT": str(spec.mlp_mult),
        "TIE_EMBEDDINGS": "1" if spec.tie_embeddings else "0",
        "TIED_EMBED_INIT_STD": repr(spec.tied_embed_init_std),
        "ROPE_BASE": repr(spec.rope_base),
        "LOGIT_SOFTCAP": repr(spec.logit_softcap),
        "QK_GAIN_INIT": repr(spec.qk_gain_init),
        "TRAIN_BATCH_TOKENS": str(t.batch_tokens),
        "TRAIN_SEQ_LEN": str(t.seq_len),
        "ITERATIONS": str(steps),
        "WARMUP_STEPS": str(warmup),
        "VAL_LOSS_EVERY": "0",
        "TRAIN_LOG_EVERY": "1",
        "MAX_WALLCLOCK_SECONDS": "0",
        "RUN_ID": "loopgolf_bench_upstream",
        "OUT_DIR": str(workdir),
        "PYTHONUNBUFFERED": "1",
    }
    for var, (section, key) in UPSTREAM_FORWARDED.items():
        value = getattr(getattr(cfg, section), key)
        env[var] = repr(value) if isinstance(value, float) else str(value)
    if backend == "mlx":
        env["GRAD_ACCUM_STEPS"] = str(t.grad_accum_steps)
        # No further chunking: each micro-batch runs whole, as in loopgolf (upstream's default is 8,192 tokens).
        env["MLX_MAX_MICROBATCH_TOKENS"] = str(t.batch_tokens // t.grad_accum_steps)
    for item in extra or ():
        if "=" not in item:
            raise UserError(f"--upstream-env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env[k.strip()] = v
    return env


def run_upstream(script: str, env: dict[str, str], workdir: Path, timeout: float) -> dict:
    """Run the upstream script once; stop it as soon as its last training step is logged (its final
    validation and quantization are not what is measured). Returns the parsed lines and the output."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(env)
    iterations = int(env["ITERATIONS"])
    proc = subprocess.Popen([sys.executable, str(Path(script).resolve())], cwd=workdir, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    timed_out = threading.Event()

    def stop():
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, stop)
    timer.start()
    lines, done, dtype = [], False, None
    t0 = time.perf_counter()
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = DTYPE_LINE.match(line.strip())
            if m:
                dtype = m.group(1)
            rec = parse_train_lines(line)
            if rec and rec[0]["step"] >= iterations:
                done = True
                break
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
    wall = time.perf_counter() - t0
    text = "\n".join(lines)
    if not done:
        tail = "\n".join(lines[-15:])
        why = (f"it was stopped after --upstream-timeout {timeout:g} s" if timed_out.is_set()
               else f"it exited (code {proc.returncode})")
        raise UserError(f"--vs-upstream {script}: {why} before logging step "
                        f"{iterations}/{iterations}; its last output:\n{tail}")
    return {"records": parse_train_lines(text), "compute_dtype": dtype, "wall_s": wall, "output_lines": len(lines)}


def compare_upstream(args, cfg: RunConfig, data, backend_name: str, dtype_name: str, first_ms: list[float],
                     time_ours: Callable[[], list[float]]) -> dict:
    """Alternate rounds: loopgolf's timed steps (round 1 reuses `first_ms`, later rounds call `time_ours`)
    and one run of the user's upstream script; report the tokens/s ratio."""
    t = cfg.train
    skip = 1  # upstream's first step after its warm-up is not steady (MLX: first optimizer update)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="loopgolf-upstream-") as workdir:
        env = upstream_env(cfg, data, backend_name, args.steps + skip, args.warmup, Path(workdir), args.upstream_env)
        for r in range(args.rounds):
            if r == 0:
                ours = first_ms  # the measurement already taken is round 1's loopgolf half
            else:
                ours = time_ours()
            up = run_upstream(args.vs_upstream, env, Path(workdir), args.upstream_timeout)
            st = steady_state(up["records"], skip=skip)
            ours_ms = statistics.median(ours)
            rounds.append({"loopgolf_ms": ours_ms, "loopgolf_all_ms": [round(x, 4) for x in ours],
                           "upstream_ms": st["median_ms"], "upstream_mean_ms": st["mean_ms"],
                           "upstream_steps": st["steps"], "upstream_compute_dtype": up["compute_dtype"],
                           "upstream_final_loss": up["records"][-1]["train_loss"],
                           "ratio": st["median_ms"] / ours_ms})
    ours_ms = statistics.median([x for r in rounds for x in r["loopgolf_all_ms"]])
    up_ms = statistics.median([r["upstream_ms"] for r in rounds])
    ours_tok, up_tok = t.batch_tokens / (ours_ms / 1000), t.batch_tokens / (up_ms / 1000)
    up_dtype = rounds[-1]["upstream_compute_dtype"]
    same = None if up_dtype is None else up_dtype.split(".")[-1] == dtype_name
    return {"script": str(args.vs_upstream), "env": env, "rounds": rounds, "loopgolf_ms": ours_ms,
            "upstream_ms": up_ms, "loopgolf_tokens_per_s": ours_tok, "tokens_per_s": up_tok,
            "ratio": ours_tok / up_tok, "loopgolf_dtype": dtype_name, "upstream_dtype": up_dtype,
            "same_dtype": same}
