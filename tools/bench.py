"""`loopgolf bench`: steady-state training speed, model FLOPs, MFU against a measured peak, memory, eval
and data-loader throughput; optionally side by side with the user's copy of upstream's script.

What one run does, in order, in one process on one device:
  1. build the backend from the config (core's init weights), on real shards when the config's (or
     --data's) data resolves, else on synthetic uniform random tokens written to a temporary shard;
  2. --warmup training steps (compile, allocator), then --steps timed steps, each timed as core.loop
     does it: fetching the batch plus backend.train_step (which returns the loss, so it has synced);
  3. peak memory over the timed steps (torch CUDA: max_memory_allocated; MLX: mx.get_peak_memory;
     else the process's peak RSS, which covers everything the process ever held);
  4. the peak: a square matrix multiply in the training compute dtype on the same device, n = the cube
     root of the FLOPs of the model's largest product (core.flops.probe_size), timed after warm-up
     right before and right after the timed steps, the best sample taken (so MFU is conservative);
  5. eval throughput: backend.eval_loss_sum on one val-sized batch (train.val_batch_tokens);
  6. the data loader alone: core.shards.TokenStream + next_batch, as the loop calls them.
MFU = train FLOPs/token (core.flops, 3 x forward, causal attention half) x tokens/s / measured peak.

--vs-upstream PATH alternates rounds of loopgolf's timed steps with a subprocess running the user's
upstream train_gpt_mlx.py / train_gpt.py on the same shards with the same settings as upstream's
environment variables, parses its `step:N/M train_loss:... train_time:...ms` lines, and reports the
tokens/s ratio. Nothing of the upstream script is part of loopgolf.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from core.config import RunConfig, load_config
from core.errors import UserError
from core.flops import flops_per_token, largest_matmul, probe_size, six_n_per_token
from core.params import count_params, init_weights
from core.schedule import muon_momentum
from core.shards import TokenStream, load_val_tokens, next_batch, read_shard, write_shard
from tools.bench_hooks import hooks_for
from tools.bench_upstream import TORCH_UPSTREAM_ACCUM, check_upstream_comparable, compare_upstream

LOADER_TARGET = 50.0  # the floor: loader tokens/s at least 50x the trainer's
SYNTHETIC_MIN_TOKENS = 1 << 18
SYNTHETIC_MAX_TOKENS = 1 << 25



# ----------------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure training speed, FLOPs, MFU, memory, eval and loader throughput",
        description="Warm-up, then timed training steps: ms/step, tokens/s, model FLOPs/token, achieved FLOP/s, "
                    "MFU against a matmul peak measured in the same run, peak memory, eval and data-loader "
                    "throughput. --vs-upstream compares with your copy of upstream's script.")
    p.add_argument("--config", required=True, help="run config TOML (see configs/)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.batch_tokens=16384 (repeatable)")
    p.add_argument("--small", action="store_true",
                   help="shrink width and sequence length for a quick check, keeping the topology")
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                   help="auto: MLX on Apple Silicon, torch elsewhere")
    p.add_argument("--data", help="data root with manifest.json, or a dataset directory (default: the config's "
                                  "data.path; synthetic random tokens when that does not resolve)")
    p.add_argument("--synthetic", action="store_true", help="use synthetic uniform random tokens even if shards resolve")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps first (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON to PATH")
    p.add_argument("--probe-seconds", type=float, default=1.0,
                   help="time spent timing the matmul peak probe, split before and after the timed steps (default 1.0)")
    p.add_argument("--vs-upstream", metavar="PATH",
                   help="your copy of upstream's train_gpt_mlx.py (--backend mlx) or train_gpt.py (--backend torch): "
                        "run it on the same shards and settings, alternating with loopgolf, and report the ratio")
    p.add_argument("--rounds", type=int, default=2, help="--vs-upstream: alternating rounds of each (default 2)")
    p.add_argument("--upstream-env", action="append", metavar="KEY=VALUE",
                   help="--vs-upstream: extra or overriding environment for the upstream run (repeatable)")
    p.add_argument("--upstream-timeout", type=float, default=3600.0,
                   help="--vs-upstream: seconds before one upstream run is stopped (default 3600)")
    return p


def run_bench(args) -> int:
    result = bench(args)
    print_result(result)
    if args.json:
        from core.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------------
# the measurement


def load_bench_config(args) -> RunConfig:
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f'data.path="{args.data}"')
    return load_config(args.config, overrides, small=args.small)


def resolve_bench_data(cfg: RunConfig, explicit: bool, synthetic: bool):
    """(DataPaths or None, a sentence saying which data the run uses)."""
    if synthetic:
        return None, f"synthetic uniform random tokens over vocab {cfg.model.vocab_size} (--synthetic)"
    from core.manifest import resolve_data

    try:
        data = resolve_data(cfg.data.path, cfg.data.dataset or None, cfg.data.tokenizer or None)
    except UserError as e:
        if explicit:
            raise
        return None, (f"synthetic uniform random tokens over vocab {cfg.model.vocab_size} "
                      f"(the config's data.path {cfg.data.path!r} did not resolve: {e})")
    if data.vocab_size != cfg.model.vocab_size:
        msg = (f"the shards in {data.dataset_dir} have vocab {data.vocab_size} but model.vocab_size is "
               f"{cfg.model.vocab_size}")
        if explicit:
            raise UserError(msg)
        return None, f"synthetic uniform random tokens over vocab {cfg.model.vocab_size} ({msg})"
    return data, f"shards {data.dataset_dir} ({len(data.train_files)} train, {len(data.val_files)} val)"


def synthetic_shard(dirpath: Path, cfg: RunConfig) -> Path:
    t = cfg.train
    n = int(min(max(4 * (t.batch_tokens + 1), t.val_batch_tokens + 1, SYNTHETIC_MIN_TOKENS), SYNTHETIC_MAX_TOKENS))
    tokens = np.random.default_rng(t.seed).integers(0, cfg.model.vocab_size, n, dtype=np.uint16)
    path = dirpath / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    return path


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values), "all": [round(v, 4) for v in values]}


def bench(args) -> dict:
    from tools.backends import build_backend, resolve_backend

    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps {args.steps} --warmup {args.warmup}: expected at least 1 timed step and 0+ warm-up")
    backend_name = resolve_backend(args.backend)
    upstream = getattr(args, "vs_upstream", None)
    cfg = load_bench_config(args)
    notes = []
    if upstream:
        check_upstream_comparable(cfg, backend_name)
        if not Path(upstream).is_file():
            raise UserError(f"--vs-upstream {upstream}: file not found")
        if args.rounds < 1:
            raise UserError(f"--rounds {args.rounds}: expected 1 or more")
        if backend_name == "torch" and cfg.train.grad_accum_steps != TORCH_UPSTREAM_ACCUM:
            # Upstream train_gpt.py on one process always splits a step into 8 micro-batches.
            args = argparse.Namespace(**{**vars(args), "set": [*(args.set or []),
                                                               f"train.grad_accum_steps={TORCH_UPSTREAM_ACCUM}"]})
            cfg = load_bench_config(args)
            notes.append(f"train.grad_accum_steps set to {TORCH_UPSTREAM_ACCUM} to match upstream train_gpt.py "
                         f"on one process")
    t, spec = cfg.train, cfg.model
    micro = t.batch_tokens // t.grad_accum_steps
    if micro < t.seq_len or micro % t.seq_len or micro * t.grad_accum_steps != t.batch_tokens:
        from core.loop import raise_batch_error

        raise_batch_error(t.batch_tokens, 1, t.grad_accum_steps, t.seq_len)
    data, data_note = resolve_bench_data(cfg, explicit=bool(args.data), synthetic=args.synthetic)
    if upstream and data is None:
        raise UserError(f"--vs-upstream needs real shards and a tokenizer (upstream reads them): {data_note}; "
                        "pass --data DIR (e.g. make_mini_shards --demo --out data)")

    with tempfile.TemporaryDirectory(prefix="loopgolf-bench-") as tmp:
        if data is None:
            train_files = [synthetic_shard(Path(tmp), cfg)]
            val_source = np.asarray(read_shard(train_files[0]), dtype=np.int32)
        else:
            train_files = data.train_files
            val_source = load_val_tokens(data.val_files, t.seq_len, spec.vocab_size)

        backend = build_backend(backend_name, spec, init_weights(spec, t.seed), t, cfg.optim)
        hooks = hooks_for(backend)
        try:
            result = _measure(args, cfg, backend, hooks, train_files, val_source)
            result["data"] = {"source": "synthetic" if data is None else "shards", "note": data_note,
                              "path": None if data is None else str(data.dataset_dir)}
            result["notes"] = notes
            if upstream:
                stream = TokenStream(train_files, cfg.model.vocab_size)
                result["upstream"] = compare_upstream(
                    args, cfg, data, backend.name, hooks.dtype_name, result["step_ms"]["all"],
                    lambda: _timed_steps(backend, cfg, stream, args.steps)[0])
        finally:
            backend.close()
    return result


def _timed_steps(backend, cfg: RunConfig, stream: TokenStream, n: int, first_step: int = 0):
    """Returns per-step wall ms, batch-fetch ms, losses, and the process CPU seconds the steps used."""
    t = cfg.train
    times, fetch, losses = [], [], []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        batches = [next_batch(stream, t.batch_tokens, t.seq_len, t.grad_accum_steps, 0, 1)
                   for _ in range(t.grad_accum_steps)]
        t1 = time.perf_counter()
        loss = backend.train_step(batches, 1.0, muon_momentum(first_step + i, cfg.optim))
        t2 = time.perf_counter()
        times.append(1000 * (t2 - t0))
        fetch.append(1000 * (t1 - t0))
        losses.append(loss)
    return times, fetch, losses, time.process_time() - cpu0


def _measure(args, cfg: RunConfig, backend, hooks, train_files, val_source) -> dict:
    t, spec = cfg.train, cfg.model
    micro = t.batch_tokens // t.grad_accum_steps
    n = probe_size(spec, micro)
    stream = TokenStream(train_files, cfg.model.vocab_size)
    _timed_steps(backend, cfg, stream, args.warmup)  # untimed
    # The peak is probed right before and right after the timed steps and the better taken: on a shared
    # machine a burst of someone else's load during one probe would otherwise inflate MFU.
    before = hooks.matmul_peak(n, args.probe_seconds / 2)
    hooks.reset_peak()
    times, fetch, losses, cpu_s = _timed_steps(backend, cfg, stream, args.steps, args.warmup)
    peak_bytes, peak_source = hooks.peak_memory()
    after = hooks.matmul_peak(n, args.probe_seconds / 2)
    probe = max(before, after, key=lambda p: p["flops_per_s"])
    probe = {**probe, "before_flops_per_s": before["flops_per_s"], "after_flops_per_s": after["flops_per_s"]}
    median_ms = statistics.median(times)
    tok_s = t.batch_tokens / (median_ms / 1000)

    fl = flops_per_token(spec, t.seq_len)
    six_n = six_n_per_token(spec)
    achieved = fl.train * tok_s
    cpu = None
    if hooks.on_cpu:
        # A shared CPU: the share of its cores' time the process used while stepping (low under others' load,
        # or when kernels run single-threaded), and MFU counted in process CPU seconds against the probe's
        # FLOPs per CPU second (less sensitive to other load; spin-waiting threads count as busy, so it is an
        # estimate, not a measurement of a quiet machine).
        wall_s = sum(times) / 1000
        per_cpu_s = fl.train * t.batch_tokens * args.steps / max(cpu_s, 1e-9)
        cpu = {"process_cpu_s": cpu_s, "wall_s": wall_s, "threads": hooks.threads(),
               "share": cpu_s / max(wall_s * hooks.threads(), 1e-9),
               "mfu_cpu_time": per_cpu_s / probe["flops_per_cpu_s"],
               "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}

    ev = eval_throughput(backend, val_source, t.seq_len, t.val_batch_tokens)
    loader = loader_throughput(train_files, cfg)
    unique, effective = count_params(spec)
    return {
        "loopgolf_bench": 1,
        "config": cfg.source,
        "small": bool(args.small),
        "overrides": list(args.set or []),
        "backend": backend.name,
        "device": backend.device,
        "dtype": hooks.dtype_name,
        "versions": hooks.versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "blas": hooks.blas(), "threads": hooks.threads()},
        "spec": spec.to_dict(),
        "params": {"unique": unique, "effective": effective},
        "seq_len": t.seq_len,
        "batch_tokens": t.batch_tokens,
        "grad_accum_steps": t.grad_accum_steps,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "step_ms": _summary(times),
        "data_fetch_ms": _summary(fetch),
        "tokens_per_s": tok_s,
        "tokens_per_s_mean": t.batch_tokens / (statistics.fmean(times) / 1000),
        "flops_per_token": {**fl.to_dict(), "six_n": six_n},
        "achieved_flops_per_s": achieved,
        "peak": probe,
        "mfu": achieved / probe["flops_per_s"],
        "mfu_6n": six_n * tok_s / probe["flops_per_s"],
        "mfu_vs_median_peak": achieved / probe["median_flops_per_s"],
        "cpu": cpu,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_source": peak_source,
        "eval": ev,
        "loader": {**loader, "ratio_to_train": loader["tokens_per_s"] / tok_s, "target_ratio": LOADER_TARGET,
                   "ok": loader["tokens_per_s"] / tok_s >= LOADER_TARGET},
        "largest_matmul": list(largest_matmul(spec, micro)),
        "losses": [float(x) for x in losses],
    }


def eval_throughput(backend, val_tokens: np.ndarray, seq_len: int, val_batch_tokens: int, reps: int = 2) -> dict:
    """Tokens/s of backend.eval_loss_sum on one val-sized batch (as core.loop.evaluate slices it), after one
    untimed call (compilation)."""
    seqs = max(min(val_batch_tokens // seq_len, (len(val_tokens) - 1) // seq_len), 1)
    chunk = np.asarray(val_tokens[: seqs * seq_len + 1], dtype=np.int64)
    x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
    backend.eval_loss_sum(x, y)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        backend.eval_loss_sum(x, y)
        times.append(time.perf_counter() - t0)
    best = statistics.median(times)
    return {"tokens": int(y.size), "ms": 1000 * best, "tokens_per_s": y.size / best}


def loader_throughput(train_files, cfg: RunConfig, min_seconds: float = 0.2, min_steps: int = 3) -> dict:
    """Tokens/s of core.shards.TokenStream + next_batch alone, a whole step's micro-batches at a time."""
    t = cfg.train
    stream = TokenStream(train_files, cfg.model.vocab_size)
    tokens = steps = 0
    t0 = time.perf_counter()
    while steps < min_steps or time.perf_counter() - t0 < min_seconds:
        for _ in range(t.grad_accum_steps):
            x, _ = next_batch(stream, t.batch_tokens, t.seq_len, t.grad_accum_steps, 0, 1)
            tokens += x.size
        steps += 1
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "steps": steps, "tokens": tokens}


