"""One exception type for a user's mistake: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (a path, a config key, a file's contents). The message names the file or
    key and says what was expected; it is shown as-is, without a traceback."""


def os_error(e: OSError, path, doing: str = "write") -> UserError:
    """An OS error (a full disk, a read-only or missing directory, a path under a regular file) as one line
    naming `path`: the file the user knows, not a temporary name beside it."""
    return UserError(f"cannot {doing} {path}: {e.strerror or e}")
