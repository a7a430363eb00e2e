"""Qwen3-MoE decoder (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B, Qwen3-235B-A22B); Mixtral runs on it too.

A pre-norm decoder: attention with q/k RMSNorm per head (Mixtral: none), scaling 1/sqrt(D),
GQA, one RoPE for every layer; then a sparse MoE block (router softmax in fp32, top-k,
renormalized when `norm_topk_prob`, SiLU experts) or, in `mlp_only_layers`, a dense MLP.

Checkpoints store the experts per expert (`mlp.experts.{e}.gate_proj.weight` ..., what
transformers >= 5 writes back out and every released checkpoint holds) or fused
(`mlp.experts.gate_up_proj` [E, 2I, H], the layout transformers 5 computes with). `read_experts`
takes either into localrun's fused layout, so quantization, plan and expert store are shared.

On the CPU in fp32 a decoded token runs each MoE layer as one C call (DecoderLayer.forward_decode,
kernels.MoEDecodeLayer), bit for bit the module path, as Gemma 4's layers do.

Shape letters: B batch, T tokens, S key positions, N heads, D head dim, H hidden,
K top-k, E experts, I expert intermediate, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, check_shape, read_rows
from ..config import (COUNT, EXPERTS, POSITIONS, SIZE, TOKEN_ID, ConfigError, check_bools, check_eos, check_even,
                      check_ints, check_kv_heads, check_required, check_rms_norm_eps, is_int, is_number)
from ..errors import LocalrunError
from .. import kernels
from ..kernels import fused as fused_ops
from ..kernels import linear
from ..kvcache import FullKV, RingKV
from ..moe import ACTIVATIONS, DenseExperts
from . import common, rope
from .gemma4 import (DECODE_KERNELS, MLP, DecodeSegments, Front, RMSNorm, apply_rope, attend, fuse_linears,
                     fused_on_cuda, norm_rope, project, qkv_attention_applies)


@dataclass
class MoEArgs:
    """Config fields with Qwen3-MoE's Hugging Face names (Mixtral's are mapped onto them)."""

    model_type: str = "qwen3_moe"
    vocab_size: int = 151_936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # the dense MLP of `mlp_only_layers`
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10_000.0})
    attention_bias: bool = False
    sliding_window: int | None = None  # every layer slides when set
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    qk_norm: bool = True  # Qwen3: RMSNorm over each q and k head before RoPE; Mixtral: none
    weight_prefix: str = "model."

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise LocalrunError(f"hidden_act {self.hidden_act!r} is not implemented "
                                f"(localrun has: {', '.join(ACTIVATIONS)})")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ("default", *rope.SCALED):
            raise LocalrunError(f"rope_type {rope_type!r} is not implemented (localrun has: default, "
                                f"{', '.join(rope.SCALED)})")
        self.rope_parameters = rope.resolved(self.rope_parameters, self.max_position_embeddings)
        self.max_position_embeddings = rope.positions(self.rope_parameters, self.max_position_embeddings)
        self.mlp_only_layers = list(self.mlp_only_layers or [])

    # What the shared code reads (see localrun.config) ----------------------------------------

    hidden_size_per_layer_input = 0

    @property
    def top_k_experts(self) -> int:
        return self.num_experts_per_tok

    @property
    def hidden_activation(self) -> str:
        return self.hidden_act

    @property
    def enable_moe_block(self) -> bool:
        return any(self.has_experts(i) for i in range(self.num_hidden_layers))

    def has_experts(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads

    def kv_source_layer(self, layer: int) -> int:
        return layer

    def mlp_intermediate(self, layer: int) -> int:
        """The dense MLP's width (0 in a layer whose feed-forward is the experts)."""
        return 0 if self.has_experts(layer) else self.intermediate_size

    @property
    def eos_ids(self) -> list[int]:
        ids = self.eos_token_id
        return list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]


