"""`loopgolf eval`: score saved weights or an artifact on a dataset's validation split.

Always upstream's standard eval (non-overlapping windows of --seq-len); with --stride, the sliding-window
eval (core/sliding.py) over the same targets; with --hedge, the Hedge mixer's bpb (core/hedge.py) beside
the sliding one, never instead; with --ttt, score-first test-time training over the sliding windows
(core/ttt.py), its settings the run's eval.ttt_* keys (config.toml beside the file, else the defaults) and
--set eval.ttt_KEY=VALUE. The tokenizer and byte tables come from the data, as in `loopgolf train`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from core.config import EvalConfig
from core.depth import check_loops
from core.errors import UserError
from core.spec import ModelSpec
from tools.eval_depth import add_arguments as add_depth_arguments, run_depth_eval, wants_depth_eval


FALLBACK_SEQ_LEN = 1024  # upstream's, for a file with no run config beside it


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="val_bpb of saved weights or an artifact: standard, sliding-window, Hedge")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="W.safetensors", help="loopgolf weights (e.g. RUN_DIR/model.safetensors)")
    src.add_argument("--artifact", metavar="A.art",
                     help="a loopgolf artifact, evaluated dequantized (the round trip the challenge counts)")
    p.add_argument("--data", required=True, help="data root with manifest.json, or a dataset directory")
    p.add_argument("--dataset", help="the manifest's dataset name (default: the only one)")
    p.add_argument("--seq-len", type=int, default=None, metavar="L",
                   help="window length of both evals (default: the run's train.seq_len, from the config.toml "
                        f"beside the file, else {FALLBACK_SEQ_LEN}; need not be training's)")
    p.add_argument("--stride", type=int, default=0, metavar="S",
                   help="also run the sliding-window eval, scoring S new tokens per window (e.g. 64; <= L)")
    d = EvalConfig  # the defaults are the config's, not copies
    p.add_argument("--batch-seqs", type=int, default=d.batch_seqs, metavar="N",
                   help=f"windows per forward (default {d.batch_seqs})")
    p.add_argument("--hedge", action="store_true",
                   help="also report the Hedge mixer's bpb over the sliding windows (#895 without its entropy expert)")
    p.add_argument("--hedge-eta", type=float, default=d.hedge_eta,
                   help=f"the Hedge rule's learning rate (default {d.hedge_eta})")
    p.add_argument("--ttt", action="store_true",
                   help="also run score-first test-time training over the sliding windows (#1493; needs --stride)")
    p.add_argument("--set", action="append", default=[], metavar="eval.ttt_KEY=VALUE",
                   help="a TTT setting, e.g. --set eval.ttt_lr=0.005 (repeatable; see [eval] in the README)")
    p.add_argument("--max-tokens", type=int, default=0, metavar="N",
                   help="only the first N validation targets, rounded down to whole windows (quick checks)")
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                   help="auto: MLX on Apple Silicon, torch elsewhere")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bf16 on GPU/Metal, fp32 on CPU)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="torch: split the windows over N local ranks (torch.distributed.run)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr (default: a bar on a terminal, else a line every 10%%)")
    add_depth_arguments(p)
    return p


def resolve_seq_len(args) -> str:
    """Fill in args.seq_len when --seq-len is not given: the run's own train.seq_len from RUN_DIR/config.toml
    beside the weights or artifact (a model scores worst past the length it trained at), else upstream's
    1024. Returns where the number came from, for the report."""
    if args.seq_len is not None:
        return "--seq-len"
    from core.config import load_config

    config = Path(args.weights or args.artifact).parent / "config.toml"
    if not config.is_file():
        args.seq_len = FALLBACK_SEQ_LEN
        return f"default; no {config} to take the run's train.seq_len from"
    args.seq_len = load_config(config).train.seq_len
    return f"train.seq_len of {config}"


def check_args(args) -> None:
    """The flags EvalConfig has are checked by it (an error names the flag), then what only `eval` has."""
    from tools.flags import config_from_flags

    if args.seq_len < 1:  # before EvalConfig, where 0 means train.seq_len
        raise UserError(f"--seq-len {args.seq_len}: expected a positive integer")
    config_from_flags(EvalConfig, "eval", {
        "stride": ("--stride", args.stride), "seq_len": ("--seq-len", args.seq_len),
        "batch_seqs": ("--batch-seqs", args.batch_seqs), "hedge": ("--hedge", args.hedge),
        "hedge_eta": ("--hedge-eta", args.hedge_eta)})
    if args.stride > args.seq_len:
        raise UserError(f"--stride {args.stride}: expected 0 (off) up to --seq-len ({args.seq_len}); a longer "
                        "stride would leave targets between windows unscored")
    if args.max_tokens < 0:
        raise UserError(f"--max-tokens {args.max_tokens}: expected 0 (all) or more")
    if (args.ttt or args.set) and not args.stride:
        raise UserError("--ttt scores each chunk with the sliding windows: give --stride too (e.g. --stride 64)")
    if args.set and not args.ttt:
        raise UserError(f"--set {args.set[0]}: eval takes only TTT settings, which need --ttt")
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: expected 1 or more")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise UserError(f"--json {args.json}: directory {Path(args.json).absolute().parent} not found")
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {args.json} is a directory; expected a file path to write, e.g. eval.json")


def load_model(args) -> tuple[ModelSpec, dict[str, np.ndarray], str]:
    """(spec, float32 weights, a description) from --weights or --artifact."""
    from core.artifact import MAGIC, read_artifact
    from core.weights import check_weights, load_weights

    path = Path(args.weights or args.artifact)
    if path.is_dir():
        hint = "model.safetensors" if args.weights else "model.int8-zlib.art"
        raise UserError(f"--{'weights' if args.weights else 'artifact'} {path} is a directory; expected a file "
                        f"(e.g. {path / hint})")
    if not path.is_file():
        raise UserError(f"{'weight file' if args.weights else 'artifact'} {path} not found")
    with open(path, "rb") as f:
        is_artifact = f.read(len(MAGIC)) == MAGIC
    if args.weights:
        if is_artifact:
            raise UserError(f"--weights {path} is a loopgolf artifact; pass it with --artifact")
        spec, weights = load_weights(path)
        return spec, weights, f"weights {path}"
    if not is_artifact:
        raise UserError(f"--artifact {path} is not a loopgolf artifact (bad magic); for a .safetensors weight "
                        "file use --weights")
    spec_json, weights, info = read_artifact(path)
    spec = ModelSpec.from_table(spec_json, where=f"{path} spec")
    check_weights(spec, weights, str(path))
    return spec, weights, f"artifact {path} ({info.scheme}, {info.codec_label}, {info.total_bytes:,} B), dequantized"


def load_data(args, spec: ModelSpec):
    """(data paths, byte tables, val tokens) for the model's vocabulary, or one clear error."""
    from core.bpb import build_byte_luts, check_vocab
    from core.manifest import resolve_data
    from core.shards import first_val_tokens, load_val_tokens
    from core.tokenizer import load_tokenizer

    data = resolve_data(args.data, args.dataset, dataset_flag="--dataset NAME")
    sp = load_tokenizer(data.tokenizer_path)
    check_vocab(sp, spec.vocab_size, data.tokenizer_path)
    luts = build_byte_luts(sp, spec.vocab_size)
    tokens = first_val_tokens(load_val_tokens(data.val_files, args.seq_len), args.max_tokens, args.seq_len)
    top = int(np.max(tokens))
    if top >= spec.vocab_size:
        raise UserError(f"validation shards in {data.dataset_dir} hold token id {top}, but the model's vocab_size "
                        f"is {spec.vocab_size}: the model and the data do not match")
    return data, luts, tokens