# ----------------------------------------------------------------------------------------------------
# output

COLUMNS = ("backend", "device", "data", "tok/step", "ms/step med", "ms/step mean", "tok/s", "MFLOP/tok",
           "GFLOP/s", "peak GFLOP/s (n)", "MFU", "peak mem MiB", "eval tok/s", "loader tok/s (x train)")


def table_row(r: dict) -> list[str]:
    return [
        r["backend"], r["device"], r["data"]["source"], f"{r['batch_tokens']:,}",
        f"{r['step_ms']['median']:,.1f}", f"{r['step_ms']['mean']:,.1f}", f"{r['tokens_per_s']:,.0f}",
        f"{r['flops_per_token']['train'] / 1e6:,.2f}", f"{r['achieved_flops_per_s'] / 1e9:,.2f}",
        f"{r['peak']['flops_per_s'] / 1e9:,.1f} ({r['peak']['n']})", f"{100 * r['mfu']:.1f}%",
        f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{r['eval']['tokens_per_s']:,.0f}",
        f"{r['loader']['tokens_per_s']:,.0f} ({r['loader']['ratio_to_train']:,.0f}x)",
    ]


def print_result(r: dict) -> None:
    print(f"loopgolf bench: {r['config']}{' --small' if r['small'] else ''} on {r['backend']} {r['device']}; "
          f"{r['warmup_steps']} warm-up + {r['steps']} timed steps of {r['batch_tokens']:,} tokens (seq {r['seq_len']})")
    print(f"data: {r['data']['note']}")
    for note in r.get("notes", []):
        print(f"note: {note}")
    fl = r["flops_per_token"]
    print(f"model FLOPs/token: train {fl['train']:,} (3 x forward {fl['forward']:,}; attention "
          f"{'causal half' if fl['causal'] else 'full'}), 6N {fl['six_n']:,}")
    print(f"peak: {r['peak']['framework']} {r['peak']['dtype']} {r['peak']['n']}^3 matmul on {r['peak']['device']}: best "
          f"{r['peak']['flops_per_s'] / 1e9:,.1f} GFLOP/s (before the timed steps {r['peak']['before_flops_per_s'] / 1e9:,.1f}, "
          f"after {r['peak']['after_flops_per_s'] / 1e9:,.1f})")
    print(f"memory: {r['peak_memory_source']}")
    if r.get("cpu"):
        c = r["cpu"]
        print(f"cpu: the process used {100 * c['share']:.0f}% of {c['threads']} core(s) while stepping (load average "
              f"{', '.join(f'{x:.2f}' for x in c['load_average'] or [])}); MFU in CPU seconds {100 * c['mfu_cpu_time']:.1f}%, "
              f"against the median probe sample {100 * r['mfu_vs_median_peak']:.1f}%")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    print("| " + " | ".join(table_row(r)) + " |")
    if not r["loader"]["ok"]:
        print(f"warning: the data loader is only {r['loader']['ratio_to_train']:.0f}x the trainer's tokens/s "
              f"(target {LOADER_TARGET:.0f}x)")
    if r["losses"] and not np.isfinite(r["losses"][-1]):
        print(f"warning: the last training loss is {r['losses'][-1]} (timings still stand)")
    up = r.get("upstream")
    if up:
        print(f"vs upstream {up['script']} ({len(up['rounds'])} alternating rounds):")
        for i, rd in enumerate(up["rounds"], 1):
            print(f"  round {i}: loopgolf {rd['loopgolf_ms']:,.1f} ms/step, upstream {rd['upstream_ms']:,.1f} "
                  f"ms/step (median of {rd['upstream_steps']} steps), ratio {rd['ratio']:.2f}x")
        print(f"  tokens/s: loopgolf {up['loopgolf_tokens_per_s']:,.0f}, upstream {up['tokens_per_s']:,.0f}: "
              f"loopgolf is {up['ratio']:.2f}x upstream")
        if up["same_dtype"] is False:
            print(f"  warning: compute dtypes differ (loopgolf {up['loopgolf_dtype']}, upstream {up['upstream_dtype']}); "
                  f"for a like-for-like ratio use --set train.compute_dtype=... to match")

