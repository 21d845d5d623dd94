"""Weight files: safetensors with the spec as metadata, checked against the parameter table on load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_bytes
from core.errors import UserError
from core.params import init_weights, param_table  # noqa: F401  (init_weights is part of this module's API)
from core.spec import ModelSpec

# One metadata key: safetensors writes several keys in a random order, and weight files should be
# byte-identical for identical weights.
SPEC_KEY = "loopgolf.spec"
FLOAT_DTYPES = ("F16", "F32", "F64")  # safetensors names of the dtypes load_weights accepts (as float32)


def check_weights(spec: ModelSpec, weights: dict[str, np.ndarray], source: str) -> None:
    """Names and shapes must match the spec's parameter table exactly; list every difference."""
    expected = {p.name: p.shape for p in param_table(spec)}
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    wrong = [
        f"{n} {tuple(weights[n].shape)} (expected {expected[n]})"
        for n in expected
        if n in weights and tuple(weights[n].shape) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"extra {', '.join(extra)}")
    if wrong:
        problems.append(f"wrong shape {', '.join(wrong)}")
    if problems:
        raise UserError(f"{source}: weights do not match the spec: {'; '.join(problems)}")


def save_weights(path: str | Path, spec: ModelSpec, weights: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    check_weights(spec, weights, str(path))
    tensors = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in sorted(weights)}
    data = save(tensors, metadata={SPEC_KEY: spec.to_json()})
    atomic_write_bytes(path, data)


def read_spec_metadata(path: str | Path) -> ModelSpec:
    """The spec stored in a weight file's header, without reading the tensors."""
    path = Path(path)
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get(SPEC_KEY), str):
        raise UserError(f"{path}: safetensors file has no '{SPEC_KEY}' metadata; not a loopgolf weight file")
    try:
        return ModelSpec.from_json(meta[SPEC_KEY], source=str(path))
    except (RecursionError, ValueError) as e:  # nested too deeply; an integer of more than 4300 digits
        raise UserError(f"{path}: the model spec is not valid JSON ({type(e).__name__})") from None
    except UserError as e:
        raise UserError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def load_weights(path: str | Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    spec = read_spec_metadata(path)
    for name, entry in read_header(path).items():  # numpy has no bfloat16; integers are not weights
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        if name != "__metadata__" and dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {dtype!r}; "
                            f"a weight file holds {', '.join(FLOAT_DTYPES)}")
    try:
        weights = load(path.read_bytes())
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    check_weights(spec, weights, str(path))
    weights = {k: v.astype(np.float32, copy=False) for k, v in weights.items()}
    bad = [k for k, v in sorted(weights.items()) if not np.isfinite(v).all()]
    if bad:  # training from, quantizing or scoring them would only spread the NaN (the run that wrote it diverged)
        count = int(sum(np.count_nonzero(~np.isfinite(weights[k])) for k in bad))
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"{path}: {count:,} NaN or inf values in tensor {bad[0]!r}{more}; a weight file must be finite")
    return spec, weights


def read_header(path: Path) -> dict:
    """Parse a safetensors header ourselves so a malformed file gets one clear line."""
    if path.is_dir():
        raise UserError(f"weight file {path} is a directory; expected a .safetensors file "
                        f"(e.g. {path / 'model.safetensors'})")
    if not path.is_file():
        raise UserError(f"weight file {path} not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 * 2**20):
            raise UserError(f"{path}: safetensors header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
            raise UserError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is not a JSON object")
    return header