def ttt_settings(args):
    """The --ttt eval's settings: the run's [eval] ttt_* keys (RUN_DIR/config.toml beside the file) or the
    defaults, then --set eval.ttt_KEY=VALUE, validated as the config's own."""
    import dataclasses

    from core.config import EvalConfig, load_config, parse_override
    from core.tables import dataclass_from_table
    from core.ttt import TTTSettings

    config = Path(args.weights or args.artifact).parent / "config.toml"
    base = load_config(config).eval if config.is_file() else EvalConfig()
    table = {k: v for k, v in dataclasses.asdict(base).items() if k.startswith("ttt_")}
    for text in args.set:
        section, key, value = parse_override(text)
        if section != "eval" or not key.startswith("ttt_"):
            raise UserError(f"--set {text!r}: eval takes only TTT settings, eval.ttt_KEY=VALUE")
        table[key] = value
    settings = TTTSettings.from_eval(dataclass_from_table(EvalConfig, table, "eval", ttt=True, stride=args.stride))
    if settings.chunk_tokens < args.seq_len:  # before any eval runs
        raise UserError(f"eval.ttt_chunk_tokens = {settings.chunk_tokens} is shorter than the window (--seq-len "
                        f"{args.seq_len}): a chunk must hold at least one training sequence")
    return settings


