"""What a person at a terminal (or a script) sees: clean stdout, quiet libraries, exit codes, memory errors."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time

import pytest

from localrun import loader
from localrun.cli import main

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def localrun(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "localrun.cli", *argv], capture_output=True, text=True,
                          env=ENV, timeout=120, **kw)


def test_json_stdout_stays_clean_while_progress_goes_to_a_terminal_stderr(tiny_moe):
    """--json on stdout is one JSON object even when stderr is a terminal that shows a progress bar."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "localrun.cli", "run", str(tiny_moe), "hi", "-n", "3", "--json"],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=ENV)
    os.close(slave)
    out, _ = proc.communicate(timeout=120)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    assert proc.returncode == 0
    assert set(json.loads(out)) >= {"text", "tokens"}
    assert b"loading" in err  # the bar was there, on stderr
    assert b"kernels" not in err


def test_bitsandbytes_warning_is_silenced(tiny_moe):
    res = localrun("run", str(tiny_moe), "hi", "-n", "2", "--experts", "nf4", stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert "kernels" not in res.stderr and "kernels" not in res.stdout


def test_quiet_prints_nothing_on_stderr(tiny_moe):
    res = localrun("run", str(tiny_moe), "hi", "-n", "2", "--quiet", stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stderr == ""


def test_never_waits_for_stdin_when_a_prompt_is_given(tiny_moe):
    """stdin is an open pipe nobody writes to: with a PROMPT, run must not read it."""
    proc = subprocess.Popen([sys.executable, "-m", "localrun.cli", "run", str(tiny_moe), "hi", "-n", "2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.stdin.close()
    assert proc.returncode == 0


def test_ctrl_c_during_generation_exits_130(tiny_moe):
    # bf16 compute: torch's CPU path, ~20x slower than the fp32 C path, so the reply (at most the
    # tiny model's 4096 positions) is still streaming when the signal comes (fp32 takes about a second)
    proc = subprocess.Popen([sys.executable, "-m", "localrun.cli", "run", str(tiny_moe), "hi", "-n", "100000",
                             "--ignore-eos", "--dtype", "bfloat16"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not proc.stdout.read(1):  # wait for the first streamed text
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "interrupted"


COLOR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|4[0-8]|9[0-7]|10[0-7])[;m]")  # styles like bold may stay


def test_no_color_means_no_ansi_colors(tiny_moe):
    pexpect = pytest.importorskip("pexpect")
    env = {k: v for k, v in ENV.items() if k != "FORCE_COLOR"}

    def screen(no_color: bool) -> str:
        child = pexpect.spawn(sys.executable, ["-m", "localrun.cli", "fit", str(tiny_moe), "--vram", "16GiB"],
                              env=dict(env, TERM="xterm-256color", **({"NO_COLOR": "1"} if no_color else {})),
                              timeout=120)
        child.expect(pexpect.EOF)
        return child.before.decode()

    assert COLOR_SGR.search(screen(no_color=False))  # a terminal gets colors...
    plain = screen(no_color=True)
    assert "fits" in plain and not COLOR_SGR.search(plain)  # ...unless NO_COLOR says no


def test_not_enough_memory_points_to_fit(capsys, tiny_moe, monkeypatch):
    monkeypatch.setattr(loader, "detect_host_ram", lambda: 64 * 1024 * 1024)  # 64 MiB of RAM
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny_moe), "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err.startswith("error: does not fit") and "localrun fit" in err and len(err.strip().splitlines()) == 1


def test_chat_says_when_the_input_ends_inside_a_block(tiny_moe):
    """Piped input that stops before a \"\"\" block closes: the message is not sent, and chat says so."""
    res = subprocess.run([sys.executable, "-m", "localrun.cli", "chat", str(tiny_moe), "-q"], input='"""\nhello\n',
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0 and "multi-line message discarded" in res.stderr + res.stdout


def test_python_dash_m_localrun_runs_the_cli():
    """`python -m localrun` is the `localrun` script: help exits 0, and an error keeps its exit code."""
    helped = subprocess.run([sys.executable, "-m", "localrun", "--help"], capture_output=True, text=True, env=ENV,
                            timeout=120)
    assert helped.returncode == 0 and "Usage: localrun" in helped.stdout, helped.stderr
    failed = subprocess.run([sys.executable, "-m", "localrun", "run", "--no-such-option"], capture_output=True,
                            text=True, env=ENV, timeout=120)
    assert failed.returncode == 2 and failed.stderr.startswith("error: "), failed.stderr


@pytest.mark.parametrize("argv", [["run", "hi"], ["serve", "--port", "0", "--parallel", "2", "-q"]])
def test_does_not_fit_is_said_once(cli, tiny_moe, monkeypatch, argv):
    monkeypatch.setattr(loader, "detect_host_ram", lambda: 64 * 1024 * 1024)  # 64 MiB of RAM
    code, out, err = cli(argv[0], tiny_moe, *argv[1:], "--device", "cpu")
    assert code == 1 and err.startswith("error: does not fit: ") and err.count("does not fit") == 1, err


@pytest.mark.parametrize("command", [["fit", "demo", "--vram", "16GB"], ["run", "demo", "hi"]])
def test_an_empty_experts_flag_is_a_usage_error_not_the_default(cli, command):
    code, out, err = cli(*command, "--experts=")
    assert code == 2 and "--experts must be one of" in err and "not ''" in err