def rope_parameters(config: dict, default_theta: float) -> dict:
    """`rope_parameters` (transformers 5), the older top-level `rope_theta` / `rope_scaling`, or both: a
    `rope_scaling` added beside `rope_parameters` (Qwen's card says to add it to config.json, which
    transformers 5 writes with rope_parameters) scales them, keeping their rope_theta."""
    params, scaling = (_spelled(config.get(name) or {}) for name in ("rope_parameters", "rope_scaling"))
    if scaling.get("rope_type", "default") != "default" or not params:
        params.update(scaling)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", config.get("rope_theta", default_theta))
    return params


def _spelled(params: dict) -> dict:
    """RoPE parameters with the older `type` spelled `rope_type`."""
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    return params


def make_args(config: dict, **fixed) -> MoEArgs:
    """MoEArgs from the fields of `config` it knows (others do not change the text model), then `fixed`."""
    names = {f.name for f in fields(MoEArgs)} - {"weight_prefix", "qk_norm"}
    return MoEArgs(**{**{k: v for k, v in config.items() if k in names}, **fixed})


def args_from_dict(config: dict) -> MoEArgs:
    experts = experts_field(config)
    check_config(config, QWEN_INTS | {experts: (*EXPERTS, False)}, QWEN_BOOLS,
                 REQUIRED + (experts, "moe_intermediate_size"), experts)
    check_mlp_only_layers(config.get("mlp_only_layers"), config["num_hidden_layers"])
    config = dict(config)
    config["num_experts"] = config[experts]
    if not config.get("use_sliding_window", False):
        config["sliding_window"] = None  # Qwen3-MoE slides only when use_sliding_window says so
    return make_args(config, rope_parameters=rope_parameters(config, 10_000.0))


def experts_field(config: dict) -> str:
    """The field counting a Qwen3-MoE config's experts: num_experts, or num_local_experts (transformers 5.24's)."""
    return "num_local_experts" if "num_experts" not in config and "num_local_experts" in config else "num_experts"


# Config validation: every field the family reads, before it becomes MoEArgs (bounds as in localrun.config) ----

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_experts_per_tok")  # the shape: a default would plan and build some other model
INTS = {  # what both families read, {name: (min, max, may be null)}; each adds how it counts its experts
    **{name: (*SIZE, False) for name in ("vocab_size", "hidden_size", "intermediate_size")},
    "head_dim": (*SIZE, True),  # null: hidden_size // num_attention_heads
    "sliding_window": (*SIZE, True),
    "num_hidden_layers": (*COUNT, False),
    "num_attention_heads": (*COUNT, False),
    "num_key_value_heads": (*COUNT, True),  # null: num_attention_heads
    "num_experts_per_tok": (*EXPERTS, False),
    "max_position_embeddings": (*POSITIONS, False),
    "bos_token_id": (*TOKEN_ID, True),
    "pad_token_id": (*TOKEN_ID, True),
}
BOOLS = ("tie_word_embeddings",)
QWEN_INTS = INTS | {"moe_intermediate_size": (*SIZE, False), "decoder_sparse_step": (*COUNT, False)}
QWEN_BOOLS = BOOLS + ("attention_bias", "norm_topk_prob", "use_sliding_window")


def check_config(config: dict, ints: dict, bools: tuple[str, ...], required: tuple[str, ...], experts: str) -> None:
    """Raise ConfigError naming the first field of a Qwen3-MoE or Mixtral config that is missing, of the
    wrong type, out of range or inconsistent; `experts` is the field counting the experts."""
    check_required(config, required)
    check_ints(config, ints)
    check_bools(config, bools)
    check_rms_norm_eps(config)
    if config.get("eos_token_id") is not None:
        check_eos(config["eos_token_id"], "eos_token_id")
    check_rope(config)
    check_heads(config)
    top_k, count = config["num_experts_per_tok"], config[experts]
    if top_k > count:
        raise ConfigError(f"num_experts_per_tok ({top_k}) must not exceed {experts} ({count})")


def check_heads(config: dict) -> None:
    """KV heads dividing the query heads; the head dim, given or hidden_size // num_attention_heads, even."""
    heads = config["num_attention_heads"]
    check_kv_heads(config, "num_key_value_heads", heads)
    check_even(config, "head_dim")
    derived = config["hidden_size"] // heads
    if config.get("head_dim") is None and (derived == 0 or derived % 2):
        raise ConfigError(f"head_dim is not given and hidden_size // num_attention_heads ({derived}) "
                          "is not an even positive number")


