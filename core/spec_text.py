"""The text forms of ModelSpec's keys: layer plans ("3x4", "0 1 2 1 2 3", "flat") and index lists ("9,10").

Each bad value is one UserError naming the key; nothing here hands a user's text to int() unchecked (int()
refuses 4300+ digits and accepts no '²', which str.isdigit() does).
"""

from __future__ import annotations

import re
from typing import Any

from core.errors import UserError
from core.tables import coerce

MAX_LAYERS = 4096  # effective layers (the seeds use 9 to 27); also the most blocks
_MAX_DIGITS = 20  # an index longer than this is past every limit; int() of it is never needed
_CYCLE = re.compile(r"^\s*([0-9]+)\s*x\s*([0-9]+)\s*$")


def _is_index(t: str) -> bool:
    return t.isascii() and t.isdigit() and len(t) <= _MAX_DIGITS


def check_layers(n: int, key: str) -> None:
    if n > MAX_LAYERS:
        raise UserError(f"{key} = {n:,}: at most {MAX_LAYERS:,}")


def parse_indices(text: str, key: str, what: str, example: str) -> list[int]:
    """The distinct indices of a string key like model.ve_layers ("9,10" or "9 10"), ascending."""
    parts = text.replace(",", " ").split()
    if not all(_is_index(t) and len(t) <= len(str(MAX_LAYERS)) for t in parts):
        raise UserError(f"{key} = {text[:40]!r}: expected {what} indices, e.g. {example!r}")
    indices = sorted({int(t) for t in parts})
    if len(indices) != len(parts):
        raise UserError(f"{key} = {text!r} names a {what.split()[-1]} twice")
    return indices


def parse_layer_plan(value: Any, num_layers: int | None, key: str) -> tuple[tuple[int, ...], int]:
    """Expand a plan and return (plan, num_blocks implied by it).

    Accepted: a list of block indices; a string of them ("0 1 2 3 4 5 4 5 6 7 8"); "KxR" for K blocks
    cycled R times (0 1 .. K-1 repeated R times); "flat" for one block per layer (needs num_layers).
    """
    if isinstance(value, str):
        text = value.strip()
        m = _CYCLE.match(text)
        if m:
            if not (_is_index(m.group(1)) and _is_index(m.group(2))):
                raise UserError(f"{key} = {value[:40]!r}: 'KxR' with K x R at most {MAX_LAYERS:,}")
            k, r = int(m.group(1)), int(m.group(2))
            if k < 1 or r < 1:
                raise UserError(f"{key} = {value!r}: 'KxR' needs K >= 1 blocks and R >= 1 repeats")
            check_layers(k * r, f"{key} = {value!r}: K x R")  # before the plan is built
            return tuple(list(range(k)) * r), k
        if text == "flat":
            if num_layers is None:
                raise UserError(f"{key} = 'flat' needs model.num_layers")
            check_layers(num_layers, "model.num_layers")
            return tuple(range(num_layers)), num_layers
        parts = text.replace(",", " ").split()
        if not parts or not all(p.isascii() and p.isdigit() for p in parts):
            raise UserError(
                f"{key} = {value[:40]!r}: expected 'KxR' (e.g. '3x4'), 'flat', or block indices like '0 1 2 0 1 2'"
            )
        if not all(_is_index(p) for p in parts):
            raise UserError(f"{key}: a block index of {max(map(len, parts)):,} digits; at most {MAX_LAYERS:,} blocks")
        plan = tuple(int(p) for p in parts)
    else:
        plan = coerce(value, list[int], key)
        if not plan:
            raise UserError(f"{key} is empty: expected at least one layer")
        if any(b < 0 for b in plan):
            raise UserError(f"{key} has a negative block index: {list(plan)}")
    return plan, max(plan) + 1
