"""What the machine offers: memory sizes, GPU presets, bandwidth figures, free VRAM/RAM detection.

Sizes are binary. GPU memory and RAM are built in powers of two and sold under decimal
names: a "24 GB" RTX 4090 holds 24 GiB (nvidia-smi: 24564 MiB). So "16GB", "16G" and
"16GiB" all mean 16 * 2**30 bytes; a user typing `--vram 16GB` for a 16 GB card gets the
card's real size, not 7% less.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import LocalrunWarning, UsageError

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
GB_S = 10**9  # bandwidths are quoted in decimal GB/s by vendors; keep them that way

_UNITS = {
    "": 1, "b": 1,
    "k": KIB, "kb": KIB, "kib": KIB,
    "m": MIB, "mb": MIB, "mib": MIB,
    "g": GIB, "gb": GIB, "gib": GIB,
    "t": TIB, "tb": TIB, "tib": TIB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$", re.ASCII)  # ASCII digits: no "١٦GB"
# A bare number below this is almost surely a forgotten unit ("--vram 16"), not 16 bytes.
_MIN_BARE_BYTES = MIB

# Practical host->device copy rates from pinned memory (~80% of the link's nominal rate).
PCIE_GEN4_X16 = 25 * GB_S
PCIE_GEN4_X8 = 13 * GB_S
PCIE_GEN5_X8 = 25 * GB_S
PCIE_GEN5_X16 = 50 * GB_S
DEFAULT_PCIE_BANDWIDTH = PCIE_GEN4_X16  # what we assume for a card we don't know

# Host RAM as the CPU reads cold experts where they lie (fit's CPU route), when --host-bandwidth is not
# given: a desktop's dual-channel DDR5 (77-90 GB/s nominal) read by a few cores. A planning figure like
# the PCIe rates above, not a measurement: fit's verdict must not change with this machine's load at the
# moment, and what the CPU route really costs (the 4-bit kernel on the threads the run gets) is what
# the loader's `experts.calibrate` measures. For scale, one core of a shared 2-core AMD EPYC (Zen 5)
# sums a 2 GiB tensor at 36-41 GB/s (two cores 47-80), and the 4-bit expert op reads 26B-A4B's NF4 experts
# from RAM at 24 GB/s on one core, 40 on two (docs/cpu/2026-11-27-epyc-zen5-26b-a4b.md).
DEFAULT_HOST_BANDWIDTH = 50 * GB_S


@dataclass(frozen=True)
class MeasuredEfficiency:
    """What localrun's decode reached on a real GPU (`scripts/gpu_check.py`), as the two figures `fit`
    scales any plan by: the fraction of the vendor bandwidth its weight-reading kernels (the 4-bit MoE
    GEMVs, the dense GEMMs) reached, and a time per layer that does not shrink with bytes (attention,
    norms, routing, the gaps between kernels). A tiny model is then bound by its layers, a big one by
    its bytes, and a card's bandwidth scales only the part it drives."""

    bandwidth_fraction: float
    layer_seconds: float
    device: str
    date: str
    report: str
    measured: str

    def expected_tokens_per_s(self, ceiling_tokens_per_s: float, layers: int) -> float:
        """Decode speed from a plan's memory-bandwidth ceiling and its layer count."""
        return 1.0 / (1.0 / (ceiling_tokens_per_s * self.bandwidth_fraction) + layers * self.layer_seconds)


# docs/gpu/2026-11-27-h200-resident.md (`speed_graphs_with_dense_gemv`, now the default): 293.5 tok/s
# (3.41 ms a token) for 6.08 GB a token. Its kernel table: the weight kernels (the MoE GEMVs, the
# Triton GEMVs, the lm_head's cuBLAS GEMM) read those bytes in 2.39 ms, 53% of the H200's 4.8 TB/s;
# the other 1.02 ms (attention, norms, routing, gaps) over 30 layers is 34 us a layer.
DECODE_EFFICIENCY = MeasuredEfficiency(
    bandwidth_fraction=0.53, layer_seconds=34e-6, device="NVIDIA H200", date="2026-11-27",
    report="docs/gpu/2026-11-27-h200-resident.md",
    measured="Gemma 4 26B-A4B (random NF4 weights), every expert resident, CUDA-graph decode: 293.5 tok/s")

