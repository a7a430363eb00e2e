"""RMSNorm and RMSNorm + RoPE as torch ops, `localrun::rms_norm` and `localrun::rms_norm_rope`.

On CUDA each is one Triton kernel (kernels/triton_norm.py, imported on first use: a CPU-only
install needs no Triton); on every other device the torch formula, which is what the decoder
computes there. The decoder calls them for half-precision activations on CUDA, where they turn a
Gemma 4 layer's eleven norms (five to seven small kernels each) into eleven launches.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), x.shape[-1:], w, eps).to(x.dtype)


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            eps: float) -> torch.Tensor:
    n = F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps)
    return (n * cos.float() + n.roll(n.shape[-1] // 2, dims=-1) * sin.float()).to(x.dtype)


@torch.library.custom_op("localrun::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _(x, weight, eps):
    from .triton_norm import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("localrun::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """apply_rope(rms_norm(x) * weight) of [B, T, N, D] heads; cos/sin [T, 1, D], sin's first half negated."""
    return rms_norm_rope_reference(x, weight, cos, sin, eps)


@rms_norm_rope.register_kernel("cuda")
def _(x, weight, cos, sin, eps):
    from .triton_norm import rms_norm_rope_triton

    return rms_norm_rope_triton(x, weight, cos, sin, eps)


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
