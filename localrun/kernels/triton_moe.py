"""Grouped 4-bit MoE in Triton: every top-k expert of every token of one layer in one or two launches.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate, P = T*K pairs.
The weights are a quant.layer.ExpertBuffer: row e of a [E, nbytes] uint8 tensor is expert e's
PackedExpert, i.e. bitsandbytes' own 4-bit layout. A matrix W [N, D] (gate_up [2I, H], down
[H, I]) is flattened row-major; element i sits in byte i // 2, the high nibble for even i, the
low nibble for odd i; its value is code[nibble] * absmax[i // blocksize] with bitsandbytes'
16-value NF4/FP4 table. With double quant the absmax is itself a uint8 code:
absmax[b] = dynamic[q[b]] * nested_absmax[b // 256] + offset.

Decode (a GEMV per token and expert), two launches:

  gate_up, grid (P, I / BLOCK_N):  h[p] = act(W_gate[e] x[t]) * (W_up[e] x[t])   fp32 [P, I]
  down,    grid (T, H / BLOCK_N):  y[t] = sum_k w[t,k] * W_down[ids[t,k]] h[t,k]   fp32 sum

v2 (the default) reads the codes as 32-bit words, v4 (opt-in) as 16-byte chunks with the code table in
the warp's lanes; v5 (opt-in, one token) does both matrices in one launch. Expert ids and routing
weights are read from device memory, so nothing syncs with the host and the step can be
graph-captured; with T > 1 the pairs run sorted by expert so that programs reading the same expert
run together (L2 reuse). From GROUPED_MIN_TOKENS tokens (a prefill), and for rows that are not
whole 32-bit words, a grouped GEMM runs instead: the pairs sorted by expert in blocks, one
dequantized weight tile per block of pairs, tl.dot on the tensor cores (`moe_4bit_grouped`).

Import this module after setting TRITON_INTERPRET=1 to run it on CPU tensors (the tests do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import counters, triton_pdl
from .triton_pdl import pdl_start
from .triton_prefetch import LINE, inline_ptx, prefetch_share

NESTED_BLOCKSIZE = 256  # quant.spec.NESTED_BLOCKSIZE, a constant of the kernel
ACT_CODES = {"gelu_pytorch_tanh": 0, "gelu": 1, "silu": 2}


def interpreted() -> bool:
    return _gate_up_v2_kernel.__class__.__name__ == "InterpretedFunction"


@triton.jit
def _absmax(buf_u8, buf_f32, base, base32, blk, mask, absmax_off, nested_off32, offset_off32, nested_code,
            DOUBLE_QUANT: tl.constexpr):
    """absmax of quantization block `blk` (any shape) of one matrix of the expert at byte `base`."""
    if DOUBLE_QUANT:
        q = tl.load(buf_u8 + base + absmax_off + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(buf_f32 + base32 + nested_off32 + blk // 256, mask=mask, other=0.0)
        offset = tl.load(buf_f32 + base32 + offset_off32)
        return tl.load(nested_code + q) * scale + offset
    else:
        return tl.load(buf_f32 + base32 + absmax_off // 4 + blk, mask=mask, other=0.0)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # gelu, tanh approximation (Gemma)
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)  # tanh is +-1 in fp32 there; exp stays finite
        return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 1:  # gelu, exact
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # silu
        return g * tl.sigmoid(g)


# -- v2: bandwidth-shaped decode kernels ------------------------------------------------------
#
# The first kernels here (v1, deleted on 2026-11-28) streamed one expert matrix per loop with a few
# hundred bytes per step and walked the K experts of `down` one after the other, so an SM held a few KB
# of loads in flight (H200: 53.7 us a 26B-A4B layer, ~500 GB/s; v2 29). v2 keeps every program's step
# large and independent:
#
#   gate_up: a program owns BLOCK_N rows of gate AND the matching BLOCK_N rows of up of one
#     (token, expert) pair: tile [2, BLOCK_N, NB, BB] bytes (NB groups of BB bytes that share one
#     absmax), full reduction over H in the loop (no split-K, no atomics: deterministic).
#   down: a program owns BLOCK_N output rows of one token for ALL its K experts at once:
#     tile [KE, BLOCK_N, NB, BB] (KE = next power of two >= K), so the 8 experts' rows are
#     loaded in the same step; the weighted sum over k is a fixed-order tl.sum (deterministic).
#
# Codes are read as 32-bit words (8 weights in element order: byte k's high nibble, then its low
# one), 16 bytes per thread per load, so x / h are read in natural order with vector loads and
# broadcast over the rows a thread holds. A group of BB bytes (BB = gcd(bytes per row, bytes per
# quantization block), at most 32) lies in one quantization block whether or not rows hold whole
# blocks, so each absmax is loaded and applied once per group. Triton's pipeliner does not touch
# loads that feed no dot, so each loop requests the NEXT step's codes and absmax (registers)
# before this step's table lookups and FMAs: two steps of codes in flight per thread.
# Shapes whose rows are not whole words (H or I not a multiple of 8) run the grouped kernels.
# Tiles, warps and stages come from triton.autotune keyed on the shape, the token bucket and the
# quantization flags (the first call of a shape benchmarks 6 configs per kernel at 5 + 20 ms each, then Triton's disk
# cache keeps the pick);
# under TRITON_INTERPRET=1 there is one config (INTERPRETER_TILES).


@dataclass(frozen=True)
class Tiles:
    """v2 tiles: rows per program / bytes per step (x2 matrices for gate_up, x KE experts for down)."""

    gate_up_n: int = 8
    gate_up_k: int = 256
    gate_up_warps: int = 4
    down_n: int = 4
    down_k: int = 128
    down_warps: int = 4
    num_stages: int = 1


INTERPRETER_TILES = Tiles(gate_up_n=64, gate_up_k=512, down_n=256, down_k=512)
MAX_TILE_NUMEL = 1 << 20  # elements in one Triton tensor at most (triton.language's TRITON_MAX_TENSOR_NUMEL)
GROUP_MAX = 32  # bytes per absmax group at most (two threads' 16-byte loads)


def _gcd_pow2(n: int, blocksize: int) -> int:
    """Bytes per absmax group: gcd(n bytes per row, blocksize / 2 bytes per block), capped."""
    return min(math.gcd(n, blocksize // 2), GROUP_MAX)


def _cfg(n, k, w):
    # num_stages: Triton's pipeliner leaves these loads alone (no dot); the kernels prefetch one step
    return triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1)


# bytes per step = 2 * BLOCK_N * BLOCK_K (gate_up) / KE * BLOCK_N * BLOCK_K (down); 16 codes bytes
# per thread per load. Programs at 26B-A4B, T=1: gate_up 704/BLOCK_N * 8, down 2816/BLOCK_N.
# The lists keep the H200's
# picks (gate_up (4, 128, 1) at 1 and 8 tokens; down (8, 64, 4) at 1, (8, 32, 2) at 8) and their
# neighbours, so that a shape's first call compiles fewer configs (each ~0.5-1 s).
GATE_UP_CONFIGS = [_cfg(n, k, w) for n, k, w in (
    (4, 128, 1), (4, 256, 2), (8, 128, 2), (8, 256, 4), (4, 512, 4), (2, 1024, 4))]
DOWN_CONFIGS = [_cfg(n, k, w) for n, k, w in (
    (8, 64, 4), (8, 32, 2), (4, 64, 2), (4, 128, 4), (2, 128, 2), (8, 128, 8))]


def _fast_bench(kernel_call, quantiles):
    # the default (25 ms warmup + 100 ms per config) would take seconds per kernel
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


@triton.jit
def _nibbles(words):
    """int32 words [..., W] -> their 8 codes [..., W, 8] in element order (byte k: high nibble, then low)."""
    j = tl.arange(0, 8)
    shifts = (j // 2) * 8 + tl.where(j % 2 == 0, 4, 0)
    return (tl.expand_dims(words, -1) >> shifts) & 15


@triton.jit
def _load_codes(buf_i32, word_ptr0, gw, mask, buf_u8, buf_f32, base, base32, blk, absmax_off, nested_off32,
                offset_off32, nested_code, GW: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """One step's code words [..., NG, GW] (from word offsets word_ptr0 + gw) and group absmax [..., NG]."""
    q = tl.arange(0, GW)
    words = tl.load(buf_i32 + tl.expand_dims(word_ptr0 + gw, -1) + q, mask=tl.expand_dims(mask, -1), other=0)
    am = _absmax(buf_u8, buf_f32, base, base32, blk, mask, absmax_off, nested_off32, offset_off32, nested_code,
                 DOUBLE_QUANT)
    return words, am


# Opt-in (scripts/gpu_check.py's decode A/B: `with_pdl_and_early_moe`): with PDL, a decoded token's MoE
# kernels request their first step of expert rows before the wait (`EARLY`), while the kernel before still
# runs: the dense MLP's down GEMV before gate_up, gate_up before down. Legal because of when a PDL kernel is
# placed: once every program of the kernel before has passed its own wait, so every kernel before that one
# has ended and its writes are visible, and the router's ids are written two launches or more before
# gate_up (the MLP's down GEMV between, in a Gemma 4 layer; always gate_up between, for down). Where another
# order wrote them a launch before (Qwen3-MoE, Mixtral, `parallel_mlp`), the ids read early are another
# token's: after the wait each program reads the ids again and requests its step again wherever the expert
# differs (the first step's latency paid as without EARLY, bytes read in vain while the kernel before ran).
# The expert rows themselves must not change within a decode step: no kernel of the graphs step writes the
# layer buffer (offloaded experts' copies come between graph segments, where no PDL applies). Only one
# token (the sorted order of T > 1 pairs is the step's), only under PDL.
EARLY_LOADS = False


@triton.jit
def _early_expert(ptr, mask, other, n_experts):
    """Expert ids read before the PDL wait (EARLY): whatever the step's ids hold then (maybe another token's,
    so checked against `_step_expert` after the wait), clamped to the buffer's rows so that what they address
    exists; from the L2 (.cg), not brought into the L1 for a read after the wait to meet."""
    e = tl.load(ptr, mask=mask, other=other, cache_modifier=".cg").to(tl.int64)
    return tl.minimum(tl.maximum(e, 0), n_experts - 1)


@triton.jit
def _step_expert(ptr, mask, other, EARLY: tl.constexpr):
    """Expert ids after the wait; with EARLY from the L2 (.cg): a line the early reads brought into this SM's
    L1 (any program of the kernel) may hold the ids from before the kernel before ended."""
    if EARLY:
        return tl.load(ptr, mask=mask, other=other, cache_modifier=".cg").to(tl.int64)
    else:
        return tl.load(ptr, mask=mask, other=other).to(tl.int64)


@triton.jit
def _gate_up_early_expert(early_ids_ptr, n_experts, SORTED: tl.constexpr):
    """A gate_up program's expert as the ids hold it before the wait (EARLY: one token, pairs in order)."""
    tl.static_assert(not SORTED)
    return _early_expert(early_ids_ptr + tl.program_id(0), None, None, n_experts)


@triton.jit
def _gate_up_pair(ids_ptr, order_ptr, K, SORTED: tl.constexpr, EARLY: tl.constexpr):
    """(pair, token, expert) of a gate_up program, after the wait: pairs sorted by expert where SORTED."""
    if SORTED:
        p = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    else:
        p = tl.program_id(0).to(tl.int64)
    return p, p // K, _step_expert(ids_ptr + p, None, None, EARLY)


