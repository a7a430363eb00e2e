"""Dense projections of a few rows in Triton: y [M, N] = x [M, K] @ W [N, K]^T (+ bias), M <= 4.

The CUDA decode step's bf16 projections (q/k/v, o_proj, the dense MLP, the router; lm_head
maybe) are GEMVs: every weight byte is read once per token, so the step is bound by how fast the
weights stream in. cuBLAS runs them as GEMMs with an 8-wide tile, most of them split-K with a
second reduce kernel, at ~60% of the copy bandwidth on an H200. Here one program owns BLOCK_N
output rows for every x row at once and reduces the whole of K itself (no split-K, no atomics:
deterministic), so a projection is one launch.

Bandwidth comes from bytes in flight: each step loads a [BLOCK_N, BLOCK_K] tile of W (16-byte
vectors along K, W's rows contiguous) and requests the NEXT step's tile before this step's
multiply-adds (Triton's pipeliner stages only loads that feed a dot), so a program has two tiles
in flight, and many small programs (N / BLOCK_N, hundreds to thousands) share each SM. Products
accumulate in fp32 per element of the tile; the reduction over the tile's columns runs once at
the end. Rows past N read row N - 1 again and columns past the last whole step run one masked
step, so the main loop has no masks. x's rows (up to 4, one accumulator each) are read at every
step as tiles of W's shape (L1 hits); the result is rounded once to x's dtype. Compiled offline
for sm_90a (Triton 3.9, ptxas, no GPU), every config's loop is 16-byte loads and FMAs only: no
shared memory, no barrier, no spills (K a multiple of 16: 36 to 79 registers a thread at one row,
at most 154 at 2 or 4).
A K of whole steps and a partial one (26B-A4B's dense MLP down: 2,112 at 512 a step) has the partial
step's tile requested with the first (TAIL, `_tail`), not after the loop, one memory latency less.
Under programmatic dependent launch (kernels/triton_pdl.py) the first step's tile, the partial one
and the bias are requested before the kernel waits for the one before it: they are no kernel's
output, so a program's first weights arrive while that kernel still runs.

Tiles come from triton.autotune keyed on N, K, the padded row count BM and the dtypes (the first
call of a shape benchmarks <= 12 configs, kept in Triton's disk cache); under TRITON_INTERPRET=1 there is one config
(INTERPRETER_TILES). `gemv_triton` backs the torch op localrun::gemv (kernels/gemv.py).
Import this module after setting TRITON_INTERPRET=1 to run it on CPU tensors (the tests do).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import triton_pdl
from .timing import calls_us
from .triton_pdl import pdl_start

MAX_ROWS = 4  # x rows per call: one fp32 accumulator tile each


@dataclass(frozen=True)
class Tiles:
    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4


# Few large tiles: the interpreter's cost is per tile operation, not per element.
INTERPRETER_TILES = Tiles(block_n=128, block_k=1024)


def interpreted() -> bool:
    return _gemv_kernel.__class__.__name__ == "InterpretedFunction"


@triton.jit
def _x_row(x_ptr, i, M, stride_xm, cols, k, mask, MASKED: tl.constexpr):
    """Row i of x (row M - 1 again where i >= M: that accumulator is never stored), columns k + cols,
    fp32, as a tile of W's shape: `cols` is [BLOCK_N, BLOCK_K] (every row the same addresses, L1 hits),
    so x gets W's register layout; a [1, BLOCK_K] load got one of its own, and the compiler then moved
    each W tile through shared memory (a barrier per step) to match."""
    ptr = x_ptr + tl.minimum(i, M - 1) * stride_xm + k + cols
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptr).to(tl.float32)


@triton.jit
def _products(w, x_ptr, M, stride_xm, cols, k, mask, acc0, acc1, acc2, acc3,
              BM: tl.constexpr, MASKED: tl.constexpr):
    """acc_i += W tile * x row i (columns k + cols) for the BM rows."""
    w = w.to(tl.float32)
    acc0 += w * _x_row(x_ptr, 0, M, stride_xm, cols, k, mask, MASKED)
    if BM > 1:
        acc1 += w * _x_row(x_ptr, 1, M, stride_xm, cols, k, mask, MASKED)
    if BM > 2:
        acc2 += w * _x_row(x_ptr, 2, M, stride_xm, cols, k, mask, MASKED)
        acc3 += w * _x_row(x_ptr, 3, M, stride_xm, cols, k, mask, MASKED)
    return acc0, acc1, acc2, acc3


@triton.jit
def _first_tiles(w_tile, cols, K, BLOCK_K: tl.constexpr, TAIL: tl.constexpr):
    """(first step's tile, the partial last step's where TAIL (else the first again), k_main: K's whole
    steps) of the weight rows at w_tile: no kernel's output, so a kernel requests them before PDL's wait,
    while the kernel before still runs (triton_pdl's prologue)."""
    w_first = tl.load(w_tile, mask=cols < K, other=0.0, eviction_policy="evict_first")
    k_main = tl.multiple_of(K - K % BLOCK_K, BLOCK_K)  # whole steps, unmasked (said so: 16-byte tail loads)
    w_tail = w_first
    if TAIL:  # the partial last step's tile now, not after the loop: a row of a few steps (K = 2,112 at 512
        # a step) would wait one memory latency more at its end (its registers are held through the loop,
        # hence a constexpr: none where K is whole steps)
        w_tail = tl.load(w_tile + k_main, mask=cols + k_main < K, other=0.0, eviction_policy="evict_first")
    return w_first, w_tail, k_main


@triton.jit
def _row_products(x_ptr, M, stride_xm, w_tile, cols, K, w_first, w_tail, k_main, BM: tl.constexpr,
                  BLOCK_K: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] fp32 products of each weight row with x's rows 0..BM-1 summed over the
    steps (acc0..acc3; a row's dot product is its sum over the tile's columns), from the tiles
    `_first_tiles` requested: the next step's tile is requested before this step's products."""
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if k_main > 0:
        w = w_first
        for k in range(BLOCK_K, k_main, BLOCK_K):
            w_next = tl.load(w_tile + k, eviction_policy="evict_first")  # in flight during this step's products
            acc0, acc1, acc2, acc3 = _products(w, x_ptr, M, stride_xm, cols, k - BLOCK_K, None, acc0, acc1, acc2,
                                               acc3, BM, False)
            w = w_next
        acc0, acc1, acc2, acc3 = _products(w, x_ptr, M, stride_xm, cols, k_main - BLOCK_K, None, acc0, acc1, acc2,
                                           acc3, BM, False)
    if k_main < K:  # the last, partial step (the first tile itself where it is the only one)
        w = w_first  # where K is less than a step
        if TAIL:
            w = w_tail
        elif k_main > 0:  # launched without `_tail`'s word on it: the tile now, as before TAIL
            w = tl.load(w_tile + k_main, mask=cols + k_main < K, other=0.0, eviction_policy="evict_first")
        acc0, acc1, acc2, acc3 = _products(w, x_ptr, M, stride_xm, cols, k_main, cols + k_main < K, acc0, acc1,
                                           acc2, acc3, BM, True)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 BM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 TAIL: tl.constexpr, PDL: tl.constexpr = False):
    """Grid (cdiv(N, BLOCK_N),). BM: M rounded up to 1, 2 or 4 (rows >= M compute but never store).
    TAIL: K is whole steps and a partial one (`_tail`): that step's tile is requested with the first."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)[None, :] + 0 * rows[:, None]  # [BLOCK_N, BLOCK_K]: each row's columns
    # rows past N (the last program's) read row N - 1 again, so no load needs a row mask
    w_tile = w_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * K + cols
    mask_n = rows < N
    w_first, w_tail, k_main = _first_tiles(w_tile, cols, K, BLOCK_K, TAIL)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
    pdl_start(PDL)
    acc0, acc1, acc2, acc3 = _row_products(x_ptr, M, stride_xm, w_tile, cols, K, w_first, w_tail, k_main, BM, BLOCK_K,
                                           TAIL, BLOCK_N)
    out = y_ptr + rows
    # (M + 0 * rows): the row count as a tensor, which the interpreter's masks need
    tl.store(out, (tl.sum(acc0, axis=1) + bias).to(y_ptr.dtype.element_ty), mask=mask_n)
    if BM > 1:
        tl.store(out + stride_ym, (tl.sum(acc1, axis=1) + bias).to(y_ptr.dtype.element_ty),
                 mask=mask_n & (M + 0 * rows > 1))
    if BM > 2:
        tl.store(out + 2 * stride_ym, (tl.sum(acc2, axis=1) + bias).to(y_ptr.dtype.element_ty),
                 mask=mask_n & (M + 0 * rows > 2))
        tl.store(out + 3 * stride_ym, (tl.sum(acc3, axis=1) + bias).to(y_ptr.dtype.element_ty),
                 mask=mask_n & (M + 0 * rows > 3))


def _cfg(n: int, k: int, warps: int) -> triton.Config:
    # num_stages 1: the kernel requests the next step itself (no shared-memory staging for loads that feed no dot)
    return triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=1)


