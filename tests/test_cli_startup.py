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
from localrun.errors import LocalrunWarning

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
    monkeypatch.setattr(hardware, "usable_cpu_set", lambda: set(range(8)))
    monkeypatch.setattr(hardware, "cpu_quota", lambda: None)
    monkeypatch.setattr(hardware, "physical_cores", lambda: 4)  # 8 SMT threads on 4 cores
    for running, want in ((1, 4), (3, 2), (5, 1), (40, 1)):  # "running" counts this process too
        loadavg.write_text(f"0.50 0.40 0.30 {running}/300 12345\n")
        monkeypatch.setattr(hardware, "busy_cpus", lambda: real_busy(loadavg, interval_s=0))
        assert hardware.default_threads() == want, running


class FakeProc:
    """/proc/stat and /proc/self/stat as files the test writes, and a clock it moves."""

    def __init__(self, tmp_path, cpus=(0, 1)):
        self.stat, self.own, self.now, self.cpus = tmp_path / "stat", tmp_path / "self_stat", 0.0, cpus
        self.busy, self.idle, self.own_ticks = {c: 300 for c in cpus}, {c: 9000 for c in cpus}, 120
        self.steal = {c: 7 for c in cpus}
        self.write()

    def write(self):
        lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]  # the sum line is not read: only this process's CPUs
        lines += [f"cpu{c} {self.busy[c]} 0 0 {self.idle[c]} 0 0 0 {self.steal[c]} 0 0" for c in self.cpus]
        lines += ["cpu7 500 0 0 0 0 0 0 0 0 0", "intr 12345 0", "ctxt 999"]  # a CPU this process may not use
        self.stat.write_text("\n".join(lines) + "\n")
        # the name field may hold spaces and parentheses
        self.own.write_text(f"4242 (python (x) y) R 1 4242 4242 0 -1 4194304 0 0 0 0 {self.own_ticks} 0 0 0 20\n")

    def run(self, seconds, ours, others, steal=0.0):
        """`seconds` pass; this process ran `ours` cores' worth, other processes `others` and the hypervisor
        took `steal` of the last CPU (100 ticks a second)."""
        self.now += seconds
        ticks, left_ours, left_others = int(100 * seconds), ours, others
        for c in self.cpus:
            mine, theirs = min(1.0, left_ours), min(1.0 - min(1.0, left_ours), left_others)
            left_ours, left_others = left_ours - mine, left_others - theirs
            stolen = int(ticks * steal) if c == self.cpus[-1] else 0
            self.busy[c] += int(ticks * (mine + theirs))
            self.steal[c] += stolen
            self.idle[c] += ticks - int(ticks * (mine + theirs)) - stolen
        self.own_ticks += int(ticks * ours)
        self.write()


