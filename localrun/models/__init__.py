"""Model families: `config["model_type"]` -> the module of this package that implements it.

A family module provides, with the same names:

- `args_from_dict(config) -> args`: the config (HF field names) as one per-layer description
  (see localrun.config for what the shared code reads of it);
- `Model(args)`: the decoder, `hidden(ids, cache)`, `logits(h)`, `layers[i].router` / `.experts`;
- `checkpoint_shapes(args)`: every text tensor after the weight prefix, experts as fused
  `...experts.gate_up_proj` [E, 2I, H] / `...experts.down_proj` [E, H, I] (localrun's layout);
- `tensor_group(name)`: the component a tensor belongs to, for fit's breakdown;
- `sanitize(args, name)`: checkpoint key -> model key, or None for tensors the text model never reads;
- `read_experts(ckpt, args, layer, start=0, stop=None)`: one layer's experts [start, stop) in the fused
  layout, however stored, reading only those experts' bytes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import LocalrunError

FAMILIES = {
    "gemma4": "gemma4",
    "gemma4_text": "gemma4",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str | None) -> ModuleType:
    """The module implementing `model_type`; a one-line error naming every supported type otherwise."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:  # a list is unhashable
        raise LocalrunError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


def is_expert_tensor(key: str) -> bool:
    """Whether a model key (after sanitize) holds routed-expert weights, fused or per expert."""
    return ".experts." in key