# Opt-in (scripts/gpu_check.py's decode A/B: `with_down_prefetch`): a decoded token's gate_up programs ask the
# L2 for their expert's down matrix (each program a share of it, after its own first step is requested), so
# that the down kernel after reads the L2 rather than HBM. Unknown: whether the down stage is bound by where
# its bytes come from (kernels/triton_moe_probe.py's `l2_us` against `dram_us` says), and what the extra
# requests cost gate_up. One token only (a prompt's pairs share experts), CUDA only (inline PTX).
PREFETCH_DOWN = False
_LINE = tl.constexpr(LINE)  # the prefetch's line bytes, as a kernel reads a global


@triton.jit
def _prefetch_down(buf_u8, base, expert_bytes, h_row, DOWN_OFF: tl.constexpr):
    """This program's share (its row tile of the expert's) of the expert's down matrix and statistics (from
    byte DOWN_OFF of its row to the row's end) asked of the L2; the asm's zeros stored under a mask that is
    never true (h_row: this pair's h, whose first elements the program's own store writes later anyway)."""
    zeros = prefetch_share(buf_u8 + base + DOWN_OFF, expert_bytes - DOWN_OFF, tl.program_id(1), tl.num_programs(1),
                           32, _LINE)
    tl.store(h_row + tl.arange(0, 32), zeros.to(tl.float32), mask=zeros != 0)


def _down_off(c: "_Call") -> dict:
    """DOWN_OFF for a gate_up launch of `c`: the down matrix's first byte where PREFETCH_DOWN applies (one
    token on CUDA, not interpreted), else nothing."""
    if not PREFETCH_DOWN or c.T != 1 or c.x.device.type != "cuda" or interpreted():
        return {}
    return {"DOWN_OFF": c.offsets[4]}


