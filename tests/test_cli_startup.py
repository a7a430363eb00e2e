"""Start-up stays instant: parsing the command line imports no torch, bitsandbytes or transformers.

The import graph is what is held here (a timed assertion would be flaky on a busy machine);
`scripts/startup_and_threads.py` reports the seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from localrun import __version__, hardware

HEAVY = ("torch", "bitsandbytes", "transformers", "safetensors", "tokenizers", "jinja2", "numpy")

PROBE = """
import sys
from localrun.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def imported_after(*argv) -> tuple[list[str], subprocess.CompletedProcess]:
    res = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                         timeout=60)
    line = [l for l in res.stderr.splitlines() if l.startswith("HEAVY:")][-1]
    return [m for m in line[len("HEAVY:"):].split(",") if m], res


@pytest.mark.parametrize("argv", [
    ["--help"], ["--version"], [],
    *[[cmd, "--help"] for cmd in ("run", "chat", "serve", "fit", "quantize", "profile", "bench", "list")],
    ["serve", "demo", "--parallel", "0"],
    ["run", "--max-tokens", "0", "demo", "x"], ["run", "demo", "x", "--top-p", "0"], ["run", "demo", "x", "--bogus"],
    ["chat", "--threads", "0"], ["fit", "demo", "--vram", "lots"], ["quantize", "demo", "out", "--experts", "int8"],
    ["bench", "--dtype", "int8"], ["bench", "bench", "--compare", "llama.cpp", "--gguf", "q5"],
    ["profile", "demo", "--prompts", "/nonexistent"],
])
def test_help_version_and_usage_errors_import_no_heavy_module(argv):
    heavy, res = imported_after(*argv)
    assert heavy == [], (argv, heavy, res.stderr)


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"localrun {__version__}"


def test_help_lists_verbose_and_shows_no_bool_metavar(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "--verbose" in out and "--version" in out
    for cmd in ("run", "list", "fit"):
        code, out, _ = cli(cmd, "--help")
        assert code == 0 and "<bool>" not in out and "--json" in out


def test_every_model_command_takes_threads(cli):
    for cmd in ("run", "chat", "bench", "profile"):
        assert "--threads" in cli(cmd, "--help")[1], cmd


def test_default_threads_leave_busy_cores_alone(tmp_path, monkeypatch):
    loadavg, real_busy = tmp_path / "loadavg", hardware.busy_cpus
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    monkeypatch.setattr(hardware, "physical_cores", lambda: 4)  # 8 SMT threads on 4 cores
    for running, want in ((1, 4), (3, 2), (5, 1), (40, 1)):  # "running" counts this process too
        loadavg.write_text(f"0.50 0.40 0.30 {running}/300 12345\n")
        monkeypatch.setattr(hardware, "busy_cpus", lambda: real_busy(loadavg, interval_s=0))
        assert hardware.default_threads() == want, running


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    info = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n\n" for i in range(4))
    (tmp_path / "cpuinfo").write_text(info)
    assert hardware.physical_cores(tmp_path / "cpuinfo") == 2


def test_threads_must_be_positive(cli):
    code, _, err = cli("run", "demo", "x", "--threads", "0")
    assert code == 2 and "--threads" in err
