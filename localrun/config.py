"""The text config of a checkpoint, read into one per-layer description.

`load_config` / `args_from_dict` pick the model family by `model_type` (see
`localrun.models`); each family reads its own fields with Hugging Face names. What the
shared code (plan, loader, KV cache) reads of any family's args: `num_hidden_layers`,
`hidden_size`, `num_attention_heads`, `vocab_size`, `max_position_embeddings`,
`sliding_window`, `weight_prefix`, the expert sizes (`num_experts`, `top_k_experts`,
`moe_intermediate_size`, `hidden_activation`) and per layer `is_sliding`, `layer_head_dim`,
`layer_kv_heads`, `kv_source_layer`, `mlp_intermediate`, `has_experts`.

`ModelArgs` is Gemma 4's. `from_dict` accepts both layouts Google publishes: the multimodal
`Gemma4ForConditionalGeneration` (`model_type: gemma4`, text fields nested under
`text_config`, weights under `model.language_model.`) and the text-only
`Gemma4ForCausalLM` (`model_type: gemma4_text`, weights under `model.`), and both spellings
of the full-attention layers' geometry: transformers >= 5.24 writes `per_layer_config`
(`{"5": {"head_dim": 512, "num_key_value_heads": 2}}`), older versions `global_head_dim` and
`num_global_key_value_heads`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .errors import LocalrunError

GEMMA4_TYPES = ("gemma4", "gemma4_text")
PLACEHOLDER_FIELDS = ("image_token_id", "video_token_id", "audio_token_id")  # a multimodal config's top level

SLIDING = "sliding_attention"
FULL = "full_attention"

GEMMA4_ROPE_TYPES = ("default", "proportional")
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")  # what a Gemma 4 layer may override

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
    global_head_dim: int | None = None  # older spelling; 512 when neither it nor per_layer_config is given
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None  # transformers >= 5.24: {layer: {"head_dim": .., "num_key_value_heads": ..}}
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
    use_bidirectional_attention: str | None = None
    # Where the text weights live in the checkpoint ("model." or "model.language_model.").
    weight_prefix: str = "model."
    # A multimodal checkpoint's image / video / audio placeholder ids: a text-only pass embeds them as
    # pad_token_id, as transformers' Gemma4Model does before it merges in the encoders' outputs.
    placeholder_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if self.layer_types[-1] != FULL:  # transformers forces this too
            self.layer_types[-1] = FULL
        if self.rope_parameters is None:  # null in config.json: the defaults, as transformers reads it
            self.rope_parameters = {}
        for kind, default in _DEFAULT_ROPE.items():
            self.rope_parameters.setdefault(kind, dict(default))
        for kind in set(self.layer_types):
            rope_type = self.rope_parameters[kind].get("rope_type", "default")
            if rope_type not in GEMMA4_ROPE_TYPES:
                raise LocalrunError(f"rope_type {rope_type!r} ({kind}) is not implemented "
                                    f"(localrun has: {', '.join(GEMMA4_ROPE_TYPES)})")
        if self.use_bidirectional_attention == "all":
            raise LocalrunError("use_bidirectional_attention 'all' is not implemented (localrun attends causally)")
        self._head_dims, self._kv_heads = self._layer_geometry()

    def _layer_geometry(self) -> tuple[list[int], list[int]]:
        """Head dim and KV heads of every layer, from `per_layer_config` or the older global_* fields."""
        L = self.num_hidden_layers
        if self.per_layer_config is None:  # the older spelling, as transformers converts it
            full = {"head_dim": 512 if self.global_head_dim is None else self.global_head_dim}
            if self.attention_k_eq_v and self.num_global_key_value_heads:
                full["num_key_value_heads"] = self.num_global_key_value_heads
            overrides = {i: full for i, kind in enumerate(self.layer_types) if kind == FULL}
        else:
            overrides = {}
            for key, values in self.per_layer_config.items():
                try:
                    layer = int(key)
                except (TypeError, ValueError):
                    raise LocalrunError(f"per_layer_config key {key!r} is not a layer index") from None
                if not 0 <= layer < L or not isinstance(values, dict):
                    raise LocalrunError(f"per_layer_config[{key!r}] must be a dict for a layer in 0..{L - 1}")
                for name, value in values.items():
                    if name not in PER_LAYER_KEYS and getattr(self, name, object()) != value:
                        raise LocalrunError(f"per_layer_config[{key!r}] sets {name!r}, which localrun does not "
                                            f"implement per layer (it has: {', '.join(PER_LAYER_KEYS)})")
                overrides[layer] = values
        head_dims = [overrides.get(i, {}).get("head_dim", self.head_dim) for i in range(L)]
        kv_heads = [overrides.get(i, {}).get("num_key_value_heads", self.num_key_value_heads) for i in range(L)]
        for kind in set(self.layer_types):  # RoPE frequencies are per kind of layer
            dims = {head_dims[i] for i in range(L) if self.layer_types[i] == kind}
            if len(dims) > 1:
                raise LocalrunError(f"{kind} layers with different head dims {sorted(dims)} are not implemented")
        return head_dims, kv_heads

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """Build from a Gemma 4 config.json dict (either layout); keys that don't change the text model are ignored."""
        model_type = config.get("model_type")
        if model_type not in GEMMA4_TYPES:
            raise LocalrunError(f"not a Gemma 4 config: model_type {model_type!r}")
        validate_config(config)
        if model_type == "gemma4":
            text = dict(config.get("text_config") or {})
            # Gemma4ForConditionalGeneration ties lm_head by the top-level flag; text_config's is not read
            text["tie_word_embeddings"] = config.get("tie_word_embeddings", True)
            if "eos_token_id" in config:  # the top-level list (1 and 106) is what generation stops on
                text["eos_token_id"] = config["eos_token_id"]
            text["model_type"] = "gemma4_text"
            prefix = "model.language_model."
        else:
            text, prefix = dict(config), "model."
        names = {f.name for f in dataclasses.fields(cls)} - {"weight_prefix", "placeholder_token_ids"}
        args = cls(**{k: v for k, v in text.items() if k in names})
        args.weight_prefix = prefix
        if model_type == "gemma4":
            args.placeholder_token_ids = tuple(sorted({
                config[k] for k in PLACEHOLDER_FIELDS if is_int(config.get(k)) and 0 <= config[k] < args.vocab_size}))
        return args

    # Per-layer geometry -------------------------------------------------------------------

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self._head_dims[layer]

    def layer_kv_heads(self, layer: int) -> int:
        return self._kv_heads[layer]

    def has_experts(self, layer: int) -> bool:
        return self.enable_moe_block

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


