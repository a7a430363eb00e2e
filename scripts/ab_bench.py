#!/usr/bin/env python3
"""A/B speed of two checkouts of localrun on the same machine, in alternating rounds.

    git worktree add /tmp/base <commit>
    python scripts/ab_bench.py /tmp/base . --rounds 3 -- --prompt-tokens 128 --prompt-tokens 512 --gen-tokens 32

Each round runs `localrun bench MODEL --json ARGS` (MODEL: --model, default the generated `bench`
model; or a model directory, e.g. a Qwen3-MoE one) once in each checkout (A, then B; the next round
B, then A), each in a fresh process importing that checkout's package. Each side keeps its best per
case, and the spread over rounds is printed too: this machine's speed drifts, so only numbers from
one alternating run are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def bench_once(checkout: Path, bench_args: list[str], model: str = "bench") -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, "-m", "localrun.cli", "bench", model, "--json", "--rounds", "1",
                           *bench_args], cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed in {checkout}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)["measurements"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="checkout A (the baseline)")
    p.add_argument("b", type=Path, help="checkout B (the change)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="bench", help="what `localrun bench` measures (default: bench)")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows -- goes to `localrun bench`
    args = p.parse_args(argv[:cut])
    args.bench_args = argv[cut + 1 :]
    runs: dict[str, list[list[dict]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        order = [("A", args.a), ("B", args.b)] if r % 2 == 0 else [("B", args.b), ("A", args.a)]
        for side, checkout in order:
            runs[side].append(bench_once(checkout.resolve(), args.bench_args, args.model))
            print(f"round {r + 1}: {side} done", file=sys.stderr, flush=True)
    print(f"A = {args.a}, B = {args.b}, model {args.model}; best (and range) of {args.rounds} alternating rounds")
    print("| experts | prompt | gen | prefill tok/s A | prefill tok/s B | B/A | decode tok/s A | decode tok/s B | B/A |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, m in enumerate(runs["A"][0]):
        def col(side: str, key: str) -> tuple[float, float, float]:
            values = [run[i][key] for run in runs[side]]
            return max(values), min(values), max(values)

        cells = [str(m.get("variant") or "-"), str(m["prompt_tokens"]), str(m["gen_tokens"])]
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            (a, a_lo, a_hi), (b, b_lo, b_hi) = col("A", key), col("B", key)
            cells += [f"{a:.1f} ({a_lo:.0f}-{a_hi:.0f})", f"{b:.1f} ({b_lo:.0f}-{b_hi:.0f})", f"{b / a:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
