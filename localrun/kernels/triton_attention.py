"""Attention of one new token over a KV cache, split over the keys (flash decoding), in Triton.

A decoded token has one query row per head. A fused prefill kernel (cuDNN's, FlashAttention's)
tiles queries in blocks of 64 and runs one program per (batch, KV head): for Gemma 4 26B-A4B that
is 2 to 8 programs on a 132-SM GPU, each walking all of the layer's keys, ~70 us a layer on an
H200 where the bytes take ~3 us. Here the keys of each KV head are cut into splits, one program
per (batch, KV head, split), and a second kernel combines the splits:

  partial  each program takes the G query heads that share its KV head as the rows of one
           [G, D] tile (padded to 16 rows for tl.dot), walks its keys in blocks with an online
           softmax, and writes its running max m, sum l and unnormalised output acc (fp32);
  combine  out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, a few heads' partial rows in
           one tile (a head's combine waits on memory about once, not once a split).

Opt-in (COMBINE_IN_PLACE_MAX above 0), the combine needs no launch of its own where the partial rows
of a KV head are few: each partial program counts itself done on its (batch, KV head)'s counter (an
atomic add, release/acquire at GPU scope, after a barrier that orders its threads' stores before it),
and the program that comes last combines the G heads and resets the counter. One launch a layer fewer,
the same arithmetic in the same order, but slower on an H200: the last program's combine waits behind
the counter (in CUDA graphs, with both launches: 8.9 vs 8.6 us at 256 sliding keys, 14.2 vs 12.5 at
1,536, 12.8 vs 9.6 at 256 full-layer keys; docs/gpu/2026-11-27-h200-kernels-offload.md).

`_qkv_attention_kernel` (opt-in, `localrun::qkv_attention`) is the partial kernel of one token with
kernels/triton_qkv_write.py's work in front of its keys: each program norms and ropes its G query
heads itself (qkv_write's helper, at the same warps: the same bits), and the program whose split
holds the new slot writes the new key, value and ring position, then passes a barrier before its
loads (no other program reads the slot). The same loop and combine follow: one launch a layer fewer.

Masked keys (a bool `visible` row shared by the batch, as the static decode step and `attend`
build it) weigh exactly 0. fp32 inputs use IEEE fp32 products (no TF32), so the result is the
reference's up to summation order. Half-precision inputs are widened to fp32 and multiplied as TF32,
whose 10-bit mantissa holds a bf16 value exactly: exact products of q and k, fp32 sums, and the
probabilities rounded to 10 bits for the product with v (the fused kernels round them to bf16). Backs the torch op `localrun::decode_attention` (kernels/attention.py).
Set TRITON_INTERPRET=1 before importing triton to run on CPU tensors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import counters, triton_pdl
from .triton_norm import head_weights, norm_rope_head
from .triton_pdl import pdl_start
from .triton_prefetch import LINE, inline_ptx, prefetch_l1

MAX_SPLITS = 64  # programs per (batch, KV head); the combine loop reads this many partial rows at most


# Pipeline stages of the partial kernel: one. Triton's default (3) pipelines the K and V tiles where
# they feed tl.dot as loaded (fp32): 143 KiB of shared memory a block at D = 128, 283-297 KiB at
# 256-512, past the 99 KiB of an RTX 3090 / 4090 and at D >= 256 past an H100's 227 KiB (out of
# resources at the first decoded token). Half precision is widened first and never pipelined: its
# cubin is the same at 1 and 3 stages (sm_90, Triton 3.9). tests/test_sass_stats.py holds the launch to 99 KiB.
PARTIAL_STAGES = 1

COMBINE_IN_PLACE_MAX = 0  # partial elements (splits x G x D) the last program combines itself at most (0: never)

# Opt-in (scripts/gpu_check.py's decode A/B: `with_attention_prefetch`), CUDA only (inline PTX): right after its
# wait each `_qkv_attention_kernel` program asks its SM's L1 for every line it reads first (`prefetch_l1`):
# its KV head's G raw query rows, the raw key and value rows, and its split's first key and value tiles. In
# the compiled kernel the query heads' loop waits on memory once a head (its row sum's barriers keep the next
# head's load behind them: an L2 round trip each, 8 a full layer of 26B-A4B), and the first key tile is read
# only after all of them; with the lines already on their way, the loop's loads hit the L1 and the keys'
# latency overlaps the heads' arithmetic. No arithmetic changes: the same bits.
L1_PREFETCH = False
_LINE = tl.constexpr(LINE)  # bytes of a cache line: one prefetch each


@triton.jit
def _prefetch_rows(base, stride, rows, D, sink, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Every line of `rows` rows of D elements at base + r * stride asked of the L1 ([BLOCK_R, lines]
    prefetches; rows and lines past the end repeat the first line, a prefetch of a line already asked for).
    The asm's zeros are stored at `sink` under a mask that is never true: no prefetch is dead code, and no
    reduction (a barrier) keeps them."""
    PER_LINE: tl.constexpr = _LINE * 8 // base.dtype.element_ty.primitive_bitwidth  # elements a line
    LINES: tl.constexpr = (BLOCK_D + PER_LINE - 1) // PER_LINE
    r = tl.arange(0, BLOCK_R)[:, None]
    j = tl.arange(0, LINES)[None, :] * PER_LINE
    ok = (r < rows) & (j < D)
    address = tl.where(ok, base + r.to(tl.int64) * stride + j, base)
    zeros = prefetch_l1(tl.cast(address, tl.int64))
    tl.store(sink + 0 * zeros, zeros.to(sink.dtype.element_ty), mask=zeros != 0)


