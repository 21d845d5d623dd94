"""`loopgolf parity`: do the MLX and PyTorch backends compute the same model? A table, one row per check.

    loopgolf parity --config configs/ut_3x4.toml --small [--dtype float32|bfloat16] [--seed N] [--set k=v]
    python -m tools.parity --config ...            (the same, without the console script)

Both backends are built from ONE weight file: init_weights(spec, seed) nudged off its init by a seeded
perturbation (zero-initialised projections would make every block the identity and hide attention and
MLP bugs), written with core.weights.save_weights and read back with load_weights, the real path, then
handed to each backend's trainer. The checks (tools/parity_checks.py, one function per phase), in the order
a bug would show first:

- per op on small random inputs: RMSNorm, RoPE, attention with GQA, MLP, softcap, cross-entropy;
- each effective layer's hidden state (naming the block it runs), the logits and the loss;
- the gradients of one backward pass, one row per parameter tensor;
- one optimizer step (Muon and Adam) of each backend's update function on the SAME numpy gradients, one
  with decoupled weight decay on every group ("update+wd": the config's decay, else 0.04), and Muon with
  MuonEq-R's row normalisation ("update+row_norm", optim.muon_row_normalize), then one full
  train_step of each trainer on the same batch (weights' change, one row per group);
- the artifact: the weights exported from each backend (backend tensors -> numpy) quantized and
  serialized by core; the SHA-256 of the uncompressed payload and of the compressed artifact must be
  identical, and the dequantized weights must give the same logits in both backends.

A row holds when max|a - b| <= tolerance = atol + rtol * max(|a|, |b|); the numbers and their reasons
are in core/tolerances.py. Exit 0 when every row holds, 1 otherwise (with "first divergence: <row>");
a bad config is one error line (exit 2). Everything runs on the CPU in both frameworks; --dtype bfloat16
runs the forward passes in bf16 and checks a looser band.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.config import RunConfig, load_config
from core.errors import UserError
from core.spec import ModelSpec
from core.tolerances import NOT_COMPARED
from tools.parity_checks import (
    Pair, artifact_rows, backward_rows, export_row, forward_rows, op_rows, qat_rows, train_step_rows, update_rows,
)
# HEADER and format_report are part of this module's interface (tests, tools): re-exported.
from tools.parity_rows import HEADER, Row, first_divergence, format_report  # noqa: F401

DTYPES = ("float32", "bfloat16")
PERTURB_VECTOR = 0.05  # std of the nudge on 1-D tensors; matrices get 0.5 / sqrt(fan_in)
OP_BATCH = 2  # sequences in every forward batch


# ---- shared inputs (tests/golden depends on these: changing them means regenerating the golden file) ----

def perturbed_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """init_weights(spec, seed) plus seeded noise on every tensor, so no projection starts at zero."""
    from core.params import init_weights

    rng = np.random.default_rng([seed, 0x9A717])
    out = {}
    for name, w in init_weights(spec, seed).items():
        std = 0.5 / math.sqrt(w.shape[1]) if w.ndim == 2 else PERTURB_VECTOR
        out[name] = (w + rng.normal(0.0, std, w.shape)).astype(np.float32)
    return out


def synthetic_batch(vocab: int, batch: int, seq: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int32 (batch, seq): a noisy affine bigram chain t -> (5 t + 3) mod vocab with 10% random tokens,
    so a model can learn it and a short training run shows a falling loss."""
    seqs = np.empty((batch, seq + 1), np.int64)
    seqs[:, 0] = rng.integers(0, vocab, batch)
    for t in range(seq):
        seqs[:, t + 1] = (5 * seqs[:, t] + 3) % vocab
    noise = rng.random(seqs.shape) < 0.1
    seqs[noise] = rng.integers(0, vocab, int(noise.sum()))
    return seqs[:, :-1].astype(np.int32), seqs[:, 1:].astype(np.int32)


# ---- the checks -----------------------------------------------------------------------------------------

