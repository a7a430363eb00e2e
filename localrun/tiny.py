"""Tiny random Gemma 4 checkpoints in the exact Hugging Face layout, for tests and demos.

`write_checkpoint` writes what `huggingface-cli download google/gemma-4-...` would give
(sharded safetensors + index, config.json, generation_config.json, tokenizer files and
chat_template.jinja), only with ~300K random parameters. Every tensor is drawn
away from its "identity" value (norms != 1, layer_scalar != 1, router scales != 1), so a
decoder that ignores or misreads one disagrees with transformers.
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .config import FULL, SLIDING, ModelArgs
from .models.gemma4 import checkpoint_shapes
from .text import builtin_chat_template

TINY_VOCAB = 512
KINDS = ("moe", "moe_v", "dense_e2b")
LAYOUTS = ("text", "multimodal")
SPACE = "▁"  # U+2581, what Gemma's normalizer turns spaces into

# Gemma 4's special tokens at their real ids; the ids in between are "<unused{n}>".
SPECIAL_TOKENS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}

_WORDS = """the of and to a in is it you that he was for on are with as I his they be at one have
this from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so these
her long make thing see him two has look more day could go come did number sound no most people
my over know water than call first who may down side been now find any new work part take get
place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause much
mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men
change went light kind off need house picture try us again animal point mother world near build
self earth father head stand own page should country found answer school grow study still learn
plant cover food sun four between state keep eye never last let thought city tree cross farm hard
start might story saw far sea draw left late run while press close night real life few north
model user system hello thanks please question sum plus minus equals result number""".split()

_SENTENCES = [
    "What is 17 + 25?",
    "17 + 25 = 42.",
    "What is 3 * 4? It is 12.",
    "Count: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.",
    "Hello! How are you today?",
    "I am fine, thank you. And you?",
    "The quick brown fox jumps over the lazy dog.",
    "Please answer in one word: yes or no.",
    "Write a short story about a cat (and a dog).",
    "The year was 1984; the price was $3.50 - or 50% off!",
    "She said: \"It's a good day\", and left at 10:30.",
    "Q: Where is the sun? A: In the sky.",
    "def add(a, b):\n    return a + b\n",
    "[1, 2, 3] {\"key\": \"value\"} <tag> a/b a|b a_b a~b a^b a#b a@b a&b",
    "You are a helpful assistant.\nAnswer the question.\n",
]


def default_corpus() -> list[str]:
    """The built-in training text: common English words, digits, punctuation, Q&A lines."""
    lines = [" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 12)]
    return lines + _SENTENCES


def _is_digit(piece: str) -> bool:
    return any(c.isdigit() for c in piece)


def _train_merges(corpus: list[str], n_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Plain BPE on words split before each "▁": (alphabet, merges) with `n_tokens` distinct strings.

    Fully deterministic: ties go to the lexicographically smallest pair. Digits never merge
    (Gemma splits numbers into single digits).
    """
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus:
        for w in re.split(f"(?={SPACE})", line.replace(" ", SPACE)):
            if w:
                words[tuple(w)] += 1
    alphabet = sorted({c for w in words for c in w})
    seen = set(alphabet)
    merges: list[tuple[str, str]] = []
    while len(seen) < n_tokens:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                if not (_is_digit(a) or _is_digit(b)):
                    pairs[a, b] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        seen.add(best[0] + best[1])
        merged: Counter[tuple[str, ...]] = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return alphabet, merges


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = TINY_VOCAB) -> Tokenizer:
    """A small real tokenizer built like Gemma's: byte-fallback BPE, "▁" for spaces, BOS added.

    Ids 0-106 hold Gemma 4's special tokens at their real ids (gaps filled with <unusedN>),
    then the 256 byte tokens <0x00>..<0xFF>, the corpus alphabet and the learned merges,
    exactly `vocab_size` in all. The same inputs give a byte-identical tokenizer.json.
    """
    unused = itertools.count()
    specials = [SPECIAL_TOKENS.get(i) or f"<unused{next(unused)}>" for i in range(max(SPECIAL_TOKENS) + 1)]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    alphabet, merges = _train_merges(default_corpus() if corpus is None else corpus, vocab_size - len(vocab))
    for piece in alphabet + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    if len(vocab) != vocab_size:
        raise ValueError(f"corpus too small for a {vocab_size}-token vocabulary ({len(vocab)} reached)")

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # The same pipeline transformers' GemmaTokenizer builds, so both read this file alike.
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    return tok


# Configs -----------------------------------------------------------------------------------

_LAYER_TYPES = [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL]


