"""Gemma 4 text decoder (26B-A4B MoE, E2B/E4B dense with per-layer embeddings, 31B dense).

Shape letters: B batch, T tokens, S key positions, N heads, D head dim, H hidden,
K top-k, E experts, I intermediate, L layers, P per-layer-input dim, V vocab.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, check_shape, read_rows
from . import common
from ..config import ModelArgs
from ..errors import LocalrunError
from .. import kernels
from ..kernels import gemv as gemv_ops
from ..kernels import norm as norm_ops
from ..kernels import fused as fused_ops
from ..kernels.attention import blocked_attention, causal_attention, decode_attention, grouped_sdpa
from ..kvcache import FullKV, RingKV, attention_mask
from ..moe import DenseExperts, activation
from ..plan import FUSED_SDPA_MAX_HEAD_DIM


def args_from_dict(config: dict) -> ModelArgs:
    return ModelArgs.from_dict(config)


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every text tensor of a checkpoint, by name after the weight prefix, with its shape.

    This is the one description of the layout: the loader, the fit planner and the tiny
    checkpoint factory all read it.
    """
    H, V = args.hidden_size, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, H), "norm.weight": (H,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)  # stored outside the prefix; see loader
    L, P = args.num_hidden_layers, args.hidden_size_per_layer_input
    if P:
        shapes["embed_tokens_per_layer.weight"] = (args.vocab_size_per_layer_input, L * P)
        shapes["per_layer_model_projection.weight"] = (L * P, H)
        shapes["per_layer_projection_norm.weight"] = (P,)
    for i in range(L):
        p = f"layers.{i}."
        D, N, KV = args.layer_head_dim(i), args.num_attention_heads, args.layer_kv_heads(i)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (H,)
        shapes[p + "layer_scalar"] = (1,)
        shapes[p + "self_attn.q_proj.weight"] = (N * D, H)
        shapes[p + "self_attn.q_norm.weight"] = (D,)
        shapes[p + "self_attn.o_proj.weight"] = (H, N * D)
        if args.kv_source_layer(i) == i:
            shapes[p + "self_attn.k_proj.weight"] = (KV * D, H)
            shapes[p + "self_attn.k_norm.weight"] = (D,)
            if args.has_v_proj(i):
                shapes[p + "self_attn.v_proj.weight"] = (KV * D, H)
        if args.attention_bias:  # every projection the layer has gets one, as in transformers
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if p + f"self_attn.{proj}.weight" in shapes:
                    shapes[p + f"self_attn.{proj}.bias"] = shapes[p + f"self_attn.{proj}.weight"][:1]
        M = args.mlp_intermediate(i)
        shapes[p + "mlp.gate_proj.weight"] = (M, H)
        shapes[p + "mlp.up_proj.weight"] = (M, H)
        shapes[p + "mlp.down_proj.weight"] = (H, M)
        if args.enable_moe_block:
            E, I = args.num_experts, args.moe_intermediate_size
            shapes[p + "router.proj.weight"] = (E, H)
            shapes[p + "router.scale"] = (H,)
            shapes[p + "router.per_expert_scale"] = (E,)
            shapes[p + "experts.gate_up_proj"] = (E, 2 * I, H)
            shapes[p + "experts.down_proj"] = (E, H, I)
            for norm in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                         "post_feedforward_layernorm_2"):
                shapes[p + norm + ".weight"] = (H,)
        if P:
            shapes[p + "per_layer_input_gate.weight"] = (P, H)
            shapes[p + "per_layer_projection.weight"] = (H, P)
            shapes[p + "post_per_layer_input_norm.weight"] = (H,)
    return shapes


def tensor_group(name: str) -> str:
    """The component a tensor belongs to, for fit's breakdown: embed, attention, mlp, router, norms, experts, per_layer."""
    if ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if ".self_attn." in name and not name.endswith("norm.weight"):
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "per_layer" in name:
        return "per_layer"
    if name.startswith(("embed_tokens.", "lm_head.")):
        return "embed"
    return "norms"