@triton.jit
def _gate_up_v2_kernel(x_ptr, ids_ptr, order_ptr, h_ptr, buf_i32, buf_u8, buf_f32, code, nested_code,
                       expert_bytes, codes_off, absmax_off, nested_off32, offset_off32,
                       K, H_Q, I, stride_xt, T_BUCKET, early_ids_ptr, N_EXPERTS,
                       ACT: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       SORTED: tl.constexpr, BB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr = False, DOWN_OFF: tl.constexpr = 0, EARLY: tl.constexpr = False):
    """H_Q: 32-bit words of codes per row (H / 8). Tile [2 (gate, up), BLOCK_N rows, NG groups, GW words].
    DOWN_OFF > 0 (PREFETCH_DOWN): the byte where the expert's down matrix starts, whose share the program
    asks of the L2 once its own first step is requested. EARLY (EARLY_LOADS): the first step requested
    before the PDL wait, for the expert early_ids_ptr names then, checked against ids_ptr after it."""
    GW: tl.constexpr = BB // 4  # words per absmax group
    NG: tl.constexpr = BLOCK_K // BB  # groups per step
    BW: tl.constexpr = BLOCK_K // 4  # words per row per step
    WPB: tl.constexpr = BLOCKSIZE // 8  # words per quantization block
    r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = r < I
    which = tl.arange(0, 2)  # 0: gate row r, 1: up row I + r
    row_w0 = (which[:, None] * I + r[None, :]) * H_Q  # word of the row's start inside the matrix
    grp = tl.arange(0, NG) * GW
    q = tl.arange(0, GW)
    j = tl.arange(0, 8)
    m_r = mask_r[None, :, None]
    gw = grp
    mask = m_r & (gw < H_Q)[None, None, :]
    blk0 = (row_w0[:, :, None] + gw[None, None, :]) // WPB
    if EARLY:  # the first step of the expert the ids hold now, before the wait (checked after it)
        e0 = _gate_up_early_expert(early_ids_ptr, N_EXPERTS, SORTED)
        base0 = e0 * expert_bytes
        words, am = _load_codes(buf_i32, ((base0 // 4 + codes_off // 4) + row_w0)[:, :, None], gw[None, None, :],
                                mask, buf_u8, buf_f32, base0, base0 // 4, blk0, absmax_off, nested_off32,
                                offset_off32, nested_code, GW, DOUBLE_QUANT)
    pdl_start(PDL)
    p, t, e = _gate_up_pair(ids_ptr, order_ptr, K, SORTED, EARLY)
    base = e * expert_bytes
    base32 = base // 4
    row_word = (base32 + codes_off // 4) + row_w0  # [2, BN] absolute words
    x_row = x_ptr + t * stride_xt
    if EARLY:
        due = e != e0  # the ids before the wait were another token's: this expert's step requested now
    else:
        due: tl.constexpr = True
    if due:
        words, am = _load_codes(buf_i32, row_word[:, :, None], gw[None, None, :], mask, buf_u8, buf_f32, base, base32,
                                blk0, absmax_off, nested_off32, offset_off32, nested_code, GW, DOUBLE_QUANT)
    if DOWN_OFF > 0:
        _prefetch_down(buf_u8, base, expert_bytes, h_ptr + p * I, DOWN_OFF)
    acc = tl.zeros([2, BLOCK_N, NG], dtype=tl.float32)
    for kb in range(0, H_Q, BW):
        # the next step's codes and absmax are requested before this step's math (register prefetch)
        gw_n = kb + BW + grp
        mask_n = m_r & (gw_n < H_Q)[None, None, :]
        words_n, am_n = _load_codes(buf_i32, row_word[:, :, None], gw_n[None, None, :], mask_n, buf_u8, buf_f32,
                                    base, base32, (row_w0[:, :, None] + gw_n[None, None, :]) // WPB, absmax_off,
                                    nested_off32, offset_off32, nested_code, GW, DOUBLE_QUANT)
        gw = kb + grp
        elem = ((gw[:, None] + q[None, :]) * 8)[:, :, None] + j  # [NG, GW, 8]
        xv = tl.load(x_row + elem, mask=(gw < H_Q)[:, None, None], other=0.0).to(tl.float32)
        vals = tl.load(code + _nibbles(words))  # [2, BN, NG, GW, 8]
        acc += tl.sum(tl.sum(vals * xv[None, None, :, :, :], axis=4), axis=3) * am
        words, am = words_n, am_n
    gu = tl.sum(acc, axis=2)  # [2, BN]
    gate = tl.sum(tl.where(which[:, None] == 0, gu, 0.0), axis=0)
    up = tl.sum(tl.where(which[:, None] == 1, gu, 0.0), axis=0)
    tl.store(h_ptr + p * I + r, _act(gate, ACT) * up, mask=mask_r)


@triton.jit
def _down_v2_kernel(h_ptr, ids_ptr, w_ptr, y_ptr, buf_i32, buf_u8, buf_f32, code, nested_code,
                    expert_bytes, codes_off, absmax_off, nested_off32, offset_off32,
                    K, H, I, I_Q, stride_yt, T_BUCKET, early_ids_ptr, N_EXPERTS,
                    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BB: tl.constexpr, KE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                    EARLY: tl.constexpr = False):
    """I_Q: words of codes per row (I / 8). Tile [KE experts, BLOCK_N rows, NG groups, GW words]. EARLY: as
    gate_up's."""
    t = tl.program_id(1).to(tl.int64)
    GW: tl.constexpr = BB // 4
    NG: tl.constexpr = BLOCK_K // BB
    BW: tl.constexpr = BLOCK_K // 4
    WPB: tl.constexpr = BLOCKSIZE // 8
    kk = tl.arange(0, KE)
    mask_k = kk < K
    p = t * K + kk  # [KE] pairs of this token
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = r < H
    row_w0 = (r * I_Q)[None, :, None]  # [1, BN, 1]
    grp = tl.arange(0, NG) * GW
    q = tl.arange(0, GW)
    j = tl.arange(0, 8)
    m_kr = mask_k[:, None, None] & mask_r[None, :, None]
    gw = grp
    mask = m_kr & (gw < I_Q)[None, None, :]
    blk0 = (row_w0 + gw[None, None, :]) // WPB
    if EARLY:  # as gate_up's
        e0 = _early_expert(early_ids_ptr + p, mask_k, 0, N_EXPERTS)
        base0 = (e0 * expert_bytes)[:, None, None]
        words, am = _load_codes(buf_i32, base0 // 4 + codes_off // 4 + row_w0, gw[None, None, :], mask, buf_u8,
                                buf_f32, base0, base0 // 4, blk0, absmax_off, nested_off32, offset_off32,
                                nested_code, GW, DOUBLE_QUANT)
    pdl_start(PDL)
    e = _step_expert(ids_ptr + p, mask_k, 0, EARLY)  # padded slots: expert 0, masked off
    wk = tl.load(w_ptr + p, mask=mask_k, other=0.0).to(tl.float32)
    base = (e * expert_bytes)[:, None, None]  # [KE, 1, 1]
    base32 = base // 4
    row_word = base32 + codes_off // 4 + row_w0  # [KE, BN, 1]
    h_rows = h_ptr + (p * I)[:, None, None, None]  # [KE, 1, 1, 1]
    if EARLY:
        due = tl.max((e != e0).to(tl.int32), axis=0) > 0  # the ids before the wait were another token's
    else:
        due: tl.constexpr = True
    if due:
        words, am = _load_codes(buf_i32, row_word, gw[None, None, :], mask, buf_u8, buf_f32, base, base32, blk0,
                                absmax_off, nested_off32, offset_off32, nested_code, GW, DOUBLE_QUANT)
    acc = tl.zeros([KE, BLOCK_N, NG], dtype=tl.float32)
    for kb in range(0, I_Q, BW):
        gw_n = kb + BW + grp
        mask_n = m_kr & (gw_n < I_Q)[None, None, :]
        words_n, am_n = _load_codes(buf_i32, row_word, gw_n[None, None, :], mask_n, buf_u8, buf_f32, base, base32,
                                    (row_w0 + gw_n[None, None, :]) // WPB, absmax_off, nested_off32, offset_off32,
                                    nested_code, GW, DOUBLE_QUANT)
        gw = kb + grp
        elem = ((gw[:, None] + q[None, :]) * 8)[:, :, None] + j  # [NG, GW, 8]
        hv = tl.load(h_rows + elem[None, :, :, :], mask=mask_k[:, None, None, None] & (gw < I_Q)[None, :, None, None],
                     other=0.0)  # [KE, NG, GW, 8]
        vals = tl.load(code + _nibbles(words))  # [KE, BN, NG, GW, 8]
        acc += tl.sum(tl.sum(vals * hv[:, None, :, :, :], axis=4), axis=3) * am
        words, am = words_n, am_n
    d = tl.sum(acc, axis=2)  # [KE, BN]
    y = tl.sum(d * wk[:, None], axis=0)  # fixed-order sum over the K experts
    tl.store(y_ptr + t * stride_yt + r, y.to(y_ptr.dtype.element_ty), mask=mask_r)


# cache_results: the picks are kept in Triton's on-disk cache, so a model load after the first skips the
# benchmarking (seconds of compiling and timing configs before the first token)
_gate_up_v2_tuned = triton.autotune(GATE_UP_CONFIGS, key=["H_Q", "I", "T_BUCKET", "K", "BLOCKSIZE", "DOUBLE_QUANT"],
                                    do_bench=_fast_bench, cache_results=True)(_gate_up_v2_kernel)
_down_v2_tuned = triton.autotune(DOWN_CONFIGS, key=["H", "I_Q", "T_BUCKET", "K", "BLOCKSIZE", "DOUBLE_QUANT"],
                                 do_bench=_fast_bench, cache_results=True)(_down_v2_kernel)


# -- chunks: the code words v4 and v5 read ------------------------------------------------------
#
# How v2 compiles depends on Triton's version: for sm_90 (scripts/sass_stats.py), Triton 3.6, which ran
# on the H200, gives v2's loops ~8-9 instructions a weight, Triton 3.9 17-22 (its tl.sum over an absmax
# group's words crosses threads every step). v4 and v5 keep every reduction inside a thread until the
# loop ends: a thread holds 4 consecutive code words (one 16-byte load: a chunk of 32 weights inside one
# quantization block, so one absmax), and each nibble's code value multiplies its x / h element into a
# per-word sum that the absmax scales once. So rows must be whole chunks (H and I multiples of 32) and
# blocksize >= 32 (`chunks_fit`); elsewhere v2 runs.
# A kernel between v2 and v4 (v3: these chunks, the table read from memory) lost on the H200: decode
# 251-261 tok/s with a per-stage pick of v3 or v2 against 267-276 with v2 alone, and at 16 GiB the
# first call's timing picked v3's down stage at 27 us a layer where v2's takes 12.5
# (docs/gpu/2026-11-27-h200-resident.md, -16gib.md). It was deleted on 2026-11-28 (git show 52c3087).

CHUNK_WEIGHTS = 32  # 4 code words: one vector load, inside one quantization block
TABLE_ALIGN = 64  # bytes: the 16-value table's address has its low 6 bits free (_table_value)


def _chunk_cfg(n, w, warps):
    """A v4 config: BLOCK_N rows a program, BLOCK_W code words a row a step."""
    return triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps, num_stages=1)


def chunks_fit(hidden: int, inter: int, blocksize: int) -> bool:
    """v4 and v5 read rows as whole 32-weight chunks, each inside one quantization block."""
    return (hidden % CHUNK_WEIGHTS == 0 and inter % CHUNK_WEIGHTS == 0 and blocksize >= CHUNK_WEIGHTS
            and blocksize & (blocksize - 1) == 0)


@triton.jit
def _table_value(table, words, j: tl.constexpr):
    """fp32 code value of nibble j of each (uint32) word (element j: byte j // 2, its high nibble for
    even j). `table` is the 64-byte aligned table's address as an int64: the nibble's byte offset
    (nibble * 4) ORs into its low bits, a shift and one LOP3 instead of a 64-bit add (sm_90, Triton
    3.6 and 3.9: 0.4-1.4 instructions a weight fewer, scripts/sass_stats.py)."""
    shift: tl.constexpr = (j // 2) * 8 + 4 - 4 * (j % 2)
    if shift >= 2:
        offset = (words >> (shift - 2)) & 60
    else:
        offset = (words << 2) & 60
    return tl.load(tl.cast(table | offset.to(tl.int64), tl.pointer_type(tl.float32)))


# -- v4: the table in the lanes, and the whole row in flight ------------------------------------
#
# Why v2 streams ~0.8 TB/s on the H200 (26B-A4B, T=1, CUDA graphs; docs/gpu/2026-11-27-h200-resident:
# gate_up 30 x ~16.5 us, down 30 x ~12.5 us a token; a layer reads 8 experts' gate_up, 2.23 MB each
# with absmax, 17.8 MB, and down, 8.9 MB: 6.5 us at the 4.09 TB/s copy bandwidth, 29 us measured):
#   - both launches are ONE partial wave: gate_up (4, 128, 1) is 8 x 176 = 1,408 one-warp programs,
#     down (8, 64, 4) 352 programs of 4 warps: 10.7 warps an SM (2.7 a scheduler) for 132 SMs;
#   - each walks its rows in 11 (gate_up, 128 bytes a row a step) / 6 (down, 64 bytes, the last step
#     half masked) steps with one step of codes requested ahead: 32 bytes a thread, ~11 KB in flight
#     an SM, where 31 GB/s an SM x ~0.8-1.2 us of loaded latency asks for 25-40 KB: ~1/3 of the
#     bandwidth at best (135 KB an SM / 11 KB = 12 round trips for gate_up);
#   - each weight costs 8.7 (gate_up) / 8.0 (down) sm_90 instructions (Triton 3.6, the H200's;
#     scripts/sass_stats.py; 16.5 / 22.5 under 3.9): gate_up's 270 K weights an SM are 73 K warp
#     instructions, 9.2 us at one a clock per scheduler (1.98 GHz), down's 4.3 us, with 2.7 warps a
#     scheduler to hide the latency of each dependent step. Loads are 128-bit, the autotune lists
#     have whole-row configs ((2, 1024, 4)), but the pick keeps the instructions down at the cost of
#     the bytes in flight. v3 (see the chunks above) cut the instructions to ~7 (its table address is
#     64-bit: ~1.5 of them a weight) with tiles that still walk rows in 6-11 steps.
# v4 changes both:
#   - the 16-value table lives in the lanes (lane l holds code[l % 16]) and a nibble's value is a warp
#     shuffle (shfl.sync.idx reads the low 5 bits of its index, so `words >> shift` needs no mask):
#     a weight is a shift, a SHFL and an FFMA, 3.8 (gate_up) / 4.1 (down) instructions a weight with
#     x / h's loads (Triton 3.6; 3.6 / 3.9 under 3.9). Inline PTX, so CUDA only; the interpreter (and
#     ROCm) read the table from memory (`_table_value`, LUT_SHFL=False), the same arithmetic in the same order;
#   - tiles as wide as the row: gate_up steps of up to 128 words (a warp across 512 bytes of a row,
#     each thread 16 bytes of each of its 2 x BLOCK_N rows, x loaded once for all of them): 3 steps
#     for H = 2816, two in flight from the start (~88 KB an SM); down tiles [BLOCK_N rows, KE experts,
#     chunks, 4 words], the rows slowest so a thread reuses h across its rows: 1-3 steps.
# Each code word is split in the thread that loaded it and a word's 8 x / h elements come as two loads
# of 4 in that thread, so no code, x or h moves through shared memory in the loop (sm_90 and sm_89,
# Triton 3.6 and 3.9; at most a step's absmax, one value per 32 weights). The next limit: one SHFL a weight is the shuffle pipe's 32 lanes a clock an SM, 6.4 us a
# layer on the H200, about what its bytes take. Exact as v2: fp32 products and sums, the K
# experts summed in a fixed order.

USE_V4 = False  # True: blocks=None runs v4 (autotuned) where `chunks_fit`, instead of v2
# With USE_V4, v4's down stage too (False: v2's down after v4's gate_up). On an H200 (26B-A4B, every expert
# resident, CUDA graphs; docs/gpu/2026-11-27-h200-open-switches.md) v4's gate_up took 426 us a token against
# v2's 467, its down 408 against v2's 356; decode 311.8 / 271.3 tok/s (after 16 / 512) against 278.8 / 275.6,
# one run each: gpu_check's alternating decode A/B measures v4, v4's gate_up alone and v2.
V4_DOWN = True


@dataclass(frozen=True)
class V4Tiles:
    """v4 tiles: rows per program and code words per row per step (multiples of 4), per kernel."""

    gate_up_n: int = 4
    gate_up_w: int = 128
    gate_up_warps: int = 1
    down_n: int = 4
    down_w: int = 32
    down_warps: int = 1


INTERPRETER_V4 = V4Tiles(gate_up_n=128, gate_up_w=128, down_n=256, down_w=128)


# Not yet measured on a GPU. Programs at 26B-A4B, T=1: gate_up 8 x 704 / BLOCK_N, down 2816 / BLOCK_N.
# A thread holds 2 * BLOCK_N * BLOCK_W / (128 * warps) (gate_up) / 8 * BLOCK_N * BLOCK_W / (128 * warps)
# (down) chunks of 16 bytes a step. sm_90, Triton 3.6: 3.8-5.6 instructions a weight, 64-255 registers,
# no spills, at most 8 KiB of shared memory (outside the loop); first in each list the shape argued above
# (gate_up 1,408 one-warp programs of 3 steps; down 704 of 3 steps, 43 KB an SM in flight), then
# more programs (BLOCK_N 2 / 1, for latency) and fewer (for instructions).
GATE_UP_V4_CONFIGS = [_chunk_cfg(n, w, warps) for n, w, warps in (
    (4, 128, 1), (2, 128, 1), (8, 128, 2), (4, 64, 1), (8, 64, 2), (2, 64, 1), (8, 32, 1), (4, 128, 2),
    # 2026-11-28: a row in two steps (256 + 96 of 256 words), both requested at the start, or in one (352 of
    # 512): no step waits on another's arrival (sm_90, Triton 3.6: 64-80 registers, no spill)
    (1, 256, 1), (2, 256, 2), (1, 512, 2))]
# H200 (2026-11-27): gate_up's pick (2, 128, 1) stands inside its list; down picked (8, 32, 2), the most
# rows a program here, at one token and at 8: (8, 32, 4) and (16, 32, 4) go past it at the same chunks a thread.
DOWN_V4_CONFIGS = [_chunk_cfg(n, w, warps) for n, w, warps in (
    (4, 32, 1), (2, 32, 1), (8, 32, 2), (1, 128, 1), (4, 64, 2), (2, 64, 1), (8, 32, 1),
    (8, 32, 4), (16, 32, 4), (2, 128, 2))]
# (2, 128, 1) left the list on 2026-11-28: 255 registers and 8 bytes of stack a thread (sm_90, Triton 3.6); the
# same row in one step at two warps (2, 128, 2) holds it in 142


@triton.jit
def _lane_table(code):
    """int32 bits of code[lane % 16] in each thread: lanes l and l + 16 hold entry l of the table."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; and.b32 l, l, 15; mul.wide.u32 a, l, 4; "
        "add.u64 a, a, $1; ld.global.nc.b32 $0, [a]; }",
        "=r,l", [tl.cast(code, tl.int64)], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _lane_value(table, idx):
    """fp32 value that lane idx % 32 holds in `table` (a warp shuffle: every lane of the warp runs it)."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [table, idx],
                                     dtype=tl.int32, is_pure=True, pack=1).to(tl.float32, bitcast=True)


@triton.jit
def _code_value(words, j: tl.constexpr, code, table, LUT_SHFL: tl.constexpr, PROBE: tl.constexpr):
    """fp32 code value of nibble j of each (uint32) word: a shuffle from the lanes' table (LUT_SHFL),
    else a load from the TABLE_ALIGN-aligned table in memory (`_table_value`). PROBE 1 (`PROBES`): no
    table, the nibble as the low bits of 2^23's mantissa (2^23 + nibble: a shift and one LOP3)."""
    if PROBE == 1:
        shift_n: tl.constexpr = (j // 2) * 8 + 4 - 4 * (j % 2)
        return (((words >> shift_n) & 15) | 0x4B000000).to(tl.float32, bitcast=True)
    elif LUT_SHFL:
        shift: tl.constexpr = (j // 2) * 8 + 4 - 4 * (j % 2)
        if shift > 0:
            idx = words >> shift  # bits above the nibble pick lane + 16, which holds the same entry
        else:
            idx = words
        return _lane_value(table, idx.to(tl.int32, bitcast=True))
    else:
        return _table_value(tl.cast(code, tl.int64), words, j)


@triton.jit
def _word_sums(word, lo, hi, code, table, LUT_SHFL: tl.constexpr, PROBE: tl.constexpr):
    """fp32 sums of code[nibble j] * v[j] over the 8 weights of each (uint32) code word; lo / hi [..., 4] hold
    each word's vector elements 0-3 / 4-7 (broadcastable to `word` once the last axis is split off)."""
    lo = tl.reshape(lo, lo.shape[:-1] + [2, 2]).to(tl.float32)  # element j at [j // 2, j % 2]
    hi = tl.reshape(hi, hi.shape[:-1] + [2, 2]).to(tl.float32)
    e, o = tl.split(lo)
    v0, v2 = tl.split(e)
    v1, v3 = tl.split(o)
    e, o = tl.split(hi)
    v4, v6 = tl.split(e)
    v5, v7 = tl.split(o)
    s = _code_value(word, 0, code, table, LUT_SHFL, PROBE) * v0
    s += _code_value(word, 1, code, table, LUT_SHFL, PROBE) * v1
    s += _code_value(word, 2, code, table, LUT_SHFL, PROBE) * v2
    s += _code_value(word, 3, code, table, LUT_SHFL, PROBE) * v3
    s += _code_value(word, 4, code, table, LUT_SHFL, PROBE) * v4
    s += _code_value(word, 5, code, table, LUT_SHFL, PROBE) * v5
    s += _code_value(word, 6, code, table, LUT_SHFL, PROBE) * v6
    s += _code_value(word, 7, code, table, LUT_SHFL, PROBE) * v7
    return s


@triton.jit
def _chunk_sums_v4(words4, vec_ptr, code, table, LUT_SHFL: tl.constexpr, PROBE: tl.constexpr):
    """fp32 [...] sums over the 32 weights of each chunk: words4 [..., 2, 2] holds the chunk's 4 code words
    (word q at [q // 2, q % 2], a [..., 4] load reshaped), vec_ptr [...] its first word's vector element
    (in bounds: no mask). The words are split in the thread that loaded them (one 16-byte load), and a
    word's vector elements come as two loads of 4 (in one thread whether bf16 or fp32), so every operand
    of the sums has the chunk's layout: x / h need no exchange between threads. PROBE 2 (`PROBES`): the
    words' XOR as a float instead, no x / h read, no table, no FMA."""
    words4 = words4.to(tl.uint32, bitcast=True)
    w02, w13 = tl.split(words4)
    w0, w2 = tl.split(w02)
    w1, w3 = tl.split(w13)
    if PROBE == 2:
        return (w0 ^ w1 ^ w2 ^ w3).to(tl.float32)
    vp = tl.expand_dims(vec_ptr, -1) + tl.arange(0, 4)  # [..., 4]
    s = _word_sums(w0, tl.load(vp), tl.load(vp + 4), code, table, LUT_SHFL, PROBE)
    s += _word_sums(w1, tl.load(vp + 8), tl.load(vp + 12), code, table, LUT_SHFL, PROBE)
    s += _word_sums(w2, tl.load(vp + 16), tl.load(vp + 20), code, table, LUT_SHFL, PROBE)
    s += _word_sums(w3, tl.load(vp + 24), tl.load(vp + 28), code, table, LUT_SHFL, PROBE)
    return s


@triton.jit
def _absmax_or_0(buf_u8, buf_f32, base, base32, blk, mask, absmax_off, nested_off32, offset_off32, nested_code,
                 DOUBLE_QUANT: tl.constexpr):
    """`_absmax`, 0 where masked (with double quant a masked block would get the nested offset): v4 reads
    x / h unmasked, so a chunk past the row or of a padded expert slot must weigh 0."""
    am = _absmax(buf_u8, buf_f32, base, base32, blk, mask, absmax_off, nested_off32, offset_off32, nested_code,
                 DOUBLE_QUANT)
    return tl.where(mask, am, 0.0)


@triton.jit
def _gate_up_v4_first(buf_i32, buf_u8, buf_f32, base, codes_off, absmax_off, nested_off32, offset_off32, nested_code,
                      row_w, mask_r, H_Q, LOG_WPB: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_W: tl.constexpr):
    """(code words, absmax) of the first step of v4's gate_up tile of the expert at byte `base`: the rows whose
    first words are row_w (where mask_r), BLOCK_W words of each; past the row, words 0 and absmax 0."""
    ch = tl.arange(0, BLOCK_W // 4) * 4
    wq = tl.arange(0, BLOCK_W)
    words = tl.load(buf_i32 + base // 4 + codes_off // 4 + row_w[:, None] + wq[None, :],
                    mask=mask_r[:, None] & (wq < H_Q)[None, :], other=0)
    am = _absmax_or_0(buf_u8, buf_f32, base, base // 4, (row_w[:, None] + ch[None, :]) >> LOG_WPB,
                      mask_r[:, None] & (ch < H_Q)[None, :], absmax_off, nested_off32, offset_off32, nested_code,
                      DOUBLE_QUANT)
    return words, am


@triton.jit
def _gate_up_v4_rows(words, am, codes, x_row, row_w, mask_r, buf_u8, buf_f32, base, base32, absmax_off, nested_off32,
                     offset_off32, nested_code, code, table, H_Q, LOG_WPB: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     LUT_SHFL: tl.constexpr, PROBE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """(gate, up) fp32 [BLOCK_N] of v4's gate_up tile: `words` / `am` its first step, already requested;
    each step requests the next one's codes and absmax before its own math."""
    NC: tl.constexpr = BLOCK_W // 4
    ch = tl.arange(0, NC) * 4
    wq = tl.arange(0, BLOCK_W)
    acc = tl.zeros([2 * BLOCK_N, NC], dtype=tl.float32)
    for kb in range(0, H_Q, BLOCK_W):
        c1 = kb + BLOCK_W + ch  # the next step's chunks, requested before this step's math
        m2n = mask_r[:, None] & (c1 < H_Q)[None, :]
        wn = kb + BLOCK_W + wq
        words_n = tl.load(codes + wn[None, :], mask=mask_r[:, None] & (wn < H_Q)[None, :], other=0)
        am_n = _absmax_or_0(buf_u8, buf_f32, base, base32, (row_w[:, None] + c1[None, :]) >> LOG_WPB, m2n, absmax_off,
                            nested_off32, offset_off32, nested_code, DOUBLE_QUANT)
        # x of the chunks past the row: the last chunk's (finite; their absmax is 0), no mask to apply
        cw = tl.minimum(kb + ch, H_Q - 4)[None, :]  # [1, NC] first word of each chunk
        acc += _chunk_sums_v4(tl.reshape(words, [2 * BLOCK_N, NC, 2, 2]), x_row + cw * 8, code, table,
                              LUT_SHFL, PROBE) * am
        words, am = words_n, am_n
    gu = tl.reshape(tl.sum(acc, axis=1), [2, BLOCK_N])
    which = tl.arange(0, 2)[:, None]
    return tl.sum(tl.where(which == 0, gu, 0.0), axis=0), tl.sum(tl.where(which == 1, gu, 0.0), axis=0)


@triton.jit
def _gate_up_v4_kernel(x_ptr, ids_ptr, order_ptr, h_ptr, buf_i32, buf_u8, buf_f32, code, nested_code,
                       expert_bytes, codes_off, absmax_off, nested_off32, offset_off32,
                       K, H_Q, I, stride_xt, T_BUCKET, early_ids_ptr, N_EXPERTS,
                       ACT: tl.constexpr, LOG_WPB: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       SORTED: tl.constexpr, LUT_SHFL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                       PDL: tl.constexpr = False, PROBE: tl.constexpr = 0, DOWN_OFF: tl.constexpr = 0,
                       EARLY: tl.constexpr = False):
    """H_Q: code words per row (H / 8); LOG_WPB: log2 of the words per quantization block.
    Tile [2 * BLOCK_N rows (gate rows, then the same up rows), BLOCK_W words], split in the threads into
    [rows, BLOCK_W / 4 chunks, 2, 2] (a 2-D load: Triton 3.6 puts chunks, not rows, on the lanes). EARLY: as
    v2's."""
    rr = tl.arange(0, 2 * BLOCK_N)
    r = tl.program_id(1) * BLOCK_N + rr % BLOCK_N
    mask_r = r < I
    row_w = ((rr // BLOCK_N) * I + r) * H_Q  # [2BN] first word of each row
    if EARLY:  # as v2's
        e0 = _gate_up_early_expert(early_ids_ptr, N_EXPERTS, SORTED)
        words, am = _gate_up_v4_first(buf_i32, buf_u8, buf_f32, e0 * expert_bytes, codes_off, absmax_off, nested_off32,
                                      offset_off32, nested_code, row_w, mask_r, H_Q, LOG_WPB, DOUBLE_QUANT, BLOCK_W)
    pdl_start(PDL)
    p, t, e = _gate_up_pair(ids_ptr, order_ptr, K, SORTED, EARLY)
    base = e * expert_bytes
    base32 = base // 4
    table = 0
    if LUT_SHFL:
        table = _lane_table(code)
    codes = buf_i32 + base32 + codes_off // 4 + row_w[:, None]
    x_row = x_ptr + t * stride_xt
    if EARLY:
        due = e != e0  # as v2's
    else:
        due: tl.constexpr = True
    if due:
        words, am = _gate_up_v4_first(buf_i32, buf_u8, buf_f32, base, codes_off, absmax_off, nested_off32,
                                      offset_off32, nested_code, row_w, mask_r, H_Q, LOG_WPB, DOUBLE_QUANT, BLOCK_W)
    if DOWN_OFF > 0:  # as v2's (DOWN_OFF: PREFETCH_DOWN)
        _prefetch_down(buf_u8, base, expert_bytes, h_ptr + p * I, DOWN_OFF)
    gate, up = _gate_up_v4_rows(words, am, codes, x_row, row_w, mask_r, buf_u8, buf_f32, base, base32, absmax_off,
                                nested_off32, offset_off32, nested_code, code, table, H_Q, LOG_WPB, DOUBLE_QUANT,
                                LUT_SHFL, PROBE, BLOCK_N, BLOCK_W)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + p * I + rn, _act(gate, ACT) * up, mask=rn < I)


@triton.jit
def _down_v4_kernel(h_ptr, ids_ptr, w_ptr, y_ptr, buf_i32, buf_u8, buf_f32, code, nested_code,
                    expert_bytes, codes_off, absmax_off, nested_off32, offset_off32,
                    K, H, I, I_Q, stride_yt, T_BUCKET, early_ids_ptr, N_EXPERTS,
                    LOG_WPB: tl.constexpr, DOUBLE_QUANT: tl.constexpr, KE: tl.constexpr, LUT_SHFL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr = False,
                    PROBE: tl.constexpr = 0, EARLY: tl.constexpr = False):
    """I_Q: code words per row (I / 8). Tile [BLOCK_N rows, KE experts, BLOCK_W / 4 chunks, 4 words]:
    the rows vary slowest, so a thread holds rows of the same expert and chunk and loads h once for them.
    EARLY: as v2's."""
    t = tl.program_id(1).to(tl.int64)
    NC: tl.constexpr = BLOCK_W // 4
    kk = tl.arange(0, KE)
    mask_k = kk < K
    p = t * K + kk  # [KE] pairs of this token
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = r < H
    row_w = (r * I_Q)[:, None, None]  # [BN, 1, 1]
    m_rk = mask_r[:, None, None] & mask_k[None, :, None]
    ch = tl.arange(0, NC) * 4
    q = tl.arange(0, 4)[None, None, None, :]
    c0 = ch[None, None, :]
    m3 = m_rk & (c0 < I_Q)
    blk0 = (row_w + c0) >> LOG_WPB
    if EARLY:  # as v2's
        e0 = _early_expert(early_ids_ptr + p, mask_k, 0, N_EXPERTS)
        base0 = (e0 * expert_bytes)[None, :, None]
        words = tl.load((buf_i32 + base0 // 4 + codes_off // 4 + row_w)[:, :, :, None] + c0[:, :, :, None] + q,
                        mask=m3[:, :, :, None], other=0)
        am = _absmax_or_0(buf_u8, buf_f32, base0, base0 // 4, blk0, m3, absmax_off, nested_off32, offset_off32,
                          nested_code, DOUBLE_QUANT)
    pdl_start(PDL)
    table = 0
    if LUT_SHFL:
        table = _lane_table(code)
    e = _step_expert(ids_ptr + p, mask_k, 0, EARLY)  # padded slots: expert 0, masked off
    wk = tl.load(w_ptr + p, mask=mask_k, other=0.0).to(tl.float32)
    base = (e * expert_bytes)[None, :, None]  # [1, KE, 1]
    base32 = base // 4
    codes = (buf_i32 + base32 + codes_off // 4 + row_w)[:, :, :, None]  # [BN, KE, 1, 1]
    h_rows = (h_ptr + (t * K + tl.minimum(kk, K - 1)) * I)[None, :, None]  # [1, KE, 1]; padded slots: the last pair's
    if EARLY:
        due = tl.max((e != e0).to(tl.int32), axis=0) > 0  # as v2's
    else:
        due: tl.constexpr = True
    if due:
        words = tl.load(codes + c0[:, :, :, None] + q, mask=m3[:, :, :, None], other=0)
        am = _absmax_or_0(buf_u8, buf_f32, base, base32, blk0, m3, absmax_off, nested_off32, offset_off32,
                          nested_code, DOUBLE_QUANT)
    acc = tl.zeros([BLOCK_N, KE, NC], dtype=tl.float32)
    for kb in range(0, I_Q, BLOCK_W):
        c1 = (kb + BLOCK_W + ch)[None, None, :]
        m3n = m_rk & (c1 < I_Q)
        words_n = tl.load(codes + c1[:, :, :, None] + q, mask=m3n[:, :, :, None], other=0)
        am_n = _absmax_or_0(buf_u8, buf_f32, base, base32, (row_w + c1) >> LOG_WPB, m3n, absmax_off, nested_off32,
                       offset_off32, nested_code, DOUBLE_QUANT)
        cw = tl.minimum(kb + ch, I_Q - 4)[None, None, :]  # [1, 1, NC]; past the row: the last chunk (am 0 there)
        acc += _chunk_sums_v4(tl.reshape(words, [BLOCK_N, KE, NC, 2, 2]), h_rows + cw * 8, code, table,
                              LUT_SHFL, PROBE) * am
        words, am = words_n, am_n
    d = tl.sum(acc, axis=2)  # [BN, KE]
    y = tl.sum(d * wk[None, :], axis=1)  # fixed-order sum over the K experts
    tl.store(y_ptr + t * stride_yt + r, y.to(y_ptr.dtype.element_ty), mask=mask_r)


_gate_up_v4_tuned = triton.autotune(GATE_UP_V4_CONFIGS, key=["H_Q", "I", "T_BUCKET", "K", "LOG_WPB", "DOUBLE_QUANT"],
                                    do_bench=_fast_bench, cache_results=True)(_gate_up_v4_kernel)
_down_v4_tuned = triton.autotune(DOWN_V4_CONFIGS, key=["H", "I_Q", "T_BUCKET", "K", "LOG_WPB", "DOUBLE_QUANT"],
                                 do_bench=_fast_bench, cache_results=True)(_down_v4_kernel)


# -- v5: one launch a decoded token ------------------------------------------------------------
#
# v2 / v4 run a decoded token's experts as two launches, gate_up then down: each a partial wave of
# latency-bound programs with its own ramp and tail, and a kernel boundary between them (~1-2 us in a CUDA
# graph), ~27 us a layer for ~24 MB on the H200 (2026-11-27 late: v4 gate_up 14.2 us, down 13.6). v5 is one
# launch of K x I / BLOCK_J programs, program (k, j) for intermediate rows j of the token's expert k:
#   1. gate rows j and up rows I + j against x (v4's gate_up tile and loop, `_gate_up_v4_rows`), h_j =
#      act(gate) * up, stored (fp32, as v4) and read back by the program's own threads after a barrier;
#   2. down's columns j of every row against h_j (v4's chunk sums, h the same for every row), times w_k,
#      added into a held fp32 accumulator of H rows (`tl.atomic_add`), BLOCK_R rows a step; down's first
#      step is requested before phase 1's loop, so the program's down bytes are in flight while its gate_up
#      ones arrive;
#   3. a counter: the program that counts itself last (every program has added its share) rounds the rows
#      into y (x's dtype), zeroes them for the next call (an exchange with 0 reads and zeroes a row in one L2
#      operation, FINAL_ROWS rows a request) and resets the counter (release / acquire at GPU
#      scope, as norms_route), so no launch zeroes anything per call. One count a program, after its last
#      step: each release is a fence (`MEMBAR.ALL.GPU`) that waits for the program's additions to land, an
#      L2 round trip a step had each step counted for its own rows.
# Down's columns of a row are BLOCK_J / 8 words (16 bytes at BLOCK_J = 32: a 32-byte sector shared with
# the next program's, one absmax byte a row), read where the two-launch down tile read whole rows; its
# absmax bytes stride I / blocksize apart (the neighbouring programs read the same sectors: the L2's).
# The sum over the K experts and the I / BLOCK_J column blocks runs in the order the atomics land: fp32
# products and sums as v4, but not bit-reproducible from run to run on a GPU (the interpreter runs the
# programs in order). One token only (a prompt's pairs run v2 / v4 or the grouped GEMMs), rows of whole
# chunks (`chunks_fit`). Opt-in until scripts/gpu_check.py's decode A/B (`with_fused_moe`) measures it.
USE_FUSED = False
FINAL_ROWS = 2048  # the last program's rows a request: 2 requests at H = 2,816 (4,096 a request held 64-bit
# addresses enough to spill at the first config, sm_90, Triton 3.6)


@dataclass(frozen=True)
class FusedTiles:
    """v5 tiles: intermediate rows a program (a multiple of CHUNK_WEIGHTS), gate_up code words a row a step
    (a multiple of 4), down rows a step, warps."""

    block_j: int = 32
    block_w: int = 64
    block_r: int = 512
    warps: int = 4


INTERPRETER_FUSED = FusedTiles(block_j=32, block_w=128, block_r=256, warps=4)


def _fused_cfg(j, w, r, warps):
    return triton.Config({"BLOCK_J": j, "BLOCK_W": w, "BLOCK_R": r}, num_warps=warps, num_stages=1)


# Not yet measured on a GPU. Programs at 26B-A4B: 8 x 704 / BLOCK_J (176 at 32, 88 at 64); each reads
# 2 * BLOCK_J gate_up rows (1,408 bytes each) and BLOCK_J / 2 bytes of each of down's 2,816 rows.
FUSED_CONFIGS = [_fused_cfg(j, w, r, warps) for j, w, r, warps in (
    (32, 64, 512, 4), (32, 128, 1024, 16), (32, 64, 1024, 8), (64, 64, 512, 16), (64, 32, 512, 8), (32, 32, 256, 2))]


@triton.jit
def _down_columns(dn_codes, rows, cj, buf_u8, buf_f32, base, base32, absmax_off, nested_off32, offset_off32,
                  nested_code, H, I_Q, LOG_WPB: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """(code words [rows, chunks, 4], absmax [rows, chunks]) of a down matrix's chunks whose first words in a row
    are cj, in each of `rows` (rows of I_Q words; dn_codes: the chunks' [1, chunks, 4] words in row 0); past H or
    the row, words 0 and absmax 0."""
    ok = (rows < H)[:, None] & (cj < I_Q)[None, :]
    words = tl.load(dn_codes + (rows * I_Q)[:, None, None], mask=ok[:, :, None], other=0)
    am = _absmax_or_0(buf_u8, buf_f32, base, base32, ((rows * I_Q)[:, None] + cj[None, :]) >> LOG_WPB, ok, absmax_off,
                      nested_off32, offset_off32, nested_code, DOUBLE_QUANT)
    return words, am


@triton.jit
def _moe_fused_kernel(x_ptr, ids_ptr, w_ptr, h_ptr, acc_ptr, acc_bits_ptr, count_ptr, y_ptr, buf_i32, buf_u8,
                      buf_f32, code, nested_code, expert_bytes, codes_off, absmax_off, nested_off32, offset_off32,
                      dn_codes_off, dn_absmax_off, dn_nested_off32, dn_offset_off32, K, H, H_Q, I, I_Q,
                      ACT: tl.constexpr, LOG_WPB: tl.constexpr, DOUBLE_QUANT: tl.constexpr, LUT_SHFL: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                      PDL: tl.constexpr = False):
    """One token: program (k, j) as the v5 notes above say. H_Q / I_Q: code words of a gate_up / down row;
    BLOCK_H: rows the last program rounds out a request (H's next power of two, at most FINAL_ROWS); acc_ptr:
    H fp32 zeros (left zero), acc_bits_ptr the same as int32 (read and zeroed by exchanges: the interpreter has
    none of floats); count_ptr: an int32 zero (left zero)."""
    pdl_start(PDL)
    k = tl.program_id(0)
    jb = tl.program_id(1)
    NJ: tl.constexpr = BLOCK_J // 32  # down chunks a row
    e = tl.load(ids_ptr + k).to(tl.int64)
    wk = tl.load(w_ptr + k).to(tl.float32)
    base = e * expert_bytes
    base32 = base // 4
    table = 0
    if LUT_SHFL:
        table = _lane_table(code)
    # down's first step of rows: its columns j (chunks past I weigh 0, their h clamped into the row)
    cj = jb * (BLOCK_J // 8) + tl.arange(0, NJ) * 4  # [NJ] first word of each chunk in a down row
    dn_codes = buf_i32 + base32 + dn_codes_off // 4 + cj[None, :, None] + tl.arange(0, 4)[None, None, :]  # row 0
    dwords, dam = _down_columns(dn_codes, tl.arange(0, BLOCK_R), cj, buf_u8, buf_f32, base, base32, dn_absmax_off,
                                dn_nested_off32, dn_offset_off32, nested_code, H, I_Q, LOG_WPB, DOUBLE_QUANT)
    # 1. gate / up rows j: v4's tile
    rr = tl.arange(0, 2 * BLOCK_J)
    r = jb * BLOCK_J + rr % BLOCK_J
    mask_r = r < I
    row_w = ((rr // BLOCK_J) * I + r) * H_Q  # [2 BLOCK_J] first word of each row
    codes = buf_i32 + base32 + codes_off // 4 + row_w[:, None]
    words, am = _gate_up_v4_first(buf_i32, buf_u8, buf_f32, base, codes_off, absmax_off, nested_off32, offset_off32,
                                  nested_code, row_w, mask_r, H_Q, LOG_WPB, DOUBLE_QUANT, BLOCK_W)
    gate, up = _gate_up_v4_rows(words, am, codes, x_ptr, row_w, mask_r, buf_u8, buf_f32, base, base32, absmax_off,
                                nested_off32, offset_off32, nested_code, code, table, H_Q, LOG_WPB, DOUBLE_QUANT,
                                LUT_SHFL, 0, BLOCK_J, BLOCK_W)
    rn = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    tl.store(h_ptr + k * I + rn, _act(gate, ACT) * up, mask=rn < I)
    tl.debug_barrier()  # h_j stored by the threads that summed it, read below by every thread
    # 2. down's columns j of every row, BLOCK_R rows a step, the next step requested before this one's math
    h_vec = h_ptr + k * I + tl.minimum(cj, I_Q - 4)[None, :] * 8  # [1, NJ]
    for step in range(0, tl.cdiv(H, BLOCK_R)):
        dwords_n, dam_n = _down_columns(dn_codes, (step + 1) * BLOCK_R + tl.arange(0, BLOCK_R), cj, buf_u8, buf_f32,
                                        base, base32, dn_absmax_off, dn_nested_off32, dn_offset_off32, nested_code, H,
                                        I_Q, LOG_WPB, DOUBLE_QUANT)
        s = tl.sum(_chunk_sums_v4(tl.reshape(dwords, [BLOCK_R, NJ, 2, 2]), h_vec, code, table, LUT_SHFL, 0) * dam,
                   axis=1)
        rows = step * BLOCK_R + tl.arange(0, BLOCK_R)
        tl.atomic_add(acc_ptr + rows, s * wk, mask=rows < H, sem="relaxed", scope="gpu")
        dwords, dam = dwords_n, dam_n
    # 3. the last program to finish rounds the rows into y and leaves them zero
    tl.debug_barrier()  # every thread's additions above come before the release below
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) * tl.num_programs(1) - 1:
        for r0 in range(0, H, BLOCK_H):  # rows read and zeroed in one request each: an L2 round trip
            every = r0 + tl.arange(0, BLOCK_H)
            bits = tl.atomic_xchg(acc_bits_ptr + every, tl.zeros([BLOCK_H], dtype=tl.int32), mask=every < H,
                                  sem="relaxed", scope="gpu")
            v = bits.to(tl.float32, bitcast=True)
            tl.store(y_ptr + every, v.to(y_ptr.dtype.element_ty), mask=every < H)
        tl.atomic_xchg(count_ptr, 0)  # ready for the next call


@dataclass
class _Call:
    """One layer call's arguments as the GEMV kernels (v2, v4) take them; h and y are its outputs."""

    x: torch.Tensor
    ids: torch.Tensor
    order: torch.Tensor  # pairs sorted by expert (T > 1), else ids (unused)
    w: torch.Tensor
    h: torch.Tensor  # fp32 [T * K, I]: act(gate) * up per pair
    y: torch.Tensor  # [T, H] in x's dtype
    experts: torch.Tensor
    code: torch.Tensor  # TABLE_ALIGN-aligned
    nested_code: torch.Tensor
    offsets: list
    T: int
    K: int
    H: int
    I: int
    blocksize: int
    double_quant: bool
    act: str
    early: bool | None = None  # EARLY for the v2 / v4 launches (None: `_early` decides)
    early_ids: torch.Tensor | None = None  # what they read before the wait (None: ids itself)

    @property
    def t_bucket(self) -> int:
        return min(triton.next_power_of_2(self.T), 16)

    def grid(self, stage: str, block_n: int) -> tuple[int, int]:
        """A stage's grid at BLOCK_N rows a program: gate_up (pairs, tiles of I rows), down (tiles of H rows,
        tokens)."""
        if stage == "gate_up":
            return self.T * self.K, triton.cdiv(self.I, block_n)
        return triton.cdiv(self.H, block_n), self.T

    def common(self, stage: str) -> tuple:
        """The positional arguments both versions of a stage's kernel take (rows as 32-bit code words)."""
        e = self.experts
        if stage == "gate_up":
            return (self.x, self.ids, self.order, self.h, e.view(torch.int32), e, e.view(torch.float32), self.code,
                    self.nested_code, e.shape[1], *_matrix_args(self.offsets[:4]), self.K, self.H // 8, self.I,
                    self.x.stride(0), self.t_bucket)
        return (self.h, self.ids, self.w, self.y, e.view(torch.int32), e, e.view(torch.float32), self.code,
                self.nested_code, e.shape[1], *_matrix_args(self.offsets[4:]), self.K, self.H, self.I, self.I // 8,
                self.y.stride(0), self.t_bucket)


def _prepare(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant,
             act) -> _Call:
    T, K = ids_TK.shape
    ids = ids_TK.contiguous()
    if code.data_ptr() % TABLE_ALIGN:
        code = code.clone()  # a fresh allocation: torch aligns those to 64 bytes (CPU) / 512 (CUDA)
    return _Call(x_TH, ids, torch.argsort(ids.reshape(-1), stable=True) if T > 1 else ids, w_TK.contiguous(),
                 torch.empty(T * K, inter, dtype=torch.float32, device=x_TH.device),
                 torch.empty(T, hidden, dtype=x_TH.dtype, device=x_TH.device), experts, code, nested_code,
                 list(offsets), T, K, hidden, inter, blocksize, bool(double_quant), act)


def _early(c: _Call) -> dict:
    """The EARLY arguments of a v2 / v4 launch of `c`: on for one token under PDL where EARLY_LOADS says so
    (c.early instead where set: the tests, which run it under the interpreter without PDL); the ids read
    before the wait are the step's own unless c.early_ids (the tests: ids another token left there)."""
    on = EARLY_LOADS and bool(triton_pdl.launch(c.x.device)) if c.early is None else c.early
    return dict(early_ids_ptr=c.ids if c.early_ids is None else c.early_ids, N_EXPERTS=c.experts.shape[0],
                EARLY=on and c.T == 1)


def _gate_up_chunks(c: _Call, tiles: V4Tiles | None, **extra) -> None:
    """v4's gate_up stage with the constexprs `extra` (the decode step's, or triton_moe_probe's PROBE):
    autotuned (tiles None), else with `tiles`."""
    meta = dict(ACT=ACT_CODES[c.act], LOG_WPB=(c.blocksize // 8).bit_length() - 1, DOUBLE_QUANT=c.double_quant,
                SORTED=c.T > 1, **extra, **triton_pdl.launch(c.x.device))
    args = c.common("gate_up")
    if tiles is None:
        _gate_up_v4_tuned[lambda m: c.grid("gate_up", m["BLOCK_N"])](*args, **meta)
    else:
        _gate_up_v4_kernel[c.grid("gate_up", tiles.gate_up_n)](
            *args, **meta, BLOCK_N=tiles.gate_up_n, BLOCK_W=tiles.gate_up_w, num_warps=tiles.gate_up_warps,
            num_stages=1)


def _down_chunks(c: _Call, tiles: V4Tiles | None, **extra) -> None:
    """v4's down stage, as `_gate_up_chunks`."""
    meta = dict(LOG_WPB=(c.blocksize // 8).bit_length() - 1, DOUBLE_QUANT=c.double_quant,
                KE=triton.next_power_of_2(c.K), **extra, **triton_pdl.launch(c.x.device))
    args = c.common("down")
    if tiles is None:
        _down_v4_tuned[lambda m: c.grid("down", m["BLOCK_N"])](*args, **meta)
    else:
        _down_v4_kernel[c.grid("down", tiles.down_n)](
            *args, **meta, BLOCK_N=tiles.down_n, BLOCK_W=tiles.down_w, num_warps=tiles.down_warps, num_stages=1)


def _gate_up_v2(c: _Call, tiles: Tiles | None) -> None:
    meta = dict(ACT=ACT_CODES[c.act], BLOCKSIZE=c.blocksize, DOUBLE_QUANT=c.double_quant, SORTED=c.T > 1,
                BB=_gcd_pow2(c.H // 2, c.blocksize), **triton_pdl.launch(c.x.device), **_down_off(c),
                **_early(c))
    args = c.common("gate_up")
    if tiles is None:
        _gate_up_v2_tuned[lambda m: c.grid("gate_up", m["BLOCK_N"])](*args, **meta)
    else:
        _gate_up_v2_kernel[c.grid("gate_up", tiles.gate_up_n)](
            *args, **meta, BLOCK_N=tiles.gate_up_n, BLOCK_K=tiles.gate_up_k, num_warps=tiles.gate_up_warps,
            num_stages=tiles.num_stages)


def _down_v2(c: _Call, tiles: Tiles | None) -> None:
    meta = dict(BLOCKSIZE=c.blocksize, DOUBLE_QUANT=c.double_quant, BB=_gcd_pow2(c.I // 2, c.blocksize),
                KE=triton.next_power_of_2(c.K), **triton_pdl.launch(c.x.device), **_early(c))
    args = c.common("down")
    if tiles is None:
        _down_v2_tuned[lambda m: c.grid("down", m["BLOCK_N"])](*args, **meta)
    else:  # the tile holds KE x BLOCK_N x 2 BLOCK_K weights: fewer rows where top-k would pass Triton's limit
        n = min(tiles.down_n, max(1, MAX_TILE_NUMEL // (meta["KE"] * 2 * tiles.down_k)))
        _down_v2_kernel[c.grid("down", n)](
            *args, **meta, BLOCK_N=n, BLOCK_K=tiles.down_k, num_warps=tiles.down_warps, num_stages=tiles.num_stages)


def _gate_up_v4(c: _Call, tiles: V4Tiles | None) -> None:
    _gate_up_chunks(c, tiles, LUT_SHFL=inline_ptx(c.x.device), **_down_off(c), **_early(c))


def _down_v4(c: _Call, tiles: V4Tiles | None) -> None:
    _down_chunks(c, tiles, LUT_SHFL=inline_ptx(c.x.device), **_early(c))


def _moe_4bit_v4(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant,
                 act, tiles: V4Tiles | None, down: bool = True) -> torch.Tensor:
    """The v4 kernels: autotuned on CUDA (tiles None), else with `tiles`; `down` False: v2's down stage
    after v4's gate_up (autotuned on CUDA, else INTERPRETER_TILES)."""
    c = _prepare(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant,
                 act)
    _gate_up_v4(c, tiles)
    if down:
        _down_v4(c, tiles)
    else:
        _down_v2(c, INTERPRETER_TILES if interpreted() else None)
    return c.y


_moe_fused_tuned = triton.autotune(FUSED_CONFIGS, key=["H_Q", "I", "K", "LOG_WPB", "DOUBLE_QUANT"],
                                   do_bench=_fast_bench, cache_results=True)(_moe_fused_kernel)


def _fused_tiles_ok(t: FusedTiles) -> bool:
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return (t.block_j % CHUNK_WEIGHTS == 0 and pow2(t.block_j // CHUNK_WEIGHTS) and pow2(t.block_w) and t.block_w >= 4
            and pow2(t.block_r) and pow2(t.warps))


def fused_fits(T: int, hidden: int, inter: int, blocksize: int) -> bool:
    """v5 takes one token, rows of whole chunks."""
    return T == 1 and chunks_fit(hidden, inter, blocksize)


def _moe_4bit_fused(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant,
                    act, tiles: FusedTiles | None) -> torch.Tensor:
    """The v5 kernel (one token): autotuned on CUDA (tiles None), else with `tiles`."""
    if tiles is not None and not _fused_tiles_ok(tiles):
        raise ValueError(f"v5 tiles need block_j a power of two times {CHUNK_WEIGHTS} and block_w, block_r and "
                         f"warps powers of two (block_w at least 4), got {tiles}")
    c = _prepare(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant,
                 act)
    device = x_TH.device
    # held for good, zero at rest: two v5 calls on one device must not overlap (the decode step's calls follow
    # each other on its one stream; parallel_mlp's side stream runs no experts); if one did, the counter would
    # never come back to zero and no later call would round its rows out (fused_left_zero says)
    acc = counters.held(f"moe_fused_acc_{hidden}", device, hidden, torch.float32)
    count = counters.held("moe_fused", device, 1)
    e = c.experts
    args = (c.x, c.ids, c.w, c.h, acc, acc.view(torch.int32), count, c.y, e.view(torch.int32), e,
            e.view(torch.float32), c.code, c.nested_code, e.shape[1], *_matrix_args(c.offsets[:4]),
            *_matrix_args(c.offsets[4:]), c.K, c.H, c.H // 8, c.I, c.I // 8)
    meta = dict(ACT=ACT_CODES[c.act], LOG_WPB=(c.blocksize // 8).bit_length() - 1, DOUBLE_QUANT=c.double_quant,
                LUT_SHFL=inline_ptx(device), BLOCK_H=min(triton.next_power_of_2(c.H), FINAL_ROWS),
                **triton_pdl.launch(device))
    if tiles is None:
        _moe_fused_tuned[lambda m: (c.K, triton.cdiv(c.I, m["BLOCK_J"]))](*args, **meta)
    else:
        _moe_fused_kernel[(c.K, triton.cdiv(c.I, tiles.block_j))](
            *args, **meta, BLOCK_J=tiles.block_j, BLOCK_W=tiles.block_w, BLOCK_R=tiles.block_r, num_warps=tiles.warps,
            num_stages=1)
    return c.y


def fused_left_zero(device: torch.device, hidden: int) -> bool | None:
    """Whether v5's held accumulator (of `hidden` rows) and counter on `device` are zero, as every call must leave
    them (None: v5 never ran there)."""
    acc = counters._HELD.get((f"moe_fused_acc_{hidden}", device))
    count = counters._HELD.get(("moe_fused", device))
    if acc is None or count is None:
        return None
    return not acc.any().item() and not count.any().item()


def v2_fits(hidden: int, inter: int) -> bool:
    """The v2 kernels read codes as 32-bit words of whole rows: rows of a multiple of 8 weights."""
    return hidden % 8 == 0 and inter % 8 == 0


def _matrix_args(offsets: list[int]) -> tuple[int, int, int, int]:
    """(codes, absmax) byte offsets and (nested absmax, nested offset) float32 offsets; 0 where absent."""
    codes, absmax, nested, offset = offsets
    return codes, absmax, max(nested, 0) // 4, max(offset, 0) // 4


def _check(x_TH, ids_TK, experts, hidden):
    T, K = ids_TK.shape
    if x_TH.shape != (T, hidden) or x_TH.stride(1) != 1:
        raise ValueError(f"x must be [T={T}, H={hidden}] with unit column stride, got {tuple(x_TH.shape)}")
    if experts.shape[1] % 4:
        raise ValueError("expert rows must be a multiple of 4 bytes")


VERSIONS = ("v2", "v4", "v5")  # what moe_4bit_triton's `blocks` may name


def _check_word_rows(hidden: int, inter: int) -> None:
    """The GEMV kernels (v2, v4, v5) read each row as whole 32-bit words from its own first byte: a row
    of another length would start mid-word, or mid-byte (the grouped kernels index weights, and take
    any shape)."""
    if not v2_fits(hidden, inter):
        raise ValueError(f"the 4-bit GEMV kernels need a hidden and intermediate size that are multiples of 8, "
                         f"got H={hidden}, I={inter} (blocks=None runs the grouped kernels there)")


def moe_4bit_triton(x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, experts: torch.Tensor,
                    code: torch.Tensor, nested_code: torch.Tensor, offsets: list[int], hidden: int, inter: int,
                    blocksize: int, double_quant: bool, act: str,
                    blocks: FusedTiles | V4Tiles | Tiles | str | None = None) -> torch.Tensor:
    """y_TH = sum_k w[t,k] * expert_{ids[t,k]}(x[t]) over the [E, nbytes] uint8 expert rows (see module
    docstring; the arguments are those of the localrun::moe_4bit op). Returns x's dtype.

    `blocks`: None = the best kernels for the shape: from GROUPED_MIN_TOKENS tokens the grouped GEMMs
    (`moe_4bit_grouped`, the prefill path; also for rows that are not whole 32-bit words, which the GEMV
    kernels cannot read), else for one token the one-launch v5 if USE_FUSED (where `fused_fits`), else where
    `chunks_fit` v4 if USE_V4 (its down stage if V4_DOWN, else v2's), else v2; autotuned on CUDA, fixed
    tiles when interpreted. "v5" / "v4" / "v2" = those kernels alone, autotuned (A/B timing).
    A FusedTiles / V4Tiles / Tiles = the v5 / v4 / v2 kernels with those tiles."""
    if isinstance(blocks, str) and blocks not in VERSIONS:
        raise ValueError(f"no 4-bit MoE kernels named {blocks!r}: the versions are {', '.join(VERSIONS)}")
    T = ids_TK.shape[0]
    version = (default_kernels(T, hidden, inter, blocksize) if blocks is None else blocks if isinstance(blocks, str)
               else "v5" if isinstance(blocks, FusedTiles) else "v4" if isinstance(blocks, V4Tiles) else "v2")
    if version == "grouped":
        return moe_4bit_grouped(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize,
                                double_quant, act)
    _check_word_rows(hidden, inter)
    _check(x_TH, ids_TK, experts, hidden)
    if version == "v5":
        if not fused_fits(T, hidden, inter, blocksize):
            raise ValueError(f"the v5 kernel takes one token, H and I multiples of {CHUNK_WEIGHTS} and a power-of-two "
                             f"blocksize >= {CHUNK_WEIGHTS}, got T={T}, H={hidden}, I={inter}, blocksize {blocksize}")
        tiles = blocks if isinstance(blocks, FusedTiles) else INTERPRETER_FUSED if interpreted() else None
        return _moe_4bit_fused(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize,
                               double_quant, act, tiles)
    if version == "v4":
        if not chunks_fit(hidden, inter, blocksize):
            raise ValueError(f"the v4 kernels need H and I multiples of {CHUNK_WEIGHTS} and a power-of-two "
                             f"blocksize >= {CHUNK_WEIGHTS}, got H={hidden}, I={inter}, blocksize {blocksize}")
        tiles = blocks if isinstance(blocks, V4Tiles) else INTERPRETER_V4 if interpreted() else None
        return _moe_4bit_v4(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize,
                            double_quant, act, tiles, down=blocks is not None or V4_DOWN)
    tiles = blocks if isinstance(blocks, Tiles) else INTERPRETER_TILES if interpreted() else None
    return _moe_4bit_v2(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize,
                        double_quant, act, tiles)


def default_kernels(tokens: int, hidden: int, inter: int, blocksize: int) -> str:
    """The kernels moe_4bit_triton runs with blocks=None for `tokens` tokens at this shape: "grouped" (a
    prompt's, or rows that are not whole 32-bit words), else "v5" (USE_FUSED, one token), "v4" (USE_V4; its
    down stage only with V4_DOWN) or "v2"."""
    if tokens >= GROUPED_MIN_TOKENS or not v2_fits(hidden, inter):
        return "grouped"
    if USE_FUSED and fused_fits(tokens, hidden, inter, blocksize):
        return "v5"
    if USE_V4 and chunks_fit(hidden, inter, blocksize):
        return "v4"
    return "v2"


def _moe_4bit_v2(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant,
                 act, tiles: Tiles | None) -> torch.Tensor:
    """The v2 kernels (the default; v4 and v5 need rows of whole chunks): autotuned on CUDA (tiles None),
    else with `tiles`."""
    c = _prepare(x_TH, ids_TK, w_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant,
                 act)
    _gate_up_v2(c, tiles)
    _down_v2(c, tiles)
    return c.y


# -- prefill: one grouped GEMM per matrix over the pairs sorted by expert -----------------------
#
# With many tokens the GEMV kernels above would read each hit expert once per (token, expert) pair.
# Here the pairs p = t * K + k are sorted by expert and each expert's pairs padded to whole blocks of
# BLOCK_M slots (`pair_blocks`, built on the device: no host sync). A program owns one block (BLOCK_M
# pairs of ONE expert) and BLOCK_N output columns: it dequantizes a [BLOCK_N, BLOCK_K] tile of that
# expert's matrix once for all its pairs and multiplies on the tensor cores (tl.dot; fp32 inputs in
# IEEE precision, not TF32). The K outputs of a token come from different programs, so each pair's
# output is stored (rounded to x's dtype, as `localrun.moe.dispatch` rounds each expert's output) and
# the weighted sum over k runs afterwards in fp32, in k order: deterministic, no atomics.

GROUPED_MIN_TOKENS = 17  # from this many tokens a layer call is a prefill (quant.ffn.BUFFERED_MAX_TOKENS + 1)


@dataclass(frozen=True)
class GroupedTiles:
    """Grouped-GEMM tiles: output columns per program and reduction elements per step (BLOCK_M is
    chosen per call from the pairs per expert, see `grouped_block_m`)."""

    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


INTERPRETER_GROUPED = GroupedTiles(block_n=64, block_k=128)


def _gcfg(n, k, w, s):
    return triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


# not yet measured on a GPU: small enough tiles that two dequantized [BLOCK_N, BLOCK_K] fp32 tiles
# (gate and up) stay in registers. Pipelined stages hold every gathered load of a step (codes, absmax,
# nested statistics: a [BLOCK_N, BLOCK_K] tile each) in shared memory: at 3 stages the larger tiles
# need 130-430 KiB, more than an RTX 3090 / 4090 block may have (99 KiB) or even an H100's (227 KiB),
# and the autotuner skips them there. The first configs hold at most ~20 KiB (sm_86, Triton 3.6 / 3.9,
# double quant included; tests/test_sass_stats.py checks it), so every GPU has one that launches.
GROUPED_CONFIGS = [_gcfg(n, k, w, s) for n, k, w, s in (
    (64, 64, 4, 1), (32, 64, 4, 1), (32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3),
    (128, 64, 8, 3), (64, 128, 8, 3), (128, 32, 4, 3))]
GROUPED_FIT_ANYWHERE = 2  # the first configs, which launch within 48 KiB of shared memory (any CUDA GPU)


def grouped_block_m(pairs: int, num_experts: int) -> int:
    """Pair slots per block: about the pairs an expert gets (a block re-reads its expert's bytes)."""
    per_expert = pairs / max(1, min(num_experts, pairs))
    return 16 if per_expert <= 8 else 32 if per_expert <= 16 else 64


@dataclass(frozen=True)
class PairBlocks:
    """The pairs sorted by expert, each expert's padded to whole blocks of `block_m` slots."""

    pairs: torch.Tensor  # int32 [blocks * block_m]: the pair in each slot; P (= T * K) in padding slots
    experts: torch.Tensor  # int32 [blocks]: each block's expert; E for the blocks past the last one
    block_m: int


def pair_blocks(ids_TK: torch.Tensor, num_experts: int, block_m: int,
                wave: tuple[int, int] | None = None) -> PairBlocks:
    """Device-side layout, no host value read: `blocks` is the static upper bound
    cdiv(P, block_m) + min(E, P) (every hit expert wastes less than one block).

    `wave` (pairs, experts): lay out only the pairs whose id is below num_experts, that many of them
    over that many experts (counts the host knows: ExpertStore's waves); the others (id num_experts)
    get no slot, and the bound counts the wave's experts."""
    dev = ids_TK.device
    flat = ids_TK.reshape(-1).long()
    P = flat.numel()
    n, hit = (P, num_experts) if wave is None else wave
    order = torch.argsort(flat, stable=True)[:n]  # the skipped pairs sort last
    sorted_e = flat[order]
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, sorted_e, torch.ones_like(sorted_e))
    per_expert = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(per_expert, 0)
    first_pair = torch.cumsum(counts, 0) - counts
    slot = (block_end - per_expert)[sorted_e] * block_m + torch.arange(n, device=dev) - first_pair[sorted_e]
    blocks = triton.cdiv(n, block_m) + min(hit, n)
    slots = torch.full((blocks * block_m,), P, dtype=torch.int32, device=dev)
    slots[slot] = order.to(torch.int32)
    experts = torch.searchsorted(block_end, torch.arange(blocks, device=dev), right=True).to(torch.int32)
    return PairBlocks(slots, experts, block_m)


@triton.jit
def _dequant_tile(buf_u8, buf_f32, base, base32, codes_off, absmax_off, nested_off32, offset_off32, code,
                  nested_code, rows, cols, row_len, mask, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 [rows, cols] tile of one 4-bit matrix (rows of `row_len` weights, flat bitsandbytes layout)."""
    i = rows[:, None] * row_len + cols[None, :]  # element index in the matrix (int32: < 2**31 weights)
    b = tl.load(buf_u8 + base + codes_off + i // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(i % 2 == 0, b >> 4, b & 15)
    am = _absmax(buf_u8, buf_f32, base, base32, i // BLOCKSIZE, mask, absmax_off, nested_off32, offset_off32,
                 nested_code, DOUBLE_QUANT)
    return tl.load(code + nib) * am


@triton.jit
def _dot_t(a, w, acc, IEEE: tl.constexpr):
    """acc + a @ w.T, w cast to a's dtype; fp32 in IEEE precision."""
    if IEEE:
        return tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(w.to(a.dtype)), acc)


@triton.jit
def _gate_up_grouped_kernel(x_ptr, pairs_ptr, block_e_ptr, h_ptr, buf_u8, buf_f32, code, nested_code,
                            expert_bytes, codes_off, absmax_off, nested_off32, offset_off32,
                            P, K, E, H, I, stride_xt,
                            ACT: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                            IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """h[p] = act(W_gate[e] x[t]) * (W_up[e] x[t]) for the BLOCK_M pairs of block program_id(0)."""
    blk = tl.program_id(0)
    e = tl.load(block_e_ptr + blk).to(tl.int64)
    if e < E:
        pair = tl.load(pairs_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pair < P
        tok = (pair // K).to(tl.int64)
        base = e * expert_bytes
        base32 = base // 4
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < I
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < H
            xt = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :], mask=valid[:, None] & mask_k[None, :],
                         other=0.0)
            mask_w = mask_n[:, None] & mask_k[None, :]
            w_g = _dequant_tile(buf_u8, buf_f32, base, base32, codes_off, absmax_off, nested_off32, offset_off32,
                                code, nested_code, n, kk, H, mask_w, BLOCKSIZE, DOUBLE_QUANT)
            acc_g = _dot_t(xt, w_g, acc_g, IEEE)
            w_u = _dequant_tile(buf_u8, buf_f32, base, base32, codes_off, absmax_off, nested_off32, offset_off32,
                                code, nested_code, n + I, kk, H, mask_w, BLOCKSIZE, DOUBLE_QUANT)
            acc_u = _dot_t(xt, w_u, acc_u, IEEE)
        h = _act(acc_g, ACT) * acc_u
        out = h_ptr + pair.to(tl.int64)[:, None] * I + n[None, :]
        tl.store(out, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _down_grouped_kernel(h_ptr, pairs_ptr, block_e_ptr, out_ptr, buf_u8, buf_f32, code, nested_code,
                         expert_bytes, codes_off, absmax_off, nested_off32, offset_off32,
                         P, E, H, I,
                         BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[p] = W_down[e] h[p] (unweighted) for the BLOCK_M pairs of block program_id(0)."""
    blk = tl.program_id(0)
    e = tl.load(block_e_ptr + blk).to(tl.int64)
    if e < E:
        pair = tl.load(pairs_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pair < P
        pair64 = pair.to(tl.int64)
        base = e * expert_bytes
        base32 = base // 4
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < H
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < I
            ht = tl.load(h_ptr + pair64[:, None] * I + kk[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
            w_d = _dequant_tile(buf_u8, buf_f32, base, base32, codes_off, absmax_off, nested_off32, offset_off32,
                                code, nested_code, n, kk, I, mask_n[:, None] & mask_k[None, :], BLOCKSIZE,
                                DOUBLE_QUANT)
            acc = _dot_t(ht, w_d, acc, IEEE)
        tl.store(out_ptr + pair64[:, None] * H + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & mask_n[None, :])


_gate_up_grouped_tuned = triton.autotune(GROUPED_CONFIGS, key=["H", "I", "BLOCK_M", "BLOCKSIZE", "DOUBLE_QUANT"],
                                         do_bench=_fast_bench, cache_results=True)(_gate_up_grouped_kernel)
_down_grouped_tuned = triton.autotune(GROUPED_CONFIGS, key=["H", "I", "BLOCK_M", "BLOCKSIZE", "DOUBLE_QUANT"],
                                      do_bench=_fast_bench, cache_results=True)(_down_grouped_kernel)


def moe_4bit_grouped(x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, experts: torch.Tensor,
                     code: torch.Tensor, nested_code: torch.Tensor, offsets: list[int], hidden: int, inter: int,
                     blocksize: int, double_quant: bool, act: str, tiles: GroupedTiles | None = None) -> torch.Tensor:
    """moe_4bit_triton for many tokens (the prefill path; same arguments): two grouped GEMMs over the
    pairs sorted by expert, then the weighted sum over k. `tiles`: None = autotuned on CUDA
    (INTERPRETER_GROUPED when interpreted)."""
    P = ids_TK.numel()
    out_PH = torch.empty(P, hidden, dtype=x_TH.dtype, device=x_TH.device)
    h_PI = torch.empty(P, inter, dtype=x_TH.dtype, device=x_TH.device)
    grouped_pairs(x_TH, ids_TK, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant, act,
                  out_PH, h_PI, tiles=tiles)
    return weighted_sum(out_PH, w_TK)


def grouped_pairs(x_TH: torch.Tensor, ids_TK: torch.Tensor, experts: torch.Tensor, code: torch.Tensor,
                  nested_code: torch.Tensor, offsets: list[int], hidden: int, inter: int, blocksize: int,
                  double_quant: bool, act: str, out_PH: torch.Tensor, h_PI: torch.Tensor,
                  wave: tuple[int, int] | None = None, tiles: GroupedTiles | None = None) -> None:
    """The two grouped GEMMs: out[p] = expert_{ids[p]}(x[p // K]) (unweighted, out's dtype) for every
    pair p = t * K + k, or (`wave` (pairs, experts), see `pair_blocks`) only for the pairs whose id is
    a row of `experts`: ExpertStore's waves, each over the rows on the device at the time, fill one
    out [P, H] that `weighted_sum` then reduces. h [P, I] is scratch in x's dtype."""
    _check(x_TH, ids_TK, experts, hidden)
    K = ids_TK.shape[1]
    E, H, I, P = experts.shape[0], hidden, inter, ids_TK.numel()
    n, hit = (P, E) if wave is None else wave
    layout = pair_blocks(ids_TK, E, grouped_block_m(n, hit), wave)
    blocks = layout.experts.numel()
    if blocks == 0:
        return
    buf_f32 = experts.view(torch.float32)
    # IEEE: fp32 products. Also under the interpreter, whose tl.dot on bf16 returns garbage (Triton 3.9):
    # there the half-precision operands are multiplied in fp32, which only their products' rounding tells apart
    meta = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=bool(double_quant),
                IEEE=x_TH.dtype == torch.float32 or interpreted(), BLOCK_M=layout.block_m)
    gu = (x_TH, layout.pairs, layout.experts, h_PI, experts, buf_f32, code, nested_code, experts.shape[1],
          *_matrix_args(offsets[:4]), P, K, E, H, I, x_TH.stride(0))
    dn = (h_PI, layout.pairs, layout.experts, out_PH, experts, buf_f32, code, nested_code, experts.shape[1],
          *_matrix_args(offsets[4:]), P, E, H, I)
    if tiles is None and interpreted():
        tiles = INTERPRETER_GROUPED
    if tiles is None:
        _gate_up_grouped_tuned[lambda m: (blocks, triton.cdiv(I, m["BLOCK_N"]))](*gu, ACT=ACT_CODES[act], **meta)
        _down_grouped_tuned[lambda m: (blocks, triton.cdiv(H, m["BLOCK_N"]))](*dn, **meta)
    else:
        launch = dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
                      num_stages=tiles.num_stages)
        _gate_up_grouped_kernel[(blocks, triton.cdiv(I, tiles.block_n))](*gu, ACT=ACT_CODES[act], **meta, **launch)
        _down_grouped_kernel[(blocks, triton.cdiv(H, tiles.block_n))](*dn, **meta, **launch)


def weighted_sum(out_PH: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k w[t,k] * out[t * K + k] in fp32, in k order (deterministic), rounded to out's dtype."""
    T, K = w_TK.shape
    y = torch.zeros(T, out_PH.shape[1], dtype=torch.float32, device=out_PH.device)
    out_TKH, w32 = out_PH.view(T, K, -1), w_TK.float()
    for k in range(K):
        y.addcmul_(out_TKH[:, k], w32[:, k, None])
    return y.to(out_PH.dtype)
