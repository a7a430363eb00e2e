"""Pieces every family shares: the checkpoint layout's key mapping, and a decoded token's pass through
the layers on the CPU."""

from __future__ import annotations

import torch
from torch import nn


def sanitize(args, name: str) -> str | None:
    """Checkpoint key -> model key (the weight prefix stripped), or None for tensors a text decoder
    never reads (vision and audio towers, a tied model's lm_head copy)."""
    if name == "lm_head.weight":
        return None if args.tie_word_embeddings else name
    if not name.startswith(args.weight_prefix):
        return None
    return name[len(args.weight_prefix):]


def expert_shapes(args) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A MoE layer's experts as config.json implies them, in localrun's fused layout: gate_up [E, 2I, H], down [E, H, I]."""
    E, H, I = args.num_experts, args.hidden_size, args.moe_intermediate_size
    return (E, 2 * I, H), (E, H, I)


def decode_layers(layers, x: torch.Tensor, rope_rows: list, caches: list, position: int) -> torch.Tensor:
    """One host-driven decoded token x through `layers` (layer i with (cos, sin) rope_rows[i] and cache
    caches[i]): each layer's forward_decode called directly, its one C call, where nothing hooks the
    layer; a hooked layer, or one forward_decode does not apply to, goes through its Module call."""
    shared: dict = {"position": position}  # a hooked layer's forward() takes forward_decode from this
    hooked = bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    pos_1 = None
    for layer, (cos, sin), layer_cache in zip(layers, rope_rows, caches):
        out = None
        if not (hooked or layer._forward_hooks or layer._forward_pre_hooks):
            out = layer.forward_decode(x, cos, sin, layer_cache, position)
        if out is None:
            pos_1 = torch.tensor([position]) if pos_1 is None else pos_1
            out = layer(x, cos, sin, pos_1, layer_cache, shared)
        x = out
    return x