def test_during_a_reply_threads_follow_what_other_processes_take(tmp_path, monkeypatch):
    """IdleCoreWatch: the CPUs' busy time less this process's own, every interval; a program that takes
    a core mid-reply drops a thread, and its end gives it back. This process's own threads never count."""
    import torch

    proc = FakeProc(tmp_path)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(hardware, "physical_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        watch = hardware.IdleCoreWatch(interval_s=0.5, stat=proc.stat, self_stat=proc.own, clock=lambda: proc.now)
        proc.run(0.25, ours=2.0, others=0.0)
        assert watch.poll() is None  # not yet half a second
        proc.run(0.25, ours=2.0, others=0.0)  # our two threads keep both CPUs busy: nobody else's
        assert watch.poll() is None and torch.get_num_threads() == 2
        proc.run(0.5, ours=1.34, others=0.66)  # a CPU-bound program shares a core with one of ours
        assert watch.poll() == 1 and torch.get_num_threads() == 1
        proc.run(0.5, ours=1.0, others=1.0)  # it keeps the core we left it: the count holds
        assert watch.poll() is None and torch.get_num_threads() == 1
        proc.run(0.5, ours=1.0, others=0.1)  # it ended (a little system noise stays)
        assert watch.poll() == 2 and torch.get_num_threads() == 2
        proc.run(0.5, ours=2.0, others=0.3)  # a passing blip is not a core taken
        assert watch.poll() is None
        proc.run(0.5, ours=1.0, others=0.0, steal=0.8)  # a hypervisor's steal: fewer threads would not help
        assert watch.poll() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_without_proc_the_watch_never_changes_anything(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(hardware, "physical_cores", lambda: 2)
    now = [0.0]
    watch = hardware.IdleCoreWatch(stat=tmp_path / "absent", self_stat=tmp_path / "absent", clock=lambda: now[0])
    before = torch.get_num_threads()
    now[0] = 10.0
    assert watch.poll() is None and torch.get_num_threads() == before
    assert hardware.cpu_ticks({0}, tmp_path / "absent") is None and hardware.own_ticks(tmp_path / "absent") is None
    (tmp_path / "garbled").write_text("cpu0 a b c\n")
    assert hardware.cpu_ticks({0}, tmp_path / "garbled") is None and hardware.own_ticks(tmp_path / "garbled") is None


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    info = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n\n" for i in range(4))
    (tmp_path / "cpuinfo").write_text(info)
    assert hardware.physical_cores(tmp_path / "cpuinfo") == 2


def test_threads_must_be_positive(cli):
    code, _, err = cli("run", "demo", "x", "--threads", "0")
    assert code == 2 and "--threads" in err


def cgroup_tree(tmp_path, proc_cgroup: str, files: dict[str, str]):
    """A fake /proc/self/cgroup and /sys/fs/cgroup: {path under the root: text}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cgroup").write_text(proc_cgroup)
    root = tmp_path / "sys"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return tmp_path / "cgroup", root


def test_a_cgroup_cpu_quota_caps_the_threads(tmp_path, monkeypatch):
    """`docker run --cpus 2` on a big host leaves the affinity mask whole: the quota (v2 cpu.max, the
    tightest of the process's cgroup and those above it; v1 cpu.cfs_quota_us) caps the threads."""
    cgroup, root = cgroup_tree(tmp_path / "v2", "0::/app/worker\n", {
        "cpu.max": "max 100000\n", "app/cpu.max": "250000 100000\n", "app/worker/cpu.max": "max 100000\n"})
    assert hardware.cpu_quota(cgroup, root) == 2.5
    cgroup, root = cgroup_tree(tmp_path / "v1", "12:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert hardware.cpu_quota(cgroup, root) == 1.5
    cgroup, root = cgroup_tree(tmp_path / "none", "0::/\n1:cpu:/\n", {
        "cpu.max": "max 100000\n", "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert hardware.cpu_quota(cgroup, root) is None
    assert hardware.cpu_quota(tmp_path / "absent", root) is None  # no /proc: no quota

    monkeypatch.setattr(hardware, "usable_cpu_set", lambda: set(range(64)))
    monkeypatch.setattr(hardware, "physical_cores", lambda: 32)
    monkeypatch.setattr(hardware, "busy_cpus", lambda: 20)
    for quota, want in ((None, 64), (2.5, 2), (0.5, 1), (100.0, 64)):
        monkeypatch.setattr(hardware, "cpu_quota", lambda quota=quota: quota)
        assert hardware.usable_cpus() == want
    monkeypatch.setattr(hardware, "cpu_quota", lambda: 2.5)
    assert hardware.default_threads() == 2  # 12 of the host's cores are idle; the quota allows 2
    watch = hardware.IdleCoreWatch(stat=tmp_path / "absent", self_stat=tmp_path / "absent")
    assert (watch.limit, watch.cap) == (32, 2)  # during a reply too, the quota read once
    with pytest.warns(LocalrunWarning, match="more than the 2 CPUs"):
        assert hardware.check_threads(4) == 4
