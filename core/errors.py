"""One exception type for a user's mistake: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (a path, a config key, a file's contents). The message names the file or
    key and says what was expected; it is shown as-is, without a traceback."""
