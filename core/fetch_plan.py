"""What fetching one variant of the challenge's cached FineWeb export means, read from its manifest.

The layout is upstream's (data/cached_challenge_fineweb.py): in the dataset repo, PREFIX/manifest.json,
PREFIX/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin and PREFIX/<tokenizer paths>; on disk
the same paths under the data root (data/manifest.json, data/datasets/..., data/tokenizers/...), which is
what core/manifest.py reads. The download itself is tools/data.py's; this module only plans and checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import UserError
from core.manifest import CHALLENGE_DATASET, DatasetEntry, Manifest, TokenizerEntry
from core.shards import shard_name, shard_problem
from core.tokenizer import load_tokenizer

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_PREFIX = "datasets"
REPO_ID_ENV = "MATCHED_FINEWEB_REPO_ID"  # upstream's names, so a command line from a record works as is
REMOTE_PREFIX_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_TRAIN_SHARDS = 80  # upstream's default: 8B tokens
DATASET_PREFIX = "fineweb10B_"


def dataset_name(variant: str) -> str:
    """fineweb10B_<variant> for sp<VOCAB> or byte260 (a full dataset name is taken as it is)."""
    name = DATASET_PREFIX + variant.removeprefix(DATASET_PREFIX)
    if not CHALLENGE_DATASET.fullmatch(name):
        raise UserError(f"--variant {variant!r}: expected sp<VOCAB> (e.g. sp1024, sp4096, sp8192) or byte260")
    return name


def variant_of(name: str) -> str | None:
    return name.removeprefix(DATASET_PREFIX) if CHALLENGE_DATASET.fullmatch(name) else None


@dataclass(frozen=True)
class PlannedFile:
    """One file of a fetch: `rel` is its path under the data root (and under PREFIX in the repo)."""

    rel: str
    expected_tokens: int | None = None  # shards: the count the manifest implies (None: it implies none)
    tokenizer: TokenizerEntry | None = None  # tokenizer files: their manifest entry

    @property
    def is_shard(self) -> bool:
        return self.tokenizer is None


def safe_relative(path: str, where: str) -> str:
    """A manifest path as a relative POSIX path that stays inside the data root."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path:
        raise UserError(f"{where}: path {path!r} must be relative and inside the data root")
    return p.as_posix()


def expected_shard_tokens(manifest: Manifest, entry: DatasetEntry, split: str, index: int) -> int | None:
    """Tokens in shard `index` of `split`, as upstream's exporter lays them out.

    The exporter fills each shard to shard_size and starts a new one (val first, then train), so every
    shard but a split's last holds exactly shard_size tokens and the last holds the rest. A manifest
    whose stats do not fit that layout implies no count, and only the shard's own header is checked.
    """
    files = getattr(entry.stats, f"files_{split}")
    tokens = getattr(entry.stats, f"tokens_{split}")
    size = manifest.shard_size
    if files <= 0 or tokens <= 0 or size <= 0 or not size * (files - 1) < tokens <= size * files:
        return None
    return size if index < files - 1 else tokens - size * (files - 1)


def tokenizer_files(tok: TokenizerEntry, where: str) -> list[str]:
    """The tokenizer's files as upstream downloads them: model_path, vocab_path and path, where set."""
    paths = [tok.model_path, tok.vocab_path, tok.extra.get("path")]
    paths = [safe_relative(str(p), f"{where}: tokenizer {tok.name}") for p in paths if p]
    if not paths:
        raise UserError(f"{where}: tokenizer {tok.name} names no files (model_path, vocab_path or path)")
    return paths


