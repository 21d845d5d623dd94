"""The report of `loopgolf gpu-check`: one JSON file with everything, and one markdown file whose first table
has a row per part (the rest: the goals and each part's details), both written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import atomic_write_text

GIB = 2**30


def _num(x, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _parity_summary(r: dict) -> str:
    out = []
    for dtype, rows in r.get("dtypes", {}).items():
        held = sum(row["ok"] for row in rows)
        ratios = [(row["max_abs"] / row["bound"], row["check"]) for row in rows
                  if row.get("bound") and row.get("max_abs") is not None]
        worst = max(ratios, default=None)
        tail = f", worst {worst[1]} at {worst[0]:.2g} of its bound" if worst else ""
        out.append(f"{dtype}: {held}/{len(rows)} rows hold{tail}")
    return "; ".join(out)


def _train_summary(r: dict) -> str:
    mem = f"{r['peak_memory_bytes'] / GIB:.2f} GiB"
    if r.get("memory_ratio") is not None:
        mem += f" vs {r['memory_estimate_bytes'] / GIB:.2f} est ({100 * (r['memory_ratio'] - 1):+.0f}%)"
    peak = r["peak"]["flops_per_s"]
    peak_text = f"{peak / 1e12:,.1f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:,.1f} GFLOP/s"
    return (f"{r['ms_per_step']:,.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}% of "
            f"{peak_text} ({r['peak']['dtype']} {r['peak']['n']}^3), mem {mem}, "
            f"compile {_num(r.get('compile_s'), '.1f')} s, {r['graphs_before_clock']} graphs, "
            f"{r['graph_breaks']} breaks, {r['graphs_in_timed_steps']} recompiles")


def _depth_summary(r: dict) -> str:
    v = r["variants"]
    joined = lambda key, fmt="": "/".join(format(x[key], fmt) for x in v)  # noqa: E731
    return (f"layers {joined('layers')}: graphs {joined('graphs')} before the clock, "
            f"{sum(x['graphs_timed'] for x in v)} after; ms/step {joined('ms_per_step', ',.1f')}")


def _upstream_summary(r: dict) -> str:
    return (f"loopgolf {r['loopgolf_tokens_per_s']:,.0f} tok/s vs upstream {r['tokens_per_s']:,.0f}: "
            f"{r['ratio']:.2f}x ({len(r['rounds'])} round(s), dtypes {r['loopgolf_dtype']}/{r['upstream_dtype']})")


def _export_summary(r: dict) -> str:
    same = "identical" if r["identical"] else f"max |diff| {_num(r['max_abs_diff'], '.2e')}"
    return f"{len(r['script_losses'])} steps under torchrun, losses {same} to loopgolf's trainer"


SUMMARIES = {"parity": _parity_summary, "train": _train_summary, "depth": _depth_summary,
             "upstream": _upstream_summary, "export": _export_summary}


def part_summary(kind: str, r: dict) -> str:
    if r["status"] in ("error", "timeout", "skipped"):
        return r.get("error") or ""
    text = SUMMARIES[kind](r)
    failed = [f"{c['check']} ({c['detail']})" for c in r.get("checks", []) if not c["ok"]]
    return text + ("; FAILED: " + "; ".join(failed) if failed else "")


def goals(parts: list[dict], results: dict[str, dict]) -> list[dict]:
    out = []
    for p in parts:
        r = results.get(p["name"], {})
        out += [{**g, "part": p["name"]} for g in r.get("goals", [])]
    base, ut = results.get("train:baseline_9x512", {}), results.get("train:ut_3x4_iter", {})
    if base.get("status") in ("ok", "fail") and ut.get("status") in ("ok", "fail"):
        out.append({"part": "train", "check": "ut_3x4_iter at no worse MFU than the baseline",
                    "ok": ut["mfu"] >= base["mfu"],
                    "detail": f"{100 * ut['mfu']:.1f}% vs {100 * base['mfu']:.1f}%"})
    return out


def build_report(parts, results, logs, machine: dict, smoke: bool, budget: float, wall: float, argv, date: str) -> dict:
    return {"loopgolf_gpu_check": 1, "date": date, "mode": "cpu-smoke" if smoke else "cuda", "machine": machine,
            "command": ["loopgolf", *(argv or ["gpu-check"])], "budget_s": budget, "wall_s": wall,
            "parts": {p["name"]: {"kind": p["kind"], "config": Path(p["config"]).name, "sets": p["sets"],
                                  "small": p["small"], **results.get(p["name"], {"status": "missing"}),
                                  "log_tail": logs.get(p["name"], [])} for p in parts},
            "goals": goals(parts, results)}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    clean = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows])


def render_markdown(report: dict) -> str:
    m = report["machine"]
    device = m.get("gpu") or f"CPU ({m.get('cpus')} cores, --cpu-smoke)"
    lines = [f"# loopgolf gpu-check: {device}, {report['date']}", "",
             f"`{' '.join(report['command'])}`; torch {m.get('torch')}"
             + (f", CUDA {m['cuda']}" if m.get("cuda") else "") + f", Python {m.get('python')}; "
             f"{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget", ""]
    rows = [[name, r["status"], f"{r.get('seconds', 0):.0f}", part_summary(r["kind"], r)]
            for name, r in report["parts"].items()]
    lines += _table(["part", "status", "s", "result"], rows)
    if report["goals"]:
        lines += ["", "## Goals", ""]
        lines += _table(["goal", "part", "measured", "met"],
                        [[g["check"], g["part"], g["detail"], "yes" if g["ok"] else "NO"] for g in report["goals"]])
    for name, r in report["parts"].items():
        if r["status"] not in ("ok", "fail"):
            continue
        if r["kind"] == "parity":
            for dtype, prow in r["dtypes"].items():
                lines += ["", f"## {name}, {dtype} ({r['device']} against eager float32 on the CPU)", ""]
                lines += _table(["check", "max abs diff", "max rel diff", "tolerance", "ok", "note"],
                                [[x["check"], _num(x["max_abs"], ".2e"), _num(x["max_rel"], ".2e"),
                                  _num(x["bound"], ".2e"), "ok" if x["ok"] else "FAIL", x.get("note", "")]
                                 for x in prow])
        elif r["kind"] == "depth":
            lines += ["", f"## {name} ({r['batch_tokens']:,} tokens per step)", ""]
            lines += _table(["layers", "graphs before the clock", "first step ms", "graphs timed", "ms/step"],
                            [[v["layers"], v["graphs"], f"{v['first_step_ms']:,.0f}", v["graphs_timed"],
                              f"{v['ms_per_step']:,.1f}"] for v in r["variants"]])
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    atomic_write_text(json_path, json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path
