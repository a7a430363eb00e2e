"""A Gemma 4 layer's glue as torch ops: `localrun::attention_residual_norms`, `localrun::ffn_residual`
(and `localrun::ffn_residual_norm`: with the next layer's input norm), `localrun::route`,
`localrun::gated` (with `route`, for a decoded token: `localrun::gated_route`; with the two projections
they consume too, `localrun::gated_gemv_route`), for a decoded token
whose router projects on its own `localrun::norms_route` (attention_residual_norms, the router's GEMV
and `route` in one launch), and a pass's RoPE rows, `localrun::rope_rows` (what each computes:
kernels/triton_fused.py).

On CUDA each is one Triton kernel (imported on first use: a CPU-only install needs no Triton); on
the CPU in fp32 one call of the C kernels (kernels/cpu_bf16.c: the unfused layer's fp32 ops in
their order, so bit for bit its results, the router's exp aside); otherwise the formula below, in
fp32, rounded once to the activations' dtype. The decoder calls them for half-precision activations
on CUDA and fp32 on the CPU (models/gemma4.py), where they turn about 20 launches or dispatches a
layer into 3; elsewhere it runs the unfused layer, which these formulas restate. `gated` (the dense
MLP's activation times its up projection) is for CUDA alone: the CPU's fp32 MLP already takes one C
call for it (`kernels.gated`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import kernels as cpu
from ..moe import ACTIVATIONS


def _norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), x.shape[-1:], None, eps)


def attention_residual_norms_reference(x, w_post, residual, w_mlp, w_moe, w_router, router_scale: float, eps: float):
    y = (_norm(x, eps) * w_post.float() + residual.float()).to(x.dtype)
    n = _norm(y, eps)
    return (y, (n * w_mlp.float()).to(x.dtype), (n * w_moe.float()).to(x.dtype),
            (n * w_router.float() * router_scale).to(x.dtype))


@torch.library.custom_op("localrun::attention_residual_norms", mutates_args=())
def attention_residual_norms_op(x: torch.Tensor, w_post: torch.Tensor, residual: torch.Tensor, w_mlp: torch.Tensor,
                                w_moe: torch.Tensor, w_router: torch.Tensor, router_scale: float,
                                eps: float) -> torch.Tensor:
    """y = norm(x) * w_post + residual (the residual stream after attention), then norm(y) * w_moe,
    norm(y) * w_mlp and norm(y) * w_router * router_scale: the four as one [4, *x.shape] tensor, in
    that order (the dense MLP's and the router's inputs back to back: a decoded token's two
    projections of them are one GEMM, models/gemma4.py). An op's outputs may not alias each other,
    so it returns the one tensor and `attention_residual_norms` hands out its rows."""
    y, mlp, moe, router = attention_residual_norms_reference(x, w_post, residual, w_mlp, w_moe, w_router,
                                                             router_scale, eps)
    return torch.stack((y, moe, mlp, router))


@attention_residual_norms_op.register_kernel("cuda")
def _(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps):
    from .triton_fused import attention_residual_norms_triton

    return attention_residual_norms_triton(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps)


@attention_residual_norms_op.register_fake
def _(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps):
    return torch.empty((4, *x.shape), dtype=x.dtype, device=x.device)


def ffn_residual_reference(mlp, w1, moe, w2, w, residual, scalar, eps: float):
    h = _norm(mlp, eps) * w1.float() + _norm(moe, eps) * w2.float()
    return ((_norm(h, eps) * w.float() + residual.float()) * scalar.float()).to(residual.dtype)


@torch.library.custom_op("localrun::ffn_residual", mutates_args=())
def ffn_residual_op(mlp: torch.Tensor, w1: torch.Tensor, moe: torch.Tensor, w2: torch.Tensor, w: torch.Tensor,
                 residual: torch.Tensor, scalar: torch.Tensor, eps: float) -> torch.Tensor:
    """(norm(norm(mlp) * w1 + norm(moe) * w2) * w + residual) * scalar: the dense MLP and the experts
    joined, back into the residual stream, times the layer scalar."""
    return ffn_residual_reference(mlp, w1, moe, w2, w, residual, scalar, eps)


@ffn_residual_op.register_kernel("cuda")
def _(mlp, w1, moe, w2, w, residual, scalar, eps):
    from .triton_fused import ffn_residual_triton

    return ffn_residual_triton(mlp, w1, moe, w2, w, residual, scalar, eps)


@ffn_residual_op.register_fake
def _(mlp, w1, moe, w2, w, residual, scalar, eps):
    return torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)


def ffn_residual_norm_reference(mlp, w1, moe, w2, w, residual, scalar, w_next, eps: float):
    x = ffn_residual_reference(mlp, w1, moe, w2, w, residual, scalar, eps)
    return x, (_norm(x, eps) * w_next.float()).to(x.dtype)


@torch.library.custom_op("localrun::ffn_residual_norm", mutates_args=())
def ffn_residual_norm_op(mlp: torch.Tensor, w1: torch.Tensor, moe: torch.Tensor, w2: torch.Tensor, w: torch.Tensor,
                         residual: torch.Tensor, scalar: torch.Tensor, w_next: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ffn_residual's x, norm(x) * w_next): the layer's output and the next layer's input norm of it
    (the rounded x, as the next layer's rms_norm would read it), in one launch on CUDA."""
    return ffn_residual_norm_reference(mlp, w1, moe, w2, w, residual, scalar, w_next, eps)


