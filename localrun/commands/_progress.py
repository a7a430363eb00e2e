"""A rich progress bar on a terminal's stderr, nothing otherwise (pipes, --quiet, --json stay clean)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


@contextmanager
def progress_bar(label: str, enabled: bool = True):
    """Yields update(stage, done_bytes, total_bytes)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda *a: None
        return
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=None)

        def update(stage: str, done: int, total: int) -> None:
            progress.update(task, description=f"{label} {stage}", completed=done, total=total)

        yield update
