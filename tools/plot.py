"""`loopgolf plot`: loss curves against step and training time (one line per run, a variant's seeds in one
colour) and the metric against artifact bytes with the 16,000,000-byte limit; the same data as CSV.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display needed).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from core.atomic import atomic_path, atomic_write_text
from core.errors import UserError
from core.results import Run, collect
from tools.compare import DEFAULT_METRIC, loss_and_bpb_keys

LIMIT_BYTES = 16_000_000
WIDTH_IN, HEIGHT_IN, DPI = 15.0, 4.5, 100  # 1500 x 450 pixels
CSV_COLUMNS = ["variant", "run", "seed", "event", "step", "train_time_s", "loss", "bpb", "total_bytes"]


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="loss against step and time, and the metric against artifact bytes, as PNG + CSV")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                   help="run directories, sweep directories (sweep.json) or directories of runs")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write; the CSV goes beside it")
    p.add_argument("--metric", default=DEFAULT_METRIC,
                   help="final-record number plotted against total bytes (default %(default)s)")


def rows(runs: list[Run], metric: str) -> list[dict]:
    """The plotted data, one row per train record, val record and finished run."""
    loss_key, _ = loss_and_bpb_keys(metric)
    out = []
    for r in runs:
        base = {"variant": r.variant, "run": r.name, "seed": r.seed}
        for t in r.train:
            out.append({**base, "event": "train", "step": t["step"], "train_time_s": _seconds(t),
                        "loss": t.get("train_loss")})
        for v in r.val:
            out.append({**base, "event": "val", "step": v["step"], "train_time_s": _seconds(v),
                        "loss": v.get("val_loss"), "bpb": v.get("val_bpb")})
        if r.final is not None:
            out.append({**base, "event": "final", "step": r.final.get("steps"), "train_time_s": _seconds(r.final),
                        "loss": r.final.get(loss_key) if loss_key else None, "bpb": r.final.get(metric),
                        "total_bytes": r.final.get("total_bytes")})
    return out


def _seconds(record: dict):
    ms = record.get("train_time_ms")
    return None if ms is None else ms / 1000.0


def to_csv(data: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in data:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def draw(runs: list[Run], metric: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time, by_size = fig.subplots(1, 3)
    variants = list(dict.fromkeys(r.variant for r in runs))
    colours = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    for r in runs:
        c = colours[r.variant]
        for ax, x in ((by_step, "step"), (by_time, "train_time_ms")):
            scale = 1.0 if x == "step" else 1e-3
            train = [t for t in r.train if t.get(x) is not None and t.get("train_loss") is not None]
            if train:
                ax.plot([t[x] * scale for t in train], [t["train_loss"] for t in train], color=c, lw=0.8, alpha=0.7)
            val = [v for v in r.val if v.get(x) is not None and v.get("val_loss") is not None]
            if val:
                ax.plot([v[x] * scale for v in val], [v["val_loss"] for v in val], color=c, lw=1.6, ls="--",
                        marker="o", ms=3)
    for ax, label in ((by_step, "step"), (by_time, "training time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
    by_step.set_title("loss against step")
    by_time.set_title("loss against training time")
    handles = [Line2D([], [], color=colours[v], lw=2, label=v) for v in variants]
    handles += [Line2D([], [], color="grey", lw=0.8, label="train"),
                Line2D([], [], color="grey", lw=1.6, ls="--", marker="o", ms=3, label="val")]
    by_step.legend(handles=handles, fontsize=7, loc="upper right")

    done = [r for r in runs if r.final is not None and r.final.get(metric) is not None
            and r.final.get("total_bytes")]
    by_size.set_title(f"{metric} against total bytes")
    by_size.set_xlabel("total bytes (code + compressed model), log scale")
    by_size.set_ylabel(metric)
    by_size.grid(alpha=0.3)
    by_size.axvline(LIMIT_BYTES, color="red", lw=1.2, ls=":")
    by_size.text(LIMIT_BYTES, 0.98, " 16,000,000 B limit", color="red", fontsize=8, va="top", ha="right",
                 rotation=90, transform=by_size.get_xaxis_transform())
    if done:
        for v in variants:
            pts = [(r.final["total_bytes"], r.final[metric]) for r in done if r.variant == v]
            if pts:
                by_size.scatter(*zip(*pts), color=colours[v], s=22, label=v)
        by_size.set_xscale("log")
        lo = min(r.final["total_bytes"] for r in done)
        by_size.set_xlim(lo / 2, LIMIT_BYTES * 2)
    else:
        by_size.set_xscale("log")
        by_size.set_xlim(1e5, LIMIT_BYTES * 2)
        by_size.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=by_size.transAxes)
    return fig


def run_plot(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: expected a .png file name (the CSV is written beside it)")
    runs = collect(args.paths)
    if not any(r.train or r.val or r.final for r in runs):
        raise UserError(f"nothing to plot: none of the {len(runs)} run(s) has train, val or final records yet")
    fig = draw(runs, args.metric)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    csv_path = out.with_suffix(".csv")
    data = rows(runs, args.metric)
    atomic_write_text(csv_path, to_csv(data))
    w, h = int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI)
    print(f"plot: {len(runs)} run(s) in {len(set(r.variant for r in runs))} variant(s) -> {out} ({w}x{h}), "
          f"{len(data)} rows -> {csv_path}")
    return 0
