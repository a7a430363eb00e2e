"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

TRACEBACKS = False  # --verbose: the CLI sets it; code that keeps going after an unexpected error prints one then


class LocalrunError(Exception):
    """A problem the user can fix (bad path, bad option, unsupported model). Exit code 1."""

    exit_code = 1


class UsageError(LocalrunError):
    """An invalid option value or combination. Exit code 2."""

    exit_code = 2


class LocalrunWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one line."""