@ffn_residual_norm_op.register_kernel("cuda")
def _(mlp, w1, moe, w2, w, residual, scalar, w_next, eps):
    from .triton_fused import ffn_residual_triton

    return ffn_residual_triton(mlp, w1, moe, w2, w, residual, scalar, eps, w_next)


@ffn_residual_norm_op.register_fake
def _(mlp, w1, moe, w2, w, residual, scalar, w_next, eps):
    return tuple(torch.empty(residual.shape, dtype=residual.dtype, device=residual.device) for _ in range(2))


def norms_route_reference(x, w_post, residual, w_mlp, w_moe, w_router, router_scale: float, eps: float,
                          router_weight, per_expert_scale, top_k: int):
    y, mlp, moe, router = attention_residual_norms_reference(x, w_post, residual, w_mlp, w_moe, w_router,
                                                             router_scale, eps)
    logits = (router.reshape(-1, router.shape[-1]).float() @ router_weight.float().t()).to(x.dtype)
    return (torch.stack((y, mlp, moe)), *route_reference(logits, per_expert_scale, top_k))


@torch.library.custom_op("localrun::norms_route", mutates_args=())
def norms_route_op(x: torch.Tensor, w_post: torch.Tensor, residual: torch.Tensor, w_mlp: torch.Tensor,
                   w_moe: torch.Tensor, w_router: torch.Tensor, router_scale: float, eps: float,
                   router_weight: torch.Tensor, per_expert_scale: torch.Tensor,
                   top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_residual_norms, the router's projection of its router norm (rounded to x's dtype, as
    a GEMV stores it) and `route` of those logits, for one decoded token: ([3, *x.shape] rows y, x_mlp,
    x_moe; ids [1, K]; weights [1, K]). One launch on CUDA (`norms_route_triton`)."""
    return norms_route_reference(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps, router_weight,
                                 per_expert_scale, top_k)


@norms_route_op.register_kernel("cuda")
def _(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps, router_weight, per_expert_scale, top_k):
    from .triton_fused import norms_route_triton

    return norms_route_triton(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps, router_weight,
                              per_expert_scale, top_k)


@norms_route_op.register_fake
def _(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps, router_weight, per_expert_scale, top_k):
    return (torch.empty((3, *x.shape), dtype=x.dtype, device=x.device),
            torch.empty(1, top_k, dtype=torch.int64, device=x.device),
            torch.empty(1, top_k, dtype=torch.float32, device=x.device))


def route_reference(logits_TE, per_expert_scale, top_k: int):
    p = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(p, top_k, dim=-1)
    return ids, w / w.sum(dim=-1, keepdim=True) * per_expert_scale.float()[ids]


@torch.library.custom_op("localrun::route", mutates_args=())
def route_op(logits_TE: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, K] int64, weights [T, K] fp32): softmax in fp32, the top k largest first,
    renormalised over those k, times each chosen expert's scale."""
    return route_reference(logits_TE, per_expert_scale, top_k)