# docs/gpu/2026-11-27-h200-kernels-offload.md, 16 GiB budget, the segmented graphs step with the experts' kernel
# called directly (DeviceRowsCompute): 103.5 tok/s (9.66 ms a token; 51.8 before, docs/gpu/2026-11-27-h200-16gib.md).
# The ceiling at the 17.1% miss rate measured there (6.08 GB a token at 4.8 TB/s, misses over PCIe at the
# preset's 50 GB/s) is 249 tok/s (4.02 ms), 7.58 ms at the resident case's bandwidth fraction; the rest,
# 2.08 ms over 30 layers, is 69 us a layer: each layer's routing read and its missed experts' copies.
OFFLOAD_DECODE_EFFICIENCY = MeasuredEfficiency(
    bandwidth_fraction=0.53, layer_seconds=69e-6, device="NVIDIA H200", date="2026-11-27",
    report="docs/gpu/2026-11-27-h200-kernels-offload.md",
    measured="Gemma 4 26B-A4B (random NF4 weights) under a 16 GiB budget, 94 of 128 experts resident, every miss "
             "copied over PCIe, segmented CUDA-graph decode: 103.5 tok/s")


# docs/cpu/2026-11-27-epyc-zen5-26b-a4b.md: Gemma 4 26B-A4B (random NF4 experts, the rest bf16, fp32 compute) on
# one Zen 5 core decoded 5.05 tok/s, 5.63 GB a token, 69% of the 41 GB/s that core reads; with the bench model
# (64 MB a token, 12 layers, 376 tok/s) that solves to 0.69 of the read rate and 35 us a layer.
CPU_DECODE_EFFICIENCY = MeasuredEfficiency(
    bandwidth_fraction=0.69, layer_seconds=35e-6, device="AMD EPYC (Zen 5)", date="2026-11-27",
    report="docs/cpu/2026-11-27-epyc-zen5-26b-a4b.md",
    measured="Gemma 4 26B-A4B (random NF4 experts), all in RAM, one core: 5.05 tok/s at 41 GB/s of reads")


def decode_efficiency(offloaded: bool, device: str = "cuda") -> MeasuredEfficiency:
    """The measured efficiency for a placement: on the CPU; on a GPU with every expert there, or with
    some in host RAM (decoded as graphs between the layers' experts, every family)."""
    if device == "cpu":
        return CPU_DECODE_EFFICIENCY
    return OFFLOAD_DECODE_EFFICIENCY if offloaded else DECODE_EFFICIENCY


