"""The parts of `loopgolf gpu-check` (tools/gpu_check.py), each run in a process of its own:

    python -m tools.gpu_parts PART.json RESULT.json

so that a CUDA fault, an out-of-memory or a hung compile in one part costs that part only. PART.json says
what to run (kind, config, overrides, device, sizes); RESULT.json gets the measurements, a list of checks
(each {check, ok, detail}) and, where the part could not run, its one-line error. Exit 0 when every check
holds, 1 otherwise.

Kinds: parity (the device against the CPU on the same weights), train (compiled steps: speed, MFU, memory,
compiles), depth (one compile per progressive-depth variant before the clock), upstream (the user's
train_gpt.py side by side), export (the exported train_gpt.py under torchrun against loopgolf's trainer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.config import load_config
from core.errors import UserError
from core.params import init_weights
from core.shards import TokenStream

ROOT = Path(__file__).resolve().parent.parent
MEMORY_GOAL = 0.15  # the goal: peak memory within 15% of the --dry-run estimate


class Skipped(Exception):
    """The part cannot run here, and that is no failure (e.g. no --upstream script was given)."""


def check(name: str, ok: bool, detail: str) -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:400]


def _torch(part: dict):
    import torch

    from backend_torch import compiled

    compiled.BACKEND = part["compile_backend"]
    return torch, torch.device(part["device"])


def _config(part: dict, extra: list[str] = ()):
    return load_config(part["config"], [*part["sets"], *extra], small=part["small"])


def _counts_since(before: dict) -> dict:
    from backend_torch.compiled import dynamo_counts

    now = dynamo_counts()
    return {k: now[k] - before[k] for k in now}


def _compiles(part: dict, cfg) -> bool:
    c = cfg.train.compile
    return c == "on" or (c == "auto" and part["device"].startswith("cuda"))


# ---- parity: the device against the CPU ------------------------------------------------------------------

def _observe(trainer, x, y, momentum: float) -> dict:
    """What parity compares of one trainer: the loss, the log-probs, one train_step and the loss after it."""
    n = x.size
    out = {"loss": trainer.eval_loss_sum(x, y) / n, "log_probs": trainer.eval_log_probs(x)}
    out["step_loss"] = trainer.train_step([(x, y)], 1.0, momentum)
    out["weights"] = trainer.get_weights()
    out["loss_after"] = trainer.eval_loss_sum(x, y) / n
    return out


def run_parity(part: dict) -> dict:
    torch, device = _torch(part)
    from backend_torch import model as tm
    from backend_torch.trainer import TorchBackend
    from core.params import param_table
    from core.schedule import muon_momentum
    from core.tolerances import ADAM_GRAD_FLOOR, tolerance
    from tools.parity import perturbed_weights, synthetic_batch
    from tools.parity_checks import group_rows
    from tools.parity_rows import compare

    cfg = _config(part)
    spec, seed = cfg.model, part.get("seed", 1337)
    weights = perturbed_weights(spec, seed)
    x, y = synthetic_batch(spec.vocab_size, 2, cfg.train.seq_len, np.random.default_rng([seed, 2]))
    momentum = muon_momentum(0, cfg.optim)
    # The reference: eager float32 on the CPU, and its gradients (Adam's rows leave out |g| ~ 0, as parity).
    cpu_train = dataclasses.replace(cfg.train, compute_dtype="float32", compile="off")
    ref = _observe(TorchBackend(spec, weights, cpu_train, cfg.optim, device="cpu"), x, y, momentum)
    p = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    tm.mean_loss(spec, p, torch.tensor(x), torch.tensor(y), torch.float32).backward()
    grads = {k: v.grad.numpy() for k, v in p.items() if v.grad is not None}

    table, out = param_table(spec), {"config": cfg.source, "device": str(device), "dtypes": {}}
    checks = []
    for dtype in ("float32", "bfloat16"):
        train = dataclasses.replace(cfg.train, compute_dtype=dtype, compile="on" if part["compile"] else "off")
        trainer = TorchBackend(spec, weights, train, cfg.optim, device=device)
        if device.type == "cuda" and dtype == "float32":  # fp32 means fp32: no TF32 in matmuls or convolutions
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        got = _observe(trainer, x, y, momentum)
        trainer.close()
        rows = [compare("loss", ref["loss"], got["loss"], tolerance("loss", dtype)),
                compare("log-probs", ref["log_probs"], got["log_probs"], tolerance("logits", dtype)),
                compare("train_step loss", ref["step_loss"], got["step_loss"], tolerance("step_loss", dtype))]
        delta = lambda w: {k: w[k].astype(np.float64) - weights[k] for k in weights}  # noqa: E731
        floor = ADAM_GRAD_FLOOR.get(dtype)
        masks = {k: np.abs(g) >= floor * np.abs(g).max() for k, g in grads.items()} if floor else None
        rows += group_rows("train_step", table, weights, delta(ref["weights"]), delta(got["weights"]), dtype,
                            "step_muon", "step_adam", masks)
        rows.append(compare("loss after the step", ref["loss_after"], got["loss_after"],
                            tolerance("after_step_loss", dtype)))
        out["dtypes"][dtype] = [dataclasses.asdict(r) for r in rows]
        bad = [r.check for r in rows if not r.ok]
        checks.append(check(f"parity {dtype}", not bad, f"{len(rows) - len(bad)} of {len(rows)} rows hold"
                            + (f"; first divergence: {bad[0]}" if bad else "")))
    out["checks"] = checks
    return out


# ---- training: speed, MFU, memory, compiles ---------------------------------------------------------------

def _memory_estimate(cfg, micro_tokens: int, act_bytes: int) -> tuple[int | None, str]:
    try:
        from tools.train import memory_estimate  # the --dry-run estimate
    except ImportError as e:  # tools.train reaches zstandard, which a bare GPU image may lack
        return None, f"the --dry-run estimate is not importable here ({one_line(e)})"
    return int(sum(memory_estimate(cfg, micro_tokens, act_bytes).values())), "loopgolf train --dry-run"


def _stream(cfg, tmp: Path) -> TokenStream:
    from tools.bench import synthetic_shard

    return TokenStream([synthetic_shard(tmp, cfg)])  # speed does not depend on which tokens


def run_train(part: dict) -> dict:
    torch, device = _torch(part)
    from backend_torch.compiled import dynamo_counts
    from backend_torch.trainer import TorchBackend
    from core.flops import flops_per_token
    from tools.bench import _timed_steps
    from tools.bench_hooks import hooks_for

    cfg = _config(part)
    t, spec = cfg.train, cfg.model
    compiles = _compiles(part, cfg)
    backend = TorchBackend(spec, init_weights(spec, t.seed), t, cfg.optim, device=device)
    hooks = hooks_for(backend)
    try:
        with tempfile.TemporaryDirectory(prefix="loopgolf-gpu-check-") as tmp:
            stream = _stream(cfg, Path(tmp))
            start = dynamo_counts()
            warm_ms, _, _, _ = _timed_steps(backend, cfg, stream, part["warmup"])
            warm = _counts_since(start)
            hooks.reset_peak()
            after_warm = dynamo_counts()
            times, _, losses, _ = _timed_steps(backend, cfg, stream, part["steps"], part["warmup"])
            timed = _counts_since(after_warm)
            peak_bytes, peak_source = hooks.peak_memory()
        peak = hooks.matmul_peak(part["peak_n"], part["peak_seconds"])
    finally:
        backend.close()
    median = statistics.median(times)
    tok_s = t.batch_tokens / (median / 1000)
    train_flops = flops_per_token(spec, t.seq_len).train
    micro = t.batch_tokens // t.grad_accum_steps
    estimate, estimate_source = _memory_estimate(cfg, micro, 2 if hooks.dtype_name == "bfloat16" else 4)
    on_gpu = hooks.cuda
    expected = 2 if compiles else 0  # the loss (forward and backward) and the optimizer update
    out = {
        "config": cfg.source, "device": backend.device, "dtype": hooks.dtype_name, "versions": hooks.versions(),
        "batch_tokens": t.batch_tokens, "seq_len": t.seq_len, "grad_accum_steps": t.grad_accum_steps,
        "warmup_steps": part["warmup"], "steps": part["steps"], "compiled": compiles,
        "warmup_ms": [round(v, 2) for v in warm_ms], "step_ms": [round(v, 3) for v in times],
        "ms_per_step": median, "tokens_per_s": tok_s, "train_flops_per_token": train_flops,
        "peak": {k: peak[k] for k in ("n", "dtype", "flops_per_s", "median_flops_per_s")},
        "mfu": train_flops * tok_s / peak["flops_per_s"],
        # The first step compiles the loss (forward and backward) and the update; the others are steady.
        "compile_s": (warm_ms[0] - median) / 1000 if warm_ms and compiles else None,
        "graphs_before_clock": warm["graphs"], "graphs_in_timed_steps": timed["graphs"],
        "graph_breaks": warm["graph_breaks"] + timed["graph_breaks"],
        "peak_memory_bytes": peak_bytes, "peak_memory_source": peak_source,
        "memory_estimate_bytes": estimate, "memory_estimate_source": estimate_source,
        "losses": [float(v) for v in losses],
    }
    out["memory_ratio"] = peak_bytes / estimate if (estimate and on_gpu) else None
    out["checks"] = [
        check("compiles before the clock", warm["graphs"] == expected,
              f"{warm['graphs']} graph(s) in {part['warmup']} warm-up step(s); expected {expected}"
              + (" (the loss and the optimizer update)" if compiles else " (not compiled)")),
        check("graph breaks", out["graph_breaks"] == 0, f"{out['graph_breaks']} (dynamo's counters)"),
        check("no recompile in the timed steps", timed["graphs"] == 0, f"{timed['graphs']} graph(s) compiled"),
        check("finite losses", all(math.isfinite(v) for v in losses), f"last {losses[-1]:.4f}"),
    ]
    if out["memory_ratio"] is not None:
        r = out["memory_ratio"]
        out["goals"] = [check("peak memory within 15% of the --dry-run estimate", abs(r - 1) <= MEMORY_GOAL,
                              f"{peak_bytes / 2**30:.2f} GiB measured, {estimate / 2**30:.2f} GiB estimated "
                              f"({100 * (r - 1):+.0f}%)")]
    return out


# ---- progressive depth: one compile per variant, before the clock -----------------------------------------

def run_depth(part: dict) -> dict:
    torch, device = _torch(part)
    from backend_torch.compiled import dynamo_counts
    from backend_torch.trainer import TorchBackend
    from core.depth import depth_schedule
    from tools.bench import _timed_steps

    cfg = _config(part)
    schedule = depth_schedule(cfg)
    if schedule is None:
        raise UserError(f"{cfg.source}: train.depth_schedule is empty; the depth part needs a progressive config")
    t, spec = cfg.train, cfg.model
    compiles = _compiles(part, cfg)
    depths = sorted(set(schedule.layer_counts))
    backend = TorchBackend(spec, init_weights(spec, t.seed), t, cfg.optim, device=device)
    variants = []
    try:
        with tempfile.TemporaryDirectory(prefix="loopgolf-gpu-check-") as tmp:
            stream = _stream(cfg, Path(tmp))
            for layers in depths:  # before the clock, as core.loop's priming steps: one step at every depth
                backend.set_depth(layers)
                start = dynamo_counts()
                ms, _, _, _ = _timed_steps(backend, cfg, stream, 1)
                variants.append({"layers": layers, "first_step_ms": ms[0], **_counts_since(start)})
            for v in variants:  # the clock: every depth again, where nothing may compile
                backend.set_depth(v["layers"])
                start = dynamo_counts()
                ms, _, losses, _ = _timed_steps(backend, cfg, stream, part["steps"])
                timed = _counts_since(start)
                v.update(ms_per_step=statistics.median(ms), graphs_timed=timed["graphs"],
                         graph_breaks=v["graph_breaks"] + timed["graph_breaks"], last_loss=float(losses[-1]))
    finally:
        backend.close()
    expected = [(2 if i == 0 else 1) if compiles else 0 for i in range(len(depths))]  # + the update, once
    got = [v["graphs"] for v in variants]
    return {
        "config": cfg.source, "device": backend.device, "batch_tokens": t.batch_tokens, "compiled": compiles,
        "depths": depths, "variants": variants,
        "checks": [
            check("one compile per depth variant", got == expected,
                  f"graphs per depth {dict(zip(depths, got))}; expected {dict(zip(depths, expected))} "
                  "(the first also compiles the optimizer update)"),
            check("no compile once the clock runs", all(v["graphs_timed"] == 0 for v in variants),
                  f"{sum(v['graphs_timed'] for v in variants)} graph(s) in the timed steps"),
            check("graph breaks", all(v["graph_breaks"] == 0 for v in variants),
                  f"{sum(v['graph_breaks'] for v in variants)}"),
            check("finite losses", all(math.isfinite(v["last_loss"]) for v in variants),
                  ", ".join(f"{v['layers']}: {v['last_loss']:.3f}" for v in variants)),
        ],
    }


# ---- upstream side by side --------------------------------------------------------------------------------

def run_upstream(part: dict) -> dict:
    if not part.get("upstream"):
        raise Skipped("no --upstream PATH given (your copy of upstream's train_gpt.py)")
    if not part.get("data"):
        raise Skipped("upstream reads real shards and a tokenizer: pass --data DIR (e.g. make_mini_shards --demo)")
    import argparse

    torch, device = _torch(part)
    from backend_torch.trainer import TorchBackend
    from tools.bench import _timed_steps, resolve_bench_data
    from tools.bench_hooks import hooks_for
    from tools.bench_upstream import TORCH_UPSTREAM_ACCUM, check_upstream_comparable, compare_upstream

    # Upstream's train_gpt.py on one process always splits a step into 8 micro-batches.
    cfg = _config(part, [f'data.path="{part["data"]}"', 'data.dataset=""',
                         f"train.grad_accum_steps={TORCH_UPSTREAM_ACCUM}"])
    check_upstream_comparable(cfg, "torch")
    if not Path(part["upstream"]).is_file():
        raise UserError(f"--upstream {part['upstream']}: file not found")
    data, _ = resolve_bench_data(cfg, explicit=True, synthetic=False)
    t, spec = cfg.train, cfg.model
    backend = TorchBackend(spec, init_weights(spec, t.seed), t, cfg.optim, device=device)
    try:
        stream = TokenStream(data.train_files)
        _timed_steps(backend, cfg, stream, part["warmup"])
        ours = _timed_steps(backend, cfg, stream, part["steps"])[0]
        args = argparse.Namespace(steps=part["steps"], warmup=part["warmup"], rounds=part["rounds"],
                                  vs_upstream=part["upstream"], upstream_env=part.get("upstream_env") or [],
                                  upstream_timeout=part["timeout"])
        up = compare_upstream(args, cfg, data, backend.name, hooks_for(backend).dtype_name, ours,
                              lambda: _timed_steps(backend, cfg, stream, part["steps"])[0])
    finally:
        backend.close()
    up.pop("env", None)  # paths of this machine; the settings are the config's
    return {"config": cfg.source, "device": backend.device, "batch_tokens": t.batch_tokens, **up,
            "checks": [check("upstream ran", True, f"{len(up['rounds'])} round(s)")],
            "goals": [check("at least 1.1x upstream's tokens/s", up["ratio"] >= 1.1, f"{up['ratio']:.2f}x")]}


# ---- the exported submission script under torchrun ---------------------------------------------------------

def _error_line(output: str) -> str:
    """The line of a failed command's output that says why: its last error line, else its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errors or lines or ["(no output)"])[-1][:300]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float, what: str, log: Path) -> None:
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    log.write_text(proc.stdout)  # kept in the part's folder, and its tail printed to the part's log on failure
    if proc.returncode != 0:
        print(f"{what}: {cmd}\n" + "\n".join(proc.stdout.splitlines()[-40:]), file=sys.stderr)
        raise UserError(f"{what} exited {proc.returncode}: {_error_line(proc.stdout)}")