class Progress:
    """Sliding- or TTT-eval progress on stderr (rank 0): a bar on a terminal, else a line at every 10%."""

    def __init__(self, enabled: bool | None, rank: int, label: str = "sliding eval", unit: str = "window"):
        self.label, self.unit = label, unit
        self.bar = None
        self.enabled = rank == 0 and enabled is not False
        self.tty = sys.stderr.isatty()
        self.next_tenth, self.t0 = 1, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr, dynamic_ncols=True, leave=False)
            self.bar.update(done - self.bar.n)
            return
        if done * 10 >= self.next_tenth * total:
            self.next_tenth = done * 10 // total + 1
            print(f"{self.label}: {done}/{total} {self.unit}s ({100 * done // total}%) "
                  f"{time.perf_counter() - self.t0:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_eval(args) -> int:
    from core.config import OptimConfig, TrainConfig
    from tools.backends import build_backend, resolve_backend, under_torchrun

    seq_len_from = resolve_seq_len(args)
    check_args(args)
    args.ttt_settings = ttt_settings(args) if args.ttt else None
    backend_name = resolve_backend(args.backend)
    nproc = int(os.environ["WORLD_SIZE"]) if under_torchrun() else (args.nproc or 1)
    if nproc > 1 and backend_name != "torch":
        raise UserError(f"--nproc {nproc}: several ranks need --backend torch (this resolves to {backend_name})")
    spec, weights, source = load_model(args)
    if wants_depth_eval(args):  # before loading data or a backend
        check_loops(spec, args.loops, args.converge, args.max_loops)
    data, luts, tokens = load_data(args, spec)
    if nproc > 1 and not under_torchrun():  # mistakes above are reported once, before any rank starts
        from backend_torch.launch import launch

        return launch(nproc, getattr(args, "argv", None) or sys.argv[1:])
    L = args.seq_len
    train = TrainConfig(seq_len=L, batch_tokens=L, val_batch_tokens=L, compute_dtype=args.dtype)
    backend = build_backend(backend_name, spec, weights, train, OptimConfig())
    try:
        return _evaluate_and_report(args, backend, spec, source, data, luts, tokens, seq_len_from)
    finally:
        backend.close()


def _evaluate_and_report(args, backend, spec, source, data, luts, tokens, seq_len_from: str) -> int:
    from core.atomic import atomic_write_text
    from core.loop import evaluate
    from core.sliding import sliding_eval

    L, rank0 = args.seq_len, backend.rank == 0
    say = (lambda text: print(text, flush=True)) if rank0 else (lambda text: None)  # noqa: E731
    say(f"model: {spec.describe()} from {source}")
    say(f"data: {data.dataset_dir} val_targets:{len(tokens) - 1} seq_len:{L} ({seq_len_from}) backend:{backend.name} "
        f"device:{backend.device} world_size:{backend.world_size}")
    record = {"source": source, "spec": spec.to_dict(), "data": str(data.dataset_dir), "targets": len(tokens) - 1,
              "seq_len": L, "backend": backend.name, "device": backend.device, "world_size": backend.world_size}
    t0 = time.perf_counter()
    loss, bpb = evaluate(backend, tokens, L, args.batch_seqs * L * backend.world_size, luts)
    ms = 1000 * (time.perf_counter() - t0)
    say(f"standard val_loss:{loss:.8f} val_bpb:{bpb:.8f} (non-overlapping windows of {L}) eval_time:{ms:.0f}ms")
    record.update(val_loss=loss, val_bpb=bpb, eval_ms=ms)
    if args.stride:
        progress = Progress(args.progress, backend.rank)
        t0 = time.perf_counter()
        try:
            r = sliding_eval(backend, tokens, L, args.stride, args.batch_seqs, luts,
                             hedge_eta=args.hedge_eta if args.hedge else None, vocab_size=spec.vocab_size,
                             progress=progress)
        finally:
            progress.close()
        ms = 1000 * (time.perf_counter() - t0)
        say(f"sliding val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} (windows of {r.window_len}, stride "
            f"{r.stride}, {r.windows} windows) eval_time:{ms:.0f}ms")
        record.update(sliding_val_loss=r.val_loss, sliding_val_bpb=r.val_bpb, stride=r.stride, windows=r.windows,
                      sliding_eval_ms=ms)
        if args.hedge:
            say(f"hedge val_loss:{r.hedge_val_loss:.8f} val_bpb:{r.hedge_val_bpb:.8f} (beside the sliding bpb, "
                f"not instead; eta {args.hedge_eta:g}, no entropy expert; final weights neural/unigram/bigram/"
                f"trigram {'/'.join(f'{w:.3f}' for w in r.hedge_weights)}{r.hedge_note()})")
            record.update(hedge_val_loss=r.hedge_val_loss, hedge_val_bpb=r.hedge_val_bpb, hedge_eta=args.hedge_eta,
                          hedge_weights=r.hedge_weights, hedge_mixed_targets=r.hedge_mixed_targets)
    if args.ttt:
        _ttt_report(args, backend, tokens, luts, say, record)
    if wants_depth_eval(args):
        record["depth"] = run_depth_eval(args, backend, tokens, luts, L, args.batch_seqs * L * backend.world_size,
                                         log=say)
    if args.json and rank0:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


def _ttt_report(args, backend, tokens, luts, say, record: dict) -> None:
    """Score-first TTT over the sliding windows, on a copy of the weights (they are put back after)."""
    import dataclasses

    from core.ttt import ttt_eval

    settings = args.ttt_settings
    progress = Progress(args.progress, backend.rank, "TTT eval", "chunk")
    t0 = time.perf_counter()
    try:
        r = ttt_eval(backend, tokens, args.seq_len, args.stride, args.batch_seqs, luts, settings, progress=progress)
    finally:
        progress.close()
    ms = 1000 * (time.perf_counter() - t0)
    say(f"ttt val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} (score-first: {r.chunks} chunks of "
        f"{settings.chunk_tokens}, {settings.epochs} epochs, lr {settings.lr:g}, momentum {settings.momentum:g}, "
        f"clip {settings.grad_clip:g}, {r.steps} steps) eval_time:{ms:.0f}ms")
    record.update(ttt_val_loss=r.val_loss, ttt_val_bpb=r.val_bpb, ttt_chunks=r.chunks, ttt_steps=r.steps,
                  ttt=dataclasses.asdict(settings), ttt_eval_ms=ms)
