"""The commands `localrun` exposes, in help order. Each module defines one typer command function."""

from __future__ import annotations

import importlib

_MODULES = ("run", "chat", "fit", "quantize", "bench", "profile", "list_models", "inspect")

COMMANDS = []
for _name in _MODULES:
    try:
        _mod = importlib.import_module(f"localrun.commands.{_name}")
    except ModuleNotFoundError as e:  # a command not written yet
        if e.name != f"localrun.commands.{_name}":
            raise
        continue
    COMMANDS.append(_mod.command)
