"""`loopgolf quantize WEIGHTS --scheme S --codec C --out ARTIFACT`: a weight file to an artifact, with its size."""

from __future__ import annotations

import argparse

from core.artifact import CODECS, size_report, write_artifact
from core.errors import UserError
from core.quant import SCHEMES, compose_scheme
from core.size import code_bytes
from core.weights import load_weights


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a safetensors weight file into an artifact and report its size")
    p.add_argument("weights", help="loopgolf weights (.safetensors, e.g. RUN_DIR/model.safetensors)")
    p.add_argument("--out", required=True, help="artifact path to write")
    p.add_argument("--scheme", default="int8", help=f"default scheme ({', '.join(sorted(SCHEMES))}; default int8)")
    p.add_argument("--rule", action="append", default=[], metavar="PATTERN=SCHEME",
                   help="per-tensor scheme by name, first match wins (repeatable), e.g. --rule '*.mlp.*=int5'")
    p.add_argument("--codec", default="zlib", help=f"compression ({', '.join(sorted(CODECS))}; default zlib)")
    p.add_argument("--level", type=int, help="codec level (default: zlib 9, zstd 22, lzma 9)")
    p.add_argument("--backend", default="torch", choices=["torch", "mlx"], help="whose code bytes to count")


def run_quantize(args: argparse.Namespace) -> int:
    if args.codec not in CODECS:
        raise UserError(f"--codec {args.codec!r}: expected one of {', '.join(sorted(CODECS))}")
    scheme = compose_scheme(args.scheme, args.rule)
    spec, weights = load_weights(args.weights)
    info = write_artifact(args.out, spec.to_dict(), weights, scheme=scheme, codec=args.codec, level=args.level)
    print(f"wrote {args.out}: {info.total_bytes:,} bytes ({scheme}, {info.codec_label})")
    print(size_report(info, code_bytes(args.backend)))
    return 0