# (BLOCK_N, BLOCK_K, warps): 8 to 32 weights (one to four 16-byte loads) per thread per step, from
# one row per program (N programs: the router's 128 rows still make 128) to 16.
CONFIGS = [_cfg(n, k, w) for n, k, w in (
    (1, 1024, 4), (1, 2048, 8), (2, 512, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 512, 2), (8, 256, 4),
    (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8))]
MAX_ACC_PER_THREAD = 64  # fp32 accumulator registers a thread may hold across its BM tiles


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose BM accumulators would not fit a thread's registers (more rows, smaller tiles)."""
    bm = kwargs.get("BM", named_args.get("BM", 1))
    fit = [c for c in configs
           if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) <= MAX_ACC_PER_THREAD]
    return fit or configs[:1]


def _fast_bench(kernel_call, quantiles):
    # the default (25 ms warmup + 100 ms per config) would take seconds per shape
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _tail(args: dict) -> bool:
    """Whether K is whole BLOCK_K steps and a partial one (the kernel's TAIL)."""
    return args["K"] > args["BLOCK_K"] and args["K"] % args["BLOCK_K"] != 0


_gemv_tailed = triton.heuristics({"TAIL": _tail})(_gemv_kernel)
# cache_results: the picks are kept in Triton's on-disk cache, so a load after the first skips the benchmarking
_gemv_tuned = triton.autotune(CONFIGS, key=["N", "K", "BM", "HAS_BIAS"], prune_configs_by={"early_config_prune": _prune},
                              do_bench=_fast_bench, cache_results=True)(_gemv_tailed)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                tiles: Tiles | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] of at most MAX_ROWS rows (the last dim contiguous, rows
    evenly strided, else copied) and a weight [N, K] of x's dtype, accumulated in fp32; returns x's
    dtype. `tiles`: None = autotuned on CUDA (INTERPRETER_TILES when interpreted)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"gemv: weight must be [N, {K}] of {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv: 1 to {MAX_ROWS} rows, got {M}")
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x2, w, w if bias is None else bias, y, M, N, K, x2.stride(0), y.stride(0))
    # the weights are read before PDL's wait: a copy made here would be the step's own, the kernel before's
    pdl = triton_pdl.launch(x.device) if w is weight else {}
    meta = dict(BM=triton.next_power_of_2(M), HAS_BIAS=bias is not None, **pdl)
    if tiles is None and interpreted():
        tiles = INTERPRETER_TILES
    if tiles is None:
        _gemv_tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta)
    else:
        _gemv_tailed[(triton.cdiv(N, tiles.block_n),)](*args, **meta, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                                                       num_warps=tiles.num_warps, num_stages=1)
    return y.view(*x.shape[:-1], N)


