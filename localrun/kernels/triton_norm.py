"""RMSNorm, and RMSNorm + RoPE of attention heads, as one Triton kernel each: the CUDA decode step's
norms in one launch apiece (the plain torch formula takes five to seven small kernels per norm, and
a Gemma 4 layer has eleven norms).

Both compute in fp32 and round once to the input's dtype. They back the torch ops
`localrun::rms_norm` and `localrun::rms_norm_rope` (CUDA: these kernels; every other device: the
torch formula, what `models.gemma4` computes there), which a CUDA graph captures and
`torch.compile` traces. Set TRITON_INTERPRET=1 before importing triton to run them on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_pdl
from .triton_pdl import pdl_start


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, D, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    if HAS_WEIGHT:  # the norm's weight: before PDL's wait (kernels/triton_pdl.py's prologue)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_start(PDL)
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * inv
    if HAS_WEIGHT:
        y = y * w
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_t, stride_h, D, eps,
                          BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """One head of one token: y = n * cos + roll(n, D/2) * sin with n = rms_norm(x) * w (sin's first
    half carries rotate_half's sign, as Gemma4Model.rope builds it)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w, wp = head_weights(w_ptr, cols, mask, D)  # before PDL's wait (kernels/triton_pdl.py's prologue)
    pdl_start(PDL)
    row = tl.program_id(0)
    t = row // heads
    h = row % heads
    y = norm_rope_head(x_ptr + t * stride_t + h * stride_h, w, wp, cos_ptr + t * D, sin_ptr + t * D, cols, mask, D,
                       eps)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _partner(cols, D):
    """Each column's rotate_half partner: the other half's column at the same offset."""
    half = D // 2
    return tl.where(cols < half, cols + half, cols - half)


@triton.jit
def head_weights(w_ptr, cols, mask, D):
    """A head norm's weight [D] at its columns and at their partners', fp32 (norm_rope_head's w, wp)."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + _partner(cols, D), mask=mask, other=0.0).to(tl.float32)
    return w, wp


@triton.jit
def norm_rope_head(x_ptr, w, wp, cos_ptr, sin_ptr, cols, mask, D, eps):
    """fp32 [BLOCK] n * cos + roll(n, D/2) * sin of one head at x_ptr, n = rms_norm(x) * w (also the
    q/k/v write kernel's q and k, kernels/triton_qkv_write.py); w, wp: head_weights of the norm."""
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    xp = tl.load(x_ptr + _partner(cols, D), mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (x * inv * w) * cos + (xp * inv * wp) * sin


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (rows may be strided; the last dim contiguous)."""
    D = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.reshape(-1, D) if x.is_contiguous() else x.contiguous().view(-1, D)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = weight if weight is not None else rows  # any pointer; unused without a weight
    _rms_norm_kernel[(rows.shape[0],)](rows, w, out, rows.stride(0), D, eps, HAS_WEIGHT=weight is not None,
                                       BLOCK=triton.next_power_of_2(D), **triton_pdl.launch(x.device))
    return out


def rms_norm_rope_triton(x_BTND: torch.Tensor, weight: torch.Tensor, cos_T1D: torch.Tensor, sin_T1D: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """apply_rope(rms_norm(x) * weight, cos, sin) of [B, T, N, D] heads; tokens and heads may be strided
    (views of a fused q/k/v projection), the head dim contiguous. cos/sin are [T, 1, D]."""
    B, T, N, D = x_BTND.shape
    if x_BTND.stride(-1) != 1 or B != 1 and x_BTND.stride(0) != T * x_BTND.stride(1):
        x_BTND = x_BTND.contiguous()
    out = torch.empty(B, T, N, D, dtype=x_BTND.dtype, device=x_BTND.device)
    cos = cos_T1D.reshape(T, D).contiguous()
    sin = sin_T1D.reshape(T, D).contiguous()
    if B != 1:  # tokens of every batch row: the kernel indexes cos/sin by token, so repeat them
        cos, sin = cos.repeat(B, 1), sin.repeat(B, 1)
    _rms_norm_rope_kernel[(B * T * N,)](x_BTND, weight, cos, sin, out, N, x_BTND.stride(1), x_BTND.stride(2), D, eps,
                                        BLOCK=triton.next_power_of_2(D), **triton_pdl.launch(x_BTND.device))
    return out
