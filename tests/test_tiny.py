"""The tiny checkpoint factory writes exactly what transformers expects of a Gemma 4 checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from localrun.config import load_config
from localrun.models.gemma4 import checkpoint_shapes
from localrun.tiny import KINDS, LAYOUTS, TINY_VOCAB, build_tokenizer, tiny_config, write_checkpoint

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VISION_PREFIXES = ("model.vision_tower.", "model.embed_vision.")
REPO = Path(__file__).resolve().parents[1]


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(model_dir.glob("model-*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    return tensors


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_every_text_key(tiny_checkpoint, kind, layout):
    cls = transformers.Gemma4ForCausalLM if layout == "text" else transformers.Gemma4ForConditionalGeneration
    model, info = cls.from_pretrained(tiny_checkpoint(kind, layout), output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith(VISION_PREFIXES)]
    assert missing == []
    assert list(info["unexpected_keys"]) == []
    assert list(info["mismatched_keys"]) == []
    assert model.config.get_text_config().vocab_size == TINY_VOCAB


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_tensors_match_checkpoint_shapes_and_index(tiny_checkpoint, kind, layout):
    model_dir = tiny_checkpoint(kind, layout)
    args = load_config(model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in model_dir.glob("model-*.safetensors"))
    assert len(files) >= 2
    assert sorted(set(index["weight_map"].values())) == files
    for f in files:
        with safe_open(str(model_dir / f), "pt") as st:
            assert sorted(st.keys()) == sorted(k for k, v in index["weight_map"].items() if v == f)

    tensors = read_tensors(model_dir)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    text = {k.removeprefix(args.weight_prefix): tuple(t.shape)
            for k, t in tensors.items() if not k.startswith(VISION_PREFIXES)}
    assert text == checkpoint_shapes(args)
    assert "lm_head.weight" not in tensors  # tied
    vision = [k for k in tensors if k.startswith(VISION_PREFIXES)]
    assert args.weight_prefix == ("model." if layout == "text" else "model.language_model.")
    assert bool(vision) == (layout == "multimodal")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_every_tensor_is_randomized(tiny_checkpoint):
    for kind in KINDS:
        for name, t in read_tensors(tiny_checkpoint(kind, "multimodal")).items():
            t = t.float()
            assert not torch.all(t == 1.0) and not torch.all(t == 0.0), name  # catches ignored norms/scalars
            if t.numel() > 1:
                assert t.std() > 0.01, name


def test_configs_and_side_files(tiny_checkpoint):
    moe = json.loads((tiny_checkpoint("moe", "text") / "config.json").read_text())
    assert moe["architectures"] == ["Gemma4ForCausalLM"] and moe["model_type"] == "gemma4_text"
    assert moe["layer_types"] == (["sliding_attention"] * 2 + ["full_attention"]) * 2
    mm = json.loads((tiny_checkpoint("moe", "multimodal") / "config.json").read_text())
    assert mm["architectures"] == ["Gemma4ForConditionalGeneration"] and mm["model_type"] == "gemma4"
    assert mm["eos_token_id"] == [1, 106] and mm["text_config"]["model_type"] == "gemma4_text"
    assert load_config(tiny_checkpoint("moe", "multimodal")).eos_ids == [1, 106]

    e2b = load_config(tiny_checkpoint("dense_e2b", "text"))
    assert (e2b.enable_moe_block, e2b.hidden_size_per_layer_input, e2b.num_kv_shared_layers) == (False, 16, 2)
    assert e2b.use_double_wide_mlp and not e2b.attention_k_eq_v and e2b.num_global_key_value_heads is None
    assert not load_config(tiny_checkpoint("moe_v", "text")).attention_k_eq_v

    model_dir = tiny_checkpoint("moe", "text")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == TINY_VOCAB
    specials = ("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>")
    assert [tok.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3, 105, 106]
    assert (model_dir / "chat_template.jinja").read_text().startswith("{#- Gemma 4 chat format")

    with pytest.raises(ValueError, match="unknown tiny model kind"):
        tiny_config("mixtral")


def test_layouts_hold_the_same_text_weights(tiny_checkpoint):
    text = transformers.Gemma4ForCausalLM.from_pretrained(tiny_checkpoint("moe", "text"), dtype=torch.float32)
    mm = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        tiny_checkpoint("moe", "multimodal"), dtype=torch.float32)
    ids = torch.tensor([[2, 105, 400, 420, 440, 460, 480, 500, 106]])
    with torch.no_grad():
        torch.testing.assert_close(text(ids).logits, mm(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_is_not_degenerate(tiny_checkpoint, kind):
    """Varied tokens with clear margins (fp32), so a decoder that misreads a tensor shows up."""
    model_dir = tiny_checkpoint(kind, "text")
    model = transformers.Gemma4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(model_dir)("What is 17 + 25?", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
        logits = model(out).logits[0, ids.shape[1] - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    assert len(set(out[0, ids.shape[1]:].tolist())) >= 6
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


def test_same_seed_same_bytes(tmp_path):
    a = write_checkpoint(tmp_path / "a", tiny_config("moe"), seed=3)
    b = write_checkpoint(tmp_path / "b", tiny_config("moe"), seed=3)
    c = write_checkpoint(tmp_path / "c", tiny_config("moe"), seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    shard = "model-00001-of-%05d.safetensors" % len(list(a.glob("model-*")))
    assert (a / shard).read_bytes() != (c / shard).read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tokenizer_is_reproducible_and_gemma_shaped():
    tok = build_tokenizer()
    assert tok.to_str() == build_tokenizer().to_str()
    assert tok.get_vocab_size() == TINY_VOCAB
    ids = {t: tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|think|>",
                                           "<|channel>", "<channel|>", "<|turn>", "<turn|>", "<0x00>", "<0xFF>")}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|think|>": 98,
                   "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106, "<0x00>": 107, "<0xFF>": 362}
    enc = tok.encode("What is 17 + 25?")
    assert enc.ids[0] == 2 and "1" in enc.tokens and "7" in enc.tokens  # BOS added, digits split
    assert any(t.startswith("▁") and len(t) > 1 for t in enc.tokens)  # merges learned across "▁word"
    assert tok.encode("✨").tokens == ["<bos>", "<0xE2>", "<0x9C>", "<0xA8>"]  # byte fallback
    with pytest.raises(ValueError, match="corpus too small"):
        build_tokenizer(["ab"], vocab_size=TINY_VOCAB)


def test_script_writes_a_checkpoint(tmp_path):
    out = tmp_path / "m"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(out),
                          "--kind", "dense_e2b", "--layout", "multimodal", "--seed", "2"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ref = write_checkpoint(tmp_path / "ref", tiny_config("dense_e2b"), layout="multimodal", seed=2)
    for f in ref.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
