"""Shared fixtures: tiny random checkpoints, each written once per test session."""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

# A suite started with SIGINT ignored (a background job of a script: `pytest ... &`) passes that on to
# every command it starts, and Python then installs no KeyboardInterrupt handler in them: the Ctrl-C
# tests of `run` and `chat` saw their replies run to the end. The suite takes Python's handler back, so
# its children start with SIGINT at its default, as under a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# tests/test_triton_moe.py runs the Triton kernels under the interpreter, which triton reads when
# it is first imported; bitsandbytes imports it, and test modules collected before that one
# import bitsandbytes, so the variable must be set before any of them loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from localrun import kernels
from localrun.tiny import tiny_config, write_checkpoint


@pytest.fixture
def lib():
    """The compiled library; tests that exercise the C kernels skip without a C compiler."""
    lib = kernels.library()
    if lib is None:
        pytest.skip("no C kernels on this machine (no compiler or LOCALRUN_CPU_KERNELS=0)")
    return lib


@pytest.fixture
def fresh_kernels():
    """Forget the kernels' cached state before and after the test (after: so that later tests see
    the normal environment again, once monkeypatch has restored it)."""
    kernels.reset()
    yield
    kernels.reset()


@pytest.fixture
def threads():
    """set_num_threads inside a test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


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


@pytest.fixture(params=["sdpa", "onednn"])
def attention_path(request, monkeypatch) -> str:
    """Each CPU prefill attention path in turn: SDPA's fused kernel, and kernels.prefill_attention's
    oneDNN GEMMs (forced: a tiny model's blocks stay below kernels.PREFILL_ATTENTION_MIN_WORK)."""
    monkeypatch.setattr(kernels, "PREFILL_ATTENTION_MIN_WORK", 1 << 62 if request.param == "sdpa" else 0)
    return request.param


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(*argv, stdin=None) -> (exit code, stdout, stderr) of `localrun ARGV`, run in-process."""
    from localrun.cli import main

    def call(*argv, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return call
