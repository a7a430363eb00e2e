"""Mixtral (8x7B, 8x22B): the Qwen3-MoE decoder without q/k norms, every layer sparse, top-k always
renormalized. What differs is the config's names and the checkpoint's: released checkpoints hold
`block_sparse_moe.gate` and per-expert `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down),
which `sanitize` and `read_experts` map onto the shared model (`mlp.gate`, fused `mlp.experts`).
"""

from __future__ import annotations

import re

from ..checkpoint import Checkpoint
from ..config import EXPERTS
from . import qwen3_moe
from .qwen3_moe import BUILTIN_CHAT_TEMPLATE, MoEArgs, Model, checkpoint_shapes, tensor_group  # noqa: F401  (the interface)

_FUSED = tuple((f"{m}.experts.gate_up_proj", f"{m}.experts.down_proj") for m in ("block_sparse_moe", "mlp"))
_PER_EXPERT = (
    ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight",
     "block_sparse_moe.experts.{e}.w2.weight"),
    qwen3_moe.PER_EXPERT,
)
_RENAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_INTS = qwen3_moe.INTS | {"num_local_experts": (*EXPERTS, False)}  # what validation checks (see qwen3_moe.INTS)


def args_from_dict(config: dict) -> MoEArgs:
    qwen3_moe.check_config(config, _INTS, qwen3_moe.BOOLS, qwen3_moe.REQUIRED + ("num_local_experts",),
                           "num_local_experts")
    config = dict(config)
    config["num_experts"] = config["num_local_experts"]
    config["moe_intermediate_size"] = config["intermediate_size"]
    # What transformers' Mixtral has whatever the config says: no attention bias, every layer sparse.
    return qwen3_moe.make_args(config, rope_parameters=qwen3_moe.rope_parameters(config, 1_000_000.0),
                               norm_topk_prob=True, mlp_only_layers=[], qk_norm=False, attention_bias=False,
                               decoder_sparse_step=1)


def sanitize(args: MoEArgs, name: str) -> str | None:
    key = qwen3_moe.sanitize(args, name)
    if key is None or ".block_sparse_moe." not in key:
        return key
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"(\.experts\.\d+\.)(w[123])\.", lambda m: m.group(1) + _RENAME[m.group(2)] + ".", key)


def read_experts(ckpt: Checkpoint, args: MoEArgs, layer: int, start: int = 0, stop: int | None = None):
    """One layer's experts [start, stop) (default all) as (gate_up [n, 2I, H], down [n, H, I]): w1 is the
    gate, w3 the up, w2 the down."""
    return qwen3_moe.read_experts(ckpt, args, layer, fused=_FUSED, per_expert=_PER_EXPERT, start=start, stop=stop)
