"""A sweep's plan: named variants (a grid's cross product and/or explicit variants) times seeds.

Each planned run is one `loopgolf train` with extra `--set` overrides. Names are stable and readable
(`layer_plan=3x4-s1337`), and the order is the order given: variants, then grid values (first key
slowest), then seeds.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import shlex

from core.config import SECTIONS
from core.errors import UserError
from core.spec import ModelSpec

DEFAULT_SEEDS = (1337, 42, 2025)
_NAME_OK = re.compile(r"[A-Za-z0-9._+=-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    name: str  # its directory under the sweep
    variant: str
    seed: int
    overrides: tuple[str, ...]  # `--set` values for this run (the sweep's own --set come before them)

    def to_json(self) -> dict:
        return {"name": self.name, "variant": self.variant, "seed": self.seed, "overrides": list(self.overrides),
                "status": "planned"}


def config_keys() -> list[str]:
    """Every `section.key` a config may set."""
    keys = [f"model.{f.name}" for f in dataclasses.fields(ModelSpec)] + ["model.depth"]
    for section, cls in SECTIONS.items():
        if cls is not None:
            keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def check_config_key(key: str, where: str) -> None:
    known = config_keys()
    if key in known:
        return
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; expected section.key, e.g. model.layer_plan"
    raise UserError(f"{where}: '{key}' is not a config key{hint}")


def parse_seeds(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise UserError(f"--seeds {text!r}: the seed list is empty; expected integers, e.g. --seeds 1337,42,2025")
    seeds = []
    for p in parts:
        try:
            seeds.append(int(p))
        except ValueError:
            raise UserError(f"--seeds {text!r}: {p!r} is not an integer seed; expected e.g. 1337,42,2025") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def split_values(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']; commas inside quotes or brackets ('0.3:1,1.0:2', [0, 1]) do not split."""
    values, current, quote, depth = [], "", None, 0
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid {item!r}: expected section.key=V1,V2,...")
        key, raw = (s.strip() for s in item.split("=", 1))
        check_config_key(key, f"--grid {item!r}")
        if key == "train.seed":
            raise UserError(f"--grid {item!r}: seeds are given with --seeds, not as a grid key")
        values = split_values(raw)
        if not all(values):
            raise UserError(f"--grid {item!r}: an empty value; expected section.key=V1,V2,...")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r}: a value is listed twice")
        if key in (k for k, _ in grid):
            raise UserError(f"--grid: {key} is given twice; list all its values in one --grid")
        grid.append((key, values))
    return grid


def parse_variants(items: list[str]) -> list[tuple[str, list[str]]]:
    """--variant 'NAME: KEY=VALUE KEY=VALUE' (shell-quoted pairs; 'NAME:' alone is the config as it is)."""
    variants: list[tuple[str, list[str]]] = []
    for item in items:
        name, sep, rest = item.partition(":")
        name = name.strip()
        if not sep or not _NAME_OK.fullmatch(name):
            raise UserError(f"--variant {item!r}: expected 'NAME: section.key=value ...' with a NAME of letters, "
                            "digits and ._+=-")
        try:
            pairs = shlex.split(rest)
        except ValueError as e:
            raise UserError(f"--variant {item!r}: {e}") from None
        for pair in pairs:
            if "=" not in pair:
                raise UserError(f"--variant {item!r}: {pair!r} is not section.key=value")
            check_config_key(pair.split("=", 1)[0].strip(), f"--variant {name}")
        if name in (n for n, _ in variants):
            raise UserError(f"--variant: the name {name!r} is used twice")
        variants.append((name, pairs))
    return variants


def _value_label(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return _UNSAFE.sub("_", value).strip("_") or "empty"


def plan_runs(base_name: str, seeds: list[int], grid: list[tuple[str, list[str]]],
              variants: list[tuple[str, list[str]]], fixed: list[str] = ()) -> list[PlannedRun]:
    """The runs in order. `fixed` are the sweep's own --set values: a grid or variant may not set the same
    key (which one wins would be a guess)."""
    fixed_keys = {f.split("=", 1)[0].strip() for f in fixed}
    for key, _ in grid:
        if key in fixed_keys:
            raise UserError(f"--set {key} is also a --grid key; give its values in the grid only")
    for name, pairs in variants:
        for pair in pairs:
            key = pair.split("=", 1)[0].strip()
            if key in fixed_keys or key in (k for k, _ in grid):
                raise UserError(f"--variant {name}: {key} is also set by --set or --grid")
    if not _NAME_OK.fullmatch(base_name):
        base_name = _value_label(base_name)
    # A grid key is named by its last part unless two grid keys share it (train.seq_len, eval.seq_len).
    short = [k.split(".", 1)[1] for k, _ in grid]
    labels = [s if short.count(s) == 1 else k for s, (k, _) in zip(short, grid)]
    combos = list(itertools.product(*[[(k, v) for v in values] for k, values in grid]))
    runs, names = [], {}
    for vname, pairs in variants or [(None, [])]:
        for combo in combos:
            parts = ([vname] if vname else []) + [f"{label}={_value_label(v)}" for label, (_, v) in zip(labels, combo)]
            variant = ",".join(parts) or base_name
            overrides = list(pairs) + [f"{k}={v}" for k, v in combo]
            if variant in names and names[variant] != overrides:
                raise UserError(f"--grid: values {names[variant]} and {overrides} both make the run name {variant!r}; "
                                "name them with --variant instead")
            names[variant] = overrides
            for seed in seeds:
                runs.append(PlannedRun(f"{variant}-s{seed}", variant, seed, (*overrides, f"train.seed={seed}")))
    return runs
