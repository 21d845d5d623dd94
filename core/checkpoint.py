"""Checkpoints: everything a run needs to continue exactly where it stopped, in safetensors and JSON.

RUN_DIR/checkpoints/step_NNNNNN/ holds
  weights.safetensors    the weights, a loopgolf weight file (the spec in its metadata; usable with --init)
  optimizer.safetensors  flat float32 optimizer state: muon.<param>, adam_m.<param>, adam_v.<param>, adam.step
  average.safetensors    only with [average]: the weight-averaging state (core.averaging), tensors named
                         average.<param>; its kind and count are checkpoint.json's "average"
  checkpoint.json        step, training time, schedule state, data position (the sequential stream's file
                         and offset; a shuffled stream's sequences drawn per rank), resolved config, spec,
                         version, and each tensor file's size and SHA-256

A checkpoint is written under a temporary name (.step_NNNNNN.*.tmp) and renamed once every file is on disk,
so a directory named step_NNNNNN is complete: a run killed while writing leaves only a temporary directory,
which readers ignore and the next write removes. Old checkpoints are renamed away before they are deleted,
for the same reason. No pickle: loading a checkpoint never executes code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from core.config import RunConfig, SECTIONS
from core.errors import UserError, os_error
from core.params import MATRIX, param_table
from core.shards import read_shard_header
from core.spec import ModelSpec
from core.weights import SPEC_KEY, check_weights, load_weights, read_header

FORMAT = "loopgolf-checkpoint"
VERSION = 1
DIR_NAME = "checkpoints"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
AVERAGE_FILE = "average.safetensors"
META_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"step_(\d{6,})")
_MAX_META_BYTES = 16 << 20

# Keys that may change between a checkpoint and its resume: they do not touch the training trajectory.
# Every other key (and any key added later) must match. The data is compared by its train shards.
RESUME_FREE = {
    "train": {"val_every", "val_batch_tokens", "val_max_tokens", "log_every", "warmup_steps",
              "checkpoint_every", "keep_checkpoints", "compile"},
    "data": {"path", "dataset", "tokenizer"},
    "artifact": {"scheme", "codec", "level"},  # the scheme only while QAT is off: see config_differences
    "eval": {"stride", "seq_len", "batch_seqs", "hedge", "hedge_eta",  # scoring only, after training
             "ttt", "ttt_chunk_tokens", "ttt_epochs", "ttt_lr", "ttt_momentum", "ttt_grad_clip", "ttt_batch_seqs"},
}


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run after a step; `checkpoint` holds its state (None without a run dir)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclasses.dataclass
class Checkpoint:
    path: Path
    meta: dict
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    average: tuple[dict[str, np.ndarray], dict] | None = None  # (tensors, meta["average"]) with [average]

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def train_time_ms(self) -> float:
        return float(self.meta["train_time_ms"])

    @property
    def stop_after(self) -> int | None:
        return self.meta["schedule"].get("stop_after")

    @property
    def layers(self) -> int:
        """The active depth when it was written (progressive depth; full depth when absent)."""
        return self.meta["schedule"].get("layers") or len(self.meta["spec"]["layer_plan"])

    @property
    def position(self) -> tuple[int, int]:
        return self.meta["data"]["file_index"], self.meta["data"]["pos"]

    @property
    def drawn(self) -> int:
        """Sequences each rank's shuffled stream had drawn ([data] order = "shuffled"; 0 otherwise)."""
        return self.meta["data"].get("drawn", 0)


def optimizer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The canonical optimizer-state names and shapes for a spec."""
    shapes: dict[str, tuple[int, ...]] = {"adam.step": ()}
    for info in param_table(spec):
        if info.group == MATRIX:
            shapes[f"muon.{info.name}"] = info.shape
        else:
            shapes[f"adam_m.{info.name}"] = info.shape
            shapes[f"adam_v.{info.name}"] = info.shape
    return shapes


def config_record(cfg: RunConfig) -> dict:
    """The resolved config (all tables but [model]) as plain JSON values."""
    return json.loads(json.dumps({s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS if s != "model"}))


def shard_record(files) -> list[list]:
    return [[Path(f).name, read_shard_header(f)] for f in files]


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("loopgolf")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


# ---- listing -----------------------------------------------------------------------------------------

def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `root` as (step, path), oldest first. Temporary directories are not listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(m[1]), p))
    return sorted(found)


def latest(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# ---- writing -----------------------------------------------------------------------------------------

def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(path: Path) -> None:
    """Remove a directory safely: rename it to a temporary name first, so it never looks complete half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".del", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _sweep(root: Path, keep: Path | None = None) -> None:
    for p in root.iterdir():
        if p != keep and p.name.startswith(".step_") and p.name.endswith((".tmp", ".del")):
            shutil.rmtree(p, ignore_errors=True)


