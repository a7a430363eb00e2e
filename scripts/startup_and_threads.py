"""Start-up time and decode speed under load, as a user sees them (numbers, not a test).

    python scripts/startup_and_threads.py [--tokens 200] [--rounds 3]

Prints the wall time of `localrun --help` and of a usage error, then `run demo` decode tokens/s:
--threads 1 on a quiet machine, and default threads with one core kept busy by `yes > /dev/null`;
then a core taken mid-reply (`yes` started `--hog-after` seconds into a long reply of the bench model): the default
(hardware.IdleCoreWatch gives the core up) against `--threads N`, the count a quiet start gave,
alternating.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "localrun.cli"]


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(CLI + argv, capture_output=True)
    return time.perf_counter() - start


def decode(tokens: int, *extra: str) -> tuple[float, int]:
    res = subprocess.run(CLI + ["run", "demo", "What is 17 + 25?", "--json", "--ignore-eos", "-n", str(tokens),
                                "--device", "cpu", "--quiet", *extra], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    return out["timings"]["decode_tokens_per_s"], out["threads"]


def decode_with_hog_after(model: str, seconds: float, tokens: int, *extra: str) -> tuple[float, int]:
    """decode tokens/s of a reply during which a CPU-bound program starts after `seconds` (from launch)."""
    proc = subprocess.Popen(CLI + ["run", model, "What is 17 + 25?", "--json", "--ignore-eos", "-n", str(tokens),
                                   "--device", "cpu", "--quiet", *extra], stdout=subprocess.PIPE, text=True)
    time.sleep(seconds)
    hog = subprocess.Popen("exec yes > /dev/null", shell=True)
    try:
        out = json.loads(proc.communicate()[0])
    finally:
        hog.kill()
        hog.wait()
    return out["timings"]["decode_tokens_per_s"], out["threads"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long-model", default=None, help="the model of the reply a core is taken during "
                    "(default: the bench model, ~250 tok/s on two cores)")
    ap.add_argument("--long-tokens", type=int, default=2000, help="the reply a core is taken during")
    ap.add_argument("--hog-after", type=float, default=6.0, help="seconds from launch (bench loads in ~4 s)")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}")
    print(f"localrun --help: {min(wall(['--help']) for _ in range(3)):.3f} s")
    print(f"localrun run --max-tokens 0 demo x (usage error): "
          f"{min(wall(['run', '--max-tokens', '0', 'demo', 'x']) for _ in range(3)):.3f} s")
    quiet = [decode(a.tokens, "--threads", "1") for _ in range(a.rounds)]
    print(f"quiet machine, --threads 1: {max(r for r, _ in quiet):.1f} tok/s (best of {a.rounds})")
    hog = subprocess.Popen("exec yes > /dev/null", shell=True)
    try:
        time.sleep(1.0)
        busy = [decode(a.tokens) for _ in range(a.rounds)]
        forced = [decode(a.tokens, "--threads", "2") for _ in range(a.rounds)]
    finally:
        hog.kill()
        hog.wait()
    print(f"one core busy, default threads: {max(r for r, _ in busy):.1f} tok/s "
          f"(threads chosen: {sorted({t for _, t in busy})})")
    print(f"one core busy, --threads 2 (the old default): {max(r for r, _ in forced):.1f} tok/s")
    from localrun.bench import bench_model_dir

    model = a.long_model or str(bench_model_dir())
    cores = decode(a.tokens)[1]  # what a quiet start counts
    watched, pinned = [], []
    for _ in range(a.rounds):
        watched.append(decode_with_hog_after(model, a.hog_after, a.long_tokens)[0])
        pinned.append(decode_with_hog_after(model, a.hog_after, a.long_tokens, "--threads", str(cores))[0])
    print(f"a core taken {a.hog_after:.1f} s into a {a.long_tokens}-token reply, decode tok/s per round: "
          f"default {', '.join(f'{r:.1f}' for r in watched)}; --threads {cores} "
          f"{', '.join(f'{r:.1f}' for r in pinned)}")


if __name__ == "__main__":
    main()
