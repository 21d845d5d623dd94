"""Upstream's data manifest.json, and finding a dataset's shards and tokenizer from a path.

Layout (upstream's): ROOT/manifest.json, ROOT/datasets/<dataset>/fineweb_{train,val}_*.bin,
ROOT/tokenizers/<tokenizer>.model. Paths inside the manifest are relative to ROOT.
Keys we do not model (upstream writes a few more) are kept in `extra` so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_text
from core.errors import UserError
from core.shards import DEMO_HINT, list_shards, read_shard
from core.tokenizer import load_tokenizer

MANIFEST_NAME = "manifest.json"
STAT_KEYS = ("files_train", "files_val", "docs_train", "docs_val", "tokens_train", "tokens_val")


@dataclass
class TokenizerEntry:
    name: str
    kind: str = "sentencepiece_bpe"
    vocab_size: int = 0
    bos_id: int = 1
    eos_id: int = 2
    model_path: str | None = None  # relative to the data root
    vocab_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetStats:
    files_train: int = 0
    files_val: int = 0
    docs_train: int = 0
    docs_val: int = 0
    tokens_train: int = 0
    tokens_val: int = 0


@dataclass
class DatasetEntry:
    name: str
    tokenizer_name: str | None
    path: str  # relative to the data root, e.g. datasets/shakespeare_sp1024
    vocab_size: int
    stats: DatasetStats = field(default_factory=DatasetStats)
    train_glob: str = ""
    val_glob: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train_glob = self.train_glob or f"{self.path}/fineweb_train_*.bin"
        self.val_glob = self.val_glob or f"{self.path}/fineweb_val_*.bin"


@dataclass
class Manifest:
    version: str = "loopgolf"
    num_docs: int = 0
    num_val_docs: int = 0
    shuffle_seed: int | None = None
    shard_size: int = 10**8
    append_eos: bool = False
    tokenizers: list[TokenizerEntry] = field(default_factory=list)
    datasets: list[DatasetEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def dataset(self, name: str) -> DatasetEntry | None:
        return next((d for d in self.datasets if d.name == name), None)

    def tokenizer(self, name: str | None) -> TokenizerEntry | None:
        return next((t for t in self.tokenizers if t.name == name), None) if name else None

    def put_dataset(self, entry: DatasetEntry) -> None:
        """Add or replace (by name), keeping the other datasets of a shared data root."""
        self.datasets = [d for d in self.datasets if d.name != entry.name] + [entry]

    def put_tokenizer(self, entry: TokenizerEntry) -> None:
        self.tokenizers = [t for t in self.tokenizers if t.name != entry.name] + [entry]


def _take(src: dict, key: str, kind: type | tuple, where: str, default: Any = dataclasses.MISSING) -> Any:
    if key not in src:
        if default is dataclasses.MISSING:
            raise UserError(f"{where}: missing key {key!r}")
        return default
    value = src.pop(key)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is int)
    if not ok and not (value is None and default is None):
        raise UserError(f"{where}: key {key!r} should be {getattr(kind, '__name__', kind)}, found {value!r}")
    return value


def manifest_from_dict(raw: dict, where: str = MANIFEST_NAME) -> Manifest:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object at the top level")
    raw = dict(raw)
    m = Manifest(
        version=str(raw.pop("version", "")),
        num_docs=_take(raw, "num_docs", int, where, 0),
        num_val_docs=_take(raw, "num_val_docs", int, where, 0),
        shuffle_seed=_take(raw, "shuffle_seed", int, where, None),
        shard_size=_take(raw, "shard_size", int, where, 10**8),
        append_eos=_take(raw, "append_eos", bool, where, False),
    )
    for i, t in enumerate(_take(raw, "tokenizers", list, where, [])):
        w = f"{where}: tokenizers[{i}]"
        t = dict(t) if isinstance(t, dict) else {}
        m.tokenizers.append(
            TokenizerEntry(
                name=_take(t, "name", str, w),
                kind=_take(t, "kind", str, w, "sentencepiece_bpe"),
                vocab_size=_take(t, "vocab_size", int, w, 0),
                bos_id=_take(t, "bos_id", int, w, 1),
                eos_id=_take(t, "eos_id", int, w, 2),
                model_path=_take(t, "model_path", str, w, None),
                vocab_path=_take(t, "vocab_path", str, w, None),
                extra=t,
            )
        )
    for i, d in enumerate(_take(raw, "datasets", list, where, [])):
        w = f"{where}: datasets[{i}]"
        d = dict(d) if isinstance(d, dict) else {}
        s = dict(_take(d, "stats", dict, w, {}))
        stats = DatasetStats(**{k: _take(s, k, int, f"{w}.stats", 0) for k in STAT_KEYS})
        m.datasets.append(
            DatasetEntry(
                name=_take(d, "name", str, w),
                tokenizer_name=_take(d, "tokenizer_name", str, w, None),
                path=_take(d, "path", str, w),
                vocab_size=_take(d, "vocab_size", int, w),
                stats=stats,
                train_glob=_take(d, "train_glob", str, w, ""),
                val_glob=_take(d, "val_glob", str, w, ""),
                extra=d,
            )
        )
    m.extra = raw
    return m


def manifest_to_dict(m: Manifest) -> dict:
    def entry(obj) -> dict:
        out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "extra"}
        return {**obj.extra, **out}

    datasets = []
    for d in m.datasets:
        out = entry(d)
        stats = dataclasses.asdict(d.stats)
        # upstream also records the totals
        for kind in ("files", "docs", "tokens"):
            stats[f"{kind}_total"] = stats[f"{kind}_train"] + stats[f"{kind}_val"]
        out["stats"] = stats
        datasets.append(out)
    return {
        **m.extra,
        "version": m.version,
        "num_docs": m.num_docs,
        "num_val_docs": m.num_val_docs,
        "shuffle_seed": m.shuffle_seed,
        "shard_size": m.shard_size,
        "append_eos": m.append_eos,
        "tokenizers": [entry(t) for t in m.tokenizers],
        "datasets": datasets,
    }


def read_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"manifest {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"manifest {path}: not readable JSON ({e})") from None
    except RecursionError:
        raise UserError(f"manifest {path}: not readable JSON (nested too deeply)") from None
    return manifest_from_dict(raw, where=str(path))


def write_manifest(path: str | os.PathLike, m: Manifest) -> None:
    atomic_write_text(path, json.dumps(manifest_to_dict(m), indent=2) + "\n")


@dataclass
class DataPaths:
    """Everything a trainer needs to find its data, already checked."""

    dataset_dir: Path
    train_files: list[Path]
    val_files: list[Path]
    tokenizer_path: Path
    vocab_size: int
    manifest: Manifest | None = None
    dataset_entry: DatasetEntry | None = None  # this dataset's manifest entry, when there is one


CONFIG_DATASET_FLAG = "data.dataset (--set data.dataset=NAME)"
CHALLENGE_DATASET = re.compile(r"fineweb10B_(sp\d+|byte260)")  # the variants of the export on the Hub


def _is_challenge_dataset(name: str | None) -> bool:
    """fineweb10B_sp<VOCAB> or fineweb10B_byte260: a variant of the challenge's export, fetched from the Hub."""
    return bool(name and CHALLENGE_DATASET.fullmatch(name))