def encode_state(spec: ModelSpec, weights: dict[str, np.ndarray],
                 optimizer: dict[str, np.ndarray]) -> tuple[bytes, bytes]:
    """(weights file bytes, optimizer file bytes), both safetensors; checked against the spec first."""
    from safetensors.numpy import save

    check_weights(spec, weights, "checkpoint weights")
    expected = optimizer_shapes(spec)
    wrong = sorted(set(expected) ^ set(optimizer)) + sorted(
        k for k in expected if k in optimizer and tuple(np.shape(optimizer[k])) != expected[k])
    if wrong:
        raise ValueError(f"optimizer state does not match the spec: {', '.join(wrong[:5])}")
    w = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in sorted(weights)}
    o = {k: np.asarray(optimizer[k], dtype=np.float32, order="C") for k in sorted(optimizer)}  # keeps 0-d
    return save(w, metadata={SPEC_KEY: spec.to_json()}), save(o, metadata={"loopgolf.checkpoint": "optimizer"})


def nonfinite(*trees: dict[str, np.ndarray]) -> list[str]:
    return [k for tree in trees for k, v in tree.items() if not np.isfinite(v).all()]


def write_checkpoint(root: str | os.PathLike, step: int, spec: ModelSpec, weights: dict[str, np.ndarray],
                     optimizer: dict[str, np.ndarray], meta: dict, keep: int = 2,
                     average: tuple[dict[str, np.ndarray], dict] | None = None) -> Path:
    """Write root/step_NNNNNN atomically and keep the newest `keep` (0: all). Returns its path.
    `average`: the weight-averaging state (tensors, JSON record) from core.averaging, if any."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    try:
        return _write_checkpoint(root, final, step, spec, weights, optimizer, meta, keep, average)
    except OSError as e:  # a full disk, a read-only run directory: one line naming the checkpoint
        raise os_error(e, final) from None


def _write_checkpoint(root: Path, final: Path, step: int, spec: ModelSpec, weights: dict[str, np.ndarray],
                      optimizer: dict[str, np.ndarray], meta: dict, keep: int,
                      average: tuple[dict[str, np.ndarray], dict] | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    wbytes, obytes = encode_state(spec, weights, optimizer)
    blobs = {WEIGHTS_FILE: wbytes, OPTIMIZER_FILE: obytes}
    if average is not None:
        from safetensors.numpy import save

        blobs[AVERAGE_FILE] = save({k: np.ascontiguousarray(v) for k, v in sorted(average[0].items())})
        meta = {**meta, "average": average[1]}
    record = {
        "format": FORMAT, "version": VERSION, "loopgolf_version": version(), "step": step,
        **meta, "spec": spec.to_dict(),
        "files": {name: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for name, b in blobs.items()},
    }
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        for name, b in blobs.items():
            _write_synced(tmp / name, b)
        _write_synced(tmp / META_FILE, text.encode())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        _fsync_dir(tmp)
        if final.exists():
            _discard(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            _discard(old)
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- reading -----------------------------------------------------------------------------------------

def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise UserError(f"checkpoint file {path}: {what}")


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """checkpoint.json, checked for every field a resume reads."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"checkpoint file {path} not found (incomplete checkpoint)")
    _need(path.stat().st_size <= _MAX_META_BYTES, path, "implausibly large")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"checkpoint file {path}: not valid JSON ({e})") from None
    _need(isinstance(meta, dict) and meta.get("format") == FORMAT, path, f"not a {FORMAT} file")
    _need(meta.get("version") == VERSION, path,
          f"format version {meta.get('version')!r}; this loopgolf reads {VERSION}")
    _need(_is_int(meta.get("step")), path, "'step' should be an integer >= 0")
    t = meta.get("train_time_ms")
    _need(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0, path,
          "'train_time_ms' should be a number >= 0")
    sched = meta.get("schedule")
    _need(isinstance(sched, dict) and (sched.get("stop_after") is None or _is_int(sched.get("stop_after"))), path,
          "'schedule.stop_after' should be null or an integer")
    data = meta.get("data")
    _need(isinstance(data, dict) and _is_int(data.get("file_index")) and _is_int(data.get("pos")), path,
          "'data' should hold integers file_index and pos")
    _need(data.get("drawn") is None or _is_int(data["drawn"]), path, "'data.drawn' should be null or an integer >= 0")
    shards = data.get("train_shards")
    _need(isinstance(shards, list) and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], str)
                                           and _is_int(s[1]) for s in shards), path,
          "'data.train_shards' should be a list of [name, tokens]")
    _need(isinstance(meta.get("spec"), dict), path, "'spec' should be an object")
    cfg = meta.get("config")
    _need(isinstance(cfg, dict) and all(isinstance(cfg.get(s), dict) for s in SECTIONS if s != "model"), path,
          f"'config' should hold the tables {', '.join(s for s in SECTIONS if s != 'model')}")
    iterations = cfg["train"].get("iterations")
    _need(_is_int(iterations, 1) and meta["step"] <= iterations, path,
          f"'step' {meta['step']} lies beyond train.iterations = {iterations!r}")
    _need(sched.get("stop_after") is None or sched["stop_after"] <= meta["step"], path,
          "'schedule.stop_after' lies ahead of 'step'")
    plan = meta["spec"].get("layer_plan")
    _need(isinstance(plan, list) and (sched.get("layers") is None or _is_int(sched["layers"], 1)
                                      and sched["layers"] <= len(plan)), path,
          "'schedule.layers' should be null or an integer from 1 to the plan's length")
    _need(data["file_index"] < len(shards) and data["pos"] <= shards[data["file_index"]][1], path,
          f"data position {data['file_index']}:{data['pos']} lies outside its train shards")
    files = meta.get("files")
    _need(isinstance(files, dict) and all(
        isinstance(files.get(n), dict) and _is_int(files[n].get("bytes"))
        and isinstance(files[n].get("sha256"), str) for n in (WEIGHTS_FILE, OPTIMIZER_FILE)), path,
        f"'files' should give bytes and sha256 of {WEIGHTS_FILE} and {OPTIMIZER_FILE}")
    return meta


