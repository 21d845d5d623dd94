"""`loopgolf data fetch|list`: the challenge's cached FineWeb exports from the Hugging Face Hub.

fetch does what upstream's data/cached_challenge_fineweb.py does: the repo's manifest.json decides which
variants, shards and tokenizer files exist; the whole val split and the first N train shards land in the
layout both loopgolf and upstream read (OUT/manifest.json, OUT/datasets/fineweb10B_<variant>/,
OUT/tokenizers/). Files go through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE or --cache-dir) and are
hard-linked from it (copied where a link is impossible), so a second data root costs no disk.

A file counts as present only once it checks out (core/fetch_plan.py: a shard's header, size and the
token count the manifest implies; a tokenizer's vocabulary size), and it appears under OUT only then,
by rename. So a fetch that stops anywhere leaves complete files, and the next one carries on from the
first file missing; a corrupt or truncated file is fetched again. HF_HUB_OFFLINE=1 works from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from core.errors import UserError
from core.fetch_plan import (
    DEFAULT_REMOTE_PREFIX,
    DEFAULT_REPO_ID,
    DEFAULT_TRAIN_SHARDS,
    REMOTE_PREFIX_ENV,
    REPO_ID_ENV,
    PlannedFile,
    dataset_on_disk,
    file_problem,
    plan_fetch,
    record_fetched,
    variant_of,
)
from core.manifest import MANIFEST_NAME, Manifest, manifest_from_dict, read_manifest, write_manifest


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="fetch the challenge's FineWeb shards from the Hugging Face Hub; list them")
    commands = p.add_subparsers(dest="data_command", required=True, metavar="{fetch,list}")
    fetch = commands.add_parser(
        "fetch", help="download a variant's val split, first train shards and tokenizer into a data root",
        description="Download the whole val split, the first N train shards and the tokenizer of one variant "
                    "of the challenge's FineWeb export, as upstream's data/cached_challenge_fineweb.py does.")
    fetch.add_argument("--variant", default="sp1024", help="sp<VOCAB> (sp1024, sp4096, sp8192, ...) or byte260 "
                       "(default sp1024); `loopgolf data list` shows what the repo offers")
    fetch.add_argument("--train-shards", type=int, default=None, metavar="N",
                       help=f"train shards to fetch, from the first (default {DEFAULT_TRAIN_SHARDS}, upstream's: "
                            "8B tokens, or all there are if fewer; 0: val and tokenizer only)")
    fetch.add_argument("--out", default="data", help="data root to fill (default data, where the configs look)")
    listing = commands.add_parser("list", help="what the repo's manifest offers and what is on disk")
    listing.add_argument("--data", "--out", dest="out", default="data", help="data root to inspect (default data)")
    for q in (fetch, listing):
        q.add_argument("--repo-id", help=f"Hub dataset repo (default ${REPO_ID_ENV}, else {DEFAULT_REPO_ID})")
        q.add_argument("--remote-prefix", help=f"the export's folder in the repo (default ${REMOTE_PREFIX_ENV}, "
                                               f"else {DEFAULT_REMOTE_PREFIX})")
        q.add_argument("--revision", default="main", help="branch, tag or commit of the repo (default main)")
        q.add_argument("--cache-dir", help="huggingface_hub's cache (default: its own, HF_HUB_CACHE or HF_HOME/hub)")
    return p


def log(msg: str) -> None:
    print(msg, flush=True)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


class HubRepo:
    """The dataset repo through huggingface_hub, every error one line. Reads HF_ENDPOINT and
    HF_HUB_OFFLINE when it is made, not when huggingface_hub was imported."""

    def __init__(self, args):
        self.repo_id = args.repo_id or os.environ.get(REPO_ID_ENV) or DEFAULT_REPO_ID
        prefix = args.remote_prefix if args.remote_prefix is not None else os.environ.get(REMOTE_PREFIX_ENV)
        self.prefix = (DEFAULT_REMOTE_PREFIX if prefix is None else prefix).strip("/")
        self.revision = args.revision
        self.cache_dir = args.cache_dir
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.offline = _env_true("HF_HUB_OFFLINE")
        self.downloaded = self.downloaded_bytes = self.from_cache = 0

    def remote(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def where(self, rel: str) -> str:
        return f"{self.repo_id}:{self.remote(rel)}"

    def download(self, rel: str, force: bool = False) -> Path:
        """The file's path in the Hub cache, downloaded unless already there (force: downloaded again)."""
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.utils import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        remote, where = self.remote(rel), self.where(rel)
        endpoint = self.endpoint or constants.ENDPOINT
        cached = try_to_load_from_cache(self.repo_id, remote, cache_dir=self.cache_dir, revision=self.revision,
                                        repo_type="dataset")
        try:
            path = Path(hf_hub_download(
                self.repo_id, remote, repo_type="dataset", revision=self.revision, cache_dir=self.cache_dir,
                endpoint=self.endpoint, local_files_only=self.offline, force_download=force))
        except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base
            if self.offline:
                raise UserError(f"{where} is not in the Hub cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                                "fetch once online first") from None
            raise UserError(f"cannot download {where} from {endpoint} and it is not in the Hub cache "
                            f"({_first_line(e.__cause__ or e)})") from None
        except EntryNotFoundError:
            raise UserError(f"{where} not found on {endpoint} (at revision {self.revision}), "
                            "though the manifest names it") from None
        except RepositoryNotFoundError:
            raise UserError(f"dataset repo {self.repo_id} not found on {endpoint} (or private); "
                            f"check --repo-id or {REPO_ID_ENV}") from None
        except RevisionNotFoundError:
            raise UserError(f"revision {self.revision!r} of dataset repo {self.repo_id} not found "
                            "(--revision)") from None
        except HfHubHTTPError as e:
            raise UserError(f"downloading {where} failed: {_first_line(e)}") from None
        except OSError as e:  # a failed size check after retries, a full disk, ...
            raise UserError(f"downloading {where} failed: {_first_line(e)}") from None
        except Exception as e:  # the HTTP client's own transport errors, once huggingface_hub's retries are spent
            if not type(e).__module__.startswith("httpx"):
                raise
            raise UserError(f"downloading {where} failed: {type(e).__name__}: {_first_line(e)}") from None
        if isinstance(cached, str) and not force:
            self.from_cache += 1
        else:
            self.downloaded += 1
            self.downloaded_bytes += path.stat().st_size
        return path

    def pin_to_commit_of(self, cached: Path) -> None:
        """Fetch every later file from the commit this one came from, so a repo updated mid-fetch cannot
        mix two exports. The commit is the snapshot folder's name in the cache (huggingface_hub's layout)."""
        parts = cached.parts
        if "snapshots" in parts[:-1]:
            commit = parts[parts.index("snapshots") + 1]
            if len(commit) == 40:
                self.revision = commit

    def manifest(self) -> tuple[Manifest, str]:
        """The repo's manifest and how to name it."""
        where = self.where(MANIFEST_NAME)
        path = self.download(MANIFEST_NAME)
        self.downloaded = self.downloaded_bytes = self.from_cache = 0  # the summary counts the data files
        self.pin_to_commit_of(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{where}: not readable JSON ({e})") from None
        return manifest_from_dict(raw, where=where), where


def place(src: Path, dest: Path) -> None:
    """Put the cache's file at dest atomically: a hard link where possible, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_one(hub: HubRepo, planned: PlannedFile, dest: Path) -> None:
    """Download (or take from the cache) one file, check it, and only then put it at dest."""
    where = hub.where(planned.rel)
    src = hub.download(planned.rel).resolve()
    problem = file_problem(src, planned)
    if problem and not hub.offline:  # a cached copy gone bad (it may be the very inode dest was linked to)
        log(f"  {where}: the cached copy {problem}; downloading it again")
        src = hub.download(planned.rel, force=True).resolve()
        problem = file_problem(src, planned)
    if problem:
        if hub.offline:
            raise UserError(f"{where}: the cached copy {problem}; unset HF_HUB_OFFLINE to download it again")
        raise UserError(f"{where}: {problem}: the repo's file disagrees with its manifest; not used")
    place(src, dest)


def run_fetch(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; expected a data directory")
    hub = HubRepo(args)
    remote, where = hub.manifest()
    entry, tok, files = plan_fetch(remote, args.variant, args.train_shards, where)
    train = sum(f.is_shard for f in files) - entry.stats.files_val
    log(f"data fetch: {entry.name} from {hub.repo_id}@{hub.revision[:12]}{' (offline)' if hub.offline else ''}: "
        f"{entry.stats.files_val} val shards, {train} of {entry.stats.files_train} train shards, tokenizer {tok.name}")
    present = 0
    for planned in files:
        dest = out / planned.rel
        problem = file_problem(dest, planned)
        if problem is None:
            present += 1
            continue
        if problem != "missing":
            log(f"  {dest}: {problem}; fetching it again")
        fetch_one(hub, planned, dest)
        log(f"  {dest}")
    local_path = out / MANIFEST_NAME
    local = read_manifest(local_path) if local_path.is_file() else None
    write_manifest(local_path, record_fetched(local, remote, entry, tok))
    log(f"data fetch: {len(files)} files in {out}: {hub.downloaded} downloaded ({hub.downloaded_bytes:,} bytes), "
        f"{hub.from_cache} from the Hub cache, {present} already present; {time.perf_counter() - t0:.1f}s "
        f"-> {local_path}")
    return 0


def _tokens(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _tok(d, disk) -> str:
    name = d.tokenizer_name or "-"
    return name if disk.tokenizer or not (disk.val or disk.train) else f"{name} (not on disk)"


def run_list(args) -> int:
    out = Path(args.out)
    hub = HubRepo(args)
    local_path = out / MANIFEST_NAME
    local = read_manifest(local_path) if local_path.is_file() else None
    try:
        remote, where = hub.manifest()
    except UserError as e:
        if local is None:
            raise
        remote, where = None, None
        log(f"{hub.where(MANIFEST_NAME)}: unavailable ({e})")
    rows = [("variant", "dataset", "vocab", "tokenizer", "val on disk", "train on disk", "train tokens")]
    if remote is not None:
        log(f"{where} @ {hub.revision[:12]} offers (on disk: shards in {out} that check out):")
        for d in remote.datasets:
            disk = dataset_on_disk(out, remote, d, where, dataset_rel=f"datasets/{d.name}")
            rows.append((variant_of(d.name) or "-", d.name, str(d.vocab_size), _tok(d, disk),
                         f"{disk.val}/{disk.val_listed}", f"{disk.train}/{disk.train_listed}",
                         _tokens(d.stats.tokens_train)))
    offered = {d.name for d in remote.datasets} if remote is not None else set()
    others = [d for d in (local.datasets if local else []) if d.name not in offered]
    if others:
        rows.append(("", "", "", "", "", "", ""))
        for d in others:
            disk = dataset_on_disk(out, local, d, str(local_path))
            rows.append(("(local)", d.name, str(d.vocab_size), _tok(d, disk),
                         f"{disk.val}/{disk.val_listed}", f"{disk.train}/{disk.train_listed}",
                         _tokens(d.stats.tokens_train)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        log(("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip())
    if local is None:
        log(f"nothing fetched into {out} yet: loopgolf data fetch --variant sp1024 --train-shards 1 --out {out}")
    return 0


def run_data(args) -> int:
    return run_fetch(args) if args.data_command == "fetch" else run_list(args)


if __name__ == "__main__":
    from tools.cli import main

    sys.exit(main(["data", *sys.argv[1:]]))
