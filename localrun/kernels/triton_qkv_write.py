"""A decoded token's q/k/v path in one Triton launch: RMSNorm + RoPE of the q heads (returned),
RMSNorm + RoPE of the k heads, RMSNorm of the v heads, both stored into the cache at slot
pos % size, and for a sliding layer's ring the position into its slot table (what
kernels/triton_norm.py's three kernels and three index_copy_ did).

One program per kv head, then one per query head (grid KV + N). The position is read from device
memory, so the launch has the same arguments every token and a CUDA graph replays it. The
arithmetic is triton_norm's, in the same order (fp32 inside, one rounding to the output's dtype),
so q and the cache hold what the unfused kernels wrote. It backs the torch op `localrun::qkv_write`
(kernels/qkv_write.py). Set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_pdl
from .triton_pdl import pdl_start

from .triton_norm import head_weights, norm_rope_head


@triton.jit
def _qkv_write_kernel(q_ptr, qw_ptr, q_out_ptr, k_ptr, v_ptr, w_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, ring_ptr,
                      pos_ptr, KV, stride_qh, stride_kh, stride_vh, stride_kch, stride_kcs, stride_vch, stride_vcs,
                      size, D, eps, NORM_V: tl.constexpr, HAS_RING: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = False):
    h = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    # the head's norm weight (q_norm's or k_norm's): before PDL's wait (kernels/triton_pdl.py's prologue)
    w, wp = head_weights(tl.where(h >= KV, qw_ptr, w_ptr), cols, mask, D)
    pdl_start(PDL)
    if h >= KV:  # a query head: n = rms_norm(x) * w, then n * cos + roll(n, D/2) * sin
        n = h - KV
        q = norm_rope_head(q_ptr + n * stride_qh, w, wp, cos_ptr, sin_ptr, cols, mask, D, eps)
        tl.store(q_out_ptr + n * D + cols, q.to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        pos = tl.load(pos_ptr)
        slot = pos % size
        # k: as q, with k_norm's weight
        k = norm_rope_head(k_ptr + h * stride_kh, w, wp, cos_ptr, sin_ptr, cols, mask, D, eps)
        tl.store(kc_ptr + h * stride_kch + slot * stride_kcs + cols, k.to(kc_ptr.dtype.element_ty), mask=mask)
        # v: weightless RMSNorm (or the heads as they are)
        v = tl.load(v_ptr + h * stride_vh + cols, mask=mask, other=0.0).to(tl.float32)
        if NORM_V:
            v = v * (1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps))
        tl.store(vc_ptr + h * stride_vch + slot * stride_vcs + cols, v.to(vc_ptr.dtype.element_ty), mask=mask)
        if HAS_RING:  # one program writes the slot's position
            tl.store(ring_ptr + slot, pos, mask=h == 0)


def num_warps(D: int) -> int:
    """The decode attention kernel's warps at head dim D (triton_attention.decode_attention_triton): a
    head's norm sums its squares in the same order in both, so the fused q/k/v write and attention
    (triton_attention.qkv_attention_triton) computes this kernel's very q, k and v."""
    from .triton_attention import warps_for

    return warps_for(D)


def one_token_heads(x_11ND: torch.Tensor, op: str = "qkv_write") -> torch.Tensor:
    """One token's heads [1, 1, heads, D] with a contiguous head dim (heads may be strided)."""
    if x_11ND.dim() != 4 or x_11ND.shape[:2] != (1, 1):
        raise ValueError(f"{op} takes one token's heads [1, 1, heads, D], not {list(x_11ND.shape)}")
    return x_11ND if x_11ND.stride(-1) == 1 else x_11ND.contiguous()


def qkv_write_triton(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps: float, k_cache, v_cache, ring_pos,
                     pos_1, size: int, norm_v: bool = True) -> torch.Tensor:
    """kernels/qkv_write.py's `qkv_write`: raw_q [1, 1, N, D], raw_k, raw_v [1, 1, KV, D] (strided
    heads welcome), cos/sin [1, 1, D], k_cache, v_cache [1, KV, S, D] with a contiguous head dim,
    ring_pos [S] or None. Returns q [1, 1, N, D]."""
    raw_q, raw_k, raw_v = one_token_heads(raw_q), one_token_heads(raw_k), one_token_heads(raw_v)
    N, D = raw_q.shape[2:]
    KV = raw_k.shape[2]
    if raw_k.shape[3] != D or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("qkv_write takes q and k heads of one size and caches whose head dim is contiguous")
    cos, sin = cos.reshape(D).contiguous(), sin.reshape(D).contiguous()
    q = torch.empty(1, 1, N, D, dtype=raw_q.dtype, device=raw_q.device)
    ring = ring_pos if ring_pos is not None else pos_1  # any pointer; unused without a ring
    _qkv_write_kernel[(KV + N,)](raw_q, q_weight, q, raw_k, raw_v, k_weight, cos, sin, k_cache, v_cache, ring, pos_1,
                                 KV, raw_q.stride(2), raw_k.stride(2), raw_v.stride(2), k_cache.stride(1),
                                 k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), size, D, eps,
                                 NORM_V=norm_v, HAS_RING=ring_pos is not None, BLOCK=triton.next_power_of_2(D),
                                 num_warps=num_warps(D),
                                 **triton_pdl.launch(raw_q.device))
    return q