def _need_backends():
    import importlib.util

    missing = [m for m in ("mlx", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        from tools.backends import INSTALL_HINT

        hints = "; ".join(f"{m}: {INSTALL_HINT[m]}" for m in missing)
        raise UserError(f"parity runs both backends, but {' and '.join(missing)} is not installed ({hints})")


@contextlib.contextmanager
def _mlx_on_cpu():
    import mlx.core as mx

    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(before)


@contextlib.contextmanager
def _torch_threads_restored():
    """Parity runs torch on one thread (set after the trainer picks its own count) and restores the count
    after. CPU-sized parity gains nothing from threads, and when torch was imported before backend_torch
    could set OMP_WAIT_POLICY=PASSIVE, its spinning OpenMP workers beside MLX's threads made a run 5-20x
    slower (measured on 2 cores). The tolerances hold for 1 and 2 threads (core/tolerances.py)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_and_load(spec: ModelSpec, weights: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Through the real weight-file path: core.weights.save_weights, then load_weights."""
    from core.weights import load_weights, save_weights

    save_weights(path, spec, weights)
    spec2, loaded = load_weights(path)
    if spec2 != spec:
        raise AssertionError(f"{path}: the spec read back differs from the one written")
    return loaded


def parity_rows(cfg: RunConfig, dtype: str = "float32", seed: int = 1337, progress=None) -> list[Row]:
    """Every check for `cfg`'s model, MLX against torch, in table order."""
    _need_backends()
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    with _mlx_on_cpu(), _torch_threads_restored(), tempfile.TemporaryDirectory(prefix="loopgolf-parity-") as tmp:
        return _parity_rows(cfg, dtype, seed, Path(tmp), progress or (lambda msg: None))


def _parity_rows(cfg: RunConfig, dtype: str, seed: int, tmp: Path, progress) -> list[Row]:
    """The phases in table order; each returns its rows (see the module docstring)."""
    import torch

    from backend_mlx.trainer import MLXBackend
    from backend_torch.trainer import TorchBackend

    spec, optim = cfg.model, cfg.optim
    train = dataclasses.replace(cfg.train, compute_dtype=dtype)
    weights = save_and_load(spec, perturbed_weights(spec, seed), tmp / "parity.safetensors")
    progress("building both trainers")
    pair = Pair(spec, dtype, weights, MLXBackend(spec, weights, train, optim),
                TorchBackend(spec, weights, train, optim, device="cpu"))
    torch.set_num_threads(1)  # see _torch_threads_restored
    x, y = synthetic_batch(spec.vocab_size, OP_BATCH, cfg.train.seq_len, np.random.default_rng([seed, 2]))
    try:
        # What each backend holds, back at the numpy boundary (the artifact is built from these).
        exported = {"mlx": pair.mlx.get_weights(), "torch": pair.torch.get_weights()}
        rows = [export_row(weights, exported)]
        progress("per-op checks")
        rows += op_rows(pair, OP_BATCH, cfg.train.seq_len, np.random.default_rng([seed, 1]))
        progress("forward")
        rows += forward_rows(pair, x)
        progress("backward")
        backward, grads = backward_rows(pair, x, y)
        rows += backward
        progress("optimizer step")
        rows += update_rows(pair, optim, grads)
        progress("train_step")
        rows += train_step_rows(pair, optim, x, y, grads)
    finally:
        pair.torch.close()
    progress("artifact")
    artifact, deq = artifact_rows(pair, cfg.artifact, exported, x)
    rows += artifact
    progress("fake quantization (QAT)")
    return rows + qat_rows(pair, cfg.artifact, deq, x)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("parity", help="check that the MLX and torch backends compute the same model",
                              description="Build the model in both backends from one weight file and compare "
                                          "ops, layers, logits, gradients, optimizer steps and the artifact.")
    _add_args(p)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config TOML (see configs/)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set model.layer_plan='2x3' (repeatable)")
    p.add_argument("--small", action="store_true",
                   help="shrink width, sequence length and vocabulary (keeping the topology): CPU-sized")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype of the forward passes (default float32; bfloat16 checks a looser band)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for the weights, their perturbation and the inputs (default: train.seed)")


def run_parity(args) -> int:
    cfg = load_config(args.config, list(args.set or []), small=args.small, small_vocab=args.small)
    seed = cfg.train.seed if args.seed is None else args.seed
    if seed < 0:
        raise UserError(f"--seed {seed}: expected 0 or more")
    _need_backends()  # after the config: a bad path is reported before a missing backend
    import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
    import mlx.core as mx
    import torch

    start = time.perf_counter()
    print(f"loopgolf parity: {args.config}{' --small' if args.small else ''}, {args.dtype}, seed {seed}, "
          f"MLX {mx.__version__} vs torch {torch.__version__}, both on CPU")
    print(f"model: {cfg.model.describe()}")
    print(f"batch: {OP_BATCH} x {cfg.train.seq_len} tokens; weights: init_weights + seeded perturbation, "
          "through save_weights/load_weights")
    print("a row holds when max abs diff <= tolerance = atol + rtol * max|value| (core/tolerances.py; weight "
          "changes add one ulp of the weight); max rel diff = max abs diff / max|value|")
    for (kind, dtype), why in NOT_COMPARED.items():
        if dtype == args.dtype:
            print(f"not compared in {dtype}: {kind} rows. {why}")
    print()

    def progress(msg: str) -> None:  # phases on stderr, so a long full-width run shows where it is
        if sys.stderr.isatty():
            print(f"  ... {msg} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    rows = parity_rows(cfg, args.dtype, seed, progress)
    print(format_report(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if first_divergence(rows) is None else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.parity ...`: the `loopgolf parity` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="loopgolf parity", description=__doc__.split("\n\n")[0])
    _add_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_parity(args)
    except UserError as e:
        print(f"loopgolf: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
