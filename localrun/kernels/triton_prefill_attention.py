"""Causal attention of a prefill chunk's queries over their keys (flash attention), in Triton.

SDPA's fused CUDA backends (flash, memory-efficient, cuDNN) refuse a head dim above 256, so Gemma 4's
full layers (D = 512) fall to its math backend: fp32 copies of K and V and fp32 scores of every
query over every key, ~18 KiB a key of context for 26B-A4B, and a few passes over them. This kernel
keeps nothing per key: each program walks its keys in blocks with an online softmax (running max m,
sum l and unnormalised output acc in fp32) and writes only its output rows.

  rows     the G query heads sharing a KV head and their queries are one KV head's rows, query-major
           (row r: query r // G, head kv * G + r % G), so a block of BLOCK_M rows reads each key
           tile once for all its G heads, and covers BLOCK_M / G consecutive queries: the keys it
           may see end at its last query's own key;
  keys     the cache's slice, as `attend` gets it: the earlier keys (in any order), then the T new
           ones in position order. A program reads up to its last query's own key, and from key 0,
           or in a sliding layer whose first query's window starts among the new keys, from there
           (`blocked_attention`'s slices); within that, visibility is `kvcache.attention_mask`'s,
           from the positions themselves (pos_S <= pos_T, pos_S >= 0, and pos_T - window < pos_S
           when sliding), so empty (-1) and stale ring slots weigh 0;
  head dim each program computes the output columns [dv, dv + BLOCK_DV) of its rows, and the scores
           over all of D in a loop of BLOCK_DK-wide chunks (query chunks read again per key block,
           from L1/L2): a [BLOCK_M, 512] fp32 accumulator beside whole query and key rows would not
           fit a consumer GPU block's registers and 99 KiB of shared memory (RTX 3090 / 4090), and a
           loop over D, not an unrolled one, keeps one chunk's tiles in shared memory, not all of
           them. The scores are computed once per output slice (D / BLOCK_DV times): FLOPs, not
           memory; scripts/gpu_check.py times the tiles of TILE_CHOICES against each other.

Half precision multiplies on the tensor cores in the input dtype (q k^T, and the probabilities
rounded to it for the product with v, as FlashAttention does) with fp32 accumulation and softmax;
fp32 inputs use IEEE fp32 products (no TF32), so fp32 matches the reference up to summation order.
Backs the CUDA kernel of the torch op `localrun::causal_attention` (kernels/attention.py).
Set TRITON_INTERPRET=1 before importing triton to run on CPU tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * log2 e): the scale takes the factor, the loop calls exp2


@triton.jit
def _scores(q_rows, k_ptr, s, s_ok, row_ok, D, qk_scale, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr):
    """q k^T * qk_scale of a row block ([BLOCK_M] pointers to its query rows) over the keys at offsets
    `s` ([BLOCK_N]) from k_ptr, the head dim in chunks of BLOCK_DK (a loop: one chunk's tiles live at
    a time; the query chunks are read again per key block, from L1/L2)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, BLOCK_D, BLOCK_DK):
        d = d0 + tl.arange(0, BLOCK_DK)
        d_ok = d < D
        q = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptr + s[None, :] + d[:, None], mask=s_ok[None, :] & d_ok[:, None], other=0.0)  # [DK, N]
        acc = _mma(q, k, acc, PRECISION, WIDEN)
    return acc * qk_scale


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """acc + a @ b. WIDEN (the interpreter, half-precision inputs): multiply as fp32, since the
    interpreter's dot multiplies bf16 as the integers holding its bits; the products are exact either
    way (a bf16 x bf16 product fits fp32) and the sums fp32, as the tensor cores compute them."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _causal_attention_kernel(q_ptr, k_ptr, v_ptr, pos_t_ptr, pos_s_ptr, out_ptr,
                             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                             stride_vb, stride_vh, stride_vs, T, S, KV, D, G, window, qk_scale,
                             SLIDING: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    row_blocks = tl.num_programs(0)
    m0 = (row_blocks - 1 - tl.program_id(0)) * BLOCK_M  # the last queries see the most keys: start them first
    bkv = tl.program_id(1)
    b = (bkv // KV).to(tl.int64)  # b * stride_kb passes 2^31 elements where a batch of long caches does
    kv = bkv % KV
    dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    r = m0 + tl.arange(0, BLOCK_M)
    t = r // G
    row_ok = t < T
    head = kv * G + r % G
    q_rows = q_ptr + b * stride_qb + head * stride_qh + t * stride_qt
    q_pos = tl.load(pos_t_ptr + t, mask=row_ok, other=-1)
    # keys this block may see (`attend`'s cache slice: `old` earlier keys, then the new ones in order)
    old = S - T
    t_first = m0 // G
    t_last = tl.minimum((m0 + BLOCK_M - 1) // G, T - 1)
    hi = tl.minimum(old + t_last + 1, S)
    lo = 0  # `attend`'s block rule: the earlier keys (any order: a ring's) are read whole ...
    if SLIDING:
        if t_first - window + 1 >= 0:  # ... unless the first query's window starts among the new keys
            lo = old + t_first - window + 1
    k_base = k_ptr + b * stride_kb + kv * stride_kh
    v_base = v_ptr + b * stride_vb + kv * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s0 in range(lo, hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        scores = _scores(q_rows, k_base, s * stride_ks, s_ok, row_ok, D, qk_scale, PRECISION, WIDEN,
                         BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK)
        k_pos = tl.load(pos_s_ptr + s, mask=s_ok, other=-1)
        visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])  # kvcache.attention_mask
        if SLIDING:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + s[:, None] * stride_vs + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, WIDEN)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that sees no key (none in `attend`): 0
    out_rows = out_ptr + ((b * KV * G + head) * T + t) * D  # [B, N, T, D], contiguous
    tl.store(out_rows[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


def interpreted() -> bool:
    """Whether the kernel runs under TRITON_INTERPRET=1 (on CPU tensors)."""
    return _causal_attention_kernel.__class__.__name__ == "InterpretedFunction"


class Tiles(NamedTuple):
    """One launch's tile: rows (query heads x queries) and keys a step, the head dim's chunk for the
    scores and its slice for the output, warps and pipeline stages."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_DK: int
    BLOCK_DV: int
    num_warps: int
    num_stages: int