def args_from_dict(config: dict):
    """The args of a config.json dict, read by the family its `model_type` names (see localrun.models)."""
    from .models import family  # models import this module

    read_quantization(config)  # a quantization localrun cannot read is refused before anything is planned
    return family(config.get("model_type")).args_from_dict(config)


# Pre-quantized checkpoints ----------------------------------------------------------------------
# Two FP8 formats localrun reads as bf16 (localrun.fp8): Qwen's and DeepSeek's block-scaled
# `quant_method: fp8` (W and W_scale_inv, one scale per block of `weight_block_size`), and
# compressed-tensors' float-quantized FP8 (llm-compressor's FP8 / FP8-dynamic / FP8-block releases: W
# and W_scale, one scale per tensor, per output channel, per group of columns or per block). Every other
# quantization (GPTQ, AWQ, bitsandbytes, compressed-tensors' int4 ...) is refused by name.

FP8_METHOD = "fp8"
FP8_DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default
CT_METHOD = "compressed-tensors"
CT_FORMATS = ("float-quantized", "naive-quantized")  # FP8 codes stored as they are
CT_STRATEGIES = ("tensor", "channel", "group", "block")  # each a grid of scales over the matrix


class FloatWeights(NamedTuple):
    """How an FP8 checkpoint stores a matrix W: codes in W, scales in W + scale_suffix. block: the
    (rows, columns) each scale covers when the config fixes it (a partial last block has its own);
    None: as many rows and columns as the scale's grid divides the matrix into."""

    scale_suffix: str
    block: tuple[int, int] | None


def read_quantization(config: dict) -> FloatWeights | None:
    """The FP8 layout a config.json dict declares; None for an unquantized checkpoint.

    LocalrunError for a quantization localrun cannot read, naming it; ConfigError for a malformed one.
    """
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == FP8_METHOD:
        return FloatWeights("_scale_inv", _block(quant.get("weight_block_size", list(FP8_DEFAULT_BLOCK)),
                                                 "weight_block_size"))
    if method == CT_METHOD:
        return _compressed_tensors(quant)
    named = f"quant_method {method!r}" if isinstance(method, str) else "a quantization_config without quant_method"
    raise _unreadable(named)


def _unreadable(named: str) -> LocalrunError:
    return LocalrunError(f"this checkpoint is pre-quantized ({named}); localrun reads bf16, fp16 and fp32 "
                         f"checkpoints and FP8 ones ({FP8_METHOD!r}, {CT_METHOD} float-quantized): use the "
                         "original weights")


