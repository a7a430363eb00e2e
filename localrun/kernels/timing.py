"""Timing a GPU call as the decode step sees it: mean microseconds of back-to-back calls (CUDA events), or
of a CUDA graph's replays (no launch gaps: the step replays a graph too). On the CPU, wall-clock time.
The kernel benchmarks (triton_moe_bench, triton_gemv, triton_moe_probe) and scripts/gpu_check.py use it."""

from __future__ import annotations

import time

import torch


def time_us(fn, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / iters * 1e3


def graph_us(fn, iters: int, device: torch.device, outputs: list | None = None) -> float:
    """Microseconds per call of fn captured once as a CUDA graph and replayed: the kernels' time without
    launch gaps the decode step's graph does not have either (fn itself on the CPU). Warm fn first: what
    it compiles or autotunes must happen outside the capture. `outputs`: gets fn's output in the graph (after
    the replays: the last replay's)."""
    if device.type != "cuda":
        return time_us(fn, iters, device)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(device)
    with torch.cuda.graph(graph):
        y = fn()
    us = time_us(graph.replay, iters, device)
    if outputs is not None:
        outputs.append(y)
    return us


def calls_us(calls: list, iters: int, device: torch.device) -> float:
    """Microseconds a call of `calls` (say each on its own copy of a weight, so that a replay reads them
    from memory), all replayed as one CUDA graph (graph_us); each runs once first, so that what it
    autotunes or compiles happens outside the capture."""
    for call in calls:
        call()
    return graph_us(lambda: [call() for call in calls], iters, device) / len(calls)