def _data_hint(dataset: str | None) -> str:
    """How to get the data: the challenge's shards are fetched, anything else is the demo's to make."""
    if _is_challenge_dataset(dataset):
        return f"fetch it with: loopgolf data fetch --variant {dataset.removeprefix('fineweb10B_')}"
    return f"make the demo data with: {DEMO_HINT}"


def _pick_dataset(m: Manifest, name: str | None, where: Path, flag: str) -> DatasetEntry:
    names = [d.name for d in m.datasets]
    if not names:
        raise UserError(f"{where}: lists no datasets")
    if name is None:
        if len(names) > 1:
            raise UserError(f"{where} lists several datasets ({', '.join(names)}); name one with {flag}")
        return m.datasets[0]
    entry = m.dataset(name)
    if entry is None:
        raise UserError(f"{where}: no dataset named {name!r}; it lists {', '.join(names)}; {_data_hint(name)}")
    return entry


def check_tokenizer_vocab(sp_vocab: int, tokenizer_path: Path, entry: DatasetEntry | None,
                          tok_entry: TokenizerEntry | None, root: Path | None) -> int:
    """The data's vocabulary size: the tokenizer's, which must be what the manifest records for the dataset
    and for the tokenizer (another tokenizer gives a meaningless val_bpb without any error)."""
    recorded = [(f"dataset {entry.name}", entry.vocab_size)] if entry is not None else []
    recorded += [(f"tokenizer {tok_entry.name}", tok_entry.vocab_size)] if tok_entry is not None else []
    for what, size in recorded:
        if size and size != sp_vocab:
            raise UserError(f"tokenizer {tokenizer_path} has vocab {sp_vocab}, but {root / MANIFEST_NAME} records "
                            f"vocab_size {size} for {what}: the tokenizer does not match the shards")
    return sp_vocab