# The decoder ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 (Gemma multiplies by the weight itself, not 1 + weight)."""
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        if not torch.is_grad_enabled():  # decode calls it ~130 times a token: one C call each
            out = kernels.rms_norm(x, weight, eps)
            if out is not None:
                return out
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    if x.device.type == "cuda" and not torch.is_grad_enabled():  # one kernel, not five to seven (~11 a layer)
        return norm_ops.rms_norm(x, weight, eps)
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), x.shape[-1:], w, eps).type_as(x)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.linear` (which also takes the bf16-stored weights of an fp32 CPU run); with
    DECODE_KERNELS["dense_gemv"] on, the few rows of a CUDA half-precision decode step go through
    localrun::gemv instead (one Triton GEMV a projection, not cuBLAS' split-K GEMM + reduce)."""
    if DECODE_KERNELS["dense_gemv"] and gemv_ops.applies(x, w, b):
        return gemv_ops.gemv(x, w, b)
    return kernels.linear(x, w, b)


def project(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """lin(x) through `linear`."""
    return linear(x, lin.weight, lin.bias)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor `parts` make up when they already lie back to back in one storage (the loader
    allocates fused weights that way), else None."""
    first = parts[0]
    offset = first.storage_offset()
    for t in parts:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several Linears reading the same input; each Linear's parameters
    become views of it, so state keeps its checkpoint names and no copy stays alive. Weights that
    already share one storage in order (as the loader reads them) are used in place: no copy."""
    weights = [lin.weight.detach() for lin in linears]
    w = _joined(weights)
    if w is None:
        w = torch.cat(weights)
    b = None
    if linears[0].bias is not None:
        biases = [lin.bias.detach() for lin in linears]
        b = _joined(biases)
        if b is None:
            b = torch.cat(biases)
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(w[start : start + n], requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b[start : start + n], requires_grad=False)
        start += n
    return w, b


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] for "default" and "proportional" RoPE.

    Proportional (Gemma 4 full layers): only the first int(factor * D / 2) pairs rotate, at
    frequencies theta^(-2k/D) of the *whole* head dim; the remaining pairs get frequency 0.
    """
    theta, kind = params["rope_theta"], params.get("rope_type", "default")
    if kind == "default":
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    if kind == "proportional":
        angles = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        rotated = 1.0 / theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float) / head_dim)
        inv = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)])
        return inv / params.get("factor", 1.0)
    raise LocalrunError(f"unsupported rope_type {kind!r} (supported: default, proportional)")


def apply_rope(x_BTND, cos_T1D, sin_T1D):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = roll(x, D/2) * sign: the sign lives in
    `sin_T1D` (its first half negated, see Gemma4Model.rope), so this is two products and a roll."""
    return x_BTND * cos_T1D + x_BTND.roll(x_BTND.shape[-1] // 2, dims=-1) * sin_T1D


# localrun's own decode kernels (kernels/attention.py; kernels/fused.py and kernels/qkv_write.py are
# the fused glue; kernels/gemv.py) and fusions (mlp_router_gemm: DecoderLayer._mlp_and_router);
# switched off, the same step runs the plain torch ops (scripts/gpu_check.py measures both). dense_gemv
# (CUDA only) paid on an H200: graphs decode 284-293 tok/s against cuBLAS's 251-261, the same tokens
# (docs/gpu/2026-11-27-h200-resident.md: 359 kernels a token, not 394; no split-K reduce launches).
# parallel_mlp (CUDA graphs step, opt-in until measured): a decoded token's dense MLP (its gate/up
# GEMV, the gated activation, the down GEMV: ~11 us a layer at 26B-A4B on an H200) runs on a side stream
# while the main one routes (the router's own GEMV, the top-k) and runs the routed experts (~30 us of
# latency-bound kernels), joined before the FFN's residual glue: the graph holds the two branches, the
# GPU overlaps them. It takes the router's rows off the MLP's GEMM (mlp_router_gemm does not apply).
# norms_route (opt-in, with parallel_mlp: where the router projects on its own): the post-attention
# norms, the router's GEMV and the top-k as one launch (localrun::norms_route), where they were three.
# fused_qkv_attention (where qkv_write runs: CUDA's half-precision static step): the q/k/v norms, RoPE and
# K/V write inside the decode attention launch (localrun::qkv_attention), where they were two launches a
# layer; the same bits (each split program norms its query heads as qkv_write does). On an H200 graphs
# decode 297.6 / 281.5 tok/s (after 16 / 512) against 278.8 / 275.6 without, the same tokens, 333 kernels
# a token, not 359 (docs/gpu/2026-11-27-h200-open-switches.md).
# l2_prefetch (opt-in, CUDA graphs step, MoE layers: kernels/triton_prefetch.py): on the step's side stream,
# a layer asks the L2 for its o_proj's weights before its attention (L2_PREFETCH "o_proj"; "mlp": its dense
# MLP's too) and for the next layer's q/k/v weights before its experts ("next_qkv"): latency-bound
# kernels leave most of the bandwidth idle there, and the projections after them could then read L2.
# gated_gemv (opt-in, where mlp_router_gemm's GEMM runs and the CUDA glue applies): that GEMM's two projections
# as one-row GEMVs (the MLP's gate / up rows against its input, the router's rows against the router's) and
# their two small consumers, act(gate) * up and the top-k, in one launch (localrun::gated_gemv_route), where
# they were two: cuBLAS's two-row GEMM (each projection computed for both rows, half of it thrown away) and
# gated_route.
DECODE_KERNELS = {"decode_attention": True, "fused_glue": True, "decode_layer": True, "dense_gemv": True,
                  "mlp_router_gemm": True, "parallel_mlp": False, "norms_route": False,
                  "fused_qkv_attention": True, "l2_prefetch": False, "gated_gemv": False}
L2_PREFETCH = ("o_proj", "next_qkv")
CPU_ONLY_KERNELS = {"decode_layer"}  # DecoderLayer.forward_decode: nothing to switch off on CUDA


def use_kernel(name: str, x: torch.Tensor) -> bool:
    """Whether activations x take localrun's kernel `name` (inference only): on CUDA, split-key
    decode attention, and the fused layer glue for half precision (fp32 there stays the unfused
    ops, the reference CUDA is checked against); on the CPU in fp32 when the C kernels are built,
    both as C calls (the glue computes the unfused ops' very results, with fewer calls)."""
    if not DECODE_KERNELS[name] or torch.is_grad_enabled():
        return False
    if x.device.type == "cuda":
        return name == "decode_attention" or x.dtype != torch.float32
    return x.device.type == "cpu" and x.dtype == torch.float32 and kernels.library() is not None


def qkv_attention_applies(raw_q_BTND: torch.Tensor) -> bool:
    """Whether a static step's layer whose q/k/v write is one kernel (fused_on_cuda) attends in that
    launch too (DECODE_KERNELS["fused_qkv_attention"]): one token of one sequence, where the decode
    attention kernel would run."""
    return (DECODE_KERNELS["fused_qkv_attention"] and raw_q_BTND.shape[:2] == (1, 1)
            and use_kernel("decode_attention", raw_q_BTND))


def fused_on_cuda(x: torch.Tensor) -> bool:
    """Whether activations x take the glue kernels that exist for CUDA alone (the K/V write, the
    dense MLP's gated activation): the fused glue in half precision on CUDA. The CPU's fp32 glue is
    the C calls, which do this work inside kernels.DecodeLayer and `kernels.gated`."""
    return x.device.type == "cuda" and use_kernel("fused_glue", x)


def rope_on_cuda(pos_T: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a pass's RoPE rows come from `localrun::rope_rows` (one launch a layer kind): with the
    fused glue, for half-precision activations on CUDA (fp32 there computes the torch formula, the
    reference CUDA is checked against)."""
    return (pos_T.device.type == "cuda" and dtype != torch.float32 and DECODE_KERNELS["fused_glue"]
            and not torch.is_grad_enabled())


# A prefill's attention: on CUDA in half precision, for a head dim that SDPA's fused backends refuse
# (above plan.FUSED_SDPA_MAX_HEAD_DIM: Gemma 4's full layers, D = 512), the whole chunk is one
# `localrun::causal_attention` launch, a Triton flash attention kernel that allocates its output and
# nothing a key; SDPA's math backend would hold fp32 copies of K and V and fp32 scores, ~18 KiB a key
# for 26B-A4B (plan.prefill_attention_bytes counts either, by this switch). Everything else attends
# in blocks of QUERY_BLOCK queries (`blocked_attention`), each over the keys it can see. Off: the
# blocks everywhere (scripts/gpu_check.py measures both).
PREFILL_KERNELS = {"flash_attention": True}


def flash_prefill(q_BNTD: torch.Tensor) -> bool:
    """Whether a prefill's queries take `localrun::causal_attention` (see PREFILL_KERNELS)."""
    return (PREFILL_KERNELS["flash_attention"] and q_BNTD.device.type == "cuda"
            and q_BNTD.dtype in (torch.bfloat16, torch.float16) and q_BNTD.shape[-1] > FUSED_SDPA_MAX_HEAD_DIM
            and not torch.is_grad_enabled())


def attend(q_BNTD, k_BNSD, v_BNSD, pos_T, pos_S, window: int | None, masks: dict | None = None,
           visible_1S: torch.Tensor | None = None, scale: float = 1.0):
    """Attention (scale 1.0 unless given, GQA) of the T new queries over the S keys a cache returned, which are
    the earlier positions followed by the T new ones (FullKV, RingKV and KV sharing all return that).

    One token sees every key (the caches return only visible ones), unless `visible_1S` masks some
    (the static decode step reads fixed-size buffers) or a sliding layer's ring returns more keys
    than its window (rollback slots, localrun/kvcache.py): then its mask comes from the positions.
    Many tokens: `localrun::causal_attention` where `flash_prefill` says so (one Triton launch,
    visibility from the positions), else `blocked_attention` (QUERY_BLOCK queries a call, each over
    the keys it can see, its mask kept in `masks` for the other layers of the same kind).
    """
    T, S = q_BNTD.shape[2], k_BNSD.shape[2]
    if T == 1:
        if visible_1S is None and window is not None and S > window:  # a ring with rollback slots
            visible_1S = mask = None if masks is None else masks.get((window, "decode"))
            if mask is None:
                visible_1S = attention_mask(pos_T, pos_S, window)
                if masks is not None:
                    masks[window, "decode"] = visible_1S
        if use_kernel("decode_attention", q_BNTD):  # CUDA: keys split over the SMs; CPU: one C call
            out = kernels.decode_attention(q_BNTD, k_BNSD, v_BNSD, visible_1S, scale)
            return out if out is not None else decode_attention(q_BNTD, k_BNSD, v_BNSD, visible_1S, scale)
        return grouped_sdpa(q_BNTD, k_BNSD, v_BNSD, visible_1S, scale)
    if flash_prefill(q_BNTD):
        return causal_attention(q_BNTD, k_BNSD, v_BNSD, pos_T, pos_S, window, scale)
    return blocked_attention(q_BNTD, k_BNSD, v_BNSD, pos_T, pos_S, window, masks, scale)


def norm_rope(x_BTND, norm: "RMSNorm", cos_T1D, sin_T1D):
    """apply_rope(norm(x)): q and k heads; one C call per layer on CPU in fp32 inference."""
    if not torch.is_grad_enabled():
        out = kernels.rms_norm_rope(x_BTND, norm.weight, cos_T1D, sin_T1D, norm.eps)
        if out is not None:
            return out
    if x_BTND.device.type == "cuda" and x_BTND.dtype != torch.float32 and not torch.is_grad_enabled():
        return norm_ops.rms_norm_rope(x_BTND, norm.weight, cos_T1D, sin_T1D, norm.eps)
    return apply_rope(norm(x_BTND), cos_T1D, sin_T1D)


class Attention(nn.Module):
    """Gemma 4 attention: q/k RMSNorm, weightless v norm, scaling 1.0, GQA, optional K=V.

    With attention_k_eq_v (full layers) there is no v_proj: k_proj's output is both the
    values (v-normed, no RoPE) and the keys (k-normed, RoPE'd). A KV-shared layer has
    neither k_proj nor its own cache: it attends over its source layer's keys and values.
    """

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        H, N = args.hidden_size, args.num_attention_heads
        self.layer = layer
        self.head_dim = D = args.layer_head_dim(layer)
        self.kv_heads = KV = args.layer_kv_heads(layer)
        self.window = args.sliding_window if args.is_sliding(layer) else None
        self.shares_kv = args.kv_source_layer(layer) != layer
        self.eps = args.rms_norm_eps
        bias = args.attention_bias
        self.q_proj = nn.Linear(H, N * D, bias=bias)
        self.q_norm = RMSNorm(D, self.eps)
        self.o_proj = nn.Linear(N * D, H, bias=bias)
        if not self.shares_kv:
            self.k_proj = nn.Linear(H, KV * D, bias=bias)
            self.k_norm = RMSNorm(D, self.eps)
            self.v_proj = nn.Linear(H, KV * D, bias=bias) if args.has_v_proj(layer) else None
        self.qkv = None  # (weight, bias) of q/k/v fused into one matmul, set by fuse()

    def fuse(self) -> None:
        projs = [self.q_proj] + ([] if self.shares_kv else [self.k_proj] + ([self.v_proj] if self.v_proj else []))
        self.qkv = fuse_linears(*projs)
        self.qkv_sizes = [p.out_features for p in projs]

    def project(self, x_BTH):
        """q, k, v projections (k, v None in a KV-shared layer; v None with K=V)."""
        if self.qkv is None:
            k = None if self.shares_kv else project(self.k_proj, x_BTH)
            v = None if self.shares_kv or self.v_proj is None else project(self.v_proj, x_BTH)
            return project(self.q_proj, x_BTH), k, v
        out = linear(x_BTH, *self.qkv).split(self.qkv_sizes, dim=-1)
        return out[0], out[1] if len(out) > 1 else None, out[2] if len(out) > 2 else None

    def forward(self, x_BTH, cos_TD, sin_TD, pos_T, cache, shared: dict):
        B, T, _ = x_BTH.shape
        raw_q, raw, v = self.project(x_BTH)
        raw_q = raw_q.view(B, T, -1, self.head_dim)
        span = shared.get("span")  # the static decode step's full-layer key count (None: host-driven)
        visible = None
        q = None
        if self.shares_kv:
            k, v, pos_S, visible = shared[self.window is not None]
        else:
            raw = raw.view(B, T, self.kv_heads, self.head_dim)
            v = raw if v is None else v.view(B, T, self.kv_heads, self.head_dim)
            pos_S = pos_T
            if cache is not None and span is not None and fused_on_cuda(raw):  # q/k norms, RoPE, write: one kernel
                if qkv_attention_applies(raw_q):  # and the attention, in the same launch
                    out, k, v, visible = cache.write_attend(raw_q, self.q_norm.weight, raw, v, self.k_norm.weight,
                                                            cos_TD, sin_TD, self.eps, pos_T, span,
                                                            shared.setdefault("static", {}))
                    shared[self.window is not None] = (k, v, pos_S, visible)
                    return project(self.o_proj, out.transpose(1, 2).reshape(B, T, -1))
                q, k, v, visible = cache.write_raw(raw_q, self.q_norm.weight, raw, v, self.k_norm.weight, cos_TD,
                                                   sin_TD, self.eps, pos_T, span, shared.setdefault("static", {}))
            else:
                k = norm_rope(raw, self.k_norm, cos_TD, sin_TD).transpose(1, 2)
                v = rms_norm(v, None, self.eps).transpose(1, 2)
                if cache is not None and span is not None:
                    k, v, visible = cache.write(k, v, pos_T, span, shared.setdefault("static", {}))
                elif cache is not None:
                    k, v, pos_S = cache.update(k, v, pos_T)
            shared[self.window is not None] = (k, v, pos_S, visible)  # the last layer of each kind wins
        if q is None:
            q = norm_rope(raw_q, self.q_norm, cos_TD, sin_TD)
        out = attend(q.transpose(1, 2), k, v, pos_T, pos_S, self.window, shared.setdefault("masks", {}), visible)
        return project(self.o_proj, out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act, self.act_name = activation(act), act
        self.gate_up = None  # (weight, None) of gate/up fused into one matmul, set by fuse()

    def fuse(self) -> None:
        self.gate_up = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x, gate_up: torch.Tensor | None = None, activated: torch.Tensor | None = None):
        """gate_up: x's fused gate/up projection, activated: act(gate) * up of it, where the caller
        computed them (DecoderLayer.front)."""
        if activated is not None:
            return project(self.down_proj, activated)
        if self.gate_up is None:
            return project(self.down_proj, self.act(project(self.gate_proj, x)) * project(self.up_proj, x))
        if gate_up is None:
            gate_up = linear(x, *self.gate_up)
        if fused_on_cuda(gate_up):  # one Triton kernel, not the activation's and the product's
            return project(self.down_proj, fused_ops.gated_op(gate_up, self.act_name))
        a = kernels.gated(gate_up, self.act_name) if not torch.is_grad_enabled() else None
        if a is None:  # the C call is the activation DecodeLayer computes (fp32 CPU inference)
            gate, up = gate_up.chunk(2, dim=-1)
            a = self.act(gate) * up
        return project(self.down_proj, a)


class Router(nn.Module):
    """h -> (ids_TK, w_TK): softmax over experts in fp32, top-k renormalized, then per-expert scale."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        H, E = args.hidden_size, args.num_experts
        self.top_k, self.eps = args.top_k_experts, args.rms_norm_eps
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(E))
        self.root_size = H**-0.5

    def forward(self, r_TH, normed: bool = False, logits: torch.Tensor | None = None, routed: tuple | None = None):
        """normed: r_TH is already rms_norm(r) * scale * root_size (fused_ops.attention_residual_norms),
        and the rest runs as one op; logits: its projection, routed: the (ids, weights) of those, where
        the caller computed them (DecoderLayer.front: with the dense MLP's). Either way a forward hook
        sees (ids, weights) (localrun/profile.py)."""
        if routed is not None:
            return routed
        if normed:
            logits = project(self.proj, r_TH) if logits is None else logits
            return fused_ops.route(logits, self.per_expert_scale, self.top_k)
        h = rms_norm(r_TH, None, self.eps) * self.scale * self.root_size
        p_TE = torch.softmax(project(self.proj, h), dim=-1, dtype=torch.float32)
        w_TK, ids_TK = torch.topk(p_TE, self.top_k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        return ids_TK, w_TK * self.per_expert_scale[ids_TK]


class Front(NamedTuple):
    """A layer's state at its routed experts (DecoderLayer.front): what `back` needs after them."""

    residual: torch.Tensor  # the residual stream after attention
    h: torch.Tensor  # the dense MLP's output
    experts_in: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (x_TH, ids_TK, w_TK); None: no experts
    fused: bool  # the glue ran as kernels/fused.py's ops (back must too)
    shared: dict | None = None  # the pass's shared dict, where CUDA's back() hands the next layer its input norm
    beside: tuple | None = None  # (side stream, its input): h is computed there, back() joins it first


def parallel_mlp(x: torch.Tensor) -> bool:
    """Whether a decoded token's dense MLP runs beside its routing and experts (DECODE_KERNELS["parallel_mlp"]):
    one token on CUDA, outside torch.compile."""
    return (DECODE_KERNELS["parallel_mlp"] and x.device.type == "cuda" and x.shape[:-1].numel() == 1
            and not torch.compiler.is_compiling())


def mlp_beside(mlp: "MLP", x: torch.Tensor, stream) -> tuple[torch.Tensor, tuple]:
    """mlp(x) on `stream` once it has what the current stream queued (x); (its output, Front.beside).
    x stays referenced until the join: freed earlier, the current stream could reuse its memory while
    the side stream still reads it."""
    with forked(stream):
        h = mlp(x)
    return h, (stream, x)


@contextlib.contextmanager
def forked(stream):
    """Within: work queued on `stream`, forked from the current stream here (a capture holds it as a
    branch that starts at this point of the chain); `join_stream` joins it back."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield


def l2_prefetch(x: torch.Tensor) -> bool:
    """Whether a decoded token's layers ask the L2 for their next weights (DECODE_KERNELS["l2_prefetch"]):
    one token on CUDA in half precision, outside torch.compile."""
    return (DECODE_KERNELS["l2_prefetch"] and x.device.type == "cuda" and x.shape[:-1].numel() == 1
            and x.dtype != torch.float32 and not torch.compiler.is_compiling())


def prefetch_beside(stream, *weights: torch.Tensor) -> None:
    """weights into the L2 on `stream`, `forked` here; joined by the layer's end."""
    from ..kernels.triton_prefetch import l2_prefetch_triton  # CUDA only: torch's CUDA builds ship triton

    with forked(stream):
        l2_prefetch_triton(*weights)


def join_stream(stream) -> None:
    """The current stream waits for what `stream` was given so far."""
    torch.cuda.current_stream().wait_stream(stream)


def join_beside(front: Front) -> None:
    """The current stream waits for what `front` ran beside it."""
    if front.beside is not None:
        join_stream(front.beside[0])


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.index = layer
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(H, args.mlp_intermediate(layer), args.hidden_activation)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(H, eps))
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = args.enable_moe_block
        if self.moe:
            self.router = Router(args)
            # Any callable (x_TH, ids_TK, w_TK) -> y_TH: the loader swaps in 4-bit or offloaded experts.
            self.experts = DenseExperts(
                torch.empty(args.num_experts, 2 * args.moe_intermediate_size, H),
                torch.empty(args.num_experts, H, args.moe_intermediate_size),
                args.hidden_activation,
            )
            for name in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
                setattr(self, name, RMSNorm(H, eps))
        self.per_layer = args.hidden_size_per_layer_input
        if self.per_layer:
            self.act = activation(args.hidden_activation)
            self.per_layer_input_gate = nn.Linear(H, self.per_layer, bias=False)
            self.per_layer_projection = nn.Linear(self.per_layer, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps)

    stacked = None  # [2 * I + E, H]: the dense MLP's gate/up and the router's rows, one storage (fuse())

    def fuse(self) -> None:
        """Inference layout: q/k/v one matrix; the dense MLP's gate/up one matrix, and in an MoE layer
        the router's rows right after it (the loader places them so: plan.FUSED), so that a decoded
        token's two projections of the same residual, norm(r) * w_mlp and norm(r) * w_router * c, are
        one two-row GEMM (`_mlp_and_router`): one launch a layer fewer, the same bytes."""
        self.self_attn.fuse()
        mlp = self.mlp
        if not self.moe or self.router.proj.weight.dtype != mlp.gate_proj.weight.dtype:  # one matrix, one dtype
            self.stacked = None
            mlp.fuse()
            return
        self.stacked, _ = fuse_linears(mlp.gate_proj, mlp.up_proj, self.router.proj)
        mlp.gate_up = (self.stacked[: mlp.gate_proj.out_features + mlp.up_proj.out_features], None)

    def _mlp_and_router(self, mlp_router) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the dense MLP's gate/up, the router's logits) of one decoded token as one GEMM over its two
        inputs, the rows of `mlp_router` [2, B, T, H] (as the glue op writes them); (None, None) where
        they are not one tensor or are many tokens (a prompt's rows would double the GEMM's work:
        there each projection runs on its own)."""
        if not self._one_gemm(mlp_router):
            return None, None
        y = linear(mlp_router.reshape(2, -1), self.stacked)
        split = self.mlp.gate_up[0].shape[0]
        return y[:1, :split].reshape(*mlp_router.shape[1:-1], split), y[1:, split:]

    def _one_gemm(self, mlp_router) -> bool:
        """Whether the dense MLP's gate / up and the router project one decoded token's rows `mlp_router`
        as one GEMM (`_mlp_and_router`)."""
        return (self.stacked is not None and mlp_router is not None and mlp_router[0].numel() == mlp_router.shape[-1]
                and DECODE_KERNELS["mlp_router_gemm"])

    def _route_and_mlp(self, r_TH, x_mlp, mlp_router, route) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, weights, the dense MLP's output) from the fused glue's norms (`route`: self.route or
        the router itself). A decoded token's two projections are one GEMM (`_mlp_and_router`), and on
        CUDA that GEMM's two small consumers, act(gate) * up and the top-k, one launch (gated_route); with
        `gated_gemv` the projections and their consumers one launch (gated_gemv_route)."""
        if DECODE_KERNELS["gated_gemv"] and self._one_gemm(mlp_router) and fused_on_cuda(mlp_router):
            activated, *routed = fused_ops.gated_gemv_route_op(
                mlp_router.reshape(2, -1), self.stacked, self.mlp.gate_up[0].shape[0] // 2,
                self.router.per_expert_scale, self.router.top_k, self.mlp.act_name)
            ids_TK, w_TK = route(r_TH, normed=True, routed=tuple(routed))
            return ids_TK, w_TK, self.mlp(x_mlp, activated=activated.reshape(*x_mlp.shape[:-1], -1))
        gate_up, logits = self._mlp_and_router(mlp_router)
        if gate_up is not None and fused_on_cuda(gate_up):
            activated, *routed = fused_ops.gated_route_op(gate_up, logits, self.router.per_expert_scale,
                                                          self.router.top_k, self.mlp.act_name)
            ids_TK, w_TK = route(r_TH, normed=True, routed=tuple(routed))
            return ids_TK, w_TK, self.mlp(x_mlp, activated=activated)
        ids_TK, w_TK = route(r_TH, normed=True, logits=logits)
        return ids_TK, w_TK, self.mlp(x_mlp, gate_up)

    def set_experts(self, backend) -> None:
        """Swap the expert backend (a module or any callable (x_TH, ids_TK, w_TK) -> y_TH)."""
        self._modules.pop("experts", None)
        self.experts = backend
        self.decode_c = None  # forward_decode's C call reads the experts: built again for these

    def route(self, r_TH, normed: bool = False, logits: torch.Tensor | None = None, routed: tuple | None = None):
        """The router's (ids, weights); offloaded experts start their ids + weights for the host."""
        ids_TK, w_TK = self.router(r_TH, normed=normed, logits=logits, routed=routed)
        prefetch = getattr(self.experts, "prefetch", None)
        if prefetch is not None:
            prefetch(ids_TK, w_TK)
        return ids_TK, w_TK

    def forward(self, x_BTH, cos_TD, sin_TD, pos_T, cache, shared, per_layer_BTP=None):
        if "position" in shared and cache is not None and self.decode_c is not False:
            out = self.forward_decode(x_BTH, cos_TD, sin_TD, cache, shared["position"])
            if out is not None:
                return out
        side = shared.get("side_stream")
        ahead = side is not None and self.moe and l2_prefetch(x_BTH)
        if ahead and (first := self._prefetch_targets(shared, "front")):
            prefetch_beside(side, *first)
        front = self.front(x_BTH, cos_TD, sin_TD, pos_T, cache, shared, beside=side)
        if ahead and (behind := self._prefetch_targets(shared, "experts")):
            prefetch_beside(side, *behind)
        out = self.back(front, self.experts(*front.experts_in) if front.experts_in else None, per_layer_BTP)
        if ahead:
            join_stream(side)
        return out

    def _prefetch_targets(self, shared: dict, when: str) -> list[torch.Tensor]:
        """The weights `l2_prefetch` asks for before this layer's attention ("front": its o_proj, its dense
        MLP's) or before its experts ("experts": the next layer's q/k/v), as L2_PREFETCH names them."""
        if when == "front":
            out = [self.self_attn.o_proj.weight] if "o_proj" in L2_PREFETCH else []
            if "mlp" in L2_PREFETCH:
                out += [self.stacked if self.stacked is not None else self.mlp.gate_up[0], self.mlp.down_proj.weight]
            return out
        layers = shared.get("layers")
        if "next_qkv" not in L2_PREFETCH or layers is None or self.index + 1 >= len(layers):
            return []
        qkv = layers[self.index + 1].self_attn.qkv
        return [qkv[0]] if qkv is not None else []

    def front(self, x_BTH, cos_TD, sin_TD, pos_T, cache, shared, prefetch: bool = True,
              fused: bool | None = None, beside=None) -> "Front":
        """The layer up to its routed experts: attention, the residual and its norms, the router and
        the dense MLP. forward() = back(front, the experts' output); a decode step that captures the
        rest as CUDA graphs (step.SegmentedGraphStep) runs the experts between front and back.
        prefetch=False: the router's ids do not start for the host here (a graph replay would not
        start them again; the expert store does it itself). fused: the glue as kernels/fused.py's
        three ops (default: where `use_kernel("fused_glue")` says so). beside: a CUDA stream the dense
        MLP may run on (`parallel_mlp`), for a caller whose back() follows in the same capture."""
        if fused is None:
            fused = self.moe and not self.per_layer and use_kernel("fused_glue", x_BTH)
        route = self.route if prefetch or not self.moe else self.router  # a dense layer (E2B) has no router
        handed = shared.get("normed_input")  # (x, its input norm) from the layer before (back(), CUDA)
        x_in = handed[1] if handed is not None and handed[0] is x_BTH else self.input_layernorm(x_BTH)
        attn = self.self_attn(x_in, cos_TD, sin_TD, pos_T, cache, shared)
        H = x_BTH.shape[-1]
        parallel = beside is not None and parallel_mlp(x_BTH)
        if fused and parallel and DECODE_KERNELS["norms_route"] and fused_on_cuda(x_BTH):
            return self._front_in_one_launch(attn, x_BTH, route, shared, beside)
        if fused:  # the same formulas, each in fp32 and rounded once, in three kernels instead of ~20 ops
            x, x_mlp, x_moe, x_router, mlp_router = fused_ops.attention_residual_norms(
                attn, self.post_attention_layernorm.weight, x_BTH, self.pre_feedforward_layernorm.weight,
                self.pre_feedforward_layernorm_2.weight, self.router.scale, self.router.root_size,
                self.input_layernorm.eps)
            if parallel:
                h, side = mlp_beside(self.mlp, x_mlp, beside)
                ids_TK, w_TK = route(x_router.reshape(-1, H), normed=True)
                return Front(x, h, (x_moe.reshape(-1, H), ids_TK, w_TK), True, shared, side)
            ids_TK, w_TK, h = self._route_and_mlp(x_router.reshape(-1, H), x_mlp, mlp_router, route)
            return Front(x, h, (x_moe.reshape(-1, H), ids_TK, w_TK), True, shared)
        x = self.post_attention_layernorm(attn) + x_BTH
        experts_in = None
        if self.moe:
            r_TH = x.reshape(-1, H)
            ids_TK, w_TK = route(r_TH)  # the router reads the un-normed residual
            experts_in = (self.pre_feedforward_layernorm_2(r_TH), ids_TK, w_TK)
        return Front(x, self.mlp(self.pre_feedforward_layernorm(x)), experts_in, False)

    def _front_in_one_launch(self, attn, x_BTH, route, shared: dict, beside) -> "Front":
        """front()'s fused glue after attention with the router in the norms' launch (`norms_route`),
        the dense MLP beside it on `beside`. The router's hooks still see its (ids, weights)."""
        H = x_BTH.shape[-1]
        rows, ids_TK, w_TK = fused_ops.norms_route_op(
            attn, self.post_attention_layernorm.weight, x_BTH, self.pre_feedforward_layernorm.weight,
            self.pre_feedforward_layernorm_2.weight, self.router.scale, self.router.root_size, self.input_layernorm.eps,
            self.router.proj.weight, self.router.per_expert_scale, self.router.top_k)
        h, side = mlp_beside(self.mlp, rows[1], beside)
        ids_TK, w_TK = route(rows[2].reshape(-1, H), normed=True, routed=(ids_TK, w_TK))
        return Front(rows[0], h, (rows[2].reshape(-1, H), ids_TK, w_TK), True, shared, side)

    def back(self, front: "Front", moe_TH: torch.Tensor | None, per_layer_BTP=None) -> torch.Tensor:
        """The layer after its routed experts (their output moe_TH; None without experts): the FFN
        norms, the residual, the per-layer input (E2B/E4B) and the layer scalar."""
        r, h = front.residual, front.h
        join_beside(front)
        if front.fused:
            glue = (h, self.post_feedforward_layernorm_1.weight, moe_TH.reshape(r.shape),
                    self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight, r,
                    self.layer_scalar)
            nxt = self.next_input_norm
            if nxt is not None and front.shared is not None and fused_on_cuda(r):  # the next input norm too
                x, normed = fused_ops.ffn_residual_norm_op(*glue, nxt.weight, self.input_layernorm.eps)
                front.shared["normed_input"] = (x, normed)
                return x
            return fused_ops.ffn_residual(*glue, self.input_layernorm.eps)
        if moe_TH is not None:
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(moe_TH.reshape(r.shape))
        x = self.post_feedforward_layernorm(h) + r
        if self.per_layer:
            g = self.act(project(self.per_layer_input_gate, x)) * per_layer_BTP
            x = x + self.post_per_layer_input_norm(project(self.per_layer_projection, g))
        return x * self.layer_scalar

    decode_c = None  # kernels.DecodeLayer once built; False where it cannot apply to this layer
    next_input_norm = None  # the next layer's input_layernorm (Gemma4Model sets it; not a submodule)

    def _decode_kernel(self):
        """This layer's kernels.DecodeLayer, built on first use (None: the layer cannot use it)."""
        if self.decode_c is None:
            attn, mlp, router = self.self_attn, self.mlp, self.router if self.moe else None
            # the modules whose hooks the C call would bypass (forward_decode checks them every token)
            experts = self.experts if self.moe else None
            self._watched = tuple(m for m in (attn, mlp, router, experts) if isinstance(m, nn.Module))
            self._fused_at_build = (attn.qkv, mlp.gate_up)  # fuse() again makes new weights: build again
            ok = (self.moe and not self.per_layer and not attn.shares_kv and attn.qkv is not None
                  and mlp.gate_up is not None and attn.qkv[0].shape[1] == attn.q_proj.in_features)
            self.decode_c = ok and kernels.DecodeLayer.build(
                heads=attn.q_proj.out_features // attn.head_dim, kv_heads=attn.kv_heads, head_dim=attn.head_dim,
                eps=attn.eps, router_root=router.root_size, top_k=router.top_k, act=mlp.act_name,
                vectors=dict(w_in=self.input_layernorm.weight, w_qn=attn.q_norm.weight, w_kn=attn.k_norm.weight,
                             w_post=self.post_attention_layernorm.weight, w_mlp=self.pre_feedforward_layernorm.weight,
                             w_moe=self.pre_feedforward_layernorm_2.weight, w_router_scale=router.scale,
                             expert_scale=router.per_expert_scale),
                qkv=attn.qkv[0], qkv_bias=attn.qkv[1], o=attn.o_proj.weight, o_bias=attn.o_proj.bias,
                gate_up=mlp.gate_up[0], down=mlp.down_proj.weight, router=router.proj.weight) or False
            c_experts = getattr(experts, "c_experts", None)
            if self.decode_c and c_experts is not None and getattr(experts, "act_name", None) == mlp.act_name:
                desc = c_experts()
                if desc is not None:
                    self.decode_c.with_experts(desc, self.post_feedforward_layernorm_1.weight,
                                               self.post_feedforward_layernorm_2.weight,
                                               self.post_feedforward_layernorm.weight, float(self.layer_scalar))
        return self.decode_c or None

    def forward_decode(self, x_BTH, cos_TD, sin_TD, cache, position: int):
        """forward_fused of one token on the CPU in fp32 with the layer's front as one C call
        (kernels.DecodeLayer), its results bit for bit; None where that does not apply (then the
        caller runs forward). Module hooks on the attention, MLP, router or experts (profile.py's)
        would not see the C call, so they keep the module path."""
        kernel = self.decode_c
        if kernel is not None and (self._fused_at_build[0] is not self.self_attn.qkv
                                   or self._fused_at_build[1] is not self.mlp.gate_up):
            kernel = self.decode_c = None
        if kernel is None:
            kernel = self._decode_kernel()
        if (not kernel or x_BTH.shape[:2] != (1, 1) or x_BTH.dtype != torch.float32 or x_BTH.device.type != "cpu"
                or not (DECODE_KERNELS["decode_layer"] and DECODE_KERNELS["fused_glue"]) or torch.is_grad_enabled()
                or any(m._forward_hooks or m._forward_pre_hooks for m in self._watched)
                or type(cache) not in (FullKV, RingKV) or cache.k.dtype != torch.float32):
            return None
        slot, n_keys, window = cache.claim()
        if kernel.experts is not None:
            return kernel.full(x_BTH.contiguous(), cos_TD, sin_TD, cache.k, cache.v, cache.pos if window else None,
                               slot, n_keys, position, window)
        res, h, x_moe, ids_TK, w_TK = kernel(x_BTH.contiguous(), cos_TD, sin_TD, cache.k, cache.v,
                                             cache.pos if window else None, slot, n_keys, position, window)
        prefetch = getattr(self.experts, "prefetch", None)
        if prefetch is not None:
            prefetch(ids_TK, w_TK)
        moe = self.experts(x_moe, ids_TK, w_TK).reshape(res.shape)
        return fused_ops.ffn_residual(h, self.post_feedforward_layernorm_1.weight, moe,
                                      self.post_feedforward_layernorm_2.weight, self.post_feedforward_layernorm.weight,
                                      res, self.layer_scalar, self.input_layernorm.eps)

    def forward_fused(self, x_BTH, cos_TD, sin_TD, pos_T, cache, shared):
        """forward() of an MoE layer with its glue fused (kernels/fused.py), wherever it runs."""
        front = self.front(x_BTH, cos_TD, sin_TD, pos_T, cache, shared, fused=True)
        return self.back(front, self.experts(*front.experts_in))


class Gemma4Model(nn.Module):
    """The Gemma 4 text decoder. Attribute names follow the checkpoint's keys after the prefix."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, L, P = args.hidden_size, args.num_hidden_layers, args.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(args.vocab_size, H)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(L))
        for layer, after in zip(self.layers, self.layers[1:]):  # CUDA's ffn_residual computes it (back())
            layer.__dict__["next_input_norm"] = after.input_layernorm  # a reference, not a submodule
        self.norm = RMSNorm(H, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(H, args.vocab_size, bias=False)
        if P:
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = nn.Linear(H, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, args.rms_norm_eps)
        self.init_buffers()

    def text_ids(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """ids_BT with a multimodal checkpoint's image / video / audio placeholders read as pad_token_id
        (transformers' text-only pass): one gather from a table on the device, no host sync."""
        return self.text_id_table[ids_BT] if self.args.placeholder_token_ids else ids_BT

    def init_buffers(self, device=None) -> None:
        """(Re)compute the buffers no checkpoint holds (RoPE frequencies, the placeholder table of
        `text_ids`); the loader calls it after building on the meta device."""
        args = self.args
        for kind in set(args.layer_types):
            D = args.layer_head_dim(args.layer_types.index(kind))
            inv = rope_inv_freq(args.rope_parameters[kind], D).to(device)
            self.register_buffer(f"inv_freq_{kind}", inv, persistent=False)
        if args.placeholder_token_ids:
            table = torch.arange(args.vocab_size, device=device)
            table[list(args.placeholder_token_ids)] = args.pad_token_id
            self.register_buffer("text_id_table", table, persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: the norms' (matrices may be stored narrower, see kernels.storage_dtype)."""
        return self.norm.weight.dtype

    def fuse_projections(self) -> None:
        """Inference layout, once after loading: q/k/v and the dense MLP's gate/up each become one
        matmul. Checkpoint-named parameters keep their shapes and values (as views of the fused
        storage); bytes are unchanged. The fused weights are plain attributes, so call this on the
        final device (the loader does, after load_weights)."""
        for layer in self.layers:
            layer.fuse()

    def _per_layer_inputs(self, ids_BT, x_BTH):
        """Per-layer embeddings (E2B/E4B): token identity plus a projection of the input embedding."""
        args = self.args
        L, P = args.num_hidden_layers, args.hidden_size_per_layer_input
        dtype = self.compute_dtype
        tok = F.embedding(ids_BT, self.embed_tokens_per_layer.weight).to(dtype) * torch.tensor(P**0.5, dtype=dtype)
        proj = project(self.per_layer_model_projection, x_BTH) * args.hidden_size**-0.5
        proj = self.per_layer_projection_norm(proj.reshape(*x_BTH.shape[:2], L, P))
        return (proj + tok.reshape(*ids_BT.shape, L, P)) * 2**-0.5

    def rope(self, pos_T: torch.Tensor, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (cos, sin) [T, 1, D] at positions pos_T, sin's first half negated so that apply_rope
        needs no rotate_half. Computed per call, not tabled: a table for a 128K context would cost
        hundreds of MiB that the plan does not budget, to save a few small ops per token."""
        out = {}
        for kind in set(self.args.layer_types):
            inv_freq = getattr(self, f"inv_freq_{kind}")
            rows = fused_ops.rope_rows_op if rope_on_cuda(pos_T, dtype) else fused_ops.rope_rows
            out[kind] = rows(pos_T, inv_freq, dtype)  # the op: one Triton launch, not eight
        return out

    def hidden(self, ids_BT: torch.Tensor, cache=None, pos_T: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] of `ids_BT`, appended to `cache` (positions follow it)."""
        T = ids_BT.shape[1]
        if pos_T is None and T == 1 and cache is not None and cache.span is None:
            h = self._decode_hidden(ids_BT, cache)
            if h is not None:
                return h
        if pos_T is None:
            start = cache.offset if cache is not None else 0
            pos_T = torch.arange(start, start + T, device=ids_BT.device)
        x, run = self._start(ids_BT, cache, pos_T)
        for i, layer in enumerate(self.layers):
            x = layer(x, *run.layer_args(i))
        if cache is not None and cache.span is None:
            cache.offset += T
        return self.norm(x)

    def _start(self, ids_BT: torch.Tensor, cache, pos_T: torch.Tensor) -> tuple[torch.Tensor, "_Pass"]:
        """The embedded tokens and what each layer of this pass takes besides them (_Pass)."""
        dtype = self.compute_dtype
        ids_BT = self.text_ids(ids_BT)
        x = F.embedding(ids_BT, self.embed_tokens.weight).to(dtype) * torch.tensor(self.args.hidden_size**0.5, dtype=dtype)
        per_layer = self._per_layer_inputs(ids_BT, x) if self.args.hidden_size_per_layer_input else None
        shared: dict = {}  # per forward: KV of the last layer of each kind (KV sharing), attention masks
        if cache is not None and cache.span is not None:
            shared["span"] = cache.span
        if getattr(cache, "side_stream", None) is not None:
            shared["side_stream"] = cache.side_stream
            shared["layers"] = self.layers  # l2_prefetch: a layer asks for the next one's weights
        return x, _Pass(self.args, self.rope(pos_T, dtype), pos_T, cache, shared, per_layer)

    def decode_segments(self, ids_11: torch.Tensor, cache, pos_1: torch.Tensor) -> "DecodeSegments":
        """The static decode step (cache.span set) cut at each MoE layer's routed experts, for a step
        that captures the rest as CUDA graphs (step.SegmentedGraphStep)."""
        return DecodeSegments(self, ids_11, cache, pos_1)

    def _decode_hidden(self, ids_11: torch.Tensor, cache) -> torch.Tensor | None:
        """hidden() of one host-driven token on the CPU in fp32, with the embedding and RoPE rows as C
        calls and each layer's forward_decode called directly (no Module call where nothing hooks
        the layer); None where that does not apply (hidden() then runs its general path). KV sharing
        is one: a layer's C call writes its cache but leaves no keys in the pass for a sharing layer."""
        args = self.args
        if (ids_11.shape[0] != 1 or args.hidden_size_per_layer_input or args.num_kv_shared_layers
                or torch.is_grad_enabled() or self.compute_dtype != torch.float32 or ids_11.device.type != "cpu"):
            return None
        position = cache.offset
        x = kernels.embed(self.text_ids(ids_11), self.embed_tokens.weight, args.hidden_size**0.5)
        rope = {kind: kernels.rope_row(getattr(self, f"inv_freq_{kind}"), position) for kind in set(args.layer_types)}
        if x is None or any(r is None for r in rope.values()):
            return None
        x = common.decode_layers(self.layers, x, [rope[kind] for kind in args.layer_types], cache.layers, position)
        cache.offset += 1
        return self.norm(x)

    def logits(self, h_BTH: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states, soft-capped like Gemma does."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        cap = self.args.final_logit_softcapping
        logits = kernels.logits(h_BTH, w, cap)  # fp32 CPU decode: the GEMV and the cap in one C call
        if logits is not None:
            return logits
        logits = linear(h_BTH, w)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, ids_BT, cache=None, last_only: bool = False):
        h = self.hidden(ids_BT, cache)
        return self.logits(h[:, -1:] if last_only else h)


class _Pass:
    """One forward pass's per-layer arguments besides the hidden states: RoPE of the layer's kind,
    positions, the layer's cache, the pass's shared dict, its per-layer input (E2B/E4B)."""

    def __init__(self, args: ModelArgs, rope: dict, pos_T: torch.Tensor, cache, shared: dict, per_layer):
        self.args, self.rope, self.pos_T, self.cache, self.shared, self.per_layer = \
            args, rope, pos_T, cache, shared, per_layer

    def layer_args(self, i: int) -> tuple:
        """(cos, sin, pos_T, layer cache, shared, per-layer input) of layer i: DecoderLayer.forward's."""
        cos, sin = self.rope[self.args.layer_types[i]]
        return (cos, sin, self.pos_T, None if self.cache is None else self.cache.layers[i], self.shared,
                None if self.per_layer is None else self.per_layer[:, :, i])


class DecodeSegments:
    """One static decode step as segments that end where a layer's routed experts begin:

        first()        embedding ... front of the first MoE layer          -> its experts' (x_TH, ids_TK, w_TK)
        next(moe_TH)   back of that layer (given its experts' output) ... front of the next MoE layer
                       -> the next experts' call, or after the last layer the final-normed hidden [1, 1, H]

    Nothing in a segment reads a device value, so each can be captured as a CUDA graph; the experts
    (which must tell the host their ids to copy the missing ones) run between them. Routing ids are
    not sent to the host inside a segment (front(prefetch=False)): a graph replay would not send them."""

    def __init__(self, model: "Gemma4Model", ids_11: torch.Tensor, cache, pos_1: torch.Tensor):
        self.model, self.ids, self.cache, self.pos = model, ids_11, cache, pos_1
        self._pass: _Pass | None = None
        self._at: tuple[int, Front] | None = None  # the MoE layer whose experts are due, and its front

    def first(self):
        x, self._pass = self.model._start(self.ids, self.cache, self.pos)
        return self._run_from(0, x)

    def next(self, moe_TH: torch.Tensor):
        i, front = self._at
        x = self.model.layers[i].back(front, moe_TH, self._pass.layer_args(i)[-1])
        return self._run_from(i + 1, x)

    def _run_from(self, i: int, x: torch.Tensor):
        layers = self.model.layers
        while i < len(layers):
            cos, sin, pos, cache, shared, per_layer = self._pass.layer_args(i)
            front = layers[i].front(x, cos, sin, pos, cache, shared, prefetch=False)
            if front.experts_in is not None:
                self._at = (i, front)
                return front.experts_in
            x = layers[i].back(front, None, per_layer)
            i += 1
        self._at = None
        return self.model.norm(x)

    def layer_at(self) -> "DecoderLayer":
        """The layer whose experts the last segment asked for."""
        return self.model.layers[self._at[0]]


BUILTIN_CHAT_TEMPLATE = True  # templates/gemma4.jinja stands in for a checkpoint that ships no chat template
Model = Gemma4Model
EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")


sanitize = common.sanitize  # checkpoint key -> model key (the interface every family module has)


def read_experts(ckpt: Checkpoint, args: ModelArgs, layer: int, start: int = 0,
                 stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's fused expert tensors (gate_up [E, 2I, H], down [E, H, I]) as stored, or their
    experts [start, stop)."""
    names = [f"{args.weight_prefix}layers.{layer}.{k}" for k in EXPERT_KEYS]
    missing = [n for n in names if n not in ckpt]
    if missing:
        raise LocalrunError(f"checkpoint is missing {missing[0]}")
    for name, shape in zip(names, common.expert_shapes(args)):
        check_shape(ckpt, name, shape)
    if start == 0 and stop is None:
        return ckpt.read(names[0]), ckpt.read(names[1])
    stop = ckpt.tensors[names[0]].shape[0] if stop is None else stop
    return tuple(read_rows(ckpt, n, start, stop) for n in names)