def _train_losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not written")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(e["train_loss"]) for e in events if e.get("event") == "train"]


def run_export(part: dict) -> dict:
    import importlib.util
    import os

    if importlib.util.find_spec("tools.export") is None:
        raise UserError("loopgolf export is not available in this tree yet (tools/export.py not found)")
    if not part.get("data"):
        raise Skipped("the exported script trains on real shards: pass --data DIR (e.g. make_mini_shards --demo)")
    from core.tolerances import tolerance

    steps, work = part["steps"], Path(part["workdir"])
    sets = [*part["sets"], f"train.iterations={steps}", "train.log_every=1", "train.val_every=0",
            f"train.warmup_steps={part['warmup']}", "train.max_wallclock_seconds=0",
            f'data.path="{Path(part["data"]).resolve()}"', 'data.dataset=""']
    config = ["--config", part["config"], *(["--small"] if part["small"] else []),
              *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, **part.get("env", {}))
    cli = [sys.executable, "-m", "tools.cli"]
    deadline = time.monotonic() + part["timeout"]
    left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
    _run([*cli, "train", *config, "--backend", "torch", "--out", str(work / "run"), "--no-progress"], ROOT, env,
         left(), "loopgolf train", work / "train.out")
    _run([*cli, "export", *config, "--out", str(work / "submission"), "--pack", "none", "--force",
          "--run", str(work / "run")], ROOT, env, left(), "loopgolf export", work / "export.out")
    # The script where loopgolf is not importable: its own folder as the working directory, the repository off
    # the path (the extra site directory with wheels the GPU image lacks stays).
    script_env = dict(env, OUT_DIR=str(work / "script_run"), RUN_ID="gpu_check")
    keep = [p for p in script_env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    script_env["PYTHONPATH"] = os.pathsep.join(keep)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train_gpt.py"],
         work / "submission", script_env, left(), "torchrun train_gpt.py", work / "script.out")
    ours, theirs = _train_losses(work / "run"), _train_losses(work / "script_run")
    dtype = "bfloat16" if part["device"].startswith("cuda") else "float32"
    tol = tolerance("after_step_loss", dtype)
    n = min(len(ours), len(theirs))
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    within = all(d <= tol.bound(abs(a)) for d, a in zip(diffs, ours))
    return {
        "config": part["config"], "steps": steps, "loopgolf_losses": ours, "script_losses": theirs,
        "identical": ours == theirs, "max_abs_diff": max(diffs) if diffs else None,
        "checks": [
            check("the script logged every step", len(theirs) == steps == len(ours),
                  f"script {len(theirs)}, loopgolf {len(ours)} of {steps} steps"),
            check("losses match loopgolf's trainer", n > 0 and within,
                  ("identical" if ours == theirs else f"max |diff| {max(diffs):.2e}") + f" over {n} steps; "
                  f"bound {tol.rtol:g} relative (core/tolerances.py after_step_loss, {dtype}): the same code, "
                  "run twice, may sum in another order on a GPU"),
        ],
    }


PARTS = {"parity": run_parity, "train": run_train, "depth": run_depth, "upstream": run_upstream,
         "export": run_export}


def main(argv: list[str]) -> int:
    from core.atomic import atomic_write_text

    part = json.loads(Path(argv[0]).read_text())
    started = time.perf_counter()
    try:
        result = PARTS[part["kind"]](part)
        failed = [c["check"] for c in result.get("checks", []) if not c["ok"]]
        result.update(status="fail" if failed else "ok", error=None)
    except Skipped as e:
        result = {"status": "skipped", "error": str(e), "checks": []}
    except Exception as e:  # noqa: BLE001 - every failure is this part's one line; the others still run
        import traceback

        traceback.print_exc()
        result = {"status": "error", "error": one_line(e), "checks": []}
    result["seconds"] = time.perf_counter() - started
    atomic_write_text(argv[1], json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    return 0 if result["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