def check_rope(config: dict) -> None:
    """rope_parameters and rope_scaling null or objects, every rope_theta given a positive number
    (which rope_type localrun implements, MoEArgs says)."""
    thetas = {"rope_theta": config["rope_theta"]} if "rope_theta" in config else {}
    for name in ("rope_parameters", "rope_scaling"):
        params = config.get(name)
        if params is not None and not isinstance(params, dict):
            raise ConfigError(f"{name} must be an object or null, not {params!r}")
        if params and "rope_theta" in params:
            thetas[f"{name}.rope_theta"] = params["rope_theta"]
    for name, theta in thetas.items():
        if not (is_number(theta) and theta > 0):
            raise ConfigError(f"{name} must be a positive number, not {theta!r}")
    for name in ("rope_parameters", "rope_scaling"):
        params = config.get(name) or {}
        rope.check_scaling(_spelled(params), name)


def check_mlp_only_layers(layers, count: int) -> None:
    if layers is not None and not (isinstance(layers, list) and all(is_int(i) and 0 <= i < count for i in layers)):
        raise ConfigError(f"mlp_only_layers must be a list of layer indexes in 0..{count - 1}, not {layers!r}")


BUILTIN_CHAT_TEMPLATE = False  # the checkpoint's own template only (tokenizer_config.json or chat_template.jinja)


# Checkpoint layout -------------------------------------------------------------------------------

FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
PER_EXPERT = ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight")


