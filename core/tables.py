"""Typed TOML tables -> frozen dataclasses, with one clear error per bad key or value.

Shared by the model spec and the run config so every table refuses unknown keys the same way (with the
closest known key suggested: a silently ignored typo wastes a GPU hour).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

from core.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict, or one clear error naming the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a directory; expected a .toml file (a run's is {path / 'config.toml'})")
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); a TOML config is UTF-8") from None
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as e:  # ValueError: an integer of 4300+ digits
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"config file {path}: cannot read it ({e.strerror or e})") from None


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"


def check_known_keys(table: dict, known: list[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise UserError(f"unknown key '{where}.{key}'{_suggest(key, known)}")


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (a pasted 100,000-character value is still one line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more than 4,300 digits has no repr
        return f"<an integer of {value.bit_length():,} bits>"
    return text if len(text) <= 80 else text[:60] + f"... ({len(text):,} characters)"


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check one TOML value against a field annotation (int, float, bool, str, list[int], or a union)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return coerce(value, option, key)
            except UserError:
                pass
        raise UserError(f"'{key}' = {_show(value)}: expected {_describe(annotation)}")
    if annotation is type(None):
        if value is None:
            return None
        raise UserError(f"'{key}' = {_show(value)}: expected nothing")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"'{key}' = {_show(value)}: expected a list of {item.__name__}")
        return tuple(coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"'{key}' = {_show(value)}: expected true or false")
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:  # no count or size of a run is that large; numpy could not hold it
                raise UserError(f"'{key}': an integer of {value.bit_length()} bits; expected at most 64 bits")
            return value
        raise UserError(f"'{key}' = {_show(value)}: expected an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past float's range
                number = math.inf
            if not math.isfinite(number):  # nan and inf are valid TOML; no rate, scale or time may be one
                raise UserError(f"'{key}' = {_show(value)}: expected a finite number")
            return number
        raise UserError(f"'{key}' = {_show(value)}: expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserError(f"'{key}' = {_show(value)}: expected a string")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _describe(annotation: Any) -> str:
    names = []
    for a in typing.get_args(annotation):
        if typing.get_origin(a) is list:
            names.append("a list of integers")
        elif a is type(None):
            continue
        else:
            names.append({int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(a, str(a)))
    return " or ".join(names)


def dataclass_from_table(cls, table: dict, where: str, **overrides):
    """Build dataclass `cls` from a TOML table: unknown keys refused, each value type-checked."""
    if not isinstance(table, dict):
        raise UserError(f"'{where}' must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_known_keys(table, list(fields), where)
    hints = typing.get_type_hints(cls)
    values = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    values.update(overrides)
    return cls(**values)
