"""Programmatic dependent launch (PDL, Hopper and later) for the CUDA decode step's Triton kernels.

In a CUDA graph each of a decoded token's ~400 launches still waits for the one before it to end
before its programs are placed on the SMs: a microsecond or two a launch, for kernels that mostly
run a few microseconds. A kernel launched with PDL may be placed while the one before it finishes;
its programs then wait (`griddepcontrol.wait`) until that kernel has ended and its writes are
visible, before they touch what it wrote. Every kernel here calls `pdl_start(PDL)`: the wait, then
the signal that lets the next one be placed (given once all of this kernel's programs have started,
so the next kernel never takes an SM a program of this one still needs). Everything after it is as
ordered as without PDL, whatever kernel (cuBLAS, torch) comes between: a kernel launched without
PDL is placed after the one before it ends, as always.

What may come before `pdl_start` (a kernel's prologue): loads of data no kernel of the decode step
writes, so that their memory latency overlaps the kernel before instead of adding to the chain: a
projection's weights (the GEMV's first tile and its bias), norm weight vectors, the layer scalar,
the RoPE inverse frequencies; and arithmetic on program ids and arguments. Never before it: a read
of anything a kernel of the step may have written (activations, the residual stream, the KV cache
and ring positions, expert ids and weights, router logits, cos / sin rows, the token and position
copied into the graph's inputs, expert rows copied in from host memory), nor any write (the kernel
before may still read what it would overwrite). A prologue pointer must be the caller's tensor
itself: a launcher that had to copy or convert it (`.contiguous()`, `.float()`) made that copy in
the step, so it launches without PDL. The attention kernels have none (what they read first is the
step's: the cache). The MoE kernels' is of another kind, opt-in (`triton_moe.EARLY_LOADS`): the first
step of expert rows at the ids as they stand before the wait, read again after it and requested again
where they were another token's. tests/test_triton_pdl.py names each kernel's prologue
pointers (no other may come first), and tests/test_sass_stats.py checks in the sm_90 SASS that the
prologues' loads are issued before the wait, and no load or write of a kernel without one. The
signal stays right after the wait: one kernel placed ahead, as measured; wherever it stood, the next
kernel is placed only once every program of this one has issued it, so a kernel of more programs
than one wave never loses SMs to the next one's waiting programs.

Only while a decode step is captured as CUDA graphs, its warm-up included (`in_graphs`, set by
step._capture_once): that is where the gaps it hides are the step's; a prefill's kernels, launched
one by one from Python, keep their plain launches. Opt-in (`ENABLED`) until scripts/gpu_check.py
shows it pays (`speed_graphs_with_pdl`: +12% decode on an H200 on its own, the same tokens); only
on compute capability 9.0 and later (sm_90: H100, H200; sm_100, sm_120), never under the interpreter.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = False
_graphs = 0  # how many in_graphs() blocks are open


@contextlib.contextmanager
def in_graphs():
    """Within: a decode step's CUDA-graph capture (and the warm-up before it), where kernels take PDL."""
    global _graphs
    _graphs += 1
    try:
        yield
    finally:
        _graphs -= 1


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """With PDL, wait for the kernel before (its writes visible), then let the next one be placed: a
    kernel's first statement, or the first after its prologue's loads of step constants."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or later (ROCm reports its GPUs as "cuda" devices too)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def launch(device: torch.device) -> dict:
    """Launch keywords for a kernel with a `PDL` constexpr: PDL on where ENABLED, inside `in_graphs`,
    and the device has it."""
    if not ENABLED or not _graphs or device.type != "cuda" or pdl_start.__class__.__name__ == "InterpretedFunction":
        return {}
    if not _supported(device.index if device.index is not None else torch.cuda.current_device()):
        return {}
    return {"PDL": True, "launch_pdl": True}
