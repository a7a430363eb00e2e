"""The commands `localrun` exposes, in help order. Each module defines one typer command function."""

from __future__ import annotations

import importlib

_MODULES = ("run", "chat", "serve", "fit", "quantize", "profile", "bench", "list_models")

COMMANDS = [importlib.import_module(f"localrun.commands.{name}").command for name in _MODULES]