@triton.jit
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, vis_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                           KV, S, D, G, scale, keys_per_split,
                           HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, COMBINE: tl.constexpr,
                           BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_H: tl.constexpr = 1, BLOCK_SPLITS: tl.constexpr = 1, CHUNK: tl.constexpr = 1,
                           PDL: tl.constexpr = False):
    pdl_start(PDL)
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = (bkv // KV).to(tl.int64)  # b * stride_kb passes 2^31 elements where a batch of long caches does
    kv = bkv % KV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    heads = kv * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_ptr + b * stride_kb + kv * stride_kh
    v_base = v_ptr + b * stride_vb + kv * stride_vh
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, S)
    m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_base, v_base, vis_ptr, stride_ks, stride_vs, start, end, scale, d,
                                 d_ok, HAS_MASK, PRECISION, BLOCK_S)
    _split_done(m_i, l_i, acc, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr, (b * KV * G + heads) * splits + split, g_ok,
                d, d_ok, bkv, split, splits, D, G, COMBINE, BLOCK_H, BLOCK_SPLITS, CHUNK, BLOCK_D)


@triton.jit
def _attend_keys(q, m_i, l_i, acc, k_base, v_base, vis_ptr, stride_ks, stride_vs, start, end, scale, d, d_ok,
                 HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr):
    """A split's keys [start, end) of one KV head against its G query rows q [BLOCK_G, BLOCK_D] (fp32):
    the online softmax's running max m_i, sum l_i and unnormalised output acc, carried on from the
    values given (a split starts them at -inf, 0, 0)."""
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        valid = s_ok
        if HAS_MASK:
            valid = valid & (tl.load(vis_ptr + s, mask=s_ok, other=0) != 0)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        v = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        pv = tl.dot(p, v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _split_done(m_i, l_i, acc, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr, row, g_ok, d, d_ok, bkv, split, splits, D,
                G, COMBINE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SPLITS: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """A split's partial rows (row: [BLOCK_G] of the [B, N, splits] rows) stored; with COMBINE the last
    split of its (batch, KV head) to count itself done combines the G heads (module docstring)."""
    tl.store(m_ptr + row, m_i, mask=g_ok)
    tl.store(l_ptr + row, l_i, mask=g_ok)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    if COMBINE:
        tl.debug_barrier()  # every thread's stores above come before the release below
        done = tl.atomic_add(count_ptr + bkv, 1, sem="acq_rel", scope="gpu")
        if done == splits - 1:  # the last split of this (batch, KV head): the others' rows are visible
            _combine_heads(m_ptr, l_ptr, acc_ptr, out_ptr, bkv * G, G, splits, D, ".cg", BLOCK_H, BLOCK_SPLITS, CHUNK,
                           BLOCK_D)
            tl.atomic_xchg(count_ptr + bkv, 0)  # ready for the next call


@triton.jit
def _qkv_attention_kernel(rq_ptr, qw_ptr, rk_ptr, rv_ptr, kw_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, ring_ptr, pos_ptr,
                          vis_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr, stride_qh, stride_rkh, stride_rvh,
                          stride_kh, stride_ks, stride_vh, stride_vs, S, D, G, size, eps, scale, keys_per_split,
                          NORM_V: tl.constexpr, HAS_RING: tl.constexpr, HAS_MASK: tl.constexpr,
                          PRECISION: tl.constexpr, COMBINE: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr = 1,
                          BLOCK_SPLITS: tl.constexpr = 1, CHUNK: tl.constexpr = 1, PDL: tl.constexpr = False,
                          PREFETCH: tl.constexpr = False):
    """_decode_partial_kernel (one token, batch 1) that also does the q/k/v write of
    kernels/triton_qkv_write.py: program (kv, split) norms and ropes its KV head's G query heads from
    the raw projection, rounded to their dtype as qkv_write stores q. The new key and value (their
    norms and RoPE, rounded to the cache's dtype) go into slot pos % size, written by the program
    whose split holds the slot (the last split where none does), the only program that reads the
    slot: its threads store, meet at a barrier (CTA scope: each sees the others' stores), then walk
    the keys as _decode_partial_kernel does, the same loop. The ring's position: that program of KV
    head 0; nothing in the launch reads the table (`vis_ptr` must already show the slot visible). PREFETCH
    (`L1_PREFETCH`): what the program reads first asked of its L1 right after the wait."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    # q_norm's and k_norm's weights: before PDL's wait (kernels/triton_pdl.py's prologue)
    qw, qwp = head_weights(qw_ptr, d, d_ok, D)
    kw, kwp = head_weights(kw_ptr, d, d_ok, D)
    pdl_start(PDL)
    kv = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    if PREFETCH:  # after the wait: the kernel before wrote the raw rows (and earlier ones the keys)
        first = split * keys_per_split
        _prefetch_rows(rq_ptr + kv * G * stride_qh, stride_qh, G, D, m_ptr, BLOCK_G, BLOCK_D)
        _prefetch_rows(rk_ptr + kv * stride_rkh, stride_rkh, 1, D, m_ptr, 1, BLOCK_D)
        _prefetch_rows(rv_ptr + kv * stride_rvh, stride_rvh, 1, D, m_ptr, 1, BLOCK_D)
        _prefetch_rows(k_ptr + kv * stride_kh + first * stride_ks, stride_ks, S - first, D, m_ptr, BLOCK_S, BLOCK_D)
        _prefetch_rows(v_ptr + kv * stride_vh + first * stride_vs, stride_vs, S - first, D, m_ptr, BLOCK_S, BLOCK_D)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    heads = kv * G + g
    q = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # padding rows and columns 0, as the plain kernel loads them
    for i in range(0, G):  # each head as qkv_write computes it (a [BLOCK_D] row, the same helper), then stores it
        qi = norm_rope_head(rq_ptr + (kv * G + i) * stride_qh, qw, qwp, cos_ptr, sin_ptr, d, d_ok, D, eps)
        q = tl.where((g == i)[:, None], qi.to(rq_ptr.dtype.element_ty).to(tl.float32)[None, :], q)
    k_base = k_ptr + kv * stride_kh
    v_base = v_ptr + kv * stride_vh
    pos = tl.load(pos_ptr)
    slot = pos % size
    if tl.minimum(slot // keys_per_split, splits - 1) == split:  # the split that holds the slot writes it
        k_new = norm_rope_head(rk_ptr + kv * stride_rkh, kw, kwp, cos_ptr, sin_ptr, d, d_ok, D, eps)
        tl.store(k_base + slot * stride_ks + d, k_new.to(k_ptr.dtype.element_ty), mask=d_ok)
        v_new = tl.load(rv_ptr + kv * stride_rvh + d, mask=d_ok, other=0.0).to(tl.float32)
        if NORM_V:
            v_new = v_new * (1.0 / tl.sqrt(tl.sum(v_new * v_new, axis=0) / D + eps))
        tl.store(v_base + slot * stride_vs + d, v_new.to(v_ptr.dtype.element_ty), mask=d_ok)
        if HAS_RING:
            tl.store(ring_ptr + slot, pos, mask=kv == 0)
    tl.debug_barrier()  # (bar.sync) those stores by this block's threads are visible to its loads below
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, S)
    m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_base, v_base, vis_ptr, stride_ks, stride_vs, start, end, scale, d,
                                 d_ok, HAS_MASK, PRECISION, BLOCK_S)
    _split_done(m_i, l_i, acc, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr, heads * splits + split, g_ok, d, d_ok, kv,
                split, splits, D, G, COMBINE, BLOCK_H, BLOCK_SPLITS, CHUNK, BLOCK_D)


@triton.jit
def _combine_heads(m_ptr, l_ptr, acc_ptr, out_ptr, first, heads, splits, D, CACHE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_SPLITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[first : first + heads] (head = b * N + n) from their `splits` partial rows each. BLOCK_H
    heads at a time, their rows CHUNK splits a load: each load is one tile of [BLOCK_H, CHUNK, D], so
    a head's combine waits on memory about once, where a loop over its splits waited once a split
    (`combine_tiles` sizes the tiles). CACHE ".cg": read the rows from L2."""
    h = tl.arange(0, BLOCK_H)
    s = tl.arange(0, BLOCK_SPLITS)
    c = tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    for h0 in range(0, heads, BLOCK_H):
        head = first + h0 + h
        h_ok = h0 + h < heads
        rows = head[:, None] * splits + s[None, :]
        ok = h_ok[:, None] & (s < splits)[None, :]
        m = tl.load(m_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=CACHE)
        l = tl.load(l_ptr + rows, mask=ok, other=0.0, cache_modifier=CACHE)
        top = tl.max(m, axis=1)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp(m - top[:, None]) * l, axis=1)  # exp(-inf) = 0: splits that saw no visible key
        total = tl.where(h_ok, total, 1.0)  # padding heads: no 0 / 0
        out = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for s0 in range(0, splits, CHUNK):
            chunk = head[:, None] * splits + (s0 + c)[None, :]
            chunk_ok = h_ok[:, None] & (s0 + c < splits)[None, :]
            w = tl.exp(tl.load(m_ptr + chunk, mask=chunk_ok, other=float("-inf"), cache_modifier=CACHE) - top[:, None])
            acc = tl.load(acc_ptr + chunk[:, :, None] * D + d[None, None, :],
                          mask=chunk_ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=CACHE)
            out += tl.sum(w[:, :, None] * acc, axis=1)
        tl.store(out_ptr + head[:, None] * D + d[None, :], (out / total[:, None]).to(out_ptr.dtype.element_ty),
                 mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, D, G,
                           BLOCK_H: tl.constexpr, BLOCK_SPLITS: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """Program (b * KV + kv, j): heads j * BLOCK_H on of that KV head's G, the same tile as the
    partial kernel's in-place combine takes them in (so the two give the same bits)."""
    pdl_start(PDL)
    h0 = tl.program_id(1) * BLOCK_H
    _combine_heads(m_ptr, l_ptr, acc_ptr, out_ptr, tl.program_id(0) * G + h0, tl.minimum(BLOCK_H, G - h0), splits, D,
                   "", BLOCK_H, BLOCK_SPLITS, CHUNK, BLOCK_D)


COMBINE_TILE = 8192  # fp32 partial elements one combine load takes at most (32-64 registers a thread)


def combine_tiles(G: int, splits: int, BLOCK_D: int) -> dict[str, int]:
    """The combine's tile sizes (constexprs of `_combine_heads`) for G heads a KV head of `splits`
    partial rows: whole rows of D, as many splits of a head as COMBINE_TILE holds, then as many heads."""
    block_splits = triton.next_power_of_2(splits)
    chunk = max(1, min(block_splits, COMBINE_TILE // BLOCK_D))
    block_h = max(1, min(triton.next_power_of_2(G), COMBINE_TILE // (chunk * BLOCK_D)))
    return dict(BLOCK_H=block_h, BLOCK_SPLITS=block_splits, CHUNK=chunk)


@functools.lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM keep a GPU's memory system busy (a CPU under the interpreter: 4)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_keys(S: int, groups: int, device: torch.device, block_s: int) -> tuple[int, int]:
    """(keys per split, splits) for S keys and `groups` (batch x KV heads) programs before splitting:
    enough splits to fill the device, whole key blocks each, at most MAX_SPLITS."""
    want = max(1, min(MAX_SPLITS, _programs_wanted(device) // max(groups, 1)))
    per = triton.cdiv(triton.cdiv(S, want), block_s) * block_s
    return per, triton.cdiv(S, per)


# The partial kernel's key block and warps by BLOCK_D, where not the rule in `partial_tile` (a K and a V
# tile of 16,384 elements). At 26B-A4B's sliding layers (D = 256) the rule's 64 keys at 4 warps hold both
# tiles in 255 registers a thread and spill 192 bytes to the stack (sm_90, Triton 3.9; 64 at 8 warps and
# 32 at 4 do not). gpu_check's `decode attention` rows time every TILE_CHOICES pair (`tiles_us`): make
# the fastest the entry here. The q/k/v write launches with the same warps (`warps_for`). Every choice
# fits a 99 KiB block (an RTX 4090's) and spills at most 24 bytes, but the rule's own at D = 256.
# H200 (docs/gpu/2026-11-27-h200-kernels-offload.md, us in CUDA graphs): at D = 256, 32 keys at 4 warps
# 7.3 / 14.3 (256 / 1,536 keys) against the rule's 8.8 / 14.3; at D = 512 the rule's 32 x 8 is fastest
# but at 4,096 keys (12.7 / 18.8 / 96.1 at 256 / 4,096 / 32,768; 16 x 4: 21.6 / 17.8 / 107.7).
PARTIAL_TILES: dict[int, tuple[int, int]] = {256: (32, 4)}
TILE_CHOICES = {256: ((64, 4), (64, 8), (32, 4), (32, 8), (16, 4)),  # BLOCK_D -> (BLOCK_S, warps)
                512: ((32, 8), (16, 8), (16, 4))}  # (64 keys of 512 want 100 KiB; 32 at 4 warps spills 192 bytes)


def partial_tile(BLOCK_D: int) -> tuple[int, int]:
    """(BLOCK_S, warps) of the partial kernel (and of the combine kernel after it) at this BLOCK_D."""
    return PARTIAL_TILES.get(BLOCK_D) or (max(16, min(64, 16384 // BLOCK_D)), 4 if BLOCK_D <= 256 else 8)


def warps_for(D: int) -> int:
    """The decode attention kernels' warps at head dim D."""
    return partial_tile(max(16, triton.next_power_of_2(D)))[1]


def launch_shape(S: int, D: int, groups: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_S, keys per split, splits) of the partial kernel over S keys of head dim D for
    `groups` (batch x KV heads)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_S = partial_tile(BLOCK_D)[0]
    return BLOCK_D, BLOCK_S, *split_keys(S, groups, device, BLOCK_S)


MAX_COUNTERS = 4096  # (batch, KV head) groups one in-place combine call counts at most


def _counters(device: torch.device) -> torch.Tensor:
    """The in-place combine's MAX_COUNTERS counters (kernels/counters.py)."""
    return counters.held("decode_attention", device, MAX_COUNTERS)


def combines_in_place(groups: int, splits: int, G: int, D: int) -> bool:
    """Whether the partial programs of `groups` (batch x KV heads) combine their rows themselves (one
    launch): where the rows one program then reads are few, and the counters suffice."""
    return splits * G * D <= COMBINE_IN_PLACE_MAX and groups <= MAX_COUNTERS


def decode_attention_triton(q_BN1D: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                            visible_1S: torch.Tensor | None, scale: float, in_place: bool | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for one query per head, G = N / KV query heads per KV head
    (head h reads KV head h // G). q [B, N, 1, D]; k, v [B, KV, S, D] (views of a larger cache are
    fine: only the last dim must be contiguous); visible: bool, S elements, or None. in_place: combine
    in the partial kernel (one launch) or in a kernel of its own; None: `combines_in_place` decides."""
    B, N, T, D = q_BN1D.shape
    KV, S = k_BKSD.shape[1], k_BKSD.shape[2]
    assert T == 1 and N % KV == 0, (q_BN1D.shape, k_BKSD.shape)
    G = N // KV
    q = q_BN1D if q_BN1D.stride(-1) == 1 else q_BN1D.contiguous()
    k = k_BKSD if k_BKSD.stride(-1) == 1 else k_BKSD.contiguous()
    v = v_BKSD if v_BKSD.stride(-1) == 1 else v_BKSD.contiguous()
    BLOCK_D, BLOCK_S, per, splits = launch_shape(S, D, B * KV, q.device)
    if in_place is None:
        in_place = combines_in_place(B * KV, splits, G, D)
    assert not in_place or B * KV <= MAX_COUNTERS, (B, KV)
    m = torch.empty(B * N * splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * N * splits, D, dtype=torch.float32, device=q.device)
    out = torch.empty(B, N, 1, D, dtype=q.dtype, device=q.device)
    vis = q if visible_1S is None else visible_1S.reshape(S).contiguous().view(torch.uint8)
    count = _counters(q.device) if in_place else m
    tiles = combine_tiles(G, splits, BLOCK_D)
    _decode_partial_kernel[(B * KV, splits)](
        q, k, v, vis, m, l, acc, count, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), KV, S, D, G, scale, per,
        HAS_MASK=visible_1S is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", COMBINE=in_place,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, **tiles,
        num_warps=warps_for(D), num_stages=PARTIAL_STAGES, **triton_pdl.launch(q.device))
    if not in_place:
        _decode_combine_kernel[(B * KV, triton.cdiv(G, tiles["BLOCK_H"]))](
            m, l, acc, out, splits, D, G, BLOCK_D=BLOCK_D, **tiles, num_warps=warps_for(D),
            **triton_pdl.launch(q.device))
    return out


def qkv_attention_triton(raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, eps: float, k_cache, v_cache, ring_pos,
                         pos_1, size: int, norm_v: bool, keys: int, visible_1S: torch.Tensor | None, scale: float,
                         in_place: bool | None = None) -> torch.Tensor:
    """kernels/qkv_write.py's `qkv_attention`: qkv_write_triton's write and decode_attention_triton over
    the first `keys` slots of k_cache, v_cache [1, KV, S, D] (head dim contiguous) in one launch
    (_qkv_attention_kernel; the combine kernel too where the partial rows are many). raw_q [1, 1, N, D],
    raw_k, raw_v [1, 1, KV, D]; visible [1, keys] as it stands after the write. Returns [1, N, 1, D]."""
    from .triton_qkv_write import one_token_heads

    raw_q, raw_k, raw_v = (one_token_heads(x, "qkv_attention") for x in (raw_q, raw_k, raw_v))
    N, D = raw_q.shape[2:]
    KV = raw_k.shape[2]
    if (raw_k.shape[3] != D or N % KV or k_cache.shape[0] != 1 or k_cache.shape[1] != KV or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1 or not 0 < keys <= k_cache.shape[2]):
        raise ValueError("qkv_attention takes q and k heads of one size, G query heads a KV head, and a cache of "
                         "one sequence whose head dim is contiguous")
    G = N // KV
    cos, sin = cos.reshape(D).contiguous(), sin.reshape(D).contiguous()
    BLOCK_D, BLOCK_S, per, splits = launch_shape(keys, D, KV, raw_q.device)
    if in_place is None:
        in_place = combines_in_place(KV, splits, G, D)
    m = torch.empty(N * splits, dtype=torch.float32, device=raw_q.device)
    l = torch.empty_like(m)
    acc = torch.empty(N * splits, D, dtype=torch.float32, device=raw_q.device)
    out = torch.empty(1, N, 1, D, dtype=raw_q.dtype, device=raw_q.device)
    vis = m if visible_1S is None else visible_1S.reshape(keys).contiguous().view(torch.uint8)
    count = _counters(raw_q.device) if in_place else m
    ring = ring_pos if ring_pos is not None else pos_1  # any pointer; unused without a ring
    tiles = combine_tiles(G, splits, BLOCK_D)
    warps = warps_for(D)  # decode_attention_triton's (the same sums), and qkv_write's
    _qkv_attention_kernel[(KV, splits)](
        raw_q, q_weight, raw_k, raw_v, k_weight, cos, sin, k_cache, v_cache, ring, pos_1, vis, m, l, acc, count, out,
        raw_q.stride(2), raw_k.stride(2), raw_v.stride(2), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1),
        v_cache.stride(2), keys, D, G, size, eps, scale, per,
        NORM_V=norm_v, HAS_RING=ring_pos is not None, HAS_MASK=visible_1S is not None,
        PRECISION="ieee" if raw_q.dtype == torch.float32 else "tf32", COMBINE=in_place,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, **tiles, num_warps=warps,
        num_stages=PARTIAL_STAGES, PREFETCH=L1_PREFETCH and inline_ptx(raw_q.device), **triton_pdl.launch(raw_q.device))
    if not in_place:
        _decode_combine_kernel[(KV, triton.cdiv(G, tiles["BLOCK_H"]))](
            m, l, acc, out, splits, D, G, BLOCK_D=BLOCK_D, **tiles, num_warps=warps, **triton_pdl.launch(raw_q.device))
    return out
