"""A decoded token's q, k and v past their projection as one torch op, `localrun::qkv_write`.

The static decode step (localrun/step.py) writes each layer's new K/V at a device position. Unfused,
on CUDA that is five or six launches a layer: the q heads' RMSNorm + RoPE, the k heads' RMSNorm +
RoPE, the v heads' RMSNorm, an index_copy_ for each buffer, and for a sliding layer's ring one more
for its positions. The op does it all in one and returns the q heads: on CUDA the Triton kernel of
kernels/triton_qkv_write.py (imported on first use: a CPU-only install needs no Triton), on every
other device the formula below, which is the unfused ops' (kernels/norm.py's formulas, then
index_copy_). Both compute in fp32 and round once to the output's dtype. It reads the position
from device memory only, so a CUDA graph captures it and torch.compile(fullgraph=True) traces it
(its mutations declared).

`localrun::qkv_attention` (opt-in, models/gemma4.DECODE_KERNELS["fused_qkv_attention"]) is the op
and `localrun::decode_attention` after it as one: on CUDA one launch of the split-key decode kernel
whose programs each norm and rope their query heads and whose split holding the new slot writes it
(kernels/triton_attention.py's `_qkv_attention_kernel`, the same bits as the two kernels); elsewhere
`qkv_attention_reference`, what the two ops compute there.

Shape letters: N query heads, KV kv heads, S cache slots, D head dim.
"""

from __future__ import annotations

from typing import Optional

import torch

from .norm import rms_norm_reference, rms_norm_rope_reference


def qkv_write_reference(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps: float, k_cache, v_cache, ring_pos,
                        pos_1, size: int, norm_v: bool = True) -> torch.Tensor:
    """What the decoder's unfused ops compute: q = rope(rms_norm(raw_q) * q_weight), returned in
    raw_q's dtype; k = rope(rms_norm(raw_k) * k_weight), v = rms_norm(raw_v) (or raw_v as it is when
    not norm_v), in fp32, rounded once to the cache's dtype, into slot pos % size; for a ring also
    pos into ring_pos[slot]."""
    q = rms_norm_rope_reference(raw_q, q_weight, cos, sin, eps)
    slot = pos_1 % size
    k = rms_norm_rope_reference(raw_k.float(), k_weight, cos, sin, eps)
    v = rms_norm_reference(raw_v.float(), None, eps) if norm_v else raw_v
    k_cache.index_copy_(2, slot, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, slot, v.transpose(1, 2).to(v_cache.dtype))
    if ring_pos is not None:
        ring_pos.index_copy_(0, slot, pos_1)
    return q.contiguous()


@torch.library.custom_op("localrun::qkv_write", mutates_args=("k_cache", "v_cache", "ring_pos"))
def qkv_write(raw_q: torch.Tensor, q_weight: torch.Tensor, raw_k: torch.Tensor, raw_v: torch.Tensor,
              k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, k_cache: torch.Tensor,
              v_cache: torch.Tensor, ring_pos: Optional[torch.Tensor], pos_1: torch.Tensor, size: int,
              norm_v: bool) -> torch.Tensor:
    """One token's heads: raw_q [1, 1, N, D], raw_k, raw_v [1, 1, KV, D] (views of the fused q/k/v
    projection; raw_k and raw_v the same tensor where a layer's keys are its values), q_norm's and
    k_norm's weights [D], cos/sin [1, 1, D] as Gemma4Model.rope makes them (sin's first half
    negated), the buffers k_cache, v_cache [1, KV, S, D], a ring's positions ring_pos [S] (None: a
    full layer), the position pos_1 [1] (int64, on the device), and `size`, the ring's slots (a full
    layer: its capacity). norm_v: v is RMS-normed (Gemma 4) or written as it is (Qwen3).
    Returns the q heads normed and RoPE'd, [1, 1, N, D] contiguous."""
    return qkv_write_reference(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos,
                               pos_1, size, norm_v)


@qkv_write.register_kernel("cuda")
def _(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos, pos_1, size, norm_v):
    from .triton_qkv_write import qkv_write_triton

    return qkv_write_triton(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos,
                            pos_1, size, norm_v)


@qkv_write.register_fake
def _(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos, pos_1, size, norm_v):
    return torch.empty(raw_q.shape, dtype=raw_q.dtype, device=raw_q.device)


def qkv_attention_reference(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps: float, k_cache, v_cache,
                            ring_pos, pos_1, size: int, norm_v: bool, keys: int, visible, scale: float) -> torch.Tensor:
    """qkv_write_reference, then the decoded token's attention over the first `keys` slots as
    models/gemma4.attend computes it on this device (the C kernel where it applies, else grouped_sdpa)."""
    from .. import kernels
    from .attention import grouped_sdpa

    q = qkv_write_reference(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos, pos_1,
                            size, norm_v).transpose(1, 2)
    k, v = k_cache[:, :, :keys], v_cache[:, :, :keys]
    out = kernels.decode_attention(q, k, v, visible, scale)
    return out if out is not None else grouped_sdpa(q, k, v, visible, scale)


@torch.library.custom_op("localrun::qkv_attention", mutates_args=("k_cache", "v_cache", "ring_pos"))
def qkv_attention(raw_q: torch.Tensor, q_weight: torch.Tensor, raw_k: torch.Tensor, raw_v: torch.Tensor,
                  k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, ring_pos: Optional[torch.Tensor], pos_1: torch.Tensor, size: int, norm_v: bool,
                  keys: int, visible: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """`qkv_write` (the same arguments, up to norm_v), then the token's attention over the first `keys`
    slots of the caches under `visible` [1, keys] (None: all), which must show the written slot as
    visible (the caller builds it before the write). Returns [1, N, 1, D] in raw_q's dtype."""
    return qkv_attention_reference(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos,
                                   pos_1, size, norm_v, keys, visible, scale)


@qkv_attention.register_kernel("cuda")
def _(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos, pos_1, size, norm_v, keys,
      visible, scale):
    from .triton_attention import qkv_attention_triton

    return qkv_attention_triton(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos,
                                pos_1, size, norm_v, keys, visible, scale)


@qkv_attention.register_fake
def _(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps, k_cache, v_cache, ring_pos, pos_1, size, norm_v, keys,
      visible, scale):
    N, D = raw_q.shape[2:]
    return torch.empty(1, N, 1, D, dtype=raw_q.dtype, device=raw_q.device)
