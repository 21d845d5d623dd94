"""`loopgolf size`: parameter counts and the bytes the challenge counts, before or after training.

--config X: parameter counts, then the artifact of a fresh init of X, quantized and compressed exactly as
a run would export it ([artifact] scheme, rules, codec, level), per tensor group, plus the estimate for
trained weights from `loopgolf budget`'s calibrated model (init weights compress very differently).
--run DIR: the same table from the run's artifact, and the run's final metrics record.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from core.artifact import (
    CODECS, ArtifactInfo, _natural_key, encode_artifact, load_quantized, tensor_group,
)
from core.config import load_config
from core.errors import UserError
from core.params import count_params, init_weights, param_table
from core.quant import QuantizedWeights, quantize_weights, scheme_for_tensor
from core.size import CHALLENGE_LIMIT
from tools.script import DEFAULT_PACK, submission_code_bytes

CODE_NOTE = ("code counted: the train_gpt.py that `loopgolf export` writes for this config, with its default "
             f"{DEFAULT_PACK} packing (the challenge counts that one file; `loopgolf export --pack` picks another)")


def group_rows(qw: QuantizedWeights, info: ArtifactInfo, codec: str, level: int) -> list[dict]:
    """Per tensor group: tensors, schemes, raw fp32 bytes, stored (uncompressed payload) bytes, and the
    group's data compressed on its own with the artifact's codec."""
    groups: dict[str, dict] = {}
    by_name = {t.name: t for t in info.tensors}
    for name in sorted(qw.tensors):
        t = qw.tensors[name]
        g = groups.setdefault(tensor_group(name), {"tensors": 0, "schemes": set(), "raw": 0, "stored": 0,
                                                   "chunks": []})
        g["tensors"] += 1
        g["schemes"].add(scheme_for_tensor(info.scheme, name) if t.role == "quantized" else
                         f"{t.data.dtype.name} passthrough")
        g["raw"] += by_name[name].raw_bytes
        g["stored"] += by_name[name].stored_bytes
        g["chunks"].append(t.data.tobytes())
        if t.scale is not None:
            g["chunks"].append(t.scale.tobytes())
    rows = []
    for name in sorted(groups, key=_natural_key):
        g = groups[name]
        compressed = len(CODECS[codec].compress(b"".join(g["chunks"]), level))
        rows.append({"group": name, "tensors": g["tensors"], "schemes": ",".join(sorted(g["schemes"])),
                     "raw": g["raw"], "stored": g["stored"], "compressed": compressed})
    return rows


def print_table(rows: list[dict], info: ArtifactInfo) -> None:
    w = 22
    print(f"{'group':<{w}} {'tensors':>7} {'stored as':<22} {'raw fp32 B':>13} {'payload B':>12} {'compressed B':>13}")
    for r in rows:
        print(f"{r['group']:<{w}} {r['tensors']:>7} {r['schemes']:<22} {r['raw']:>13,} {r['stored']:>12,} "
              f"{r['compressed']:>13,}")
    print(f"{'all tensors':<{w}} {sum(r['tensors'] for r in rows):>7} {'':<22} {sum(r['raw'] for r in rows):>13,} "
          f"{sum(r['stored'] for r in rows):>12,} {sum(r['compressed'] for r in rows):>13,}")
    print("(compressed B per group: the group's bytes compressed on their own; the artifact compresses the whole "
          "payload at once, so the groups do not add up to it exactly)")
    print(f"payload: header {info.header_bytes:,} B + data, uncompressed {info.payload_bytes:,} B")
    print(f"artifact ({info.scheme}, {info.codec_label}): {info.total_bytes:,} B (76-byte prefix + compressed payload)")


def print_total(label: str, artifact: int, code: int) -> None:
    total = artifact + code
    margin = CHALLENGE_LIMIT - total
    verdict = f"margin {margin:,}" if margin >= 0 else f"OVER by {-margin:,}"
    print(f"{label}: {total:,} B of {CHALLENGE_LIMIT:,}  {verdict}")


def print_code(cfg) -> int:
    """The submission script's bytes under each packing; returns the default packing's."""
    sizes = {how: submission_code_bytes(cfg, how) for how in (DEFAULT_PACK, "brotli", "none")}
    print(f"code: {sizes[DEFAULT_PACK]:,} B (train_gpt.py, {DEFAULT_PACK}; brotli {sizes['brotli']:,} B, "
          f"plain {sizes['none']:,} B)")
    print(CODE_NOTE)
    return sizes[DEFAULT_PACK]


def run_size(args) -> int:
    if getattr(args, "run", None):
        if args.config:
            raise UserError("give either --config or --run, not both")
        return run_size_run(Path(args.run))
    if not args.config:
        raise UserError("size needs --config CONFIG (before training) or --run RUN_DIR (after)")
    cfg = load_config(args.config, list(args.set or []), small=args.small, small_vocab=True)
    spec = cfg.model
    by_group: dict[str, int] = defaultdict(int)
    for info in param_table(spec):
        by_group[info.group] += info.numel
    unique, effective = count_params(spec)
    print(f"model: {spec.describe()}")
    for group, n in sorted(by_group.items()):
        print(f"  {group:<8} {n:>12,}")
    print(f"params: {unique:,} unique, {effective:,} effective (block tensors counted once per use)")
    print(f"model_params:{unique}")

    art = cfg.artifact
    seed = cfg.train.seed
    qw = quantize_weights(init_weights(spec, seed), art.quant_scheme)
    _, info = encode_artifact(spec.to_dict(), qw, art.codec, art.level, art.byte_shuffle)
    print(f"\nartifact of a fresh init (seed {seed}), quantized and compressed as a run would export it:")
    print_table(group_rows(qw, info, art.codec, art.level), info)
    print("NOTE: these are the bytes of the INITIAL weights. Trained weights compress differently (the init has "
          "zero output projections and small uniform matrices; upstream's baseline init is 4.9 MB with int8+zlib, "
          "its trained artifact 15.8 MB).")
    from tools.budget import estimate_artifact_bytes

    est = estimate_artifact_bytes(spec, art.quant_scheme, art.codec, art.level)
    print(f"estimate for trained weights (loopgolf budget's calibrated bytes-per-parameter model): "
          f"{est.artifact_bytes:,} B")
    print()
    code = print_code(cfg)
    print_total("total, init artifact + code", info.total_bytes, code)
    print_total("total, trained estimate + code", est.artifact_bytes, code)
    return 0


def final_record(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    final = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not a JSON line") from None
        if isinstance(rec, dict) and rec.get("event") == "final":
            final = rec
    return final


def run_size_run(run_dir: Path) -> int:
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found")
    final = final_record(run_dir)
    if final and isinstance(final.get("artifact"), str) and (run_dir / final["artifact"]).is_file():
        art_path = run_dir / final["artifact"]
    else:
        arts = sorted(run_dir.glob("*.art"))
        if len(arts) != 1:
            found = ", ".join(a.name for a in arts) or "none"
            raise UserError(f"{run_dir}: expected one artifact (*.art) or a final record naming it; found {found}")
        art_path = arts[0]
    spec, qw, info = load_quantized(art_path)
    print(f"run: {run_dir}")
    print(f"artifact: {art_path.name}")
    print_table(group_rows(qw, info, info.codec, info.level), info)
    print()
    config_path = run_dir / "config.toml"
    cfg = load_config(config_path) if config_path.is_file() else None
    code_now = print_code(cfg) if cfg is not None else None
    if final is None:
        print("metrics.jsonl has no final record: the run did not finish its export")
        if code_now is not None:
            print_total("total, artifact + code (now)", info.total_bytes, code_now)
        return 0
    keys = ("val_bpb", "roundtrip_val_bpb", "artifact_bytes", "code_bytes", "total_bytes", "params",
            "effective_params", "steps", "backend")
    print("final record: " + ", ".join(f"{k}={final[k]}" for k in keys if k in final))
    if final.get("artifact_bytes") not in (None, info.total_bytes):
        print(f"WARNING: the final record says artifact_bytes={final['artifact_bytes']}, the file has "
              f"{info.total_bytes}: the artifact changed after the run")
    run_code = final.get("code_bytes")
    if isinstance(run_code, int):
        print_total("total, artifact + code as the run counted it", info.total_bytes, run_code)
    if code_now is not None:
        print_total("total, artifact + code (the script export writes now)", info.total_bytes, code_now)
    else:
        print(f"no {config_path.name} in {run_dir}: the code bytes need the run's config")
    return 0