def _block(block, name: str) -> tuple[int, int]:
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 16 for b in block)):
        raise ConfigError(f"quantization_config.{name} must be [rows, columns] of positive integers, not {block!r}")
    return block[0], block[1]


def _compressed_tensors(quant: dict) -> FloatWeights:
    """compressed-tensors' FP8 weights; anything else it can hold (int4 packs, zero points, 2:4 sparsity)
    refused by name. Scales are per tensor, channel, group or block: their grid gives the block."""
    groups = quant.get("config_groups")
    if not (isinstance(groups, dict) and groups and all(isinstance(g, dict) for g in groups.values())):
        raise ConfigError("quantization_config.config_groups must be an object of quantization groups")
    fmt, sparsity = quant.get("format"), quant.get("sparsity_config")
    for group in groups.values():
        w = group.get("weights")
        if w is None:
            continue  # activations only: the weights are stored as they are
        if not isinstance(w, dict):
            raise ConfigError("quantization_config.config_groups.*.weights must be an object or null")
        kind = f"{CT_METHOD} {w.get('type')} {w.get('num_bits')}-bit weights ({fmt}, {w.get('strategy')})"
        if (w.get("type"), w.get("num_bits")) != ("float", 8) or fmt not in CT_FORMATS \
                or w.get("strategy") not in CT_STRATEGIES or w.get("symmetric") is False:
            raise _unreadable(kind)
    if isinstance(sparsity, dict) and sparsity.get("format", "dense") != "dense":
        raise _unreadable(f"{CT_METHOD} with {sparsity.get('format')} sparsity")
    return FloatWeights("_scale", _ct_block(groups))


def _ct_block(groups: dict) -> tuple[int, int] | None:
    """The block every weights group's scales cover when the config fixes it: `block_structure` for the
    block strategy (compressed-tensors stores the codes unpadded, so a partial last block is one of the
    grid's own, not an equal share of the matrix); None for tensor, channel and group scales, whose grid
    divides the matrix evenly. Groups that disagree while one is block-scaled are refused: which tensor
    a group covers is not read, and a block scale's grid alone misreads a partial last block."""
    blocks = {_block(w.get("block_structure"), "config_groups.*.weights.block_structure")
              if w.get("strategy") == "block" else None
              for w in (g.get("weights") for g in groups.values()) if w is not None}
    if len(blocks) > 1:
        raise _unreadable(f"{CT_METHOD} groups of different scale blocks")
    return blocks.pop() if blocks else None


# Validation -------------------------------------------------------------------------------------

# Gemma 4's checks are here; Qwen3-MoE and Mixtral check theirs in localrun.models.qwen3_moe with the
# shared check_* functions below.

class ConfigError(LocalrunError):
    """A malformed config.json; the message names the field."""


# Without these the model's shape is unknown: a default would plan and build some other model.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
MOE_REQUIRED = ("num_experts", "top_k_experts", "moe_intermediate_size")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")  # what localrun.moe.ACTIVATIONS implements

# Upper bounds far above any real model, so a typo or a hostile file fails here instead of
# allocating (a billion layer types) or planning nonsense. Every family's checks use these.
SIZE = (1, 1 << 24)  # widths, vocab, head dims, windows
COUNT = (1, 4096)  # layers, heads
EXPERTS = (1, 1 << 16)
POSITIONS = (1, 1 << 30)
TOKEN_ID = (0, 1 << 24)

_INT_FIELDS = {  # name: (min, max, may be null)
    **{name: (*SIZE, False) for name in ("vocab_size", "hidden_size", "intermediate_size", "head_dim",
                                         "sliding_window")},
    "global_head_dim": (*SIZE, True),
    "num_hidden_layers": (*COUNT, False),
    "num_attention_heads": (*COUNT, False),
    "num_key_value_heads": (*COUNT, False),
    "num_global_key_value_heads": (*COUNT, True),
    "max_position_embeddings": (*POSITIONS, False),
    "num_kv_shared_layers": (0, 4096, False),
    "hidden_size_per_layer_input": (0, 1 << 24, False),
    "vocab_size_per_layer_input": (0, 1 << 24, False),
    "num_experts": (*EXPERTS, True),
    "top_k_experts": (*EXPERTS, True),
    "moe_intermediate_size": (*SIZE, True),
    "pad_token_id": (*TOKEN_ID, True),
    "bos_token_id": (*TOKEN_ID, False),
}
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "attention_k_eq_v", "enable_moe_block",
                "use_double_wide_mlp")


