"""Gemma 4 text decoder (26B-A4B MoE, E2B/E4B dense with per-layer embeddings, 31B dense).

Shape letters: B batch, T tokens, S key positions, N heads, D head dim, H hidden,
K top-k, E experts, I intermediate, L layers, P per-layer-input dim, V vocab.
"""

from __future__ import annotations

from ..config import ModelArgs


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
