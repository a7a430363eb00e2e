"""The `localrun` command line: parse, call the library, print. Commands live in localrun/commands/.

Start-up is kept light: the command modules import torch, bitsandbytes and the model code inside
the command functions, so `--help`, `--version` and usage errors answer without loading them
(tests/test_cli_startup.py holds the import graph to that).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Optional

import typer

from . import __version__, errors
from .errors import LocalrunError, LocalrunWarning

app = typer.Typer(
    name="localrun",
    help="Run big Mixture-of-Experts language models on one consumer GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no `<bool>` beside flags, and no rich import to show it
)

_VERBOSE_FLAGS = ("--verbose", "-v")


def _print_version(value: bool) -> None:
    if value:
        print(f"localrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                           help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the full traceback of an error (allowed anywhere on the line)."),
) -> None:
    """Run big Mixture-of-Experts language models on one consumer GPU."""


def _register() -> None:
    from .commands import registry

    if not app.registered_commands:
        for fn in registry.COMMANDS:
            app.command(**getattr(fn, "_command_kwargs", {}))(fn)


def _quiet_third_party() -> None:
    # bitsandbytes warns about an optional `kernels` package on CPU; harmless for us.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it logs (not warns) the same on CPU
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _show_warnings() -> None:
    """localrun's own warnings as one line each on stderr ("warning: ..."), like errors."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LocalrunWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in _VERBOSE_FLAGS for a in argv)
    argv = [a for a in argv if a not in _VERBOSE_FLAGS]
    errors.TRACEBACKS = verbose
    _quiet_third_party()
    _show_warnings()
    _register()
    try:
        code = app(args=argv, prog_name="localrun", standalone_mode=False)
    except LocalrunError as e:
        if verbose:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)  # a file's contents may hold newlines
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # typer's (vendored click) usage errors and anything unexpected
        _exit_for(e, verbose)
    else:
        # Without standalone mode typer returns an Exit's code instead of exiting; Ctrl-C is Exit(130).
        if code == 130:
            print("interrupted", file=sys.stderr)
        if isinstance(code, int) and code:
            sys.exit(code)


def _exit_for(e: Exception, verbose: bool) -> None:
    from typer import _click, exceptions

    if isinstance(e, exceptions.Exit):
        sys.exit(e.exit_code)
    if isinstance(e, exceptions.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(e, _click.exceptions.NoArgsIsHelpError):
        e.show()
        sys.exit(2)
    if isinstance(e, _click.exceptions.ClickException):
        print(f"error: {_one_line(e.format_message())}", file=sys.stderr)
        sys.exit(2 if isinstance(e, _click.exceptions.UsageError) else 1)
    if verbose:
        raise e
    if isinstance(e, OSError) and e.strerror:  # the system refused a read or write (disk full, stdout on /dev/full)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {_one_line(e.strerror)}{where}", file=sys.stderr)
        sys.exit(1)
    print(f"error: {type(e).__name__}: {_one_line(str(e))} (run with --verbose for the traceback)", file=sys.stderr)
    sys.exit(1)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