def validate_config(raw: dict) -> None:
    """Check a Gemma 4 config.json dict (either layout) before it becomes ModelArgs.

    Raises ConfigError naming the first bad field: missing, of the wrong type, out of range,
    a list of the wrong length, or inconsistent with another field. Other model types pass.
    """
    if not isinstance(raw, dict):
        raise ConfigError("expected a JSON object")
    if raw.get("model_type") not in GEMMA4_TYPES:
        return
    text, where = raw, ""
    if raw["model_type"] == "gemma4":
        text, where = raw.get("text_config"), "text_config."
        if not isinstance(text, dict):
            raise ConfigError("text_config must be an object holding the text model's fields")
        check_bools(raw, ("tie_word_embeddings",))
        if "eos_token_id" in raw:
            check_eos(raw["eos_token_id"], "eos_token_id")
    _check_text(text, where)


def _check_text(cfg: dict, where: str) -> None:
    def fail(name: str, problem: str):
        raise ConfigError(f"{where}{name} {problem}")

    required = REQUIRED + (MOE_REQUIRED if cfg.get("enable_moe_block") is True else ())
    check_required(cfg, required, where)
    check_ints(cfg, _INT_FIELDS, where)
    check_bools(cfg, _BOOL_FIELDS, where)
    check_rms_norm_eps(cfg, where)
    cap = cfg.get("final_logit_softcapping")
    if cap is not None and not (is_number(cap) and cap > 0):
        fail("final_logit_softcapping", f"must be a positive number or null, not {cap!r}")
    if cfg.get("hidden_activation", ACTIVATIONS[0]) not in ACTIVATIONS:
        fail("hidden_activation", f"must be one of {', '.join(ACTIVATIONS)}, not {cfg['hidden_activation']!r}")
    if "eos_token_id" in cfg:
        check_eos(cfg["eos_token_id"], where + "eos_token_id")

    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    for name in ("num_key_value_heads", "num_global_key_value_heads"):
        check_kv_heads(cfg, name, heads, where)
    for name in ("head_dim", "global_head_dim"):
        check_even(cfg, name, where)
    _check_per_layer(cfg.get("per_layer_config"), heads, where)
    if cfg.get("enable_moe_block") is True and cfg["top_k_experts"] > cfg["num_experts"]:
        fail("top_k_experts", f"({cfg['top_k_experts']}) must not exceed num_experts ({cfg['num_experts']})")
    for name in ("bos_token_id", "pad_token_id"):
        if cfg.get(name) is not None and cfg[name] >= cfg["vocab_size"]:
            fail(name, f"({cfg[name]}) must be below vocab_size ({cfg['vocab_size']})")

    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers:
            fail("layer_types", f"must be a list of num_hidden_layers ({layers}) entries")
        bad = [t for t in types if t not in (SLIDING, FULL)]
        if bad:
            fail("layer_types", f"entries must be {SLIDING!r} or {FULL!r}, not {bad[0]!r}")
    else:
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(layers)]
    types = types[:-1] + [FULL]  # as ModelArgs forces it
    shared = cfg.get("num_kv_shared_layers", 0)
    first = layers - shared
    if shared and not all(t in types[:first] for t in set(types[first:])):
        fail("num_kv_shared_layers", f"({shared}) leaves no earlier layer of each kind to share keys and values with")
    _check_rope(cfg.get("rope_parameters"), where)


def _check_rope(rope, where: str) -> None:
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}rope_parameters must be an object keyed by layer type")
    for key in rope:
        if key not in (SLIDING, FULL):  # a flat {"rope_theta": ...} (other families' spelling) included
            raise ConfigError(f"{where}rope_parameters must be keyed by layer type ({SLIDING}, {FULL}), "
                              f"not {key!r}")
    for kind in (SLIDING, FULL):
        if kind not in rope:
            continue
        p, at = rope[kind], f"{where}rope_parameters.{kind}"
        if not isinstance(p, dict):
            raise ConfigError(f"{at} must be an object")
        if not (is_number(p.get("rope_theta")) and p["rope_theta"] > 0):
            raise ConfigError(f"{at}.rope_theta must be a positive number, not {p.get('rope_theta')!r}")
        if not isinstance(p.get("rope_type", "default"), str):
            raise ConfigError(f"{at}.rope_type must be a string, not {p['rope_type']!r}")
        factor = p.get("partial_rotary_factor", 1.0)
        if not (is_number(factor) and 0 < factor <= 1):
            raise ConfigError(f"{at}.partial_rotary_factor must be a number in (0, 1], not {factor!r}")
        if not (is_number(p.get("factor", 1.0)) and p.get("factor", 1.0) > 0):
            raise ConfigError(f"{at}.factor must be a positive number, not {p['factor']!r}")