@route_op.register_kernel("cuda")
def _(logits_TE, per_expert_scale, top_k):
    from .triton_fused import route_triton

    return route_triton(logits_TE, per_expert_scale, top_k)


@route_op.register_fake
def _(logits_TE, per_expert_scale, top_k):
    T = logits_TE.shape[0]
    return (torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device),
            torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device))


def gated_reference(gate_up, act: str):
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (ACTIVATIONS[act](gate) * up).to(gate_up.dtype)


@torch.library.custom_op("localrun::gated", mutates_args=())
def gated_op(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up of a dense MLP's fused projection gate_up [..., 2I] (gate first), in fp32 and
    rounded once: [..., I]. act: gelu_pytorch_tanh, gelu or silu."""
    return gated_reference(gate_up, act)


@gated_op.register_kernel("cuda")
def _(gate_up, act):
    from .triton_fused import gated_triton

    return gated_triton(gate_up, act)


@gated_op.register_fake
def _(gate_up, act):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("localrun::gated_route", mutates_args=())
def gated_route_op(gate_up: torch.Tensor, logits_TE: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int,
                   act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gated` of a decoded token's dense gate/up and `route` of its router logits: the two outputs of
    its one two-row GEMM (models/gemma4.py, DecoderLayer._mlp_and_router), in one launch on CUDA."""
    return (gated_reference(gate_up, act), *route_reference(logits_TE, per_expert_scale, top_k))


@gated_route_op.register_kernel("cuda")
def _(gate_up, logits_TE, per_expert_scale, top_k, act):
    from .triton_fused import gated_route_triton

    return gated_route_triton(gate_up, logits_TE, per_expert_scale, top_k, act)


@gated_route_op.register_fake
def _(gate_up, logits_TE, per_expert_scale, top_k, act):
    T = logits_TE.shape[0]
    return (gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2),
            torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device),
            torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device))


def gated_gemv_route_reference(rows, weight, inter: int, per_expert_scale, top_k: int, act: str):
    y = F.linear(rows, weight.to(rows.dtype))  # [2, 2I + E]: row 0's gate / up, row 1's logits (the rest unused)
    return (gated_reference(y[:1, : 2 * inter], act), *route_reference(y[1:, 2 * inter:], per_expert_scale, top_k))


@torch.library.custom_op("localrun::gated_gemv_route", mutates_args=())
def gated_gemv_route_op(rows: torch.Tensor, weight: torch.Tensor, inter: int, per_expert_scale: torch.Tensor,
                        top_k: int, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoded token's dense MLP gate / up and router projections with their consumers: rows [2, H] (the
    MLP's input, the router's), weight [2 * inter + E, H] (gate, up, router rows: DecoderLayer.stacked) ->
    (act(gate) * up [1, inter], ids [1, K], weights [1, K]); each projection rounded to the rows' dtype, as
    `_mlp_and_router`'s GEMM and `gated_route` compute them. One launch on CUDA, where those are two."""
    return gated_gemv_route_reference(rows, weight, inter, per_expert_scale, top_k, act)


@gated_gemv_route_op.register_kernel("cuda")
def _(rows, weight, inter, per_expert_scale, top_k, act):
    from .triton_fused import gated_gemv_route_triton

    return gated_gemv_route_triton(rows, weight, inter, per_expert_scale, top_k, act)


@gated_gemv_route_op.register_fake
def _(rows, weight, inter, per_expert_scale, top_k, act):
    return (rows.new_empty(1, inter), torch.empty(1, top_k, dtype=torch.int64, device=rows.device),
            torch.empty(1, top_k, dtype=torch.float32, device=rows.device))