def resolve_data(
    root_or_dataset_dir: str | os.PathLike,
    dataset: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    dataset_flag: str = CONFIG_DATASET_FLAG,
) -> DataPaths:
    """Find shards and tokenizer from a data root (holding manifest.json) or a dataset directory.

    A dataset directory inside upstream's layout still finds ROOT/manifest.json two levels up. With no
    manifest, the tokenizer must be given. Applies upstream's checks: the tokenizer file name matches
    the manifest's entry, and the disk holds no more train shards than the manifest lists.
    """
    given = Path(root_or_dataset_dir)
    if not given.is_dir():
        raise UserError(f"data directory {given} not found; {_data_hint(dataset)}")
    manifest, entry, root = None, None, None
    if (given / MANIFEST_NAME).is_file():
        root = given
        manifest = read_manifest(root / MANIFEST_NAME)
        entry = _pick_dataset(manifest, dataset, root / MANIFEST_NAME, dataset_flag)
        dataset_dir = root / entry.path
    else:
        dataset_dir = given
        parents = given.resolve().parents
        if len(parents) >= 2 and (parents[1] / MANIFEST_NAME).is_file():
            root = parents[1]
            manifest = read_manifest(root / MANIFEST_NAME)
            entry = manifest.dataset(given.resolve().name)
            if entry is None:  # upstream ignores a manifest that does not know this directory
                manifest, root = None, None
        if dataset is not None and given.name != dataset:
            raise UserError(f"data directory {given} is a dataset directory, not {dataset!r}")

    tok_entry = manifest.tokenizer(entry.tokenizer_name) if manifest and entry else None
    if tokenizer is not None:
        tokenizer_path = Path(tokenizer)
        expected = Path((tok_entry.model_path or tok_entry.extra.get("path") or "") if tok_entry else "").name
        if expected and tokenizer_path.name != expected:
            raise UserError(
                f"tokenizer {tokenizer_path} does not match dataset {entry.name}: "
                f"its manifest expects {expected}"
            )
    elif tok_entry is not None and tok_entry.model_path:
        tokenizer_path = root / tok_entry.model_path
    else:
        raise UserError(
            f"data directory {given} has no manifest.json naming its tokenizer; give the tokenizer .model path too"
        )

    name = entry.name if entry is not None else dataset_dir.name
    if _is_challenge_dataset(name):  # say how to fetch missing shards, not how to make the demo
        for split in ("val", "train"):
            if not any(dataset_dir.glob(f"fineweb_{split}_*.bin")):
                raise UserError(f"no fineweb_{split}_*.bin shards in {dataset_dir}; {_data_hint(name)}")
    train_files = list_shards(dataset_dir, "train")
    val_files = list_shards(dataset_dir, "val")
    if entry is not None and entry.stats.files_train and len(train_files) > entry.stats.files_train:
        raise UserError(
            f"{dataset_dir} has {len(train_files)} train shards but its manifest lists "
            f"files_train={entry.stats.files_train}; stale shards from another export?"
        )
    sp = load_tokenizer(tokenizer_path)
    vocab_size = check_tokenizer_vocab(int(sp.vocab_size()), tokenizer_path, entry, tok_entry, root)
    for f in val_files:  # a tokenizer smaller than the shards' scores ids it has no pieces for as 0 bytes
        read_shard(f, vocab_size)
    return DataPaths(
        dataset_dir=dataset_dir,
        train_files=train_files,
        val_files=val_files,
        tokenizer_path=tokenizer_path,
        vocab_size=vocab_size,
        manifest=manifest,
        dataset_entry=entry,
    )