def parse_size(text: str | int) -> int:
    """Bytes from "16GiB", "16GB", "16G", "24 GiB", "512MiB", "1.5G" or a plain byte count.

    Every unit is binary (see the module docstring). Raises UsageError on anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(f"invalid size {text!r}: expected a number with a unit, e.g. 16GiB, 24GB or 512MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise UsageError(f"invalid size {text!r}: must be positive")
    if unit in ("", "b") and nbytes < _MIN_BARE_BYTES:
        raise UsageError(f"size {text!r} is only {nbytes} bytes; add a unit, e.g. {text}GiB")
    if nbytes > MAX_SIZE:
        raise UsageError(f"size {text!r} is more memory than a machine has (at most {MAX_SIZE // TIB} TiB)")
    return nbytes


MAX_SIZE = 1 << 50  # 1 PiB: a size past it is a typo, and float rounding would print it wrong


_RATE_UNITS = {  # bytes per second; decimal as vendors quote them (GB/s = 1e9 B/s), binary when spelled so
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": KIB,
    "m": 10**6, "mb": 10**6, "mib": MIB,
    "g": GB_S, "gb": GB_S, "gib": GIB,
    "t": 10**12, "tb": 10**12, "tib": TIB,
}
_RATE_RE = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Z]*)\s*(/\s*s)?\s*$", re.ASCII)
_MIN_RATE = 10**6  # bytes/s: below 1 MB/s no memory or link is meant (a bare "60" is a forgotten unit)


def parse_rate(text: str) -> float:
    """Bytes/s from "60GB/s", "60 GB/s", "60GB", "25.6e9" or "100GiB/s". Unlike sizes, rates are
    decimal (GB/s = 1e9 bytes/s, as vendors quote bandwidth) unless spelled binary (GiB/s).
    Raises UsageError on anything else."""
    m = _RATE_RE.match(str(text))
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise UsageError(f"invalid rate {text!r}: expected a number with a unit, e.g. 60GB/s or 25.6e9")
    unit = m.group(2).lower()
    rate = float(m.group(1)) * _RATE_UNITS[unit]
    if not math.isfinite(rate):
        raise UsageError(f"invalid rate {text!r}: too large")
    if rate <= 0:
        raise UsageError(f"invalid rate {text!r}: must be positive")
    if rate < _MIN_RATE:
        hint = f"add a unit, e.g. {m.group(1)}GB/s" if unit in ("", "b") else "expected at least 1MB/s"
        raise UsageError(f"rate {text!r} is only {rate:g} bytes/s; {hint}")
    return rate


def format_rate(bytes_per_s: float) -> str:
    """'13 GB/s', '54.6 GB/s', '4.8 TB/s': decimal, as vendors quote bandwidth."""
    for unit, scale in (("TB/s", 10**12), ("GB/s", GB_S), ("MB/s", 10**6)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.3g} {unit}"
    return f"{bytes_per_s:.3g} B/s"


def format_size(nbytes: int | float) -> str:
    """Human-readable binary size: '16.00 GiB', '512.0 MiB'."""
    n = float(nbytes)
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    if abs(n) >= KIB:
        return f"{n / KIB:.1f} KiB"
    return f"{int(n)} B"


# GPU presets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuPreset:
    name: str
    memory_bytes: int
    bandwidth: float  # device memory, bytes/s (vendor spec)
    pcie_bandwidth: float = DEFAULT_PCIE_BANDWIDTH  # practical host->device bytes/s


GPU_PRESETS: tuple[GpuPreset, ...] = (
    GpuPreset("RTX 3060 12GB", 12 * GIB, 360 * GB_S),
    GpuPreset("RTX 3080 10GB", 10 * GIB, 760 * GB_S),
    GpuPreset("RTX 3090", 24 * GIB, 936 * GB_S),
    GpuPreset("RTX 4060 Ti 16GB", 16 * GIB, 288 * GB_S, PCIE_GEN4_X8),
    GpuPreset("RTX 4070 Ti Super", 16 * GIB, 672 * GB_S),
    GpuPreset("RTX 4080", 16 * GIB, 717 * GB_S),
    GpuPreset("RTX 4090", 24 * GIB, 1008 * GB_S),
    GpuPreset("RTX 5060 Ti 16GB", 16 * GIB, 448 * GB_S, PCIE_GEN5_X8),
    GpuPreset("RTX 5080", 16 * GIB, 960 * GB_S, PCIE_GEN5_X16),
    GpuPreset("RTX 5090", 32 * GIB, 1792 * GB_S, PCIE_GEN5_X16),
    GpuPreset("RTX A4000", 16 * GIB, 448 * GB_S),
    GpuPreset("RTX A5000", 24 * GIB, 768 * GB_S),
    GpuPreset("L4", 24 * GIB, 300 * GB_S),
    GpuPreset("H100 80GB", 80 * GIB, 3350 * GB_S, PCIE_GEN5_X16),  # SXM (HBM3); the device name says "80GB HBM3"
    GpuPreset("H100 PCIe", 80 * GIB, 2000 * GB_S, PCIE_GEN5_X16),
    GpuPreset("H200", 140 * GIB, 4800 * GB_S, PCIE_GEN5_X16),
)


def _norm_name(name: str) -> str:
    """'NVIDIA GeForce RTX 4060 Ti 16GB' -> '4060ti16gb': lower case, no spaces/dashes/vendor words."""
    s = re.sub(r"[\s_\-]+", "", name.lower())
    for word in ("nvidia", "geforce", "rtx"):
        s = s.replace(word, "")
    return s


def _aliases(preset: GpuPreset) -> set[str]:
    # "RTX 4060 Ti 16GB" is also "4060ti"; "RTX 3060 12GB" is also "3060" (the memory suffix is optional).
    return {_norm_name(preset.name), _norm_name(re.sub(r"\s\d+GB$", "", preset.name))}


def gpu_preset(name: str) -> GpuPreset:
    """Look up a preset case/space-insensitively ("4090", "rtx-4090", "RTX 4090"); UsageError if unknown."""
    key = _norm_name(name)
    for preset in GPU_PRESETS:
        if key and key in _aliases(preset):
            return preset
    choices = ", ".join(p.name for p in GPU_PRESETS)
    raise UsageError(f"unknown GPU {name!r}; choose one of: {choices} (or give --vram SIZE)")


def preset_for_device_name(device_name: str) -> GpuPreset | None:
    """The preset matching a CUDA device name such as 'NVIDIA GeForce RTX 4090', or None."""
    key = _norm_name(device_name)
    # Longest alias first, so '4060ti' wins over a shorter alias it contains.
    candidates = sorted(((a, p) for p in GPU_PRESETS for a in _aliases(p)), key=lambda ap: -len(ap[0]))
    for alias, preset in candidates:
        if alias and alias in key:
            return preset
    return None


# Detection ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectedGpu:
    name: str
    free_bytes: int
    total_bytes: int


def detect_gpu() -> DetectedGpu | None:
    """Free and total memory of CUDA device 0, or None when there is no usable CUDA GPU.

    torch is imported here, not at module level: `localrun fit --vram` must not pay for it.
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)
        return DetectedGpu(torch.cuda.get_device_name(0), int(free), int(total))
    except Exception:  # a broken driver or CUDA runtime means "no GPU we can use"
        return None


