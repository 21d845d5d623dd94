"""A run directory holds one run: a lock file while a run writes into it, and never an earlier run's files
mixed with a new run's.

The lock is RUN_DIR/.loopgolf.lock, created exclusively (a temporary file hard-linked into place, so it is
never seen half-written) and holding the owner's pid, host, boot id and process start time. A second run
into the same directory is refused at once, naming the owner. A lock whose process is gone (killed, the
machine rebooted) is stale: it is taken over, by renaming it away first so that two runs racing for it
cannot both win. A lock written on another host cannot be checked from here and is refused with the
command that removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from core.errors import UserError, os_error

LOCK_NAME = ".loopgolf.lock"
LOCK_ENV = "LOOPGOLF_RUN_LOCK"  # set by the --nproc launcher, which holds the lock for its ranks
# What `loopgolf train` writes into a run directory (core.checkpoint.DIR_NAME is "checkpoints"; the trackers of
# --log-to write tensorboard/ and wandb/).
RUN_FILES = ("config.toml", "train.log", "metrics.jsonl", "model.safetensors", "checkpoints", "tensorboard", "wandb")
RUN_GLOBS = ("model.*.art",)


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the owner."""
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    return None


def _record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start": _start_time(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _alive(owner: dict) -> bool | None:
    """True or False for a lock written on this host; None when that cannot be told (another host)."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return False  # written before this machine last booted
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    start = _start_time(pid)
    return not (owner.get("start") and start and start != owner["start"])


def _read(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        owner = json.loads(path.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) else None
    return None


class RunLock:
    """Held while a run writes into its directory; release() removes the lock file if it is still this one,
    and the directory too if the lock made it and the run left nothing in it (it was refused early)."""

    def __init__(self, path: Path, text: str, made_dir: bool):
        self.path, self.text, self.made_dir = path, text, made_dir

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self.path.read_text(encoding="utf-8") == self.text:
                self.path.unlink()
        if self.made_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only when empty


def _create(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists; False when it does."""
    fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.link(tmp, path)  # atomic and exclusive: the lock appears complete or not at all
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _take_over_stale(path: Path, seen: str) -> None:
    """Remove a stale lock, unless another run replaced it meanwhile (then it is put back)."""
    aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another run took it over first; try again
    if aside.read_text(encoding="utf-8", errors="replace") != seen:  # a live lock: give it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink()


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Create `run_dir` if needed and lock it for this process; UserError if another live run holds it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    text = json.dumps(_record()) + "\n"
    try:
        made_dir = not run_dir.is_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if _create(path, text):
                return RunLock(path, text, made_dir)
            try:
                seen = path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue  # released meanwhile
            owner = _read(path) or {}
            alive = _alive(owner)
            if alive:
                raise UserError(f"{run_dir} is in use by another run (pid {owner['pid']} on {owner['host']}, since "
                                f"{owner.get('since', '?')}): wait for it to finish, or choose another --out")
            if alive is None and owner:
                raise UserError(f"{run_dir} is locked by a run on host {owner.get('host')} (pid {owner.get('pid')}, "
                                f"since {owner.get('since', '?')}), which cannot be checked from here; if that run "
                                f"is over, remove the lock: rm {path}")
            _take_over_stale(path, seen)  # its process is gone (or the file is not a lock at all)
    except OSError as e:  # --out under a regular file, a read-only directory
        raise os_error(e, run_dir, "use the run directory") from None
    raise UserError(f"{run_dir}: could not take the lock {path} (other runs keep replacing it)")


def earlier_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """The files an earlier `loopgolf train` left in `run_dir` (none for a new or an empty directory)."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    return found + sorted(p for pattern in RUN_GLOBS for p in run_dir.glob(pattern))


def start_afresh(run_dir: str | os.PathLike, force: bool, keep: list[str | os.PathLike] = ()) -> list[Path]:
    """A new run into `run_dir`: refused while an earlier run's files are there, unless `force`, which
    deletes them (and only them). `keep`: inputs of the new run (e.g. --init) that must not be deleted.
    Returns what was deleted."""
    run_dir = Path(run_dir)
    found = earlier_run_files(run_dir)
    if not found:
        return []
    names = ", ".join(p.name for p in found)
    if not force:
        from core import checkpoint as ckpt_io

        ckpt_io.refuse_fresh_run(run_dir)  # with checkpoints: the message that offers --resume
        raise UserError(f"{run_dir} holds an earlier run's files ({names}): choose another --out, or pass --force "
                        "to start it afresh (deletes them)")
    for kept in map(Path, keep):
        inside = [p for p in found if kept.resolve() == p.resolve() or p.resolve() in kept.resolve().parents]
        if inside:
            raise UserError(f"--force would delete {inside[0]}, which this run reads ({kept}); copy it elsewhere "
                            "first or choose another --out")
    try:
        for p in found:
            if p.is_dir() and not p.is_symlink():
                trash = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".del", dir=run_dir))
                os.replace(p, trash / p.name)  # gone from its name at once, then deleted
                shutil.rmtree(trash)
            else:
                p.unlink()
    except OSError as e:
        raise os_error(e, run_dir, "clear the run directory") from None
    return found
