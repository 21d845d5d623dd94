"""`loopgolf compare`: one row per variant over its seeds, and the challenge's significance test against a
baseline variant. Unfinished and failed runs are listed, never averaged in."""

from __future__ import annotations

import json
import math
import sys

from core.errors import UserError
from core.results import Run, check_same_experiment, collect
from core.stats import CHALLENGE_ALPHA, CHALLENGE_DELTA_NATS, summarize, welch_improvement

DEFAULT_METRIC = "roundtrip_val_bpb"


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="mean, std, min, max of a metric per variant over seeds, and the challenge's "
                                       "one-sided Welch t-test against a baseline")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                   help="run directories, sweep directories (sweep.json) or directories of runs")
    p.add_argument("--metric", default=DEFAULT_METRIC,
                   help="a number in the runs' final record: val_bpb, roundtrip_val_bpb, sliding_val_bpb, ... "
                        "(default %(default)s)")
    p.add_argument("--baseline", metavar="VARIANT", help="the variant to test against (default: the first)")
    p.add_argument("--delta", type=float, default=CHALLENGE_DELTA_NATS,
                   help="the improvement to show, in nats of the metric's loss (default %(default)s, the challenge's)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the comparison as JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def loss_and_bpb_keys(metric: str) -> tuple[str | None, str | None]:
    """The final record's nats key and bits-per-byte key that belong to a metric (val_bpb -> val_loss)."""
    if metric.endswith("_bpb"):
        return metric[: -len("bpb")] + "loss", metric
    if metric.endswith("_loss"):
        return metric, metric[: -len("loss")] + "bpb"
    return None, None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_metric(finished: list[Run], metric: str) -> None:
    missing = [r for r in finished if not _is_number(r.final.get(metric))]
    if missing:
        common = set.intersection(*(set(k for k, v in r.final.items() if _is_number(v)) for r in finished))
        shared = ", ".join(sorted(k for k in common if k.endswith(("_bpb", "_loss")))) or "none"
        names = ", ".join(r.name for r in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise UserError(f"--metric {metric}: {len(missing)} of {len(finished)} finished runs have no {metric} in "
                        f"their final record ({names}); metrics every run has: {shared}")
    scored_on = {r.config.get("train", {}).get("val_max_tokens") for r in finished if r.config}
    if len(scored_on) > 1:
        raise UserError(f"the runs were scored on different validation tokens (train.val_max_tokens "
                        f"{sorted(scored_on, key=str)}): their {metric} values are not comparable")


def compare(runs: list[Run], metric: str, baseline: str | None, delta: float) -> dict:
    check_same_experiment(runs)
    finished = [r for r in runs if r.finished]
    if not finished:
        raise UserError(f"no finished run among the {len(runs)} given (nothing to average): "
                        + ", ".join(f"{r.name} {r.status}" for r in runs[:3]) + (" ..." if len(runs) > 3 else ""))
    _check_metric(finished, metric)
    loss_key, bpb_key = loss_and_bpb_keys(metric)
    groups: dict[str, list[Run]] = {}
    for r in finished:
        groups.setdefault(r.variant, []).append(r)
    if baseline is not None and baseline not in groups:
        known = list(dict.fromkeys(r.variant for r in runs))
        why = "has no finished run" if baseline in known else "is not a variant here"
        raise UserError(f"--baseline {baseline!r} {why}; variants with finished runs: {', '.join(groups)}")
    if baseline is None and len(groups) > 1:
        baseline = next(iter(groups))

    def values(members, key):
        return [r.final[key] for r in members if key and _is_number(r.final.get(key))]

    def mean(members, key):
        v = values(members, key)
        return sum(v) / len(v) if v else None

    rows = []
    for variant, members in groups.items():
        s = summarize(values(members, metric))
        row = {"variant": variant, "runs": s.n, "seeds": [r.seed for r in members], "mean": s.mean, "std": s.std,
               "min": s.min, "max": s.max, "artifact_bytes": mean(members, "artifact_bytes"),
               "total_bytes": mean(members, "total_bytes"), "params": mean(members, "params"),
               "tok_s": mean(members, "tok_s")}
        if baseline is not None and variant != baseline:
            base = groups[baseline]
            row["diff_nats"] = _diff(mean(members, loss_key), mean(base, loss_key))
            row["diff_bpb"] = _diff(mean(members, bpb_key), mean(base, bpb_key))
            if loss_key and len(values(base, loss_key)) == len(base) and len(values(members, loss_key)) == len(members):
                test = welch_improvement(values(base, loss_key), values(members, loss_key), delta)
                row.update(t=test.t, df=test.df, p=test.p, clears=bool(test.p < CHALLENGE_ALPHA), p_note=test.why)
            else:
                row.update(p=math.nan, clears=False, p_note=f"{metric} has no loss in nats to test")
        rows.append(row)
    left_out = [{"run": r.name, "variant": r.variant, "status": r.status, "note": r.note, "path": str(r.path)}
                for r in runs if not r.finished]
    return {"metric": metric, "test_metric": loss_key, "delta_nats": delta, "alpha": CHALLENGE_ALPHA,
            "baseline": baseline, "variants": rows, "not_averaged": left_out}


def _diff(a, b):
    return None if a is None or b is None else a - b


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


COLUMNS = [("variant", "variant", "s"), ("runs", "runs", "d"), ("mean", "mean", ".4f"), ("std", "std", ".4f"),
           ("min", "min", ".4f"), ("max", "max", ".4f"), ("artifact B", "artifact_bytes", ",.0f"),
           ("total B", "total_bytes", ",.0f"), ("params", "params", ",.0f"), ("tok/s", "tok_s", ",.0f"),
           ("Δ nats", "diff_nats", "+.4f"), ("Δ bpb", "diff_bpb", "+.4f"), ("p", "p", ".3g"), ("p<0.01", "clears", "")]


def _cells(row: dict, baseline: str | None) -> list[str]:
    out = []
    for _, key, spec in COLUMNS:
        if key == "clears":
            if row["variant"] == baseline:
                out.append("baseline")
            else:
                out.append("-" if _fmt(row.get("p"), "") == "-" else ("yes" if row["clears"] else "no"))
        else:
            out.append(_fmt(row.get(key), spec))
    return out


def render_text(result: dict, markdown: bool = False) -> str:
    head = [c[0] for c in COLUMNS]
    body = [_cells(r, result["baseline"]) for r in result["variants"]]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [fmt(head)] + [fmt(cells) for cells in body]
    m, base = result["metric"], result["baseline"]
    notes = [f"metric: {m} (mean, std with ddof 1, min, max over each variant's finished runs)"]
    if base is not None:
        notes.append(f"baseline: {base}. Δ = variant mean - baseline mean (negative is better). p: one-sided Welch "
                     f"t-test on {result['test_metric']} in nats that the variant beats the baseline by at least "
                     f"{result['delta_nats']:g} nats (the challenge states its margin in nats); it clears at "
                     f"p < {result['alpha']:g}.")
        for r in result["variants"]:
            if r.get("p_note"):
                notes.append(f"{r['variant']}: no p ({r['p_note']})")
    for r in result["not_averaged"]:
        notes.append(f"not averaged: {r['run']} ({r['status']}{': ' + r['note'] if r['note'] else ''})")
    sep = "\n\n" if markdown else "\n"
    return "\n".join(lines) + sep + "\n".join(("- " if markdown else "") + n for n in notes)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def run_compare(args) -> int:
    result = compare(collect(args.paths), args.metric, args.baseline, args.delta)
    if args.json:
        json.dump(_jsonable(result), sys.stdout, indent=1)
        print()
    else:
        print(render_text(result, markdown=args.markdown))
    return 0