def plan_fetch(manifest: Manifest, variant: str, train_shards: int | None, where: str):
    """(dataset entry, tokenizer entry, files): the whole val split, the first train_shards train shards,
    and the tokenizer's files. train_shards None: upstream's default of 80, or all there are if fewer."""
    name = dataset_name(variant)
    entry = manifest.dataset(name)
    if entry is None:
        offered = ", ".join(d.name for d in manifest.datasets) or "none"
        raise UserError(
            f"--variant {variant}: {where} has no dataset {name}; it offers {offered} "
            f"(another repo: --repo-id or {REPO_ID_ENV})"
        )
    tok = manifest.tokenizer(entry.tokenizer_name)
    if tok is None:
        raise UserError(f"{where}: dataset {name} names tokenizer {entry.tokenizer_name!r}, which it does not list")
    available = entry.stats.files_train
    if train_shards is None:
        train_shards = min(DEFAULT_TRAIN_SHARDS, available)
    elif not 0 <= train_shards <= available:
        raise UserError(f"--train-shards {train_shards}: {name} in {where} has {available} train shards")
    if entry.stats.files_val <= 0:
        raise UserError(f"{where}: dataset {name} lists no val shards (stats.files_val)")
    files = [PlannedFile(rel, tokenizer=tok) for rel in tokenizer_files(tok, where)]
    for split, count in (("val", entry.stats.files_val), ("train", train_shards)):
        for i in range(count):
            rel = f"datasets/{name}/{shard_name(split, i)}"
            files.append(PlannedFile(rel, expected_shard_tokens(manifest, entry, split, i)))
    return entry, tok, files


def file_problem(path: Path, planned: PlannedFile) -> str | None:
    """Why `path` does not count as `planned` (None: it does). Shards: header, size, the manifest's count.
    SentencePiece files: the model loads and has the entry's vocab_size; the .vocab has one line per piece."""
    if not path.is_file():
        return "missing" if not path.is_symlink() else "a broken link"
    if planned.is_shard:
        tokens, problem = shard_problem(path)
        if problem:
            return problem
        if planned.expected_tokens is not None and tokens != planned.expected_tokens:
            return f"holds {tokens} tokens; the manifest implies {planned.expected_tokens}"
        return None
    tok = planned.tokenizer
    if path.stat().st_size == 0:
        return "empty"
    if not tok.kind.startswith("sentencepiece") or not tok.vocab_size:
        return None
    if path.suffix == ".model":
        try:
            pieces = int(load_tokenizer(path).vocab_size())
        except UserError as e:
            return str(e).split(": ", 1)[-1]
    elif path.suffix == ".vocab":
        with open(path, "rb") as f:
            pieces = sum(1 for _ in f)
    else:
        return None
    if pieces != tok.vocab_size:
        return f"has {pieces} pieces; the manifest's tokenizer {tok.name} has vocab_size {tok.vocab_size}"
    return None


def record_fetched(local: Manifest | None, remote: Manifest, entry: DatasetEntry, tok: TokenizerEntry) -> Manifest:
    """The data root's manifest after a fetch: its other datasets (the demo, other variants) kept, this
    dataset and tokenizer as the repo lists them, and the export-wide fields from the repo."""
    m = local if local is not None else Manifest()
    m.version, m.num_docs, m.num_val_docs = remote.version, remote.num_docs, remote.num_val_docs
    m.shuffle_seed, m.shard_size, m.append_eos = remote.shuffle_seed, remote.shard_size, remote.append_eos
    m.extra = dict(remote.extra)
    m.put_tokenizer(tok)
    # The files are where upstream's downloader puts them, whatever path the repo's entry records.
    path = f"datasets/{entry.name}"
    if entry.path != path:
        entry = dataclasses.replace(entry, path=path, train_glob="", val_glob="")
    m.put_dataset(entry)
    return m


@dataclass
class DatasetOnDisk:
    val: int  # shards that count as present
    val_listed: int
    train: int
    train_listed: int
    tokenizer: bool


def dataset_on_disk(root: Path, manifest: Manifest, entry: DatasetEntry, where: str,
                    dataset_rel: str | None = None) -> DatasetOnDisk:
    """How much of a dataset the manifest lists is on disk under root (in dataset_rel, default the entry's
    path) and checks out."""
    dataset_dir = root / (dataset_rel or entry.path)
    tok = manifest.tokenizer(entry.tokenizer_name)
    tok_ok = tok is not None and all(
        file_problem(root / rel, PlannedFile(rel, tokenizer=tok)) is None for rel in tokenizer_files(tok, where)
    )
    counts = {}
    for split in ("val", "train"):
        listed = getattr(entry.stats, f"files_{split}")
        counts[split] = sum(
            file_problem(dataset_dir / shard_name(split, i),
                         PlannedFile("", expected_shard_tokens(manifest, entry, split, i))) is None
            for i in range(listed)
        )
    return DatasetOnDisk(counts["val"], entry.stats.files_val, counts["train"], entry.stats.files_train, tok_ok)