def _check_per_layer(per_layer, heads: int, where: str) -> None:
    """The values of per_layer_config's entries: "head_dim" even, "num_key_value_heads" dividing the heads."""
    if per_layer is None:
        return
    if not isinstance(per_layer, dict):
        raise ConfigError(f"{where}per_layer_config must be an object keyed by layer index")
    for key, values in per_layer.items():
        at = f"{where}per_layer_config[{key!r}]"
        if not isinstance(values, dict):
            continue  # ModelArgs names what is wrong with the entry itself
        dim, kv = values.get("head_dim"), values.get("num_key_value_heads")
        if dim is not None and not (is_int(dim) and 2 <= dim <= 1 << 24 and dim % 2 == 0):
            raise ConfigError(f"{at}.head_dim must be an even positive integer, not {dim!r}")
        if kv is not None and not (is_int(kv) and 1 <= kv <= heads and heads % kv == 0):
            raise ConfigError(f"{at}.num_key_value_heads must divide num_attention_heads ({heads}), not {kv!r}")


# Checks every family's validation shares; `where` prefixes the field's name ("text_config.").

def check_required(cfg: dict, names: tuple[str, ...], where: str = "") -> None:
    missing = [name for name in names if cfg.get(name) is None]
    if missing:
        raise ConfigError(f"missing {', '.join(where + m for m in missing)} (needed to know the model's shape)")


def check_ints(cfg: dict, bounds: dict[str, tuple[int, int, bool]], where: str = "") -> None:
    """Each field of `bounds` ({name: (min, max, may be null)}) that `cfg` holds is an int in range."""
    for name, (lo, hi, nullable) in bounds.items():
        value = cfg.get(name)
        if name not in cfg or (value is None and nullable):
            continue
        if not is_int(value):
            raise ConfigError(f"{where}{name} must be an integer, not {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(f"{where}{name} must be between {lo} and {hi}, not {value}")


def check_bools(cfg: dict, names: tuple[str, ...], where: str = "") -> None:
    for name in names:
        if name in cfg and not isinstance(cfg[name], bool):
            raise ConfigError(f"{where}{name} must be true or false, not {cfg[name]!r}")


def check_rms_norm_eps(cfg: dict, where: str = "") -> None:
    if "rms_norm_eps" in cfg and not (is_number(cfg["rms_norm_eps"]) and 0 < cfg["rms_norm_eps"] < 1):
        raise ConfigError(f"{where}rms_norm_eps must be a number between 0 and 1, not {cfg['rms_norm_eps']!r}")


def check_kv_heads(cfg: dict, name: str, heads: int, where: str = "") -> None:
    """`cfg[name]` (a checked int or null) divides the query heads, so each KV head serves a whole group."""
    kv = cfg.get(name)
    if kv is not None and heads % kv:
        raise ConfigError(f"{where}{name} ({kv}) must divide num_attention_heads ({heads})")


def check_even(cfg: dict, name: str, where: str = "") -> None:
    if cfg.get(name) is not None and cfg[name] % 2:
        raise ConfigError(f"{where}{name} must be even (RoPE rotates pairs), not {cfg[name]}")


def check_eos(value, name: str) -> None:
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(is_int(i) and 0 <= i < 1 << 24 for i in ids):
        raise ConfigError(f"{name} must be a token id or a non-empty list of them, not {value!r}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stored_matrix_dtype(model_dir: str | Path):
    """The torch dtype config.json says the checkpoint's matrices are stored in (`dtype`, or
    `torch_dtype`, at the top or in text_config): bf16 when it names no floating dtype of 16 bits
    or more, as releases ship (an FP8 release reads as bf16: localrun/fp8.py). What `fit` plans and
    `bench --random-weights` draws for a directory without weights."""
    import torch

    cfg = json.loads((Path(model_dir) / "config.json").read_text())  # load_config has read it whole already
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    name = next((v for v in (cfg.get("dtype"), cfg.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype"))
                 if isinstance(v, str)), "bfloat16")
    stored = getattr(torch, name, None)
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point or stored.itemsize < 2:
        stored = torch.bfloat16
    return stored


def load_config(model_dir: str | Path):
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LocalrunError(f"invalid JSON in {cfg}: {e}") from None
    if not isinstance(data, dict):
        raise LocalrunError(f"invalid config in {cfg}: expected a JSON object")
    try:
        return args_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"invalid config in {cfg}: {e}") from None
