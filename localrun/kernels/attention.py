"""Grouped-query attention, and the decode case as a torch op, `localrun::decode_attention`.

`grouped_sdpa` is what every device computes for a block of queries. One decoded token on CUDA
goes through `decode_attention` instead: there it is the split-key Triton kernel
(kernels/triton_attention.py, imported on first use: a CPU-only install needs no Triton), on every
other device `grouped_sdpa` itself. A CUDA graph captures the op and `torch.compile` traces it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def grouped_sdpa(q_BNTD, k_BNSD, v_BNSD, mask=None, scale: float = 1.0):
    """Attention (scale 1.0 unless given) with grouped-query heads, exactly and without `enable_gqa`: the G query
    heads that share one KV head become that head's query rows ([B, KV, G*T, D]; head h = kv*G + g,
    as transformers' repeat_kv pairs them), and the [T, S] mask is repeated G times. Every backend
    takes this (no K/V copied G-fold, as the math fallback of `enable_gqa` does), and head dim 512
    needs no GQA support from the fused kernels."""
    B, N, T, D = q_BNTD.shape
    KV = k_BNSD.shape[1]
    if KV == N:
        return F.scaled_dot_product_attention(q_BNTD, k_BNSD, v_BNSD, attn_mask=mask, scale=scale)
    G = N // KV
    if mask is not None and mask.shape[-2] != 1:
        mask = mask.repeat(G, 1)
    out = F.scaled_dot_product_attention(q_BNTD.reshape(B, KV, G * T, D), k_BNSD, v_BNSD, attn_mask=mask, scale=scale)
    return out.reshape(B, N, T, D)


@torch.library.custom_op("localrun::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """One query per head: q [B, N, 1, D] over k, v [B, KV, S, D], bool `visible` [1, S] (None: all)."""
    return grouped_sdpa(q, k, v, visible, scale)


@decode_attention.register_kernel("cuda")
def _(q, k, v, visible, scale):
    from .triton_attention import decode_attention_triton

    return decode_attention_triton(q, k, v, visible, scale)


@decode_attention.register_fake
def _(q, k, v, visible, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
