"""The glue of a Gemma 4 layer around attention and the FFNs, one Triton kernel per piece (a row
per program), for the CUDA decode step where each small torch op is a launch of its own:

  attention_residual_norms  y = norm(attn) * w_post + residual, and the three norms of y that the
                            dense MLP, the experts and the router read (7 launches -> 1)
  ffn_residual              (norm(norm(mlp) * w1 + norm(moe) * w2) * w + residual) * layer_scalar
                            (6 launches -> 1), and optionally the next layer's input norm of it (+1 -> 0)
  route                     softmax of the router logits, top-k, renormalise, per-expert scale
                            (6-7 launches -> 1)
  norms_route               one decoded token's attention_residual_norms, the router's GEMV of its
                            router norm and route, a program a router row (3 launches -> 1)
  gated                     act(gate) * up of the dense MLP's fused gate/up projection, with the
                            activation of the expert kernels (kernels/triton_moe.py) (2 launches -> 1)
  rope_rows                 a pass's RoPE cos / sin rows of one layer kind (8 launches -> 1)

Each computes in fp32 and rounds its outputs once to the activations' dtype; `y`, the residual
stream, is rounded before its norms are taken, as the unfused layer does. They back the torch ops
of kernels/fused.py (CUDA: these kernels; every other device: the formulas there). Set
TRITON_INTERPRET=1 before importing triton to run them on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import counters, triton_pdl
from .triton_pdl import pdl_start

from .triton_gemv import _cfg, _fast_bench, _first_tiles, _row_products, _tail, interpreted
from .triton_moe import ACT_CODES, _act


@triton.jit
def _inv_rms(x, H, eps):
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)


@triton.jit
def _f32(ptr, offsets, ok):
    """A row (or weight vector) in fp32, zeros past its end."""
    return tl.load(ptr + offsets, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _attention_residual_norms_kernel(x_ptr, w_post_ptr, res_ptr, w_mlp_ptr, w_moe_ptr, w_router_ptr,
                                     y_ptr, mlp_ptr, moe_ptr, router_ptr, H, eps, router_scale,
                                     BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    # the norm weights: before PDL's wait (triton_pdl's prologue), held in their dtype until used
    w_post = tl.load(w_post_ptr + cols, mask=ok, other=0.0)
    w_mlp = tl.load(w_mlp_ptr + cols, mask=ok, other=0.0)
    w_moe = tl.load(w_moe_ptr + cols, mask=ok, other=0.0)
    w_router = tl.load(w_router_ptr + cols, mask=ok, other=0.0)
    pdl_start(PDL)
    row = tl.program_id(0)
    base = row * H + cols
    x = _f32(x_ptr, base, ok)
    res = _f32(res_ptr, base, ok)
    y = (x * _inv_rms(x, H, eps) * w_post.to(tl.float32) + res).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + base, y, mask=ok)
    y = y.to(tl.float32)
    n = y * _inv_rms(y, H, eps)
    tl.store(mlp_ptr + base, (n * w_mlp.to(tl.float32)).to(mlp_ptr.dtype.element_ty), mask=ok)
    tl.store(moe_ptr + base, (n * w_moe.to(tl.float32)).to(moe_ptr.dtype.element_ty), mask=ok)
    tl.store(router_ptr + base, (n * w_router.to(tl.float32) * router_scale).to(router_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _ffn_residual_kernel(mlp_ptr, w1_ptr, moe_ptr, w2_ptr, w_ptr, res_ptr, scalar_ptr, out_ptr, w_next_ptr,
                         next_ptr, H, eps, NEXT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """NEXT: also the next layer's input norm of the (rounded) output, as _rms_norm_kernel computes it."""
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    # the norm weights and the layer scalar: before PDL's wait (triton_pdl's prologue), in their dtype until used
    w1 = tl.load(w1_ptr + cols, mask=ok, other=0.0)
    w2 = tl.load(w2_ptr + cols, mask=ok, other=0.0)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    scalar = tl.load(scalar_ptr)
    w_next = w  # unused without NEXT
    if NEXT:
        w_next = tl.load(w_next_ptr + cols, mask=ok, other=0.0)
    pdl_start(PDL)
    row = tl.program_id(0)
    base = row * H + cols
    a = _f32(mlp_ptr, base, ok)
    b = _f32(moe_ptr, base, ok)
    h = a * _inv_rms(a, H, eps) * w1.to(tl.float32) + b * _inv_rms(b, H, eps) * w2.to(tl.float32)
    res = _f32(res_ptr, base, ok)
    y = ((h * _inv_rms(h, H, eps) * w.to(tl.float32) + res) * scalar.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + base, y, mask=ok)
    if NEXT:
        y = y.to(tl.float32)
        n = y * _inv_rms(y, H, eps) * w_next.to(tl.float32)
        tl.store(next_ptr + base, n.to(next_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _route_kernel(logits_ptr, scale_ptr, ids_ptr, w_ptr, E, K, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                  PDL: tl.constexpr = False):
    pdl_start(PDL)
    _route_row(logits_ptr, scale_ptr, ids_ptr, w_ptr, tl.program_id(0), E, K, BLOCK_E, BLOCK_K, "")


@triton.jit
def _route_row(logits_ptr, scale_ptr, ids_ptr, w_ptr, row, E, K, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
               CACHE: tl.constexpr):
    """CACHE ".cg": read the logits from L2 (other programs of the launch wrote them)."""
    cols = tl.arange(0, BLOCK_E)
    ok = cols < E
    logits = tl.load(logits_ptr + row * E + cols, mask=ok, other=float("-inf"), cache_modifier=CACHE).to(tl.float32)
    e = tl.exp(logits - tl.max(logits, axis=0))
    p = e / tl.sum(e, axis=0)
    # a NaN or inf logit makes the whole row NaN (as torch's softmax): its experts stay candidates, the
    # lowest K ids with NaN weights as lr_route picks them, never an id past E (p == top is false for NaN)
    nan = ok & (p != p)
    p = tl.where(ok, tl.where(nan, 0.0, p), -1.0)
    slots = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int32)
    vals = tl.zeros([BLOCK_K], tl.float32)
    for j in range(0, K):  # the k largest, largest first; a tie goes to the lower expert id
        top = tl.max(p, axis=0)
        pick = tl.min(tl.where(p == top, cols, BLOCK_E), axis=0)
        ids = tl.where(slots == j, pick, ids)
        vals = tl.where(slots == j, top, vals)
        p = tl.where(cols == pick, -1.0, p)
    keep = slots < K
    w = vals / tl.sum(tl.where(keep, vals, 0.0), axis=0)
    w = tl.where(tl.max(nan.to(tl.int32), axis=0) > 0, float("nan"), w)
    w = w * tl.load(scale_ptr + ids, mask=keep, other=0.0).to(tl.float32)
    tl.store(ids_ptr + row * K + slots, ids.to(tl.int64), mask=keep)
    tl.store(w_ptr + row * K + slots, w, mask=keep)


@triton.jit
def _gated_kernel(gu_ptr, out_ptr, I, ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Columns [BLOCK * j, BLOCK * (j + 1)) of one row: gate at gu[row, :I], up at gu[row, I:]."""
    pdl_start(PDL)
    _gated_block(gu_ptr, out_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), I, ACT, BLOCK)


@triton.jit
def _gated_block(gu_ptr, out_ptr, row, block, I, ACT: tl.constexpr, BLOCK: tl.constexpr):
    cols = block * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    gate = _f32(gu_ptr + row * 2 * I, cols, ok)
    up = _f32(gu_ptr + row * 2 * I + I, cols, ok)
    tl.store(out_ptr + row * I + cols, (_act(gate, ACT) * up).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_route_kernel(gu_ptr, out_ptr, I, logits_ptr, scale_ptr, ids_ptr, w_ptr, E, K, ACT: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr = False):
    """One decoded token: program 0 routes (its router logits), the others each take BLOCK columns of
    the dense MLP's act(gate) * up: the two small consumers of one GEMM in one launch."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    if pid == 0:
        _route_row(logits_ptr, scale_ptr, ids_ptr, w_ptr, 0, E, K, BLOCK_E, BLOCK_K, "")
    else:
        _gated_block(gu_ptr, out_ptr, 0, pid - 1, I, ACT, BLOCK)


@triton.jit
def _gated_gemv_route_kernel(x_ptr, w_ptr, act_ptr, logits_ptr, scale_ptr, ids_ptr, wts_ptr, count_ptr, I, E, K,
                             stride_x, TOP_K, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             TAIL: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOP: tl.constexpr,
                             PDL: tl.constexpr = False):
    """One decoded token's dense MLP gate/up and router projections with their two small consumers, w [2I + E, K]
    (gate rows, up rows, router rows; x's rows: the MLP's input, the router's). Programs [0, cdiv(E, 2 * BLOCK_N)):
    2 * BLOCK_N router rows each against x row 1, their logits stored (x's dtype), and the program that counts
    itself done last routes the E logits and resets the counter (release / acquire at GPU scope, as
    norms_route); first, so that the routing overlaps the other programs rather than trailing them. The
    rest: gate rows j and up rows I + j against x row 0, act(gate) * up of them (each product rounded to x's
    dtype first, as a GEMV stores it and `gated` reads it). A tile is 2 * BLOCK_N weight rows either way,
    summed as the GEMV kernel sums them (`_row_products`)."""
    pid = tl.program_id(0)
    n_router = tl.cdiv(E, 2 * BLOCK_N)
    router = pid < n_router
    rr = tl.arange(0, 2 * BLOCK_N)
    j = (pid - n_router) * BLOCK_N + rr % BLOCK_N  # a gate / up program's rows of the MLP's I
    e = pid * 2 * BLOCK_N + rr  # a router program's experts
    ok = tl.where(router, e < E, j < I)
    row = tl.where(router, 2 * I + e, (rr // BLOCK_N) * I + j)
    row = tl.where(ok, row, 2 * I + E - 1)  # rows past the end read the last row again: no load needs a mask
    cols = tl.arange(0, BLOCK_K)[None, :] + 0 * rr[:, None]  # [2 * BLOCK_N, BLOCK_K]: each row's columns
    w_tile = w_ptr + row.to(tl.int64)[:, None] * K + cols
    w_first, w_tail, k_main = _first_tiles(w_tile, cols, K, BLOCK_K, TAIL)  # before PDL's wait: weights
    pdl_start(PDL)
    x_row = x_ptr + router.to(tl.int64) * stride_x
    acc, _, _, _ = _row_products(x_row, 1, stride_x, w_tile, cols, K, w_first, w_tail, k_main, 1, BLOCK_K, TAIL,
                                 2 * BLOCK_N)
    s = tl.sum(acc, axis=1).to(x_ptr.dtype.element_ty).to(tl.float32)  # [2 * BLOCK_N], rounded as stored
    if router:
        tl.store(logits_ptr + e, s.to(logits_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()  # every thread's stores above come before the release below
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
        if done == n_router - 1:  # the last router program: every logit is written
            _route_row(logits_ptr, scale_ptr, ids_ptr, wts_ptr, 0, E, TOP_K, BLOCK_E, BLOCK_TOP, ".cg")
            tl.atomic_xchg(count_ptr, 0)  # ready for the next call
    else:
        gu = tl.reshape(s, [2, BLOCK_N])
        which = tl.arange(0, 2)[:, None]
        gate = tl.sum(tl.where(which == 0, gu, 0.0), axis=0)
        up = tl.sum(tl.where(which == 1, gu, 0.0), axis=0)
        jn = (pid - n_router) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(act_ptr + jn, (_act(gate, ACT) * up).to(act_ptr.dtype.element_ty), mask=jn < I)


@triton.jit
def _norms_route_kernel(x_ptr, w_post_ptr, res_ptr, w_mlp_ptr, w_moe_ptr, w_router_ptr, router_ptr, scale_ptr,
                        y_ptr, mlp_ptr, moe_ptr, logits_ptr, ids_ptr, w_ptr, count_ptr, H, E, K, eps, router_scale,
                        BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr = False):
    """One decoded token's _attention_residual_norms_kernel, router projection and _route_kernel in one
    launch: program e computes the residual after attention and its norms (every program the same bits,
    program 0 stores them), then logit e of the router's input norm (rounded to the activations' dtype
    as a GEMV would store it), and the program that counts itself done last routes the E logits and
    resets the counter (release/acquire at GPU scope, as the decode attention's in-place combine)."""
    e = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    # the router's row e and the norm weights: before PDL's wait (triton_pdl's prologue)
    row_e = tl.load(router_ptr + e * H + cols, mask=ok, other=0.0)
    w_post = tl.load(w_post_ptr + cols, mask=ok, other=0.0)
    w_router = tl.load(w_router_ptr + cols, mask=ok, other=0.0)
    pdl_start(PDL)
    x = _f32(x_ptr, cols, ok)
    res = _f32(res_ptr, cols, ok)
    y = (x * _inv_rms(x, H, eps) * w_post.to(tl.float32) + res).to(y_ptr.dtype.element_ty)
    yf = y.to(tl.float32)
    n = yf * _inv_rms(yf, H, eps)
    router_in = (n * w_router.to(tl.float32) * router_scale).to(y_ptr.dtype.element_ty).to(tl.float32)
    logit = tl.sum(router_in * row_e.to(tl.float32), axis=0)
    tl.store(logits_ptr + e, logit.to(logits_ptr.dtype.element_ty))
    if e == 0:
        tl.store(y_ptr + cols, y, mask=ok)
        tl.store(mlp_ptr + cols, (n * _f32(w_mlp_ptr, cols, ok)).to(mlp_ptr.dtype.element_ty), mask=ok)
        tl.store(moe_ptr + cols, (n * _f32(w_moe_ptr, cols, ok)).to(moe_ptr.dtype.element_ty), mask=ok)
    tl.debug_barrier()  # every thread's stores above come before the release below
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if done == E - 1:  # the last program: every logit is written
        _route_row(logits_ptr, scale_ptr, ids_ptr, w_ptr, 0, E, K, BLOCK_E, BLOCK_K, ".cg")
        tl.atomic_xchg(count_ptr, 0)  # ready for the next call


@triton.jit
def _rope_rows_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, HALF, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Row t: angles pos[t] * inv_freq (fp32), cos of them twice, sin of them negated then as they are."""
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    inv = tl.load(inv_ptr + i, mask=ok, other=0.0)  # a model buffer: before PDL's wait (the prologue)
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    angle = tl.load(pos_ptr + t).to(tl.float32) * inv
    c = tl.cos(angle).to(cos_ptr.dtype.element_ty)
    s = tl.sin(angle)
    row = t * 2 * HALF
    tl.store(cos_ptr + row + i, c, mask=ok)
    tl.store(cos_ptr + row + HALF + i, c, mask=ok)
    tl.store(sin_ptr + row + i, (-s).to(sin_ptr.dtype.element_ty), mask=ok)
    tl.store(sin_ptr + row + HALF + i, s.to(sin_ptr.dtype.element_ty), mask=ok)


GATED_BLOCK = 1024  # columns per program: a decoded token's 2,112-wide MLP (26B-A4B) in three programs


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.contiguous().view(-1, x.shape[-1])


def attention_residual_norms_triton(x, w_post, residual, w_mlp, w_moe, w_router, router_scale: float, eps: float):
    x2, r2 = _rows(x), _rows(residual)
    H = x2.shape[1]
    out = torch.empty((4, *x.shape), dtype=x.dtype, device=x.device)  # y, x_moe, x_mlp, x_router (the op's order)
    _attention_residual_norms_kernel[(x2.shape[0],)](x2, w_post, r2, w_mlp, w_moe, w_router, out[0], out[2], out[1],
                                                     out[3], H, eps, router_scale, BLOCK=triton.next_power_of_2(H),
                                                     **triton_pdl.launch(x.device))
    return out


def ffn_residual_triton(mlp, w1, moe, w2, w, residual, scalar, eps: float, w_next=None):
    """The layer's output; with w_next also (output, the next layer's input norm of it)."""
    a, b, r = _rows(mlp), _rows(moe), _rows(residual)
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    nxt = out if w_next is None else torch.empty_like(out)
    _ffn_residual_kernel[(a.shape[0],)](a, w1, b, w2, w, r, scalar, out, w if w_next is None else w_next, nxt,
                                        a.shape[1], eps, NEXT=w_next is not None,
                                        BLOCK=triton.next_power_of_2(a.shape[1]), **triton_pdl.launch(residual.device))
    return out if w_next is None else (out, nxt)


def route_triton(logits_TE: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    logits = logits_TE.contiguous()
    T, E = logits.shape
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    block_e = triton.next_power_of_2(E)
    # top-k is k rounds of two reductions over E: within one warp they are shuffles, across warps each
    # goes through shared memory and a barrier (3.6 us a layer on the H200 with 4 warps at E = 128)
    _route_kernel[(T,)](logits, per_expert_scale, ids, w, E, top_k, BLOCK_E=block_e,
                        BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if block_e <= 256 else 4,
                        **triton_pdl.launch(logits.device))
    return ids, w


def gated_triton(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    rows = _rows(gate_up)
    I = rows.shape[1] // 2
    out = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    block = min(GATED_BLOCK, triton.next_power_of_2(I))
    _gated_kernel[(rows.shape[0], triton.cdiv(I, block))](rows, out, I, ACT=ACT_CODES[act], BLOCK=block,
                                                          **triton_pdl.launch(gate_up.device))
    return out


GATED_ROUTE_BLOCK = 256  # columns per program of the one-warp gated_route kernel (26B-A4B: 9 programs)


def gated_route_triton(gate_up: torch.Tensor, logits_TE: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int,
                       act: str):
    """(gated(gate_up), *route(logits)) of one token in one launch, on one warp a program (the route's
    reductions stay warp shuffles, as route_triton runs them)."""
    gu, logits = _rows(gate_up), logits_TE.contiguous()
    if gu.shape[0] != 1 or logits.shape[0] != 1:
        raise ValueError("gated_route takes one token")
    I, E = gu.shape[1] // 2, logits.shape[1]
    out = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=logits.device)
    w = torch.empty(1, top_k, dtype=torch.float32, device=logits.device)
    block = min(GATED_ROUTE_BLOCK, triton.next_power_of_2(I))
    _gated_route_kernel[(1 + triton.cdiv(I, block),)](
        gu, out, I, logits, per_expert_scale, ids, w, E, top_k, ACT=ACT_CODES[act], BLOCK=block,
        BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k), num_warps=1,
        **triton_pdl.launch(gate_up.device))
    return out, ids, w


# (BLOCK_N, BLOCK_K, warps): rows a program per half (a tile of 2 * BLOCK_N rows: gate and up, or router rows),
# 32 fp32 accumulators a thread in each, made as the GEMV's list is (`_cfg`). Programs at 26B-A4B: 2,112 /
# BLOCK_N + 128 / (2 * BLOCK_N). The routing runs at the config's warps (route_triton's own launch takes one:
# 3.6 us a layer at 4 on the H200), in the first programs placed, beside the rest: the autotuner times the
# whole launch.
GATED_GEMV_CONFIGS = [_cfg(n, k, w) for n, k, w in (
    (4, 512, 4), (2, 512, 2), (2, 1024, 4), (1, 1024, 2), (1, 2048, 4), (4, 256, 2), (8, 256, 4), (8, 512, 8),
    (16, 256, 8), (2, 256, 1))]
INTERPRETER_GATED_GEMV = _cfg(64, 1024, 4)  # few large tiles: the interpreter's cost is per tile operation

_gated_gemv_tailed = triton.heuristics({"TAIL": _tail})(_gated_gemv_route_kernel)
# cache_results: the pick is kept in Triton's disk cache. Each timed run leaves the counter at 0 and
# rewrites the outputs, so the autotuner may run the kernel as often as it likes.
_gated_gemv_tuned = triton.autotune(GATED_GEMV_CONFIGS, key=["I", "E", "K"], do_bench=_fast_bench,
                                    cache_results=True)(_gated_gemv_tailed)


def gated_gemv_route_triton(rows: torch.Tensor, weight: torch.Tensor, inter: int, per_expert_scale: torch.Tensor,
                            top_k: int, act: str, tiles: triton.Config | None = None):
    """One decoded token's (act(gate) * up [1, I], ids [1, K], weights [1, K]) from its MLP input and
    router input, the rows of `rows` [2, H] (the last dim contiguous), and `weight` [2I + E, H] (gate,
    up, router rows: DecoderLayer.stacked) in one launch (`_gated_gemv_route_kernel`). tiles: None =
    autotuned on CUDA (INTERPRETER_GATED_GEMV when interpreted)."""
    if rows.dim() != 2 or rows.shape[0] != 2 or rows.stride(-1) != 1:
        raise ValueError(f"gated_gemv_route takes the two input rows [2, H], got {tuple(rows.shape)}")
    H = rows.shape[1]
    E = weight.shape[0] - 2 * inter
    if weight.dim() != 2 or weight.shape[1] != H or E < 1 or weight.dtype != rows.dtype or not weight.is_contiguous():
        raise ValueError(f"gated_gemv_route: weight must be [2 * {inter} + E, {H}] of {rows.dtype}, contiguous")
    act_out = torch.empty(1, inter, dtype=rows.dtype, device=rows.device)
    logits = torch.empty(E, dtype=rows.dtype, device=rows.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=rows.device)
    w = torch.empty(1, top_k, dtype=torch.float32, device=rows.device)
    count = counters.held("gated_gemv_route", rows.device, 1)  # calls follow each other on the step's one stream
    args = (rows, weight, act_out, logits, per_expert_scale, ids, w, count, inter, E, H, rows.stride(0), top_k)
    meta = dict(ACT=ACT_CODES[act], BLOCK_E=triton.next_power_of_2(E), BLOCK_TOP=triton.next_power_of_2(top_k),
                **triton_pdl.launch(rows.device))  # the weights are read before the wait: no copy was made here
    if tiles is None and interpreted():
        tiles = INTERPRETER_GATED_GEMV
    if tiles is None:
        _gated_gemv_tuned[lambda m: (triton.cdiv(inter, m["BLOCK_N"]) + triton.cdiv(E, 2 * m["BLOCK_N"]),)](
            *args, **meta)
    else:
        n = tiles.kwargs["BLOCK_N"]
        _gated_gemv_tailed[(triton.cdiv(inter, n) + triton.cdiv(E, 2 * n),)](
            *args, **meta, **tiles.kwargs, num_warps=tiles.num_warps, num_stages=1)
    return act_out, ids, w


def rope_rows_triton(pos_T: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """(cos, sin) [T, 1, 2 * len(inv_freq)] in `dtype` (fused.rope_rows_reference's formula)."""
    T, half = pos_T.shape[0], inv_freq.shape[0]
    cos = torch.empty(T, 1, 2 * half, dtype=dtype, device=pos_T.device)
    sin = torch.empty_like(cos)
    inv = inv_freq.float().contiguous()
    # read before PDL's wait: a copy made here would be the step's own, the kernel before's
    pdl = triton_pdl.launch(pos_T.device) if inv is inv_freq else {}
    _rope_rows_kernel[(T,)](pos_T, inv, cos, sin, half, BLOCK=triton.next_power_of_2(max(half, 1)), **pdl)
    return cos, sin


def norms_route_triton(x, w_post, residual, w_mlp, w_moe, w_router, router_scale: float, eps: float,
                       router_weight: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    """(the [3, *x.shape] rows y, x_mlp, x_moe, ids [1, K], weights [1, K]) of one decoded token."""
    x2, r2 = _rows(x), _rows(residual)
    if x2.shape[0] != 1:
        raise ValueError("norms_route takes one token")
    H, E = x2.shape[1], router_weight.shape[0]
    weight = router_weight if router_weight.is_contiguous() else router_weight.contiguous()
    out = torch.empty((3, *x.shape), dtype=x.dtype, device=x.device)
    logits = torch.empty(E, dtype=x.dtype, device=x.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=x.device)
    w = torch.empty(1, top_k, dtype=torch.float32, device=x.device)
    # the router's rows are read before PDL's wait: a copy made here would be the step's own
    pdl = triton_pdl.launch(x.device) if weight is router_weight else {}
    count = counters.held("norms_route", x.device, 1)  # calls follow each other on the step's one stream
    _norms_route_kernel[(E,)](x2, w_post, r2, w_mlp, w_moe, w_router, weight, per_expert_scale, out[0], out[1],
                              out[2], logits, ids, w, count, H, E, top_k, eps, router_scale,
                              BLOCK=triton.next_power_of_2(H), BLOCK_E=triton.next_power_of_2(E),
                              BLOCK_K=triton.next_power_of_2(top_k), **pdl)
    return out, ids, w
