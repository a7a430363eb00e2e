"""`localrun list`: the models on this machine (the demo and the Hugging Face cache)."""

from __future__ import annotations

import json

import typer

from ..resolve import hf_cache_dir, list_local_models


COLUMNS = ("NAME", "SIZE", "FORMAT", "FAMILY", "PATH")


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List the models found locally, with size on disk, format and model family."""
    from rich.console import Console
    from rich.table import Table

    models = list_local_models()
    if as_json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return
    console = Console()
    if not models:
        console.print(f"no models found (looked in {hf_cache_dir()} and the built-in demo)")
        return
    rows = [(m.name, human_size(m.size_bytes), m.format, m.family, m.path) for m in models]
    if not console.is_terminal:
        print(plain_table(rows), end="")
        return
    table = Table(box=None, header_style="bold")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def plain_table(rows: list[tuple[str, ...]]) -> str:
    """Tab-separated lines, header first, for a pipe or file: rich would cut the paths to 80 columns and pad
    every line with spaces, so `localrun list | grep` or `cut -f5` would see truncated or padded fields."""
    return "".join("\t".join(row) + "\n" for row in [COLUMNS, *rows])


list_models._command_kwargs = {"name": "list"}
command = list_models
