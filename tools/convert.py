"""`loopgolf convert IN OUT`: weights between loopgolf's formats and upstream's (see tools/formats.py)."""

from __future__ import annotations

import argparse

from core.config import parse_override
from tools.formats import DESCRIBE, convert
from core.errors import UserError

EPILOG = "formats (by file name):\n  " + "\n  ".join(DESCRIBE.values()) + """

Upstream files (final_model.pt, *_mlx_model.npz, *.int8.ptz) carry no spec: it is inferred from the tensor
shapes as a flat model (block i at layer i). For a looped model give --layer-plan, --num-layers or
--spec-from. Artifacts (.ptz, .art) are dequantized to float32.

The seeds' own checkpoints are recognised by their names and mapped to loopgolf's (tools/seed_layouts.py):
#470's, #319's and #167's (train_gpt_mlx_exp.py npz) give their spec from the tensors; #1110's and #895's
depend on settings the tensors do not show, so give --spec-from with the seed's config, e.g.
  loopgolf convert final_model.pt ut.safetensors --spec-from configs/ut_3x4_iter.toml"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert weights: loopgolf safetensors/npz/pt/artifact, upstream .pt/.npz/.ptz",
        description="Convert weights between loopgolf's files and upstream parameter-golf's.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="weights to read")
    p.add_argument("output", metavar="OUT", help="file to write (.safetensors, .npz, .pt or .art)")
    p.add_argument("--spec-from", metavar="CONFIG_OR_WEIGHTS",
                   help="take the model spec from a config TOML ([model]) or a loopgolf weight file")
    p.add_argument("--layer-plan", metavar="PLAN",
                   help="block index per effective layer: '3x4', '0 1 2 0 1 2', ... (keeps the file's blocks)")
    p.add_argument("--num-layers", type=int, metavar="N",
                   help="N effective layers cycling the file's blocks (layer i runs block i %% num_blocks)")
    p.add_argument("--upstream", choices=["auto", "torch", "mlx"], default="auto",
                   help="whose conventions an upstream file follows: mlx (train_gpt_mlx.py: RoPE turns the other "
                        "way, RMSNorm eps 1e-6) is converted to loopgolf's (train_gpt.py's); auto: .npz and pickled "
                        ".ptz are mlx, the rest torch")
    p.add_argument("--set", action="append", metavar="model.KEY=VALUE",
                   help="set any other model key, e.g. --set model.rope_base=50000 (repeatable)")
    return p


def model_overrides(args) -> dict:
    overrides: dict = {}
    for text in args.set or []:
        section, key, value = parse_override(text if "." in text.split("=", 1)[0] else f"model.{text}")
        if section != "model":
            raise UserError(f"--set {text!r}: convert only takes model keys (model.KEY=VALUE)")
        overrides[key] = value
    if args.layer_plan is not None:
        overrides["layer_plan"] = args.layer_plan
    if args.num_layers is not None:
        overrides["num_layers"] = args.num_layers
    return overrides


def run_convert(args) -> int:
    r = convert(args.input, args.output, args.spec_from, model_overrides(args), args.upstream)
    print(f"read {args.input}: {DESCRIBE[r.src_format]}, {r.num_tensors} tensors")
    for note in r.notes:
        print(f"  {note}")
    print(f"spec {r.spec_how}: {r.spec.describe()}")
    print(f"wrote {args.output}: {DESCRIBE[r.dst_format]}, {r.out_bytes:,} bytes")
    return 0
