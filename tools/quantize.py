"""`loopgolf quantize WEIGHTS --scheme S --codec C --out ARTIFACT`: a weight file to an artifact, with its size.

--gptq: full Hessian GPTQ (core/gptq.py) with Hessians from training batches; --eval: the round-trip val_bpb
of the artifact (--eval-weights: and of the weights before quantization). Both run the model, so they need the run's settings (train.seq_len,
batch_tokens, val_batch_tokens, compute_dtype, data.path): from --config, by default the config.toml beside
WEIGHTS in a run directory; --data overrides data.path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from core.artifact import CODECS, read_artifact, size_report, write_artifact, write_quantized
from core.errors import UserError
from core.config import ArtifactConfig
from core.gptq import collect_training_hessians, quantize_weights_gptq
from core.quant import SCHEMES
from core.weights import load_weights


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a safetensors weight file into an artifact and report its size")
    p.add_argument("weights", help="loopgolf weights (.safetensors, e.g. RUN_DIR/model.safetensors)")
    p.add_argument("--out", required=True, help="artifact path to write")
    d = ArtifactConfig  # the defaults are the config's, not copies
    p.add_argument("--scheme", default=d.scheme, help=f"default scheme ({', '.join(sorted(SCHEMES))}, or intN_stdK, "
                   f"the records' std clip, e.g. int6_std12.85; default {d.scheme})")
    p.add_argument("--rule", action="append", default=[], metavar="PATTERN=SCHEME",
                   help="per-tensor scheme by name, first match wins (repeatable), e.g. --rule '*.mlp.*=int5'")
    p.add_argument("--codec", default=d.codec, help=f"compression ({', '.join(sorted(CODECS))}; default {d.codec})")
    p.add_argument("--level", type=int, help="codec level (default: zlib 9, zstd 22, lzma 9, brotli 11)")
    p.add_argument("--byte-shuffle", type=int, default=d.byte_shuffle, metavar="STRIDE",
                   help="split the payload into STRIDE byte planes before compressing (2..8; the records use 2 "
                        "with brotli; default 0: off)")
    p.add_argument("--backend", default="torch", choices=["torch", "mlx"],
                   help="which backend runs the model for --gptq and --eval")
    p.add_argument("--gptq", action="store_true",
                   help="full Hessian GPTQ for the tensors an intN per-row scheme quantizes (int4..int7, int8_search, "
                        "intN_stdK)")
    p.add_argument("--gptq-embedding", action="store_true",
                   help="with --gptq: the tied embedding too (#1394: e.g. --rule tok_emb.weight=int8_std20)")
    p.add_argument("--batches", type=int, help="--gptq: training batches to collect Hessians on "
                   "(default: the config's artifact.gptq_batches)")
    p.add_argument("--damp", type=float, default=d.gptq_damp, help=f"--gptq damping (default {d.gptq_damp})")
    p.add_argument("--block", type=int, default=d.gptq_block,
                   help=f"--gptq columns per block (default {d.gptq_block})")
    p.add_argument("--eval", action="store_true", help="evaluate the val_bpb of the artifact's round trip")
    p.add_argument("--eval-weights", action="store_true", help="with --eval: also the weights' val_bpb before quantizing")
    p.add_argument("--config", help="run config for --gptq/--eval (default: config.toml beside WEIGHTS)")
    p.add_argument("--data", help="data root or dataset directory for --gptq/--eval (default: the config's data.path)")


def _run_config(args):
    from core.config import load_config

    path = Path(args.config) if args.config else Path(args.weights).parent / "config.toml"
    if path.is_dir():
        raise UserError(f"--config {path} is a directory; expected a run config .toml (e.g. {path / 'config.toml'})")
    if not path.is_file():
        what = f"--config {path}" if args.config else f"{path} (no --config given)"
        raise UserError(f"{what}: not found; --gptq and --eval take train.seq_len and the batch sizes from a "
                        "run config: pass --config CONFIG.toml")
    return load_config(path, [f'data.path="{args.data}"'] if args.data else [])


def _code_bytes(args) -> int:
    """The exported script's bytes for the run's config (config.toml beside WEIGHTS, or --config); 0 without one
    (the report then counts the artifact alone and says so)."""
    path = Path(args.config) if args.config else Path(args.weights).parent / "config.toml"
    if not path.is_file():
        print(f"code bytes: no run config ({path}); counted as 0 (pass --config to count the exported train_gpt.py)")
        return 0
    from tools.script import submission_code_bytes

    return submission_code_bytes(_run_config(args))


class _Model:
    """The backend and data that --gptq and --eval run the model with."""

    def __init__(self, args, spec, weights):
        from core.manifest import resolve_data
        from core.run import load_eval_data
        from tools.backends import build_backend, resolve_backend

        self.cfg = cfg = _run_config(args)
        self.data = resolve_data(cfg.data.path, cfg.data.dataset or None, cfg.data.tokenizer or None,
                                 dataset_flag="data.dataset in the run's config (or --config)")
        self.backend = build_backend(resolve_backend(args.backend), spec, weights, cfg.train, cfg.optim)
        if args.eval:  # the tokens the run evaluated (train.val_max_tokens), for the weights' vocabulary
            self.luts, self.val_tokens = load_eval_data(cfg, self.data, spec.vocab_size)

    def val_bpb(self, weights) -> float:
        from core.loop import evaluate

        t = self.cfg.train
        self.backend.set_weights(weights)
        return evaluate(self.backend, self.val_tokens, t.seq_len, t.val_batch_tokens, self.luts)[1]


def _check_gptq_targets(path, weights, scheme: str, embedding: bool) -> None:
    from core.gptq import NO_TARGETS, gptq_applies

    if not gptq_applies(weights, scheme, embedding):
        raise UserError(f"--gptq: no tensor of {path} is quantized by an intN per-row scheme (int4..int7, "
                        f"int8_search, intN_stdK) under {scheme!r}; {NO_TARGETS}")


def artifact_config(args: argparse.Namespace) -> ArtifactConfig:
    """The flags as an ArtifactConfig, checked by it (an error names the flag)."""
    from tools.flags import config_from_flags

    return config_from_flags(ArtifactConfig, "artifact", {
        "scheme": ("--scheme", args.scheme), "rules": ("--rule", args.rule), "codec": ("--codec", args.codec),
        "level": ("--level", args.level), "byte_shuffle": ("--byte-shuffle", args.byte_shuffle),
        "gptq": ("--gptq", args.gptq), "gptq_damp": ("--damp", args.damp), "gptq_block": ("--block", args.block),
        "gptq_embedding": ("--gptq-embedding", args.gptq_embedding)})


def run_quantize(args: argparse.Namespace) -> int:
    art = artifact_config(args)
    if args.batches is not None and args.batches < 1:
        raise UserError(f"--batches {args.batches}: expected a positive number of training batches")
    if args.batches is not None and not args.gptq:
        raise UserError(f"--batches {args.batches} sets the Hessian batches of --gptq: add --gptq, or drop it")
    if args.eval_weights and not args.eval:
        raise UserError("--eval-weights evaluates beside the artifact's round trip: add --eval")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory; expected the artifact's file path, e.g. model.art")
    scheme = art.quant_scheme
    spec, weights = load_weights(args.weights)
    if args.gptq:  # before minutes of Hessians
        if args.gptq_embedding and not spec.tie_embeddings:
            raise UserError(f"--gptq-embedding: {args.weights} has an untied embedding; GPTQ takes the embedding's "
                            "Hessian from its use as the head")
        _check_gptq_targets(args.weights, weights, scheme, args.gptq_embedding)
    model = _Model(args, spec, weights) if args.gptq or args.eval else None
    if args.gptq:
        batches = args.batches or model.cfg.artifact.gptq_batches
        t0 = time.perf_counter()
        hessians, record = collect_training_hessians(model.backend, model.data.train_files, model.cfg, batches)
        t1 = time.perf_counter()
        qw = quantize_weights_gptq(weights, scheme, hessians, art.gptq_damp, art.gptq_block, record,
                                   embedding=art.gptq_embedding)
        info = write_quantized(args.out, spec.to_dict(), qw, codec=art.codec, level=art.level,
                               byte_shuffle=art.byte_shuffle)
        print(f"gptq: {len(qw.gptq['tensors'])} tensors, Hessians from {batches} training batches "
              f"({record['calibration']['tokens']:,} tokens) in {t1 - t0:.1f}s, solved in {time.perf_counter() - t1:.1f}s")
    else:
        info = write_artifact(args.out, spec.to_dict(), weights, scheme=scheme, codec=art.codec, level=art.level,
                              byte_shuffle=art.byte_shuffle)
    print(f"wrote {args.out}: {info.total_bytes:,} bytes ({scheme}, {info.codec_label})")
    print(size_report(info, _code_bytes(args)))
    if args.eval:
        after = model.val_bpb(read_artifact(args.out)[1])
        line = f"val_bpb: artifact round trip {after:.4f}"
        if args.eval_weights:
            before = model.val_bpb(weights)
            line += f", weights before quantization {before:.4f} (round trip {after - before:+.4f})"
        print(line)
        print(f"row: scheme={scheme} codec={info.codec_label} gptq={'yes' if args.gptq else 'no'} "
              f"bytes={info.total_bytes} roundtrip_val_bpb={after:.4f}"
              + (f" weights_val_bpb={before:.4f}" if args.eval_weights else ""))
    return 0
