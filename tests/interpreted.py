"""Localrun's Triton kernel modules, imported to run under TRITON_INTERPRET=1 on CPU tensors (the
variable is read when triton decorates a kernel, so a module imported before it was set is
reloaded). For the test files of the kernels; `needs_triton` skips where triton is not installed."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def triton_module(name: str):
    """localrun.kernels.<name> with the interpreter on, or None when triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    full = f"localrun.kernels.{name}"
    if full in sys.modules:
        return importlib.reload(sys.modules[full])
    return importlib.import_module(full)
