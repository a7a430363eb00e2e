"""Grouped-query attention, and two cases of it as torch ops: `localrun::decode_attention` (one
decoded token) and `localrun::causal_attention` (a prefill chunk's queries, causal by position).

`grouped_sdpa` is what every device computes for a block of queries, and `blocked_attention` how a
prefill chunk's queries go through it, a block of QUERY_BLOCK at a time. On CUDA the ops are
Triton kernels instead (imported on first use: a CPU-only install needs no Triton): one decoded
token through the split-key kernel (kernels/triton_attention.py), a prefill chunk through the flash
attention kernel (kernels/triton_prefill_attention.py), which the model takes where SDPA would fall
to its math backend (head dim above plan.FUSED_SDPA_MAX_HEAD_DIM); on every other device each op
computes what the model computes without it. A CUDA graph captures the ops and `torch.compile`
traces them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import kernels
from ..kvcache import attention_mask
from ..plan import QUERY_BLOCK


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


def blocked_attention(q_BNTD, k_BNSD, v_BNSD, pos_T, pos_S, window: int | None, masks: dict | None = None,
                      scale: float = 1.0):
    """The T new queries of a prefill chunk (T > 1) over the S keys of the cache's slice, the earlier
    positions followed by the T new ones (see models/gemma4.attend), in blocks of QUERY_BLOCK queries,
    each over the contiguous slice of keys that can be visible to it: a sliding layer's block reads
    ~window + block keys instead of all S, a full layer's block only the keys up to its last query.
    Masked keys weigh exactly 0, so the result is the same as one masked call over all S keys; the
    work is not. `masks` keeps each block's mask for the other layers of the same kind in this
    forward pass, which see the very same positions. In fp32 on the CPU a block with enough work
    goes through `kernels.prefill_attention` (oneDNN GEMMs, about twice SDPA's speed there), whose
    mask covers only the block's own new keys in a full layer."""
    T, S = q_BNTD.shape[2], k_BNSD.shape[2]
    old = S - T  # keys before the new ones
    outs = []
    for a in range(0, T, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, T)
        first = old + a - window + 1 if window is not None and a - window + 1 >= 0 else 0
        q, k, v = q_BNTD[:, :, a:b], k_BNSD[:, :, first : old + b], v_BNSD[:, :, first : old + b]
        cpu = kernels.prefill_attention_applies(q, k)  # fp32 CPU: oneDNN GEMMs, a mask over the last keys
        # a full layer's block sees every key up to its first query (a full cache holds no empty
        # slots): the CPU kernel masks only the block's later keys, not the whole history
        lo = old + a + 1 if cpu and window is None else first
        mask = None if masks is None else masks.get((window, a, lo))
        if mask is None:
            mask = attention_mask(pos_T[a:b], pos_S[lo : old + b], window)
            if masks is not None:
                masks[window, a, lo] = mask
        out = kernels.prefill_attention(q, k, v, mask, scale) if cpu else grouped_sdpa(q, k, v, mask, scale)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


@torch.library.custom_op("localrun::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_T: torch.Tensor, pos_S: torch.Tensor,
                     window: Optional[int], scale: float) -> torch.Tensor:
    """A prefill chunk's T queries q [B, N, T, D] over k, v [B, KV, S, D], the cache's slice (earlier
    positions, then the T new ones): a query at position i sees the key at j when 0 <= j <= i (and
    i - window < j with a sliding `window`), from pos_T [T] and pos_S [S]. CUDA: the Triton flash
    attention kernel, whole chunk in one launch; elsewhere `blocked_attention`, as the model
    computes it without the op."""
    return blocked_attention(q, k, v, pos_T, pos_S, window, None, scale)


@causal_attention.register_kernel("cuda")
def _(q, k, v, pos_T, pos_S, window, scale):
    from .triton_prefill_attention import causal_attention_triton

    return causal_attention_triton(q, k, v, pos_T, pos_S, window, scale)


@causal_attention.register_fake
def _(q, k, v, pos_T, pos_S, window, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
