"""`loopgolf export`: a records folder for Parameter Golf from a config and the runs that trained it.

The folder holds train_gpt.py (generated: tools/script.py bundles loopgolf's own modules for the config),
submission.json in upstream's schema, a README.md written from the spec and the runs, and each run's
train.log as train_seed<SEED>.log. It is written to a temporary folder beside --out, then renamed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from core.config import load_config
from core.errors import UserError
from core.params import count_params
from core.size import CHALLENGE_LIMIT
from tools.size import final_record
from tools.script import DEFAULT_PACK, PACKS, build_script

TRACKS = ("track_10min_16mb", "track_non_record_16mb")
SIZE_FIELDS = ("vocab_size", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "num_layers", "num_blocks",
               "layer_plan")  # described by ModelSpec.describe() already
# Keys that may differ between the runs of one submission and its config: the seed is what runs vary,
# and the data may live elsewhere on each machine.
RUN_KEYS_ALLOWED_TO_DIFFER = {"train.seed", "data.path", "data.dataset", "data.tokenizer"}


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a Parameter Golf records folder: train_gpt.py, submission.json, "
                                      "README.md and the runs' logs")
    p.add_argument("--config", required=True, help="run config TOML (the one the runs trained)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--small", action="store_true", help="the config at --small (for quick checks)")
    p.add_argument("--profile", metavar="NAME", help="apply a profile, e.g. h100 (grad accumulation 8 / GPUs)")
    p.add_argument("--run", action="append", default=[], metavar="RUN_DIR",
                   help="a finished `loopgolf train` run of this config (repeatable: one per seed)")
    p.add_argument("--out", required=True, help="the records folder to write, e.g. records/track_10min_16mb/"
                                                "2026-12-01_MyLoop")
    p.add_argument("--pack", default=DEFAULT_PACK, help=f"{' | '.join(PACKS)}: self-extracting lzma or brotli "
                                                        "script (minified), or the plain bundled source")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--name", default="", help="submission name (default: the config's file name)")
    p.add_argument("--author", default="", help="your name")
    p.add_argument("--github-id", default="", help="your GitHub user name")
    p.add_argument("--blurb", default="", help="one paragraph on what the submission does")
    p.add_argument("--track", default=TRACKS[0], help=f"{' | '.join(TRACKS)}")


# ---- runs -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    path: Path
    seed: int
    final: dict
    log: Path


def _flat(cfg) -> dict[str, object]:
    out = {f"model.{k}": v for k, v in cfg.model.to_dict().items()}
    for section in ("train", "optim", "data", "artifact", "eval", "average"):
        out.update({f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, section)).items()})
    return out


def read_run(run_dir: str, cfg) -> RunResult:
    path = Path(run_dir)
    config_path, metrics_path, log_path = path / "config.toml", path / "metrics.jsonl", path / "train.log"
    for f in (config_path, metrics_path, log_path):
        if not f.is_file():
            raise UserError(f"--run {path}: {f.name} not found; expected a `loopgolf train` run directory")
    run_cfg = load_config(config_path)
    mine, theirs = _flat(cfg), _flat(run_cfg)
    differ = sorted(k for k in mine if mine[k] != theirs.get(k) and k not in RUN_KEYS_ALLOWED_TO_DIFFER)
    if differ:
        shown = ", ".join(f"{k} ({theirs.get(k)!r} in the run, {mine[k]!r} here)" for k in differ[:4])
        raise UserError(f"--run {path}: its config differs from --config in {shown}"
                        f"{' and more' if len(differ) > 4 else ''}")
    final = final_record(path)
    if final is None:
        raise UserError(f"--run {path}: the run has not finished (no final record in {metrics_path.name})")
    return RunResult(path, run_cfg.train.seed, final, log_path)


# ---- submission.json and README ------------------------------------------------------------------------

def _metric(final: dict, key: str) -> float:
    v = final.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def submission_record(args, cfg, runs: list[RunResult], code_bytes: int, artifact_bytes: int | None) -> dict:
    name = args.name or Path(args.config).stem
    record = {"author": args.author, "github_id": args.github_id, "name": name, "blurb": args.blurb,
              "date": dt.date.today().isoformat(), "track": args.track}
    if runs:
        losses = [_metric(r.final, "roundtrip_val_loss") for r in runs]
        bpbs = [_metric(r.final, "roundtrip_val_bpb") for r in runs]
        totals = [code_bytes + int(r.final.get("artifact_bytes", 0)) for r in runs]
        record.update(val_loss=statistics.fmean(losses), val_bpb=statistics.fmean(bpbs), bytes_total=max(totals),
                      bytes_code=code_bytes)
        if len(runs) > 1:
            record.update(seeds=[r.seed for r in runs], val_bpb_std=statistics.stdev(bpbs),
                          val_loss_std=statistics.stdev(losses),
                          seed_results={str(r.seed): {"val_loss": loss, "val_bpb": bpb, "bytes_total": total,
                                                      "steps": r.final.get("steps")}
                                        for r, loss, bpb, total in zip(runs, losses, bpbs, totals)})
    else:
        record.update(val_loss=None, val_bpb=None, bytes_total=None, bytes_code=code_bytes)
    return record


def readme_text(args, cfg, runs: list[RunResult], record: dict, pack: str) -> str:
    spec = cfg.model
    unique, effective = count_params(spec)
    defaults = type(spec)()
    on = [f"{f.name} = {getattr(spec, f.name)}" for f in dataclasses.fields(spec) if f.name not in SIZE_FIELDS
          and getattr(spec, f.name) != getattr(defaults, f.name)]
    t, a = cfg.train, cfg.artifact
    lines = [f"# {record['name']}", "", record["blurb"] or "A depth-recurrent model trained and exported with loopgolf.",
             "", "## Model", "",
             f"- {spec.describe()}",
             f"- {unique:,} unique parameters, {effective:,} effective (counting each reuse of a shared block)",
             f"- options (beside upstream's defaults): {', '.join(on) if on else 'none'}",
             f"- artifact: {a.scheme} weights, {a.codec} codec{', GPTQ' if a.gptq else ''}"
             f"{', QAT ' + a.qat if a.qat not in ('', 'off') else ''}",
             "", "## Run", "",
             "```bash", "torchrun --standalone --nproc_per_node=8 train_gpt.py", "```", "",
             f"Batch {t.batch_tokens:,} tokens of sequence {t.seq_len}, {t.iterations:,} iterations, "
             f"wallclock cap {t.max_wallclock_seconds:g} s. Upstream's environment knobs (ITERATIONS, SEED, "
             "DATA_PATH, TOKENIZER_PATH, MAX_WALLCLOCK_SECONDS, ...) override the exported values.", "",
             f"train_gpt.py is generated by `loopgolf export` ({pack} packing) from loopgolf's own modules: "
             f"{record['bytes_code']:,} bytes of code.", ""]
    if runs:
        lines += ["## Results", "", "| seed | steps | val_bpb (pre-quant) | val_bpb (round trip) | val_loss | bytes total |",
                  "|---|---|---|---|---|---|"]
        for r in runs:
            f = r.final
            lines.append(f"| {r.seed} | {f.get('steps')} | {_metric(f, 'val_bpb'):.4f} | "
                         f"{_metric(f, 'roundtrip_val_bpb'):.4f} | {_metric(f, 'roundtrip_val_loss'):.4f} | "
                         f"{record['bytes_code'] + int(f.get('artifact_bytes', 0)):,} |")
        if len(runs) > 1:
            lines += ["", f"Mean round-trip val_bpb {record['val_bpb']:.4f} (std {record['val_bpb_std']:.4f}) over "
                          f"{len(runs)} seeds."]
        lines.append("")
    return "\n".join(lines)


# ---- the folder -----------------------------------------------------------------------------------------

def write_folder(out: Path, files: dict[str, str | Path], force: bool) -> None:
    """All files into a temporary folder beside `out`, then one rename (a replaced folder goes after)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # an ordinary folder once renamed (mkdtemp makes it private)
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_export(args) -> int:
    if args.pack not in PACKS:
        raise UserError(f"--pack {args.pack!r}: expected one of {', '.join(PACKS)}")
    if args.track not in TRACKS:
        raise UserError(f"--track {args.track!r}: expected one of {', '.join(TRACKS)}")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    cfg = load_config(args.config, args.set or [], small=args.small, profile=args.profile)
    runs = [read_run(r, cfg) for r in args.run]
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--run: two runs have the same seed ({', '.join(map(str, seeds))}); a submission's runs "
                        "differ by train.seed")
    script = build_script(cfg, args.pack, args.profile or "")
    code_bytes = len(script.encode())
    record = submission_record(args, cfg, runs, code_bytes, None)
    files: dict[str, str | Path] = {"train_gpt.py": script, "submission.json": json.dumps(record, indent=2) + "\n",
                                    "README.md": readme_text(args, cfg, runs, record, args.pack)}
    for r in runs:
        files[f"train_seed{r.seed}.log"] = r.log
    write_folder(out, files, args.force)
    print(f"export: {out}: train_gpt.py {code_bytes:,} B ({args.pack}), {len(runs)} run(s)")
    if record.get("bytes_total"):
        total = record["bytes_total"]
        verdict = "fits" if total <= CHALLENGE_LIMIT else f"OVER by {total - CHALLENGE_LIMIT:,}"
        print(f"  total {total:,} B of {CHALLENGE_LIMIT:,} (code + the largest artifact): {verdict}")
    print(f"  run it there: cd {out} && torchrun --standalone --nproc_per_node=8 train_gpt.py")
    return 0
