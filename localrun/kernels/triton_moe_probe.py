"""What bounds the v4 4-bit MoE decode kernels: probes for scripts/gpu_check.py's kernels step.

On an H200 (docs/gpu/2026-11-27-h200-kernels-offload.md) one 26B-A4B MoE layer takes 25.6 us in a CUDA
graph with v4 (29.3 with v2): 24 MB, ~1 TB/s, a quarter of the copy bandwidth. And that timing replays
the same 8 experts, whose 24 MB fit the L2 (50 MB): in the decode step, where they come from memory,
v4's two kernels took about the same (27.8 us a layer). So memory is not what bounds them, and their
instruction count (v4's ~4 a weight: ~4 us of issue a layer, scripts/sass_stats.py) is not either on
paper. These probes measure instead of arguing, each stage (gate_up, down) on its own:

- `as_is`: the kernel as the step runs it (the autotuned tiles);
- `no_table`: the same loads, the same FMAs, each nibble's value by bit arithmetic (2^23 + nibble, one
  LOP3) instead of the lane table's shuffle: what the shuffles cost (one a weight, 32 lanes a clock an SM);
- `loads_only`: the code words and absmax read as `as_is` reads them (the same tiles, steps and absmax
  chain), XOR-ed instead of multiplied: no x / h, no table, no FMA: the kernel's memory and latency skeleton;
- `empty`: a kernel that does nothing, on the stage's grid and warps, with and without programmatic
  dependent launch: the launch floor a kernel boundary costs in a graph.

Each timed over `sets` calls in one graph: `l2_us` with the same 8 experts every call (they stay in the
L2), `dram_us` with `sets` disjoint sets of 8 in turn (16 x 8 = all 128 experts, ~380 MB: from memory).
How to read them: `dram_us` near `l2_us` says memory is not the bound; `no_table` well under `as_is`
says the shuffles are; `loads_only` near `as_is` says the loads' latency chain is (more bytes in flight a
program, fewer dependent steps); `empty` a large part of `loads_only` says the launches are (fewer
kernels, PDL).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_moe as tm
from . import triton_pdl
from .triton_pdl import pdl_start
from .timing import calls_us
from .triton_moe_bench import random_buffer

PROBES = {"as_is": 0, "no_table": 1, "loads_only": 2}  # the v4 kernels' PROBE constexpr
SETS = 16  # disjoint sets of top-k experts a dram timing walks through (16 x 8 = 26B-A4B's 128)
STAGES = ("gate_up", "down")


@triton.jit
def _empty_kernel(x_ptr, PDL: tl.constexpr = False):
    """Nothing but the PDL wait and signal: a launch's own cost."""
    pdl_start(PDL)


def _stage(c: tm._Call, stage: str, tiles: tm.V4Tiles | None, probe: int) -> None:
    """One v4 stage of the call `c` (autotuned where tiles is None) with the PROBE constexpr `probe`."""
    lut = dict(LUT_SHFL=tm.inline_ptx(c.x.device), PROBE=probe, **tm._early(c))
    if stage == "gate_up":
        tm._gate_up_chunks(c, tiles, **lut)
    else:
        tm._down_chunks(c, tiles, **lut)


def run_v4(c: tm._Call, tiles: tm.V4Tiles | None = None, probe: str = "as_is") -> torch.Tensor:
    """Both v4 stages of `c` with one probe; c.y (what `loads_only` and `no_table` leave there is no MoE
    output: tests/test_triton_moe_probe.py checks what it is)."""
    for stage in STAGES:
        _stage(c, stage, tiles, PROBES[probe])
    return c.y


def _picked_tiles(c: tm._Call) -> tm.V4Tiles:
    """The tiles the autotuner picked for c's shape (run once, autotuning), or the interpreter's."""
    if tm.interpreted():
        return tm.INTERPRETER_V4
    run_v4(c)
    gate_up, down = tm._gate_up_v4_tuned.best_config, tm._down_v4_tuned.best_config
    return tm.V4Tiles(gate_up.kwargs["BLOCK_N"], gate_up.kwargs["BLOCK_W"], gate_up.num_warps,
                      down.kwargs["BLOCK_N"], down.kwargs["BLOCK_W"], down.num_warps)


def probe_v4(device: torch.device | str = "cuda", num_experts: int = 128, hidden: int = 2816, inter: int = 704,
             top_k: int = 8, double_quant: bool = False, sets: int = SETS, iters: int = 50,
             dtype: torch.dtype = torch.bfloat16, dry: bool = False, seed: int = 0) -> dict:
    """The probes of the module docstring at one MoE layer of random NF4 experts, one token (default:
    26B-A4B's; `dry`: a scaled-down layer, interpreted on the CPU)."""
    if dry:
        num_experts, hidden, inter, top_k, sets, iters = 8, 64, 32, 2, 2, 1
    device = torch.device(device)
    if device.type != "cuda" and not tm.interpreted():
        return {"skipped": "the Triton kernels run on CUDA, or on the CPU with TRITON_INTERPRET=1 set before import"}
    if not tm.chunks_fit(hidden, inter, 64):
        return {"skipped": f"v4 needs H and I multiples of {tm.CHUNK_WEIGHTS}"}
    sets = min(sets, num_experts // top_k)
    buf = random_buffer(num_experts, hidden, inter, "nf4", 64, double_quant, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(1, hidden, device=device, generator=g).to(dtype)
    w = torch.softmax(torch.randn(1, top_k, device=device, generator=g), dim=-1)
    order = torch.randperm(num_experts, device=device, generator=g)
    calls = [tm._prepare(x, order[i * top_k:(i + 1) * top_k].reshape(1, top_k), w, buf.data, *buf.code_tables(),
                         buf.offsets(), hidden, inter, 64, double_quant, "gelu_pytorch_tanh") for i in range(sets)]
    tiles = _picked_tiles(calls[0])
    for c in calls:
        run_v4(c, tiles)  # every call's h, so each down stage reads a gate_up's output
    out: dict = {"shape": dict(E=num_experts, H=hidden, I=inter, K=top_k), "double_quant": double_quant,
                 "dtype": str(dtype).removeprefix("torch."), "tiles": repr(tiles), "sets": sets,
                 "code_bytes": {"gate_up": top_k * 2 * inter * hidden // 2, "down": top_k * hidden * inter // 2}}
    pdl = device.type == "cuda" and not tm.interpreted() and triton_pdl._supported(
        device.index if device.index is not None else torch.cuda.current_device())
    for stage in STAGES:
        row: dict = {}
        for name, probe in PROBES.items():
            fns = [lambda c=c: _stage(c, stage, tiles, probe) for c in calls]
            row[name] = {"l2_us": round(calls_us(fns[:1] * sets, iters, device), 2),
                         "dram_us": round(calls_us(fns, iters, device), 2)}
        n, warps = (tiles.gate_up_n, tiles.gate_up_warps) if stage == "gate_up" else (tiles.down_n, tiles.down_warps)
        grid = calls[0].grid(stage, n)
        empty = {"launch_us": lambda: _empty_kernel[grid](x, num_warps=warps)}
        if pdl:
            empty["launch_pdl_us"] = lambda: _empty_kernel[grid](x, PDL=True, launch_pdl=True, num_warps=warps)
        row["empty"] = {key: round(calls_us([fn] * sets, iters, device), 2) for key, fn in empty.items()}
        row["empty"]["programs"] = grid[0] * grid[1]
        row["as_is"]["dram_gbps"] = round(out["code_bytes"][stage] / row["as_is"]["dram_us"] / 1e3, 1)
        out[stage] = row
    return out
