#!/usr/bin/env python3
"""The host's share of an offloaded MoE layer at decode, measured on the CPU.

    python scripts/profile_offload_host.py                        # bench model, segments and eager steps
    python scripts/profile_offload_host.py --ab /tmp/base --rounds 5   # another checkout (A) against this one (B)
    python scripts/profile_offload_host.py --profile              # plus cProfile's functions with the most own time

The bench model is loaded in fp32 with part of each MoE layer's experts in host RAM (`--resident`, a
fraction like 26B-A4B's 94 of 128 under a 16 GiB plan), and its ExpertStore set up as on CUDA: no
one-call CPU layer (`compute_layer`), a decoded token's experts through `quant.ffn.DeviceRowsCompute`
over the layer's device rows (here RAM). So each layer runs the Python a GPU decode runs between the
routing read and the next segment: routing to the host, the cache's plan, the slot copies, the rows
table, the compute op. Per decoded layer call of `ExpertStore.prefetch` + `run` (eager routes in
prefetch, segments in run):

- `ops`: torch ops dispatched (a TorchDispatchMode), and the most frequent ones; a compute op counts
  as one whatever it runs inside (on CUDA: two Triton launches), as does an expert's compute where a
  call takes the per-expert path (a copy waiting to overwrite an expert of the same call);
- `reads`: host reads of tensor values (`tolist`, `numpy`, `item` and the ops that return host
  values), by call site: on CUDA the routing's reads come from one pinned copy after one event wait;
- `host_us`: wall time of the calls less the compute (op or per expert) and the slot copies'
  `copy_` (on the CPU a memcpy, on CUDA an async DMA): the bookkeeping, also as the median call
  (`host_us_median`: this machine's outliers move the mean); `op_overhead_us`: the compute op's
  time outside the kernel it runs (`kernels.moe_q4`, here; the Triton launches on CUDA);
  `kernel_us` and `copy_us` beside them.

With `--ab`, each round runs this script in a fresh process per checkout (A then B, next round B then
A); each side keeps its best time per metric and the range is printed (this machine drifts). The
tokens and logprobs of both sides are compared: a host-side change must not change them.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import inspect
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that hand a tensor's values to the host (a device sync on CUDA)
READ_OPS = ("_local_scalar_dense", "nonzero", "unique", "equal", "is_nonzero")


def load(resident: float, context: int, store_as: str = "cuda"):
    """The bench model with `resident` of each MoE layer's experts on the "device", its store set up as on
    CUDA (store_as "cuda"), or left as the CPU loader makes it ("cpu": a layer in one C call)."""
    from localrun.bench import bench_model_dir
    from localrun.loader import load_model
    from quant.ffn import DeviceRowsCompute

    loaded = load_model(bench_model_dir(), dtype=torch.float32, resident_fraction=resident, context=context)
    store = loaded.store
    if store is None:
        raise SystemExit(f"resident {resident} keeps every expert on the device: nothing is offloaded")
    if store_as == "cpu":
        return loaded
    layer = next(layer for layer in store._layers if store.host_payloads(layer))
    layout = next(iter(store.host_payloads(layer).values())).layout
    store.compute_layer = None  # the CPU's one-call layer: not what a GPU runs
    store.device_compute = DeviceRowsCompute(layout, loaded.args.hidden_activation)
    return loaded


class _Ops(TorchDispatchMode):
    """Counts the torch ops dispatched, and the call sites of those that read values to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.reads: Counter = Counter()
        self.paused = False  # inside the compute op: its own ops are the device's kernels, not bookkeeping

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        if name in READ_OPS:
            self.reads[f"{name} at {_caller()}"] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """file:line (function) of the innermost frame in this project, outside torch and this script."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if ("localrun" in frame.filename or "quant" in frame.filename) and "torch" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return "?"


class _Called:
    """An object (e.g. a store's compute_layer, with its `applies`) whose calls go through `call`."""

    def __init__(self, real, call) -> None:
        self._real, self._call = real, call

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


@contextlib.contextmanager
def _patched(obj, name: str, wrap):
    """obj.name = wrap(obj.name) for the duration (nothing where obj.name is None); an object that is
    not a function keeps its other attributes."""
    real = getattr(obj, name)
    if real is None:
        yield
        return
    plain = inspect.isfunction(real) or inspect.ismethod(real) or inspect.isbuiltin(real) or isinstance(real, type)
    setattr(obj, name, wrap(real) if plain or inspect.ismethoddescriptor(real) else _Called(real, wrap(real)))
    try:
        yield
    finally:
        setattr(obj, name, real)


def _count_reads(reads: Counter, enabled: list[bool]):
    """A wrapper of Tensor.tolist / numpy that tallies its call sites while `enabled[0]`."""
    def wrap(real):
        def read(self, *args, **kwargs):
            if enabled[0]:
                reads[f"{real.__name__} at {_caller()}"] += 1
            return real(self, *args, **kwargs)
        return read
    return wrap


def _timed(spent: list[float], flag: list[bool] | None = None, only_if: list[bool] | None = None):
    """A wrapper that adds its calls' seconds to spent[0]; `flag[0]` is True during them; with
    `only_if`, only calls made while only_if[0] is True are timed."""
    def wrap(real):
        def call(*args, **kwargs):
            if only_if is not None and not only_if[0]:
                return real(*args, **kwargs)
            if flag is not None:
                flag[0] = True
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
                if flag is not None:
                    flag[0] = False
        return call
    return wrap


def decode(loaded, step: str, ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
    from localrun.generate import generate
    from localrun.sampling import SamplingParams, make_sampler

    steps = generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=tokens + 1, step=step,
                     cache=loaded.kv)
    out = list(steps)
    return [s.token for s in out], [s.logprob for s in out]


def _one_token(on_call, calls: list[int] | None = None):
    """A wrapper of ExpertStore.run / prefetch that hands a decoded token's calls to `on_call(call)`,
    counting them in calls[0] if given."""
    def wrap(real):
        def wrapped(self, layer, x_or_ids, *args):
            call = lambda: real(self, layer, x_or_ids, *args)  # noqa: E731
            if x_or_ids.shape[0] != 1:
                return call()
            if calls is not None:
                calls[0] += 1
            return on_call(call)
        return wrapped
    return wrap


def count_pass(loaded, step: str, ids: list[int], tokens: int) -> dict:
    """torch ops and host reads per decoded layer call (ExpertStore.prefetch + run) over `tokens` tokens."""
    from localrun.experts import ExpertStore

    mode, inside = _Ops(), [False]
    reads: Counter = Counter()

    def on_call(call):
        inside[0] = True
        try:
            with mode:
                return call()
        finally:
            inside[0] = False

    def wrap_compute(real):  # a compute op (or an expert's, per expert) counts as one, whatever it dispatches
        def compute(*args, **kwargs):
            if not inside[0]:  # a prompt's call
                return real(*args, **kwargs)
            mode.ops["compute op"] += 1
            mode.paused, inside[0] = True, False
            try:
                return real(*args, **kwargs)
            finally:
                mode.paused, inside[0] = False, True
        return compute

    calls = [0]
    with (_patched(ExpertStore, "run", _one_token(on_call, calls)),
          _patched(ExpertStore, "prefetch", _one_token(on_call)),
          _patched(loaded.store, "device_compute", wrap_compute), _patched(loaded.store, "compute", wrap_compute),
          _patched(loaded.store, "compute_layer", wrap_compute),
          _patched(torch.Tensor, "tolist", _count_reads(reads, inside)),
          _patched(torch.Tensor, "numpy", _count_reads(reads, inside))):
        decode(loaded, step, ids, tokens)
    reads.update(mode.reads)
    n = max(calls[0], 1)
    return {"layer_calls": calls[0], "ops": sum(mode.ops.values()) / n,
            "top_ops": {k: round(v / n, 2) for k, v in mode.ops.most_common(12)},
            "reads": sum(reads.values()) / n, "read_sites": {k: round(v / n, 2) for k, v in reads.most_common()}}


def time_pass(loaded, step: str, ids: list[int], tokens: int, profile: bool) -> dict:
    """Microseconds per decoded layer call of ExpertStore.prefetch + run, of its compute op and of its
    slot copies' copy_; host_us = the calls less those two. Also the tokens and logprobs, and ms a token."""
    from localrun import kernels
    from localrun.experts import ExpertStore

    store = loaded.store
    spent, compute_s, copy_s, kernel_s = [0.0], [0.0], [0.0], [0.0]
    computing = [False]  # inside the compute op (device_compute) or an expert's compute (the per-expert path)
    in_call = [False]  # inside a decoded layer call (a prompt's calls compute too)
    per_call: list[float] = []
    profiler = cProfile.Profile() if profile else None

    prefetched = [0.0]  # host seconds of the layer's prefetch, added to its run's

    def timed(call, run: bool):
        before = compute_s[0] + copy_s[0]
        if profiler is not None:
            profiler.enable()
        in_call[0] = True
        start = time.perf_counter()
        try:
            return call()
        finally:
            took = time.perf_counter() - start
            in_call[0] = False
            if profiler is not None:
                profiler.disable()
            spent[0] += took
            host = took - (compute_s[0] + copy_s[0] - before)
            if run:
                per_call.append(host + prefetched[0])
                prefetched[0] = 0.0
            else:
                prefetched[0] += host

    def wrap_fill(real):  # the slot row's copy_ alone: the rest of the fill is bookkeeping
        def fill(row, host_row, *args, **kwargs):
            with _patched(row, "copy_", _timed(copy_s, only_if=in_call)):
                return real(row, host_row, *args, **kwargs)
        return fill

    calls = [0]
    with (_patched(ExpertStore, "run", _one_token(lambda call: timed(call, True), calls)),
          _patched(ExpertStore, "prefetch", _one_token(lambda call: timed(call, False))),
          _patched(store, "device_compute", _timed(compute_s, computing, only_if=in_call)),
          _patched(store, "compute", _timed(compute_s, computing, only_if=in_call)),
          _patched(store, "compute_layer", _timed(compute_s, computing, only_if=in_call)),
          _patched(store._copier, "fill", wrap_fill),
          _patched(kernels, "moe_q4", _timed(kernel_s, only_if=computing))):
        before = store.snapshot()
        start = time.perf_counter()
        tokens_, logprobs = decode(loaded, step, ids, tokens)
        wall = time.perf_counter() - start
        stats = store.stats(since=before)
    n = max(calls[0], 1)
    out = {"layer_calls": n, "calls_us": 1e6 * spent[0] / n, "compute_us": 1e6 * compute_s[0] / n,
           "kernel_us": 1e6 * kernel_s[0] / n, "op_overhead_us": 1e6 * (compute_s[0] - kernel_s[0]) / n,
           "copy_us": 1e6 * copy_s[0] / n, "host_us": 1e6 * (spent[0] - compute_s[0] - copy_s[0]) / n,
           "host_us_median": 1e6 * statistics.median(per_call) if per_call else 0.0,
           "copies_per_layer_call": stats["copies"] / n,
           "generate_ms_a_token": 1e3 * wall / (tokens + 1),  # the pass's generate, prompt and wrappers included
           "tokens": tokens_, "logprobs": logprobs}
    if profiler is not None:
        out["profile"] = _top_own(profiler, n)
    return out


def _top_own(profiler: cProfile.Profile, per: int, limit: int = 25) -> list[tuple[str, float, float]]:
    """(function, calls per layer call, own us per layer call) of the functions with the most own time."""
    rows = []
    for (file, line, fn), (_, calls, own, _cum, _) in pstats.Stats(profiler).stats.items():
        rows.append((f"{Path(file).name}:{line}({fn})", calls / per, 1e6 * own / per))
    return sorted(rows, key=lambda r: -r[2])[:limit]


def measure(args) -> dict:
    from localrun.bench import bench_prompt

    torch.set_num_threads(1)
    loaded = load(args.resident, args.context, args.store)
    ids = bench_prompt(args.prompt_tokens, loaded.args.vocab_size)
    out = {"torch": torch.__version__, "resident": args.resident, "tokens": args.tokens}
    for step in args.steps:
        decode(loaded, step, ids, 4)  # warm-up: first calls, imports
        out[step] = {**count_pass(loaded, step, ids, args.tokens),
                     **time_pass(loaded, step, ids, args.tokens, args.profile)}
    return out


# -------------------------------------------------------------------------------------------- A/B


def run_checkout(checkout: Path, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", *argv], cwd=checkout, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


METRICS = ("ops", "reads", "host_us", "host_us_median", "op_overhead_us", "kernel_us", "copy_us",
           "copies_per_layer_call", "generate_ms_a_token")
TIMES = ("host_us", "host_us_median", "op_overhead_us", "kernel_us", "copy_us", "generate_ms_a_token")


def ab(args, argv: list[str]) -> int:
    """Alternating rounds of `argv` in checkout A (args.ab) and this one (B); prints the table."""
    sides = {"A": args.ab.resolve(), "B": Path(__file__).resolve().parents[1]}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
            runs[side].append(run_checkout(sides[side], argv))
            print(f"round {r + 1}: {side} done", file=sys.stderr, flush=True)
    print(f"A = {sides['A']}, B = {sides['B']}; {args.rounds} alternating rounds, {args.tokens} decoded tokens, "
          f"resident {args.resident}, store as on {args.store}; times: best (range), per decoded layer call")
    for step in args.steps:
        same = all(run[step]["tokens"] == runs["A"][0][step]["tokens"]
                   and run[step]["logprobs"] == runs["A"][0][step]["logprobs"] for run in runs["A"] + runs["B"])
        print(f"\n{step}: tokens and logprobs {'identical' if same else 'DIFFER'} across A and B")
        print("| metric | A | B | B/A |")
        print("|---|---|---|---|")
        for key in METRICS:
            a, b = ([run[step][key] for run in runs[s]] for s in ("A", "B"))
            best = min if key in TIMES else statistics.median
            ba = best(b) / best(a) if best(a) else float("nan")
            print(f"| {key} | {_cell(a, best)} | {_cell(b, best)} | {ba:.2f} |")
    return 0


def _cell(values: list[float], best) -> str:
    return f"{best(values):.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{values[0]:.1f}"


def report(out: dict) -> None:
    for step in out:
        if not isinstance(out[step], dict):
            continue
        m = out[step]
        print(f"{step}: {m['layer_calls'] // out['tokens']} offloaded layer calls a token; per call: "
              f"{m['ops']:.1f} torch ops, {m['reads']:.1f} host reads, host {m['host_us']:.1f} us "
              f"(median {m['host_us_median']:.1f}), compute op {m['compute_us']:.1f} us (of which the kernel "
              f"{m['kernel_us']:.1f}), copies {m['copy_us']:.1f} us "
              f"({m['copies_per_layer_call']:.2f} a call); generate {m['generate_ms_a_token']:.2f} ms a token")
        print("  ops:", ", ".join(f"{k} {v}" for k, v in m["top_ops"].items()))
        print("  reads:", ", ".join(f"{k}: {v}" for k, v in m["read_sites"].items()) or "none")
        for fn, calls, own in m.get("profile", []):
            print(f"  {own:8.1f} us {calls:6.2f}x  {fn}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resident", type=float, default=0.625,
                   help="fraction of each layer's experts on the device (default 0.625: about one copy a layer "
                        "and token with the bench model's 32 experts, top-8 and 8 slots, like 26B-A4B at 16 GiB)")
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens a pass")
    p.add_argument("--prompt-tokens", type=int, default=30)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", nargs="+", default=["segments", "eager"])
    p.add_argument("--store", choices=["cuda", "cpu"], default="cuda",
                   help="the store as on CUDA (default: a decoded layer as one op over the device rows) or as the "
                        "CPU loader makes it (a layer in one C call over the experts where they lie)")
    p.add_argument("--profile", action="store_true", help="cProfile's top functions by own time")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.add_argument("--ab", type=Path, help="another checkout (A), measured against this one (B)")
    p.add_argument("--rounds", type=int, default=5)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.ab is not None:
        return ab(args, ["--resident", str(args.resident), "--tokens", str(args.tokens), "--prompt-tokens",
                         str(args.prompt_tokens), "--context", str(args.context), "--store", args.store,
                         "--steps", *args.steps])
    out = measure(args)
    if args.json:
        print(json.dumps(out))
    else:
        report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