def checkpoint_shapes(args: MoEArgs) -> dict[str, tuple[int, ...]]:
    """Every text tensor by model key (after the weight prefix), experts fused (see read_experts)."""
    H, V, N, KV, D = args.hidden_size, args.vocab_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, H), "norm.weight": (H,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(args.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        for name, rows in (("q_proj", N * D), ("k_proj", KV * D), ("v_proj", KV * D), ("o_proj", H)):
            shapes[p + f"self_attn.{name}.weight"] = (rows, H) if name != "o_proj" else (H, N * D)
            if args.attention_bias:
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
        if args.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (D,)
            shapes[p + "self_attn.k_norm.weight"] = (D,)
        if args.has_experts(i):
            E, I = args.num_experts, args.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (E, H)
            shapes[p + FUSED[0]] = (E, 2 * I, H)
            shapes[p + FUSED[1]] = (E, H, I)
        else:
            M = args.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (M, H)
            shapes[p + "mlp.up_proj.weight"] = (M, H)
            shapes[p + "mlp.down_proj.weight"] = (H, M)
    return shapes


def tensor_group(name: str) -> str:
    """The component a tensor belongs to, for fit's breakdown: embed, attention, mlp, router, norms, experts."""
    if ".experts." in name:
        return "experts"
    if ".mlp.gate." in name:
        return "router"
    if ".self_attn." in name and not name.endswith("norm.weight"):
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.startswith(("embed_tokens.", "lm_head.")):
        return "embed"
    return "norms"


sanitize = common.sanitize  # checkpoint key -> model key (the interface every family module has)


def read_experts(ckpt: Checkpoint, args: MoEArgs, layer: int, fused=(FUSED,), per_expert=(PER_EXPERT,),
                 start: int = 0, stop: int | None = None):
    """One layer's experts [start, stop) (default all) as (gate_up [n, 2I, H], down [n, H, I]), from
    whichever spelling the checkpoint holds: fused tensors (only those rows read), or per-expert
    (gate, up, down) matrices stacked here (only those experts read)."""
    p = f"{args.weight_prefix}layers.{layer}."
    E, I, H = args.num_experts, args.moe_intermediate_size, args.hidden_size
    stop = E if stop is None else stop
    for gate_up, down in fused:
        if p + gate_up in ckpt and p + down in ckpt:
            for name, shape in zip((p + gate_up, p + down), common.expert_shapes(args)):
                check_shape(ckpt, name, shape)
            return read_rows(ckpt, p + gate_up, start, stop), read_rows(ckpt, p + down, start, stop)
    for spelling in per_expert:
        names = [[p + t.format(e=e) for t in spelling] for e in range(E)]
        if names[0][0] not in ckpt:
            continue
        missing = [n for row in names for n in row if n not in ckpt]
        if missing:
            raise LocalrunError(f"checkpoint is missing {missing[0]}")
        for row in names[start:stop]:
            for name, shape in zip(row, ((I, H), (I, H), (H, I))):  # gate, up, down
                check_shape(ckpt, name, shape)
        dtype = ckpt.tensors[names[0][0]].dtype
        gate_up_E2IH = torch.empty(stop - start, 2 * I, H, dtype=dtype)
        down_EHI = torch.empty(stop - start, H, I, dtype=dtype)
        for e, (gate, up, down) in enumerate(names[start:stop]):
            gate_up_E2IH[e, :I] = ckpt.read(gate)
            gate_up_E2IH[e, I:] = ckpt.read(up)
            down_EHI[e] = ckpt.read(down)
        return gate_up_E2IH, down_EHI
    raise LocalrunError(f"checkpoint has no experts for layer {layer} "
                        f"(neither {p}{fused[0][0]} nor {p}{per_expert[0][0].format(e=0)})")


# The decoder -------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, args: MoEArgs, layer: int):
        super().__init__()
        H, N, bias = args.hidden_size, args.num_attention_heads, args.attention_bias
        self.head_dim = D = args.layer_head_dim(layer)
        KV = args.layer_kv_heads(layer)
        self.window = args.sliding_window
        self.scale = D**-0.5 * rope.attention_factor(args.rope_parameters) ** 2  # YaRN's m on q and on k
        self.q_proj = nn.Linear(H, N * D, bias=bias)
        self.k_proj = nn.Linear(H, KV * D, bias=bias)
        self.v_proj = nn.Linear(H, KV * D, bias=bias)
        self.o_proj = nn.Linear(N * D, H, bias=bias)
        self.q_norm = RMSNorm(D, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(D, args.rms_norm_eps) if args.qk_norm else None
        self.qkv = None  # (weight, bias) of q/k/v fused into one matmul, set by fuse()

    def fuse(self) -> None:
        self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        self.qkv_sizes = [p.out_features for p in (self.q_proj, self.k_proj, self.v_proj)]

    def forward(self, x_BTH, cos_TD, sin_TD, pos_T, cache, shared: dict):
        B, T, _ = x_BTH.shape
        if self.qkv is None:
            q, k, v = (project(p, x_BTH) for p in (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = linear(x_BTH, *self.qkv).split(self.qkv_sizes, dim=-1)
        q, k, v = (x.view(B, T, -1, self.head_dim) for x in (q, k, v))
        pos_S, visible, span = pos_T, None, shared.get("span")  # span: the static decode step's (localrun/step.py)
        if cache is not None and span is not None and self.k_norm is not None and fused_on_cuda(k):
            # q's and k's norms and RoPE and the write of k and v (as it is: no v norm here) in one kernel,
            # and where the decode attention kernel runs, the attention in that launch too
            if qkv_attention_applies(q):
                out, _, _, _ = cache.write_attend(q, self.q_norm.weight, k, v, self.k_norm.weight, cos_TD, sin_TD,
                                                  self.k_norm.eps, pos_T, span, shared.setdefault("static", {}),
                                                  scale=self.scale, norm_v=False)
                return project(self.o_proj, out.transpose(1, 2).reshape(B, T, -1))
            q, k, v, visible = cache.write_raw(q, self.q_norm.weight, k, v, self.k_norm.weight, cos_TD, sin_TD,
                                               self.k_norm.eps, pos_T, span, shared.setdefault("static", {}),
                                               norm_v=False)
        else:
            if self.q_norm is not None:
                q, k = norm_rope(q, self.q_norm, cos_TD, sin_TD), norm_rope(k, self.k_norm, cos_TD, sin_TD)
            else:
                q, k = apply_rope(q, cos_TD, sin_TD), apply_rope(k, cos_TD, sin_TD)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None and span is not None:
                k, v, visible = cache.write(k, v, pos_T, span, shared.setdefault("static", {}))
            elif cache is not None:
                k, v, pos_S = cache.update(k, v, pos_T)
        out = attend(q.transpose(1, 2), k, v, pos_T, pos_S, self.window, shared.setdefault("masks", {}), visible,
                     scale=self.scale)
        return project(self.o_proj, out.transpose(1, 2).reshape(B, T, -1))


class Router(nn.Module):
    """x -> (ids_TK, w_TK): softmax over the experts in fp32, top-k, renormalized when `norm_topk_prob`."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.top_k, self.norm = args.num_experts_per_tok, args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))

    def forward(self, x_TH):
        logits_TE = linear(x_TH, self.weight)
        if x_TH.shape[0] == 1 and not torch.is_grad_enabled():
            # a decoded fp32 CPU token: the C call DecoderLayer.forward_decode makes too (prefill: torch's ops)
            routed = kernels.route_top_k(logits_TE, self.top_k, self.norm)
            if routed is not None:
                return routed
        p_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        w_TK, ids_TK = torch.topk(p_TE, self.top_k, dim=-1)
        if self.norm:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        return ids_TK, w_TK


class SparseMoeBlock(nn.Module):
    def __init__(self, args: MoEArgs):
        super().__init__()
        E, H, I = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.gate = Router(args)
        # Any callable (x_TH, ids_TK, w_TK) -> y_TH: the loader swaps in 4-bit or offloaded experts.
        self.experts = DenseExperts(torch.empty(E, 2 * I, H), torch.empty(E, H, I), args.hidden_act)

    def forward(self, x_BTH):
        x_TH = x_BTH.reshape(-1, x_BTH.shape[-1])
        ids_TK, w_TK = self.gate(x_TH)
        return self.experts(x_TH, ids_TK, w_TK).reshape(x_BTH.shape)


class DecoderLayer(nn.Module):
    def __init__(self, args: MoEArgs, layer: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.moe = args.has_experts(layer)
        self.mlp = SparseMoeBlock(args) if self.moe else MLP(H, args.intermediate_size, args.hidden_act)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.act_name = args.hidden_act

    @property
    def router(self) -> Router:
        return self.mlp.gate

    @property
    def experts(self):
        return self.mlp.experts

    def set_experts(self, backend) -> None:
        """Swap the expert backend (a module or any callable (x_TH, ids_TK, w_TK) -> y_TH)."""
        self.mlp._modules.pop("experts", None)
        self.mlp.experts = backend
        self.decode_c = None  # forward_decode's C call reads the experts: built again for these

    def forward(self, x_BTH, cos_TD, sin_TD, pos_T, cache, shared):
        if "position" in shared and cache is not None and self.decode_c is not False:
            out = self.forward_decode(x_BTH, cos_TD, sin_TD, cache, shared["position"])
            if out is not None:
                return out
        x = x_BTH + self.self_attn(self.input_layernorm(x_BTH), cos_TD, sin_TD, pos_T, cache, shared)
        return x + self.mlp(self.post_attention_layernorm(x))

    def front(self, x_BTH, cos_TD, sin_TD, pos_T, cache, shared, prefetch: bool = True) -> Front:
        """forward() up to the routed experts (attention, the residual, the norm, the router), for a
        decode step that captures the rest as CUDA graphs (step.SegmentedGraphStep, as Gemma 4's);
        forward() = back(front, the experts' output), op for op. prefetch: no routing starts here."""
        x = x_BTH + self.self_attn(self.input_layernorm(x_BTH), cos_TD, sin_TD, pos_T, cache, shared)
        if not self.moe:
            return Front(x, self.mlp(self.post_attention_layernorm(x)), None, False)
        x_TH = self.post_attention_layernorm(x).reshape(-1, x.shape[-1])
        return Front(x, None, (x_TH, *self.mlp.gate(x_TH)), False)

    def back(self, front: Front, moe_TH: torch.Tensor | None, per_layer_BTP=None) -> torch.Tensor:
        """The layer after its routed experts: the residual plus their output (or the dense MLP's)."""
        return front.residual + (front.h if moe_TH is None else moe_TH.reshape(front.residual.shape))

    decode_c = None  # kernels.MoEDecodeLayer once built; False where it cannot apply to this layer

    def _decode_kernel(self):
        """This layer's kernels.MoEDecodeLayer, built on first use (None: the layer cannot use it)."""
        if self.decode_c is None:
            attn = self.self_attn
            router, experts = (self.mlp.gate, self.mlp.experts) if self.moe else (None, None)
            # the modules whose hooks the C call would bypass (forward_decode checks them every token)
            self._watched = tuple(m for m in (attn, self.mlp, router, experts) if isinstance(m, nn.Module))
            self._fused_at_build = attn.qkv  # fuse() again makes new weights: build again
            ok = self.moe and attn.qkv is not None and attn.qkv[0].shape[1] == attn.q_proj.in_features
            self.decode_c = ok and kernels.MoEDecodeLayer.build(
                heads=attn.q_proj.out_features // attn.head_dim, kv_heads=attn.k_proj.out_features // attn.head_dim,
                head_dim=attn.head_dim, eps=self.input_layernorm.eps, scale=attn.scale, top_k=router.top_k,
                norm_topk=router.norm, act=self.act_name,
                vectors=dict(w_in=self.input_layernorm.weight, w_post=self.post_attention_layernorm.weight,
                             w_qn=None if attn.q_norm is None else attn.q_norm.weight,
                             w_kn=None if attn.k_norm is None else attn.k_norm.weight),
                qkv=attn.qkv[0], qkv_bias=attn.qkv[1], o=attn.o_proj.weight, o_bias=attn.o_proj.bias,
                router=router.weight) or False
            c_experts = getattr(experts, "c_experts", None)
            if self.decode_c and c_experts is not None and getattr(experts, "act_name", None) == self.act_name:
                desc = c_experts()
                if desc is not None:
                    self.decode_c.with_experts(desc)
        return self.decode_c or None

    def forward_decode(self, x_BTH, cos_TD, sin_TD, cache, position: int):
        """forward() of one token on the CPU in fp32 as one C call (kernels.MoEDecodeLayer; the routed
        experts inside it where the C kernels read them, else called here), its results bit for bit;
        None where that does not apply (then the caller runs forward). Module hooks on the attention,
        the MoE block, the router or the experts (profile.py's) would not see the C call, so they keep
        the module path."""
        kernel = self.decode_c
        if kernel is not None and self._fused_at_build is not self.self_attn.qkv:
            kernel = self.decode_c = None
        if kernel is None:
            kernel = self._decode_kernel()
        if (not kernel or x_BTH.shape[:2] != (1, 1) or x_BTH.dtype != torch.float32 or x_BTH.device.type != "cpu"
                or not DECODE_KERNELS["decode_layer"] or torch.is_grad_enabled()
                or any(m._forward_hooks or m._forward_pre_hooks for m in self._watched)
                or type(cache) not in (FullKV, RingKV) or cache.k.dtype != torch.float32):
            return None
        slot, n_keys, window = cache.claim()
        kpos = cache.pos if window else None
        if kernel.experts is not None:
            return kernel.full(x_BTH.contiguous(), cos_TD, sin_TD, cache.k, cache.v, kpos, slot, n_keys, position,
                               window)
        res, x_moe, ids_TK, w_TK = kernel(x_BTH.contiguous(), cos_TD, sin_TD, cache.k, cache.v, kpos, slot, n_keys,
                                          position, window)
        return res + self.mlp.experts(x_moe, ids_TK, w_TK).reshape(res.shape)


class Model(nn.Module):
    """The decoder. Attribute names follow the checkpoint's keys after the prefix."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.args = args
        H = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, H)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(H, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(H, args.vocab_size, bias=False)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """(Re)compute the RoPE frequencies; the loader calls it after building on the meta device."""
        inv = rope.inv_freq(self.args.rope_parameters, self.args.head_dim).to(device)
        self.register_buffer("inv_freq", inv, persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def fuse_projections(self) -> None:
        """q/k/v (and a dense MLP's gate/up) each become one matmul; see Gemma4Model.fuse_projections."""
        for layer in self.layers:
            layer.self_attn.fuse()
            if not layer.moe:
                layer.mlp.fuse()

    def rope(self, pos_T: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, D], sin's first half negated (see gemma4.apply_rope)."""
        return fused_ops.rope_rows(pos_T, self.inv_freq, dtype)  # one fp32 CPU position: the C row, as decode's

    def hidden(self, ids_BT: torch.Tensor, cache=None, pos_T: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] of `ids_BT`, appended to `cache` (positions follow it)."""
        T = ids_BT.shape[1]
        dtype = self.compute_dtype
        if pos_T is None and T == 1 and cache is not None and cache.span is None:
            h = self._decode_hidden(ids_BT, cache)
            if h is not None:
                return h
        if pos_T is None:
            start = cache.offset if cache is not None else 0
            pos_T = torch.arange(start, start + T, device=ids_BT.device)
        x, run = self._start(ids_BT, cache, pos_T)
        for i, layer in enumerate(self.layers):
            x = layer(x, *run.layer_args(i)[:-1])
        if cache is not None and cache.span is None:
            cache.offset += T
        return self.norm(x)

    def _start(self, ids_BT: torch.Tensor, cache, pos_T: torch.Tensor) -> tuple[torch.Tensor, "_Pass"]:
        """The embedded tokens and what each layer of this pass takes besides them."""
        dtype = self.compute_dtype
        shared: dict = {}  # per forward: attention masks (every layer sees the same positions), the static span
        if cache is not None and cache.span is not None:
            shared["span"] = cache.span
        x = F.embedding(ids_BT, self.embed_tokens.weight).to(dtype)
        return x, _Pass(*self.rope(pos_T, dtype), pos_T, cache, shared)

    def decode_segments(self, ids_11: torch.Tensor, cache, pos_1: torch.Tensor) -> DecodeSegments:
        """The static decode step (cache.span set) cut at each MoE layer's routed experts, for a step
        that captures the rest as CUDA graphs (step.SegmentedGraphStep)."""
        return DecodeSegments(self, ids_11, cache, pos_1)

    def _decode_hidden(self, ids_11: torch.Tensor, cache) -> torch.Tensor | None:
        """hidden() of one host-driven token on the CPU in fp32, with the embedding and RoPE rows as C
        calls and each layer's forward_decode called directly (no Module call where nothing hooks the
        layer); None where that does not apply (hidden() then runs its general path)."""
        if ids_11.shape[0] != 1 or torch.is_grad_enabled() or self.compute_dtype != torch.float32 \
                or ids_11.device.type != "cpu":
            return None
        position = cache.offset
        x = kernels.embed(ids_11, self.embed_tokens.weight, 1.0)  # bf16 widened: exact, as .to(fp32)
        rope_row = kernels.rope_row(self.inv_freq, position)
        if x is None or rope_row is None:
            return None
        x = common.decode_layers(self.layers, x, [rope_row] * len(self.layers), cache.layers, position)
        cache.offset += 1
        return self.norm(x)

    def logits(self, h_BTH: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(h_BTH, w)

    def forward(self, ids_BT, cache=None, last_only: bool = False):
        h = self.hidden(ids_BT, cache)
        return self.logits(h[:, -1:] if last_only else h)


class _Pass:
    """One forward pass's per-layer arguments besides the hidden states (gemma4._Pass's interface)."""

    def __init__(self, cos_TD, sin_TD, pos_T: torch.Tensor, cache, shared: dict):
        self.cos, self.sin, self.pos_T, self.cache, self.shared = cos_TD, sin_TD, pos_T, cache, shared

    def layer_args(self, i: int) -> tuple:
        """(cos, sin, pos_T, layer cache, shared, per-layer input: none here) of layer i."""
        return self.cos, self.sin, self.pos_T, None if self.cache is None else self.cache.layers[i], self.shared, None
