"""4-bit experts in a whole model: the only error is the quantization itself.

The oracle is transformers run on a copy of the checkpoint whose expert matrices were replaced
by bitsandbytes' own quantize -> dequantize round trip (stored as float32, so no bf16 rounding
of the dequantized values), against localrun loading the original with 4-bit experts in fp32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from bitsandbytes import functional as bnbf
from safetensors.torch import load_file, save_file

from localrun.generate import generate
from localrun.loader import load_model
from localrun.sampling import SamplingParams, make_sampler
from quant.ffn import QuantizedExperts
from quant.nf4 import PackedExpert
from quant.spec import QuantSpec

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

GEN_TOKENS = 32
LOGIT_TOL = 1e-3
EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")


def round_trip(w: torch.Tensor, quant_type: str, blocksize: int = 64) -> torch.Tensor:
    """bitsandbytes quantize_4bit -> dequantize_4bit of one 2-D matrix, dequantized to float32."""
    codes, state = bnbf.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=quant_type)
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(codes, state)


def oracle_copy(src, dst, quant_type: str):
    """A copy of checkpoint `src` whose expert tensors hold the bnb round trip of each expert, in fp32."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    replaced = 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(dst / shard)
        if not any(k.endswith(EXPERT_SUFFIXES) for k in tensors):
            continue
        for name, t in tensors.items():
            if name.endswith(EXPERT_SUFFIXES):
                tensors[name] = torch.stack([round_trip(t[e], quant_type) for e in range(t.shape[0])])
                replaced += 1
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
    assert replaced > 0
    return dst


def reference(model_dir, layout):
    cls = transformers.Gemma4ForCausalLM if layout == "text" else transformers.Gemma4ForConditionalGeneration
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(107, 512, (n - 1,), generator=gen).tolist()


def assert_greedy_equal(tokens, expected, ref, prompt):
    """Equal greedy tokens, unless the first divergence is a genuine tie of the oracle's top two."""
    if tokens == expected:
        return
    first = next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + expected[:first]])).logits[0, -1]
    top2 = logits.topk(2).values
    assert (top2[0] - top2[1]).item() < LOGIT_TOL, f"tokens diverge at {first} without a tie"


CASES = [("moe", "text", "nf4"), ("moe", "multimodal", "nf4"), ("moe_v", "text", "nf4"),
         ("moe_v", "multimodal", "nf4"), ("moe", "text", "fp4")]


@pytest.mark.parametrize("kind,layout,quant_type", CASES)
def test_4bit_model_matches_transformers_on_round_tripped_experts(tiny_checkpoint, tmp_path, kind, layout, quant_type):
    src = tiny_checkpoint(kind, layout)
    ref = reference(oracle_copy(src, tmp_path / "oracle", quant_type), layout)
    ours = load_model(src, dtype=torch.float32, experts=quant_type).model
    ids = prompt_ids(40)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits
        got = ours(torch.tensor([ids]))
    assert (got - expected).abs().max().item() < LOGIT_TOL

    prompt = prompt_ids(20, seed=1)
    steps = list(generate(ours, prompt, make_sampler(SamplingParams()), max_tokens=GEN_TOKENS, prefill_chunk=6))
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=GEN_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0, min_new_tokens=GEN_TOKENS)
    assert len(steps) == GEN_TOKENS
    assert_greedy_equal([s.token for s in steps], out[0, len(prompt):].tolist(), ref, prompt)


def test_quantization_changes_the_logits(tiny_moe):
    """Guards the test above: 4-bit experts must differ from bf16 ones by far more than LOGIT_TOL."""
    ids = torch.tensor([prompt_ids(40)])
    with torch.no_grad():
        bf16 = load_model(tiny_moe, dtype=torch.float32, experts="bf16").model(ids)
        nf4 = load_model(tiny_moe, dtype=torch.float32, experts="nf4").model(ids)
    assert (bf16 - nf4).abs().max().item() > 100 * LOGIT_TOL


def non_expert_floats(model):
    rope = {id(b) for n, b in model.named_buffers() if n.startswith("inv_freq")}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t) for n, t in tensors if t.is_floating_point() and id(t) not in rope]


def assert_packed(expert: PackedExpert, args, spec: QuantSpec):
    H, I = args.hidden_size, args.moe_intermediate_size
    assert isinstance(expert, PackedExpert)
    assert expert.buffer.dtype == torch.uint8 and expert.buffer.dim() == 1
    assert expert.layout.spec == spec
    assert expert.layout.gate_up.shape == (2 * I, H) and expert.layout.down.shape == (H, I)
    assert expert.nbytes == spec.nbytes(2 * I * H) + spec.nbytes(H * I)


def test_default_load_is_bf16_with_4bit_experts(tiny_moe):
    loaded = load_model(tiny_moe)
    model, args = loaded.model, loaded.args
    assert loaded.experts == "nf4" and loaded.store is None
    floats = non_expert_floats(model)
    assert floats and all(t.dtype == torch.bfloat16 for _, t in floats), \
        [(n, t.dtype) for n, t in floats if t.dtype != torch.bfloat16]
    assert not any("experts" in n for n, _ in floats)  # no full-precision expert tensor left behind
    spec = QuantSpec("nf4")
    for layer in model.layers:
        assert layer.moe
        assert isinstance(layer.experts, QuantizedExperts)
        assert len(layer.experts.experts) == args.num_experts
        for e in layer.experts.experts:
            assert_packed(e, args, spec)


def test_a_dense_model_loads_with_the_default_experts(tiny_checkpoint):
    """A Gemma 4 without routed experts (E2B, E4B, 31B) at the default --experts nf4: nothing to quantize,
    the same logits as with bf16 (the loader once sized expert reads from the absent expert size)."""
    ids = torch.tensor([prompt_ids(12)])
    with torch.no_grad():
        logits = [load_model(tiny_checkpoint("dense_e2b"), dtype=torch.float32, experts=experts).model(ids)
                  for experts in (None, "fp4", "bf16")]
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[2])


def test_offloaded_load_keeps_every_payload_4bit(tiny_moe):
    loaded = load_model(tiny_moe, resident_fraction=0.5)
    model, args, store = loaded.model, loaded.args, loaded.store
    assert store is not None
    assert all(t.dtype == torch.bfloat16 for _, t in non_expert_floats(model))
    spec = QuantSpec("nf4")
    for i, layer in enumerate(model.layers):
        assert getattr(layer.experts, "store", None) is store and layer.experts.layer == i
        resident, host = store.resident_payloads(i), store.host_payloads(i)
        assert len(resident) == args.num_experts // 2
        assert not set(resident) & set(host) and set(resident) | set(host) == set(range(args.num_experts))
        for e in list(resident.values()) + list(host.values()):
            assert_packed(e, args, spec)


def test_experts_stored_in_two_dtypes_still_quantize(tiny_moe, tmp_path):
    """A checkpoint whose down_proj is fp16 beside a bf16 gate_up (a converted upload) packs the
    experts in gate_up's dtype (it was a ValueError naming the two dtypes) and gives the same tokens:
    the tiny model's bf16 weights survive fp16 and back."""
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_moe, mixed)
    changed = 0
    for shard in mixed.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith("experts.down_proj")]:
            tensors[name] = tensors[name].to(torch.float16)
            changed += 1
        save_file(tensors, shard, metadata={"format": "pt"})
    assert changed > 0
    ids = [2, 10, 11, 12]

    def tokens(path):
        loaded = load_model(path, dtype=torch.float32, experts="nf4")
        return [s.token for s in generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=6,
                                          cache=loaded.kv)]

    assert tokens(mixed) == tokens(tiny_moe)
