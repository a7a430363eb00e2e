"""The projections of a decoded token as a torch op, `localrun::gemv`: F.linear(x, weight, bias)
for x of at most 4 rows.

On CUDA it is one Triton GEMV launch (kernels/triton_gemv.py, imported on first use: a CPU-only
install needs no Triton) where cuBLAS runs a split-K GEMM plus a reduce kernel; on every other
device it is F.linear. The Gemma 4 decoder routes its projections here when
`models.gemma4.DECODE_KERNELS["dense_gemv"]` is on and `applies` says so; a CUDA graph captures
the op and `torch.compile` traces it (fake implementation below).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MAX_ROWS = 4  # triton_gemv.MAX_ROWS: x rows the kernel takes in one call
MIN_N, MAX_N = 1, 65536  # output rows routed: lm_head (262,144) stays with cuBLAS, already at copy bandwidth
# x rows `applies` routes to the kernel: on an H200 cuBLAS was the faster from two rows (the decode step's
# MLP gate/up + router GEMM, 2 x 4,352 x 2,816: 8.9 us vs 10.4; 4 rows at the q/k/v shape: 13.9 vs 25.7),
# the kernel from one (docs/gpu/2026-11-27-h200-kernels-offload.md, `gemv *` rows)
ROUTED_ROWS = 1
DEVICE_TYPES = ("cuda",)  # where `applies` routes (tests add "cpu" to run the routing under the interpreter)
HALF = (torch.bfloat16, torch.float16)


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel takes these arguments: half-precision x [..., K] of 1..MAX_ROWS rows, a 2-D
    contiguous weight [N, K] of x's dtype with MIN_N <= N <= MAX_N, a bias [N] or none."""
    if (x.dim() == 0 or x.dtype not in HALF or weight.dtype != x.dtype or weight.dim() != 2
            or not weight.is_contiguous()):
        return False
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K or K == 0 or not MIN_N <= N <= MAX_N:
        return False
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        return False
    return 1 <= x.numel() // K <= MAX_ROWS


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether inference activations x take localrun::gemv (a device in DEVICE_TYPES, at most ROUTED_ROWS
    rows, and `fits`)."""
    return (x.device.type in DEVICE_TYPES and not torch.is_grad_enabled() and fits(x, weight, bias)
            and x.numel() // x.shape[-1] <= ROUTED_ROWS)


@torch.library.custom_op("localrun::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias); one Triton launch on CUDA for what `fits`."""
    return F.linear(x, weight, bias)


@gemv.register_kernel("cuda")
def _(x, weight, bias):
    if not fits(x, weight, bias):
        return F.linear(x, weight, bias)
    from .triton_gemv import gemv_triton

    return gemv_triton(x, weight, bias)


@gemv.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