def detect_host_ram(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """Host RAM available to a new process, in bytes (MemAvailable), or None if unknown."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS and friends: free physical pages is the closest portable figure
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# CPU threads ------------------------------------------------------------------------------------

def physical_cores(cpuinfo: str | Path = "/proc/cpuinfo") -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo: SMT siblings share a core's arithmetic units."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, package = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or os.cpu_count() or 1


def usable_cpu_set() -> set[int]:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """How many CPUs this process may use: those it may run on (`usable_cpu_set`), at most its cgroup's
    CPU quota (`cpu_quota`: `docker run --cpus 2` on a 64-core host leaves the affinity mask at 64)."""
    return quota_cap(len(usable_cpu_set()))


def quota_cap(threads: int) -> int:
    """`threads`, at most the whole CPUs of this process's cgroup quota (at least 1)."""
    quota = cpu_quota()
    return threads if quota is None else max(1, min(threads, int(quota)))


def parse_cpu_max(text: str) -> float | None:
    """CPUs a cgroup v2 `cpu.max` allows ("QUOTA PERIOD" in microseconds, or "max PERIOD"): None for
    no limit or text that is not that."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs a cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` pair allows (quota -1: no limit)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_dirs(cgroup_text: str, root: Path, controller: str = "cpu") -> list[Path]:
    """From /proc/self/cgroup: this process's cgroup directory and those above it up to `root`, for the
    v2 hierarchy ("0::/path") and the v1 hierarchy holding `controller` ("N:cpu,cpuacct:/path", mounted
    at root / "cpu,cpuacct" or root / "cpu"), innermost first. A container sees its own cgroup as "/"."""
    dirs = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = controllers.split(",")
        if controllers == "":
            mounts = [root]
        elif controller in names:
            mounts = [root / controllers, root / controller]
        else:
            continue
        path = path.strip()
        if not path.startswith("/") or ".." in Path(path).parts:
            continue  # not a cgroup path
        relative = Path(path).relative_to("/")
        for mount in mounts:
            here = mount / relative
            while True:
                dirs.append(here)
                if here == mount:
                    break
                here = here.parent
    return dirs


def cpu_quota(cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time this process's cgroups allow (the tightest quota from its cgroup up, v2
    `cpu.max` or v1 `cpu.cfs_quota_us`), or None: no quota, or no cgroup files to read."""
    try:
        text = Path(cgroup).read_text()
    except OSError:
        return None
    quotas = []
    for here in cgroup_dirs(text, Path(root)):
        try:
            if (here / "cpu.max").is_file():
                quotas.append(parse_cpu_max((here / "cpu.max").read_text()))
            elif (here / "cpu.cfs_quota_us").is_file():
                quotas.append(parse_cfs((here / "cpu.cfs_quota_us").read_text(),
                                        (here / "cpu.cfs_period_us").read_text()))
        except OSError:
            continue
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def busy_cpus(loadavg: str | Path = "/proc/loadavg", samples: int = 5, interval_s: float = 0.01) -> int:
    """Other processes' runnable threads now: the fewest seen over a few quick reads of /proc/loadavg
    (its "running/total" field counts this process too), so a passing blip does not count as busy.

    The 1-minute load average would lag a minute behind a job that just started; this does not.
    """
    import time

    fewest = None
    for i in range(samples):
        try:
            running = int(Path(loadavg).read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        fewest = running if fewest is None else min(fewest, running)
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, (fewest or 1) - 1)


def default_threads() -> int:
    """Compute threads when --threads is not given: the cores other processes leave idle, counting
    at most the physical cores this process may use and each busy thread as taking a whole core
    (threads beyond the free cores wait on each other at every parallel step: one busy core out
    of two cut decode ~5x with two threads), and at least one."""
    return quota_cap(max(1, min(len(usable_cpu_set()), physical_cores()) - busy_cpus()))


def use_idle_cores() -> int:
    """Set torch's compute threads (the C kernels' too) to `default_threads()` now, and return it: what
    `chat` does before each reply and `serve` before work after an idle spell, when --threads is not given."""
    import torch

    n = default_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def cpu_ticks(cpus: set[int], stat: str | Path = "/proc/stat") -> tuple[int, int] | None:
    """(busy, all) clock ticks the given CPUs spent since boot (/proc/stat's `cpuN` lines): busy is
    user, nice, system, irq and softirq; all adds idle, iowait and steal (time a hypervisor ran something
    else: fewer threads would not get it back, so it is not a process to make room for). None where
    there is no such file (not Linux)."""
    busy = total = 0
    try:
        lines = Path(stat).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        try:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in rest.split()[:8])
        except ValueError:
            return None
        busy += user + nice + system + irq + softirq
        total += user + nice + system + irq + softirq + idle + iowait + steal
    return (busy, total) if total else None