def _check_file(path: Path, record: dict) -> None:
    if not path.is_file():
        raise UserError(f"checkpoint file {path} not found (incomplete checkpoint)")
    size = path.stat().st_size
    _need(size == record["bytes"], path,
          f"{size} bytes, checkpoint.json says {record['bytes']} (truncated or replaced)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    _need(h.hexdigest() == record["sha256"], path, "SHA-256 differs from checkpoint.json's (corrupt)")


def read_optimizer(path: str | os.PathLike, spec: ModelSpec) -> dict[str, np.ndarray]:
    """optimizer.safetensors: exactly the spec's names and shapes, float32, finite."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} not found")
    header = read_header(path)  # bounded, clear errors for a malformed header
    header.pop("__metadata__", None)
    expected = optimizer_shapes(spec)
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    _need(not missing and not extra, path, "optimizer state does not match the spec: "
          + "; ".join(p for p in (missing and f"missing {', '.join(missing[:5])}",
                                  extra and f"extra {', '.join(extra[:5])}") if p))
    for name, entry in header.items():
        _need(isinstance(entry, dict) and entry.get("dtype") == "F32", path,
              f"{name}: expected dtype F32, got {entry.get('dtype') if isinstance(entry, dict) else entry!r}")
        _need(isinstance(entry.get("shape"), list) and tuple(entry["shape"]) == expected[name], path,
              f"{name}: shape {entry.get('shape')!r}, expected {list(expected[name])}")
    try:
        state = load(path.read_bytes())
    except (SafetensorError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint file {path}: not a readable safetensors file ({e})") from None
    bad = nonfinite(state)
    _need(not bad, path, f"non-finite values in {', '.join(bad[:5])}")
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


def load_checkpoint(ckpt_dir: str | os.PathLike, spec: ModelSpec) -> Checkpoint:
    """Read and check a whole checkpoint (meta, file sizes and hashes, names, shapes) for `spec`."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
        _check_file(ckpt_dir / name, meta["files"][name])
    wspec, weights = load_weights(ckpt_dir / WEIGHTS_FILE)
    _need(wspec == spec, ckpt_dir / WEIGHTS_FILE, "its spec differs from the run's")
    bad = nonfinite(weights)
    _need(not bad, ckpt_dir / WEIGHTS_FILE, f"non-finite values in {', '.join(bad[:5])}")
    optimizer = read_optimizer(ckpt_dir / OPTIMIZER_FILE, spec)
    return Checkpoint(ckpt_dir, meta, weights, optimizer, read_average(ckpt_dir, meta, weights))


def read_average(ckpt_dir: Path, meta: dict, weights: dict[str, np.ndarray]):
    """(tensors, record) of the averaging state, or None when the checkpoint has none; the tensors must
    be exactly average.<param> for every weight, with its shape, and finite."""
    record = meta.get("average")
    if record is None:
        return None
    path = ckpt_dir / AVERAGE_FILE
    _need(isinstance(record, dict) and record.get("kind") in ("ema", "swa") and _is_int(record.get("count")), path,
          "checkpoint.json's 'average' should hold a kind ('ema' or 'swa') and an integer count")
    _need(record["kind"] != "swa" or isinstance(record.get("last_snapshot"), int), path,
          "checkpoint.json's SWA 'average' should hold an integer last_snapshot")
    files = meta["files"].get(AVERAGE_FILE)
    _need(isinstance(files, dict) and _is_int(files.get("bytes")) and isinstance(files.get("sha256"), str),
          ckpt_dir / META_FILE, f"'files' should give bytes and sha256 of {AVERAGE_FILE}")
    _check_file(path, files)
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint file {path}: not a readable safetensors file ({e})") from None
    expected = {} if record["kind"] == "swa" and record["count"] == 0 else {f"average.{k}": v.shape
                                                                             for k, v in weights.items()}
    _need(set(tensors) == set(expected) and all(tensors[k].shape == s for k, s in expected.items()), path,
          "the averaging tensors do not match the weights (names average.<param>, same shapes)")
    bad = nonfinite(tensors)
    _need(not bad, path, f"non-finite values in {', '.join(bad[:5])}")
    return tensors, record


def _default(section: str, key: str):
    """A key's default as the JSON record holds it (a tuple default reads back as a list)."""
    cls = ModelSpec if section == "model" else SECTIONS[section]
    for f in dataclasses.fields(cls):
        if f.name == key:
            return json.loads(json.dumps(f.default))
    return None


def config_differences(meta: dict, cfg: RunConfig) -> list[str]:
    """'section.key (checkpoint X, now Y)' for every training-relevant key that differs."""
    diffs = []
    saved_spec, spec = meta["spec"], json.loads(json.dumps(cfg.model.to_dict()))
    for key in sorted(set(saved_spec) | set(spec)):
        old = saved_spec.get(key, _default("model", key))  # a key added since the checkpoint: its default
        if old != spec.get(key):
            diffs.append(f"model.{key} (checkpoint {old!r}, now {spec.get(key)!r})")
    now = config_record(cfg)
    for section, table in now.items():
        saved = meta["config"].get(section, {})
        for key, value in table.items():
            # A QAT run trains against its scheme: a new one would change the rest of the run's training.
            trains_against = section == "artifact" and key == "scheme" and saved.get("qat", "off") != "off"
            if key in RESUME_FREE.get(section, ()) and not trains_against:
                continue
            old = saved.get(key, _default(section, key))  # a key added since the checkpoint: its default
            if old != value:
                diffs.append(f"{section}.{key} (checkpoint {old!r}, now {value!r})")
    return diffs


def resolve_resume(out_dir: str | os.PathLike, cfg: RunConfig, train_files) -> Path:
    """The newest complete checkpoint in out_dir that this config may continue; UserError otherwise."""
    out_dir = Path(out_dir)
    root = out_dir / DIR_NAME
    path = latest(root)
    if path is None:
        where = (f"{root} holds none" if root.is_dir() else
                 f"{root} is not a directory" if root.exists() else f"{root} does not exist")
        raise UserError(f"--resume: no complete checkpoint in {out_dir} ({where}); "
                        "checkpoints are written every train.checkpoint_every steps and on SIGTERM/SIGINT")
    meta = read_meta(path)
    diffs = config_differences(meta, cfg)
    if diffs:
        raise UserError(f"--resume: {path} was written with a different config: {'; '.join(diffs)}. "
                        f"Resume with the run's own settings (its config is {out_dir / 'config.toml'}), "
                        "or start a new run in another --out")
    shards = shard_record(train_files)
    if meta["data"]["train_shards"] != shards:
        raise UserError(f"--resume: {path} was trained on other data: train shards {meta['data']['train_shards']}, "
                        f"now {shards}")
    return path


def refuse_fresh_run(out_dir: str | os.PathLike) -> None:
    """A new run must not mix its checkpoints with an earlier run's in the same directory."""
    path = latest(Path(out_dir) / DIR_NAME)
    if path is not None:
        raise UserError(f"{out_dir} already holds checkpoints of a run (newest {path.name}): continue it with "
                        "--resume, choose another --out, or pass --force to start it afresh")


def checkpoint_meta(train_time_ms: float, stop_after: int | None, position: tuple[int, int], shards: list,
                    cfg: RunConfig, backend: str, world_size: int, schedule: dict, drawn: int | None = None) -> dict:
    """The JSON fields besides format, version, files and spec (see write_checkpoint). `position`: the
    sequential stream's (file index, offset); `drawn`: a shuffled stream's sequences drawn (position (0, 0))."""
    return {
        "train_time_ms": train_time_ms,
        "schedule": {"stop_after": stop_after, **schedule},
        # Nothing random is drawn after initialization (init_weights(seed); no dropout; the data order is
        # fixed, or a shuffled stream's, which `drawn` replays), so there is no RNG state to save. The exception,
        # artifact.qat_noise, draws its noise from the backend's generator, which is not saved: such a run
        # resumes, but not bit for bit.
        "rng": None,
        "data": {"file_index": position[0], "pos": position[1], "train_shards": shards,
                 **({"drawn": drawn} if drawn is not None else {})},
        "config": config_record(cfg),
        "backend": backend, "world_size": world_size,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
