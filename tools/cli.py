"""The `loopgolf` command: parse, call core and a backend, print. User mistakes are one line, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys

from core.errors import UserError


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="run config TOML (see configs/)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.iterations=50 (repeatable)")
    p.add_argument("--small", action="store_true",
                   help="shrink width and sequence length for a quick check, keeping the topology")


# Each command's implementation, imported only when it runs (so --help needs neither MLX nor torch).
COMMANDS = {
    "train": ("tools.train", "run_train"),
    "size": ("tools.size", "run_size"),
    "budget": ("tools.budget", "run_budget"),
    "quantize": ("tools.quantize", "run_quantize"),
    "parity": ("tools.parity", "run_parity"),
    "convert": ("tools.convert", "run_convert"),
    "bench": ("tools.bench", "run_bench"),
    "eval": ("tools.eval", "run_eval"),
    "sweep": ("tools.sweep", "run_sweep"),
    "compare": ("tools.compare", "run_compare"),
    "plot": ("tools.plot", "run_plot"),
    "data": ("tools.data", "run_data"),
    "export": ("tools.export", "run_export"),
    "gpu-check": ("tools.gpu_check", "run_gpu_check"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopgolf", description="Looped transformers for Parameter Golf.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a config and report val_bpb and artifact size")
    _add_config_args(train)
    train.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                       help="auto: MLX on Apple Silicon, torch elsewhere")
    train.add_argument("--data", help="data root with manifest.json, or a dataset directory (overrides data.path)")
    train.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    train.add_argument("--init", help="start from these weights (safetensors) instead of a fresh init")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out RUN_DIR from its newest complete checkpoint (same config; "
                            "see train.checkpoint_every)")
    train.add_argument("--force", action="store_true",
                       help="a new run into an --out that holds an earlier run's files: delete them first "
                            "(without it such a directory is refused)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: on when stderr is a terminal)")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="torch: run N ranks on this machine through torch.distributed.run (default 1; "
                            "all visible GPUs under --profile h100)")
    train.add_argument("--profile", metavar="NAME",
                       help="apply the config's [profile.NAME] tables; built in: h100 (torch on all GPUs, "
                            "524,288-token batches of 1024, 600 s cap, data/fineweb10B_sp1024)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved run (world size, batch split, parameters, memory estimate) and exit")
    train.add_argument("--log-to", choices=["tensorboard", "wandb"],
                       help="also send the metrics to TensorBoard or wandb (rank 0; pip install 'loopgolf[track]')")

    size = sub.add_parser("size", help="parameters and artifact bytes vs 16,000,000: a config (before) or a run (after)")
    _add_config_args(size, required=False)
    size.add_argument("--run", metavar="RUN_DIR", help="report a finished run's artifact instead of a config")
    from tools.bench import add_parser as add_bench_parser
    from tools.budget import add_parser as add_budget_parser

    add_budget_parser(sub)
    add_bench_parser(sub)
    from tools.convert import add_parser as add_convert_parser
    from tools.parity import add_parser as add_parity_parser
    from tools.quantize import add_parser as add_quantize_parser

    add_convert_parser(sub)
    add_parity_parser(sub)
    add_quantize_parser(sub)
    from tools.eval import add_parser as add_eval_parser

    add_eval_parser(sub)
    from tools.export import add_parser as add_export_parser

    add_export_parser(sub)
    from tools.compare import add_parser as add_compare_parser
    from tools.plot import add_parser as add_plot_parser
    from tools.sweep import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    add_compare_parser(sub)
    add_plot_parser(sub)
    from tools.data import add_parser as add_data_parser

    add_data_parser(sub)
    from tools.gpu_check import add_parser as add_gpu_check_parser

    add_gpu_check_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # torch --nproc re-launches the same command
    module, function = COMMANDS[args.command]
    try:
        return getattr(importlib.import_module(module), function)(args)
    except UserError as e:
        print(f"loopgolf: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"loopgolf: stopped: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # what no write or read site turned into a UserError: still one line with the path
        where = f"{e.filename}: " if e.filename else ""
        print(f"loopgolf: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loopgolf: interrupted", file=sys.stderr)
        return 130


def _will_use_mlx(argv: list[str]) -> bool:
    # A silent pre-parse: main() parses again after any re-exec, and only that parse may print help or errors.
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, _ = build_parser().parse_known_args(argv)
    except SystemExit:
        return False
    if args.command == "parity":
        return True  # parity always runs MLX beside torch
    if getattr(args, "backend", None) is None:
        return False
    from tools.backends import resolve_backend

    try:
        return resolve_backend(args.backend) == "mlx"
    except UserError:
        return False


def console_main() -> None:
    """The console script: on Linux, runs MLX with OpenBLAS preloaded when it is installed (tools/blas.py)."""
    from tools.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas(_will_use_mlx(sys.argv[1:]))
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