def own_ticks(stat: str | Path = "/proc/self/stat") -> int | None:
    """Clock ticks this process's threads have run (utime + stime, /proc/self/stat), or None."""
    try:
        fields = Path(stat).read_text().rpartition(")")[2].split()  # the name in () may hold spaces
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


class IdleCoreWatch:
    """While a reply runs without --threads (`poll` between its prefill chunks and tokens, in the thread
    that runs the model: generate's `between`): every `interval_s`, how much CPU other processes took
    on this process's CPUs since the last look, and torch's thread count set to the cores they leave.

    Between replies `use_idle_cores` counts runnable threads (/proc/loadavg), but during a reply this
    process's own threads are among them; here its own CPU time is taken out of the CPUs' busy time
    instead. A program that starts mid-reply on one of two cores would otherwise stall every parallel
    step of the rest of it: 26B-A4B decoded 0.8-2.6 tok/s with two threads and a core taken, 5 with one.
    Another process counts as holding a core from 0.4 of one (a CPU-bound one sharing a core with one of
    ours gets 0.5-0.7 of it; once ours leave, all of it, so the count holds)."""

    HOLDS_A_CORE = 0.4

    def __init__(self, interval_s: float = 0.5, stat: str | Path = "/proc/stat",
                 self_stat: str | Path = "/proc/self/stat", clock=None):
        import time

        self.interval_s, self.stat, self.self_stat = interval_s, stat, self_stat
        self.clock = clock or time.monotonic
        self.cpus = usable_cpu_set()
        self.limit = min(len(self.cpus), physical_cores())
        self.cap = quota_cap(self.limit)  # the cgroup quota, read once (not every poll)
        self.at, self.last = self.clock(), self._sample()

    def _sample(self) -> tuple[int, int, int] | None:
        ticks, own = cpu_ticks(self.cpus, self.stat), own_ticks(self.self_stat)
        return None if ticks is None or own is None else (*ticks, own)

    def others(self, before: tuple[int, int, int], now: tuple[int, int, int]) -> float:
        """Cores' worth of CPU that other processes ran between two samples."""
        busy, total, own = (b - a for a, b in zip(before, now))
        if total <= 0:
            return 0.0
        return max(0, busy - own) / (total / len(self.cpus))

    def poll(self) -> int | None:
        """Call it often (every token): once `interval_s` has passed, the new thread count if it changed
        (and torch set to it), else None. Never anything where /proc is missing."""
        if self.last is None or self.clock() - self.at < self.interval_s:
            return None
        now = self._sample()
        if now is None:
            self.last = None
            return None
        others, self.at, self.last = self.others(self.last, now), self.clock(), now
        threads = max(1, min(self.cap, self.limit - max(0, math.ceil(others - self.HOLDS_A_CORE))))
        import torch

        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        return threads


def check_threads(threads: int | None) -> int:
    """--threads as given (validated; more than the CPUs this process may use is a warning: every
    parallel step then waits for threads that share a CPU), else `default_threads()`."""
    if threads is None:
        return default_threads()
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, not {threads}")
    cpus = usable_cpus()
    if threads > cpus:
        warnings.warn(f"--threads {threads} is more than the {cpus} CPUs this process may use: each parallel "
                      "step waits for threads that share a CPU (slower, often much)", LocalrunWarning, stacklevel=2)
    return threads