def tiny_config(kind: str = "moe", **overrides) -> dict:
    """A text config dict (HF field names, `model_type: gemma4_text`) shaped like a real model.

    kind: "moe" (26B-A4B: MoE, K=V on full layers), "moe_v" (MoE, full layers keep v_proj),
    "dense_e2b" (E2B: dense, per-layer embeddings, KV sharing, double-wide MLP).
    """
    cfg = {
        "model_type": "gemma4_text",
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 6,
        "layer_types": list(_LAYER_TYPES),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": 8,
        "enable_moe_block": True,
        "num_experts": 8,
        "top_k_experts": 2,
        "moe_intermediate_size": 128,
        "final_logit_softcapping": 30.0,
        "rope_parameters": {
            FULL: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            SLIDING: {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": TINY_VOCAB,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    }
    if kind == "moe_v":
        cfg["attention_k_eq_v"] = False
    elif kind == "dense_e2b":
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size", "num_global_key_value_heads"):
            cfg[key] = None
        cfg.update(enable_moe_block=False, attention_k_eq_v=False, hidden_size_per_layer_input=16,
                   num_kv_shared_layers=2, use_double_wide_mlp=True)
    elif kind != "moe":
        raise ValueError(f"unknown tiny model kind {kind!r}; expected moe, moe_v or dense_e2b")
    cfg.update(overrides)
    return cfg


# A vision tower small enough to ignore, with the real tensor names; a text runner skips it.
_VISION_CONFIG = {
    "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "patch_size": 4,
    "position_embedding_size": 16, "pooling_kernel_size": 2, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
    "use_clipped_linears": False, "standardize": False,
}


def _vision_shapes(text_hidden: int) -> dict[str, tuple[int, ...]]:
    c = _VISION_CONFIG
    H, I, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    N, KV = c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {
        "model.vision_tower.patch_embedder.input_proj.weight": (H, 3 * c["patch_size"] ** 2),
        "model.vision_tower.patch_embedder.position_embedding_table": (2, c["position_embedding_size"], H),
        "model.embed_vision.embedding_projection.weight": (text_hidden, H),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.vision_tower.encoder.layers.{i}."
        for proj, shape in (("q_proj", (N * D, H)), ("k_proj", (KV * D, H)), ("v_proj", (KV * D, H)),
                            ("o_proj", (H, N * D))):
            shapes[p + f"self_attn.{proj}.linear.weight"] = shape
        shapes[p + "self_attn.q_norm.weight"] = (D,)
        shapes[p + "self_attn.k_norm.weight"] = (D,)
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            shapes[p + f"mlp.{proj}.linear.weight"] = shape
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (H,)
    return shapes


# Weights -----------------------------------------------------------------------------------

def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One fp32 tensor from its own generator, seeded by its name (after the weight prefix), so
    values don't depend on tensor order and both layouts hold the same text weights."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    randn = torch.randn(shape, generator=gen)
    if name.endswith("layer_scalar"):
        return 0.7 + 0.6 * torch.rand(shape, generator=gen)
    if name == "norm.weight":
        return 5.0 * (1.0 + 0.2 * randn)  # spreads the logits (std ~2) so greedy picks have clear margins
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        # q.k is the attention logit (scaling 1.0): softer attention keeps bf16 runs close to fp32.
        return 0.5 * (1.0 + 0.2 * randn)
    if name.endswith(("norm.weight", "router.scale", "router.per_expert_scale")):
        return 1.0 + 0.2 * randn
    if name == "embed_tokens.weight":
        # Small next to what the layers add, else tied logits favour repeating the input token.
        return 0.4 * randn / shape[-1] ** 0.5
    return randn / shape[-1] ** 0.5


def _shard(names: list[str], nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
        "padding_side": "left", "model_max_length": 4096, "clean_up_tokenization_spaces": False,
    }


def write_checkpoint(
    out_dir: str | Path,
    config: dict,
    *,
    layout: str = "text",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = 64 * 1024,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a random checkpoint for text `config` (from `tiny_config`) into `out_dir`; returns it.

    layout "text": `Gemma4ForCausalLM`, weights under `model.`. layout "multimodal":
    `Gemma4ForConditionalGeneration`, text weights under `model.language_model.` plus a tiny
    vision tower. Same seed and inputs give byte-identical files.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'text' or 'multimodal', not {layout!r}")
    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, config only {config['vocab_size']}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full_cfg = hf_config(config, layout, dtype)
    args = ModelArgs.from_dict(full_cfg)
    tensors = {
        (name if name.startswith("lm_head.") else args.weight_prefix + name): _random_tensor(name, shape, seed)
        for name, shape in checkpoint_shapes(args).items()
    }
    if layout == "multimodal":
        vision = _vision_shapes(args.hidden_size)
        tensors.update({name: _random_tensor(name, shape, seed) for name, shape in vision.items()})
    write_tensors(out, {name: t.to(dtype) for name, t in tensors.items()}, max_shard_bytes)
    write_side_files(out, full_cfg, tokenizer)
    return out


def hf_config(config: dict, layout: str = "text", dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json for text `config` in `layout` ("text": Gemma4ForCausalLM, "multimodal": as Google ships it)."""
    text_cfg = dict(config, model_type="gemma4_text")
    if layout == "text":
        return dict(text_cfg, architectures=["Gemma4ForCausalLM"], dtype=str(dtype).removeprefix("torch."))
    # As Google ships it: eos [1, 106] at the top, the text config's own eos is 1.
    return {
        "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
        "text_config": dict(text_cfg, eos_token_id=1), "vision_config": dict(_VISION_CONFIG),
        "audio_config": None, "eos_token_id": [1, 106], "tie_word_embeddings": text_cfg["tie_word_embeddings"],
        "boi_token_id": 255999, "eoi_token_id": 258882, "image_token_id": 258880,
        "dtype": str(dtype).removeprefix("torch."),
    }


def write_tensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    """Safetensors shards (in the tensors' own dtype, in dict order) + model.safetensors.index.json."""
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    nbytes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = _shard(list(tensors), nbytes, max_shard_bytes or sum(nbytes.values()))
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map})


def write_side_files(out: Path, full_cfg: dict, tokenizer: Tokenizer) -> None:
    """Everything but the weights: config, generation config, tokenizer files, chat template."""
    _write_json(out / "config.json", full_cfg)
    _write_json(out / "generation_config.json",
                {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0})
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    (out / "chat_template.jinja").write_text(builtin_chat_template(), encoding="utf-8")
