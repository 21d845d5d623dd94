"""The rows of `loopgolf parity`: one comparison of MLX against torch each, its tolerance, and the report."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from core.tolerances import Tol


# ---- rows -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    check: str
    max_abs: float | None  # None: an exact (hash) check
    max_rel: float | None
    bound: float | None
    ok: bool
    note: str = ""
    kind: str = ""  # the core.tolerances key it was checked against

    def format(self) -> str:
        num = lambda v: f"{v:12.3e}" if v is not None else f"{'-':>12}"  # noqa: E731
        tol = num(self.bound) if self.bound is not None else f"{'identical':>12}"
        line = f"{self.check:<44} {num(self.max_abs)} {num(self.max_rel)} {tol}  {'ok' if self.ok else 'FAIL':<4}"
        return (line + "  " + self.note) if self.note else line.rstrip()


HEADER = f"{'check':<44} {'max abs diff':>12} {'max rel diff':>12} {'tolerance':>12}  ok"


def compare(check: str, a, b, tol: Tol, note: str = "", floor: float = 0.0) -> Row:
    """a (MLX) against b (torch), both array-likes; rel is relative to the tensor's largest magnitude.
    `floor` widens the bound by a known, exact amount (one rounding of the weights a change was taken from)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return Row(check, None, None, None, False, f"shapes differ: mlx {a.shape}, torch {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        which = [n for n, v in (("mlx", a), ("torch", b)) if not np.isfinite(v).all()]
        return Row(check, math.inf, math.inf, None, False, f"non-finite values in {' and '.join(which)}")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(max(np.abs(a).max(), np.abs(b).max())) if a.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    bound = tol.bound(scale) + floor
    return Row(check, diff, rel, bound, diff <= bound, note, tol.kind)


def compare_group(check: str, pairs: dict[str, tuple], tols: dict[str, Tol], floors: dict[str, float]) -> Row:
    """One row for several tensors: the worst one (largest diff against its own bound), named in the note."""
    rows = {name: compare(check, a, b, tols[name], floor=floors[name]) for name, (a, b) in pairs.items()}

    def badness(r: Row) -> float:
        if r.max_abs is None or r.bound is None:
            return math.inf
        return r.max_abs / r.bound if r.bound > 0 else (math.inf if r.max_abs > 0 else 0.0)

    name, worst = max(rows.items(), key=lambda kv: badness(kv[1]))
    failing = [n for n, r in rows.items() if not r.ok]
    note = f"worst of {len(rows)}: {name}" + (f" ({len(failing)} fail)" if failing else "")
    if worst.note:
        note += f"; {worst.note}"
    return dataclasses.replace(worst, ok=not failing, note=note)


def compare_exact(check: str, a: bytes, b: bytes) -> Row:
    ha, hb = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()
    if ha == hb:
        return Row(check, None, None, None, True, f"{ha[:16]} ({len(a):,} B)")
    return Row(check, None, None, None, False, f"mlx {ha[:16]} ({len(a):,} B), torch {hb[:16]} ({len(b):,} B)")


# ---- the report ----------------------------------------------------------------------------------------

def first_divergence(rows: list[Row]) -> Row | None:
    return next((r for r in rows if not r.ok), None)


def format_report(rows: list[Row]) -> str:
    lines = [HEADER] + [r.format() for r in rows]
    bad = first_divergence(rows)
    if bad is not None:
        failed = sum(not r.ok for r in rows)
        lines += ["", f"first divergence: {bad.format()}", f"parity: {failed} of {len(rows)} checks FAIL"]
    else:
        lines += ["", f"parity: all {len(rows)} checks ok"]
    return "\n".join(lines)
