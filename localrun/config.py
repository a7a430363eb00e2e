"""ModelArgs: the text config of a checkpoint, with Hugging Face field names.

`from_dict` accepts both layouts Google publishes: the multimodal
`Gemma4ForConditionalGeneration` (`model_type: gemma4`, text fields nested under
`text_config`, weights under `model.language_model.`) and the text-only
`Gemma4ForCausalLM` (`model_type: gemma4_text`, weights under `model.`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LocalrunError

SUPPORTED_MODEL_TYPES = ("gemma4", "gemma4_text")

SLIDING = "sliding_attention"
FULL = "full_attention"

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass
class ModelArgs:
    model_type: str = "gemma4_text"
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 1
    tie_word_embeddings: bool = True
    rope_parameters: dict = field(default_factory=lambda: json.loads(json.dumps(_DEFAULT_ROPE)))
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    # Where the text weights live in the checkpoint ("model." or "model.language_model.").
    weight_prefix: str = "model."

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if self.layer_types[-1] != FULL:  # transformers forces this too
            self.layer_types[-1] = FULL
        for kind, default in _DEFAULT_ROPE.items():
            self.rope_parameters.setdefault(kind, dict(default))

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """Build from a config.json dict (either layout); unknown keys are ignored."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise LocalrunError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "gemma4":
            text = dict(config.get("text_config") or {})
            text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
            if "eos_token_id" in config:  # the top-level list (1 and 106) is what generation stops on
                text["eos_token_id"] = config["eos_token_id"]
            text["model_type"] = "gemma4_text"
            prefix = "model.language_model."
        else:
            text, prefix = dict(config), "model."
        names = {f.name for f in dataclasses.fields(cls)}
        args = cls(**{k: v for k, v in text.items() if k in names and k != "weight_prefix"})
        args.weight_prefix = prefix
        return args

    # Per-layer geometry -------------------------------------------------------------------

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        if not self.is_sliding(layer) and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def has_v_proj(self, layer: int) -> bool:
        return self.is_sliding(layer) or not self.attention_k_eq_v

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source_layer(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends over (itself unless KV-shared)."""
        if layer < self.first_kv_shared_layer:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(self.first_kv_shared_layer) if self.layer_types[i] == kind)

    def mlp_intermediate(self, layer: int) -> int:
        double = self.use_double_wide_mlp and layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if double else 1)

    @property
    def eos_ids(self) -> list[int]:
        ids = self.eos_token_id
        return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def load_config(model_dir: str | Path) -> ModelArgs:
    """Read `config.json` from a model directory, with one-line errors for what can go wrong."""
    path = Path(model_dir)
    if not path.exists():
        raise LocalrunError(f"model path not found: {path}")
    if not path.is_dir():
        raise LocalrunError(f"not a model directory: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise LocalrunError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalrunError(f"invalid JSON in {cfg}: {e}") from None
    if not isinstance(data, dict):
        raise LocalrunError(f"invalid config in {cfg}: expected a JSON object")
    return ModelArgs.from_dict(data)
