"""Weights into the GPU's L2 cache ahead of the kernel that reads them (opt-in,
models/gemma4.DECODE_KERNELS["l2_prefetch"]).

A decoded token's kernels use the memory unevenly: the projections' GEMVs stream their bf16 weights
at ~3 TB/s, while decode attention, the layer glue and the 4-bit MoE kernels wait on latency and draw
a fraction of the bandwidth for tens of microseconds a layer (on an H200, 2026-11-27: the MoE kernels
~0.9 TB/s for ~27 us, attention ~12 us). `l2_prefetch_triton` launches, on a stream beside the
step's chain, a kernel that asks the L2 for the lines of a weight the chain reads a few kernels
later (`prefetch.global.L2::evict_last`: no registers filled, nothing waited on, the lines kept ahead
of the GEMVs' own `evict_first` streams), so that projection reads L2 rather than HBM. Whether the
L2 holds them until then, and whether the extra traffic slows the latency-bound kernels it overlaps,
is for scripts/gpu_check.py's decode A/B to say.

CUDA only (inline PTX); the interpreter has no caches to fill, and nothing calls this off CUDA.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LINE = 128  # bytes of a cache line (the unit one prefetch asks for)
BLOCK = 128  # threads a program (4 warps), a line each a step
PROGRAMS_PER_SM = 2


@triton.jit
def _prefetch(address):
    """One prefetch of the line at `address` (int64) into L2, kept ahead of evict-first lines; 0."""
    return tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [address],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l1(address):
    """The line at `address` (int64) asked of this SM's L1 (through the L2); 0 (triton_attention's L1_PREFETCH)."""
    return tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [address], dtype=tl.int32,
                                     is_pure=False, pack=1)


def inline_ptx(device: torch.device) -> bool:
    """Whether kernels on `device` may take inline PTX (these prefetches, triton_moe's lane table): an NVIDIA
    GPU, not the interpreter or ROCm."""
    return device.type == "cuda" and torch.version.hip is None and _prefetch.__class__.__name__ != \
        "InterpretedFunction"


@triton.jit
def prefetch_share(ptr, nbytes, part, parts, LANES: tl.constexpr, LINE: tl.constexpr):
    """Share `part` of `parts` of the lines of nbytes bytes from ptr (uint8) asked of the L2, LANES a step
    (the last line of the share again past its end: a repeat costs an instruction, not a transfer); int32
    zeros [LANES], the asm's results, for the caller to keep alive (a store under a mask that is never
    true). `_l2_prefetch_kernel`'s programs share two ranges so; triton_moe's PREFETCH_DOWN asks beside
    its own work."""
    lines = tl.cdiv(nbytes, LINE)
    per = tl.cdiv(lines, parts)
    first = part * per
    end = tl.minimum(first + per, lines)
    lane = tl.arange(0, LANES)
    acc = tl.zeros([LANES], dtype=tl.int32)
    for j in range(first, end, LANES):
        line = tl.minimum(j + lane, end - 1).to(tl.int64)
        acc += _prefetch(tl.cast(ptr + line * LINE, tl.int64))
    return acc


@triton.jit
def _l2_prefetch_kernel(a_ptr, a_bytes, b_ptr, b_bytes, sink_ptr, BLOCK: tl.constexpr, LINE: tl.constexpr):
    """Grid (P,): the lines of two byte ranges, each program its share of each. The asm's zeros go to
    `sink` under a mask that is never true, so no prefetch is dead code."""
    part, parts = tl.program_id(0), tl.num_programs(0)
    acc = (prefetch_share(a_ptr, a_bytes, part, parts, BLOCK, LINE)
           + prefetch_share(b_ptr, b_bytes, part, parts, BLOCK, LINE))
    tl.store(sink_ptr + tl.arange(0, BLOCK), acc, mask=acc != 0)


@functools.lru_cache(maxsize=None)
def _sink(device: torch.device) -> torch.Tensor:
    return torch.zeros(BLOCK, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=None)
def _programs(index: int) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """t's storage as contiguous uint8 (its bytes, in place)."""
    if not t.is_contiguous():
        raise ValueError("l2_prefetch takes contiguous tensors")
    return t.reshape(-1).view(torch.uint8)


def l2_prefetch_triton(*tensors: torch.Tensor) -> None:
    """Ask the L2 for every line of each tensor on the current stream (a launch for each two); returns
    at once."""
    for i in range(0, len(tensors), 2):
        _launch(*tensors[i:i + 2])


def _launch(a: torch.Tensor, b: torch.Tensor | None = None) -> None:
    a8 = _bytes(a)
    b8 = _bytes(b) if b is not None else a8[:0]
    device = a8.device
    programs = _programs(device.index if device.index is not None else torch.cuda.current_device())
    _l2_prefetch_kernel[(programs,)](a8, a8.numel(), b8 if b8.numel() else a8, b8.numel(), _sink(device),
                                     BLOCK=BLOCK, LINE=LINE, num_warps=BLOCK // 32)
