"""Shared fixtures: tiny random checkpoints, each written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from localrun.tiny import tiny_config, write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(kind="moe", layout="text") -> Path of a tiny checkpoint (seed 0), built once.

    Treat it as read-only; copy it into tmp_path before changing anything.
    """
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str = "moe", layout: str = "text") -> Path:
        if (kind, layout) not in built:
            out = tmp_path_factory.mktemp(f"tiny-{kind}-{layout}")
            built[kind, layout] = write_checkpoint(out, tiny_config(kind), layout=layout)
        return built[kind, layout]

    return get


@pytest.fixture(scope="session")
def tiny_moe(tiny_checkpoint) -> Path:
    """The 26B-A4B-shaped tiny checkpoint, text layout."""
    return tiny_checkpoint("moe", "text")