# Every tile here fits 99 KiB of shared memory a block (RTX 3090 / 4090; an H100 has 227 KiB) at
# D = 512, at sm_89 and sm_90 under Triton 3.6 and 3.9, without spilling (scripts/sass_stats.py
# --compile-only lists their bytes; tests/test_sass_stats.py holds them to it). Half precision at
# D = 512, bf16: 40 KiB and ~185 registers a thread at sm_90 (wgmma), 40 KiB and ~210 at sm_89.
HALF_TILES = Tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=256, num_warps=8, num_stages=2)
# sm_90 and later (H100, H200): the whole head dim a program, no score computed twice: on an H200 512
# queries of a 26B-A4B full layer after 8,192 keys took 1,267 us against HALF_TILES' 2,047 and 1,322 at
# 128 rows x dv 256 (docs/gpu/2026-11-27-h200-kernels-offload.md). Below sm_90 (an RTX 4090) its
# accumulator takes every register and ptxas keeps 104-120 bytes of stack a thread, not measured there.
HOPPER_HALF_TILES = Tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_DK=64, BLOCK_DV=512, num_warps=8, num_stages=2)
FP32_TILES = Tiles(BLOCK_M=32, BLOCK_N=32, BLOCK_DK=32, BLOCK_DV=128, num_warps=4, num_stages=1)
# What scripts/gpu_check.py times against each other: the two defaults, taller row blocks, shorter key
# blocks, a deeper pipeline.
TILE_CHOICES = {
    "m64 n64 dk64 dv512 w8 s2 (default from sm_90)": HOPPER_HALF_TILES,
    "m64 n64 dk64 dv256 w8 s2 (default below)": HALF_TILES,
    "m128 n64 dk64 dv256 w8 s2": Tiles(128, 64, 64, 256, 8, 2),
    "m128 n64 dk64 dv128 w8 s2": Tiles(128, 64, 64, 128, 8, 2),
    "m64 n32 dk64 dv256 w4 s2": Tiles(64, 32, 64, 256, 4, 2),
    "m64 n64 dk128 dv256 w8 s3": Tiles(64, 64, 128, 256, 8, 3),
}


def tiles_for(D: int, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> Tiles:
    """The launch's tile for head dim D on an NVIDIA GPU of this compute capability (None: another device,
    the interpreter): FP32_TILES, or half precision's HOPPER_HALF_TILES from sm_90, else HALF_TILES; each
    chunk no wider than D needs."""
    hopper = capability is not None and capability >= (9, 0)
    t = FP32_TILES if dtype == torch.float32 else HOPPER_HALF_TILES if hopper else HALF_TILES
    block_d = max(16, triton.next_power_of_2(D))
    return t._replace(BLOCK_DK=min(t.BLOCK_DK, block_d), BLOCK_DV=min(t.BLOCK_DV, block_d))


def causal_attention_triton(q_BNTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, pos_T: torch.Tensor,
                            pos_S: torch.Tensor, window: int | None, scale: float,
                            tiles: Tiles | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, causal by position) v for the T new queries of `attend` over the S keys
    of the cache's slice (the earlier positions, then the T new ones), GQA with head h reading KV head
    h // G. q [B, N, T, D]; k, v [B, KV, S, D] (views of a larger cache are fine: only the last dim
    must be contiguous); pos_T [T], pos_S [S] integer positions (-1: an empty slot); window: a
    sliding layer's, else None. The output [B, N, T, D] in q's dtype is all this allocates."""
    B, N, T, D = q_BNTD.shape
    KV, S = k_BKSD.shape[1], k_BKSD.shape[2]
    assert N % KV == 0 and S >= T and pos_T.shape == (T,) and pos_S.shape == (S,), (q_BNTD.shape, k_BKSD.shape)
    G = N // KV
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_BNTD, k_BKSD, v_BKSD))
    nvidia = q.device.type == "cuda" and torch.version.hip is None
    capability = torch.cuda.get_device_capability(q.device) if nvidia else None
    tiles = tiles or tiles_for(D, q.dtype, capability)
    out = torch.empty(B, N, T, D, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(T * G, tiles.BLOCK_M), B * KV, triton.cdiv(D, tiles.BLOCK_DV))
    _causal_attention_kernel[grid](
        q, k, v, pos_T, pos_S, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), T, S, KV, D, G, 0 if window is None else window, scale * LOG2E,
        SLIDING=window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WIDEN=interpreted() and q.dtype != torch.float32,
        BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DK=tiles.BLOCK_DK, BLOCK_DV=tiles.BLOCK_DV, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
