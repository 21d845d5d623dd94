"""Write files so that a crash never leaves a truncated file that looks complete: temp name, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from core.errors import UserError, os_error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it."""
    path = Path(path)
    if path.is_dir():  # else the temp file lands in its parent and the rename fails with a traceback
        raise UserError(f"{path} is a directory; expected a file path to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only directory, a parent that is a regular file
        raise os_error(e, path) from None
    os.close(fd)
    # mkstemp makes the file owner-only; give it the permissions an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk, a quota: the file the user named, not the temp beside it
            raise os_error(e, path) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