def tuned_config() -> str | None:
    """The config the autotuner picked for the last shape it ran (None before the first CUDA call)."""
    best = getattr(_gemv_tuned, "best_config", None)
    return None if best is None else str(best)


# -- benchmark (scripts/gpu_check.py calls this on a lent GPU) --------------------------------

ROTATION_BYTES = 256 << 20  # weights cycled through per timing: several times any L2, like a decode step's layers
# A weight up to this size is also timed replaying itself (`us_triton_l2`): it stays in an H100's / H200's 50 MB L2,
# so that against `us_triton` it says whether the memory or the kernel's own latency bounds the shape.
L2_PROBE_BYTES = 32 << 20


def rotation_copies(nbytes: int, device: torch.device) -> int:
    """Copies of a weight of `nbytes` a timing cycles through to read it from memory (one off CUDA)."""
    return min(max(2, math.ceil(ROTATION_BYTES / nbytes)), 512) if device.type == "cuda" else 1


def benchmark_gemv(N: int, K: int, rows: int = 1, dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str = "cuda", bias: bool = False, iters: int = 20, seed: int = 0) -> dict:
    """One projection shape: the Triton GEMV against F.linear (cuBLAS on CUDA) on the same random
    weights, each timed over enough weight copies to stream from memory rather than L2, in a CUDA
    graph; us and GB/s (weight bytes / time) each, their max |y - ref| / max |ref| against the fp32
    product, and the autotuned config; a weight of at most L2_PROBE_BYTES also replaying itself (`us_triton_l2`)."""
    device = torch.device(device)
    if device.type != "cuda" and not interpreted():
        return {"skipped": "the Triton kernel runs on CUDA, or on the CPU with TRITON_INTERPRET=1 set before import"}
    g = torch.Generator(device=device).manual_seed(seed)
    nbytes = N * K * torch.finfo(dtype).bits // 8
    copies = rotation_copies(nbytes, device)
    ws = [(torch.randn(N, K, device=device, generator=g) * K ** -0.5).to(dtype) for _ in range(copies)]
    x = torch.randn(rows, K, device=device, generator=g).to(dtype)
    b = (torch.randn(N, device=device, generator=g) * 0.1).to(dtype) if bias else None
    ref = x.float() @ ws[0].float().T + (0 if b is None else b.float())
    scale = ref.abs().max()
    out: dict = {"N": N, "K": K, "rows": rows, "dtype": str(dtype).removeprefix("torch."), "weight_bytes": nbytes,
                 "weight_copies": copies}
    start = time.perf_counter()
    y = gemv_triton(x, ws[0], b)
    out["first_call_s"] = round(time.perf_counter() - start, 2)  # autotuning included
    out["config"] = "interpreter " + repr(INTERPRETER_TILES) if interpreted() else tuned_config()
    out["max_rel_err_triton"] = float((y.float() - ref).abs().max() / scale)
    out["max_rel_err_torch"] = float((F.linear(x, ws[0], b).float() - ref).abs().max() / scale)
    for side, fn in (("triton", gemv_triton), ("torch", F.linear)):
        us = calls_us([lambda w=w, fn=fn: fn(x, w, b) for w in ws], iters, device)
        out[f"us_{side}"] = round(us, 2)
        out[f"gbps_{side}"] = round(nbytes / us / 1e3, 1)
    out["speedup"] = round(out["us_torch"] / out["us_triton"], 3)
    if nbytes <= L2_PROBE_BYTES:  # one weight over and over: from the L2, where the memory is not the bound
        out["us_triton_l2"] = round(calls_us([lambda: gemv_triton(x, ws[0], b)] * len(ws), iters, device), 2)
    if device.type == "cuda" and triton_pdl._supported(device.index if device.index is not None
                                                       else torch.cuda.current_device()):
        # each GEMV placed while the one before ends, its first tiles requested before it waits: what PDL takes
        # off a projection in the step's chain (the rotation is a chain of GEMVs, as the step's graph is)
        with _pdl_on():
            out["us_triton_pdl"] = round(calls_us([lambda w=w: gemv_triton(x, w, b) for w in ws], iters, device), 2)
    return out


@contextlib.contextmanager
def _pdl_on():
    """Within: the GEMV launches with programmatic dependent launch, as inside a decode step's graphs."""
    before = triton_pdl.ENABLED
    triton_pdl.ENABLED = True
    try:
        with triton_pdl.in_graphs():
            yield
    finally:
        triton_pdl.ENABLED = before