def rope_rows_reference(pos_T, inv_freq, dtype: torch.dtype):
    freqs = pos_T[:, None].float() * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    sin = emb.sin()
    sin[..., : sin.shape[-1] // 2] *= -1
    return emb.cos().to(dtype), sin.to(dtype)


@torch.library.custom_op("localrun::rope_rows", mutates_args=())
def rope_rows_op(pos_T: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE rows (cos, sin) [T, 1, D] of positions pos_T [T] (int64) for inverse frequencies [D/2],
    in fp32 and rounded once to `dtype`; sin's first half negated (Gemma4Model.rope)."""
    return rope_rows_reference(pos_T, inv_freq, dtype)


@rope_rows_op.register_kernel("cpu")
def _(pos_T, inv_freq, dtype):
    out = _rope_row_c(pos_T, inv_freq, dtype)
    return out if out is not None else rope_rows_reference(pos_T, inv_freq, dtype)


def _rope_row_c(pos_T, inv_freq, dtype):
    """One fp32 position's rows from the C kernel, which the host-driven CPU decode takes (its cos and
    sin may differ from torch's in the last bit), or None."""
    if pos_T.numel() != 1 or dtype != torch.float32 or pos_T.device.type != "cpu":
        return None
    return cpu.rope_row(inv_freq, int(pos_T[0]))


@rope_rows_op.register_kernel("cuda")
def _(pos_T, inv_freq, dtype):
    from .triton_fused import rope_rows_triton

    return rope_rows_triton(pos_T, inv_freq, dtype)


@rope_rows_op.register_fake
def _(pos_T, inv_freq, dtype):
    shape = (pos_T.shape[0], 1, 2 * inv_freq.shape[0])
    return (torch.empty(shape, dtype=dtype, device=pos_T.device), torch.empty(shape, dtype=dtype, device=pos_T.device))


# What the decoder calls: fp32 rows on the CPU go straight to the C kernels (a custom op's dispatch
# costs more than their work at decode sizes), everything else (CUDA, tracing) through the ops.

class Normed(NamedTuple):
    """What `attention_residual_norms` returns: the residual after attention, its three norms, and
    x_mlp and x_router as the rows of one [2, *x.shape] tensor where the op made them so (None: the C
    call made them apart)."""

    y: torch.Tensor
    mlp: torch.Tensor
    moe: torch.Tensor
    router: torch.Tensor
    mlp_router: torch.Tensor | None


def attention_residual_norms(x, w_post, residual, w_mlp, w_moe, w_router, router_scale: float, eps: float) -> Normed:
    out = cpu.attention_residual_norms(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps)
    if out is not None:
        return Normed(*out, None)
    rows = attention_residual_norms_op(x, w_post, residual, w_mlp, w_moe, w_router, router_scale, eps)
    return Normed(rows[0], rows[2], rows[1], rows[3], rows[2:])


def ffn_residual(mlp, w1, moe, w2, w, residual, scalar, eps: float):
    out = cpu.ffn_residual(mlp, w1, moe, w2, w, residual, scalar, eps)
    return out if out is not None else ffn_residual_op(mlp, w1, moe, w2, w, residual, scalar, eps)


def rope_rows(pos_T, inv_freq, dtype):
    """A pass's RoPE rows, with one decoded fp32 CPU token's from the C kernel as the host-driven
    decode computes them (so the static step's tokens and logprobs are the eager step's, bit for bit;
    traced: the op, whose CPU kernel is that); else the torch formula."""
    if torch.compiler.is_compiling() and pos_T.device.type == "cpu" and pos_T.shape[0] == 1:
        return rope_rows_op(pos_T, inv_freq, dtype)
    out = None if torch.is_grad_enabled() else _rope_row_c(pos_T, inv_freq, dtype)
    return out if out is not None else rope_rows_reference(pos_T, inv_freq, dtype)


def route(logits_TE, per_expert_scale, top_k: int):
    out = cpu.route(logits_TE, per_expert_scale, top_k)
    return out if out is not None else route_op(logits_TE, per_expert_scale, top_k)
