"""The `localrun` command line: parse, call the library, print. Commands live in localrun/commands/."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from .errors import LocalrunError, LocalrunWarning

app = typer.Typer(
    name="localrun",
    help="Run big Mixture-of-Experts language models on one consumer GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_VERBOSE_FLAGS = ("--verbose", "-v")


@app.callback()
def _root() -> None:
    """Run big Mixture-of-Experts language models on one consumer GPU."""


def _register() -> None:
    from .commands import registry

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
    _quiet_third_party()
    _show_warnings()
    _register()
    try:
        code = app(args=argv, prog_name="localrun", standalone_mode=False)
    except LocalrunError as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
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
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2 if isinstance(e, _click.exceptions.UsageError) else 1)
    if verbose:
        raise e
    print(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", file=sys.stderr)
    sys.exit(1)

if __name__ == "__main__":
    main()
