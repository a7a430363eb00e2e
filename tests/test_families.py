"""Checkpoints written by transformers itself: Gemma 4 in the installed version's spelling
(`per_layer_config` since 5.24) and both layouts, Qwen3-MoE and Mixtral in both expert layouts
(per expert, as save_pretrained writes them; fused, as transformers 5 holds them in memory).
The oracle is transformers on the same files, in fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from localrun.config import args_from_dict, load_config
from localrun.errors import LocalrunError
from localrun.generate import generate
from localrun import loader
from localrun.loader import load_model
from localrun.models import SUPPORTED_MODEL_TYPES, family, mixtral
from localrun.plan import Budget, make_plan
from localrun.prequant import quantize_checkpoint
from localrun.sampling import SamplingParams, make_sampler
from localrun.tiny import _VISION_CONFIG, _random_tensor, build_tokenizer, tiny_config, write_checkpoint
from quant.spec import QuantSpec

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
GEN_TOKENS = 40
VOCAB = 512

QWEN_TEMPLATE = (  # Qwen3's, shortened: the same enable_thinking switch
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=1)
FAMILIES = {
    # norm_topk_prob False here (Mixtral covers the renormalized router); layer 1 is a dense MLP
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **SMALL, head_dim=16, intermediate_size=96, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        norm_topk_prob=False, mlp_only_layers=[1], rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)),
}


def randomize(model: torch.nn.Module, prefix: str, seed: int = 0, embed_scale: float = 1.0) -> None:
    """The tiny factory's values (norms away from 1, clear greedy margins) for every tensor, by model key.
    embed_scale: what Gemma's sqrt(hidden) does for the others (else the token identity is lost)."""
    state = model.state_dict()
    new = {k: _random_tensor(k.removeprefix(prefix), v.shape, seed) for k, v in state.items() if v.is_floating_point()}
    new[prefix + "embed_tokens.weight"] *= embed_scale
    model.load_state_dict(new, strict=False)


def write_side_files(out: Path, chat_template: str | None = QWEN_TEMPLATE) -> None:
    (out / "tokenizer.json").write_text(build_tokenizer().to_str())
    cfg = {"bos_token": None, "eos_token": "<eos>", "pad_token": "<pad>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory):
    """moe_checkpoint(family, layout) -> a transformers-written tiny checkpoint, "per_expert" or "fused"."""
    built: dict = {}

    def get(family: str, layout: str = "per_expert") -> Path:
        if (family, layout) not in built:
            torch.manual_seed(0)
            model = FAMILIES[family]().eval()
            randomize(model, "model.", embed_scale=8.0)
            out = tmp_path_factory.mktemp(f"{family}-{layout}")
            model.save_pretrained(out)  # per expert: what transformers writes back out
            if layout == "fused":  # the layout transformers 5 computes with, saved as it is in memory
                for f in out.glob("model*.safetensors*"):
                    f.unlink()
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
            write_side_files(out)
            built[family, layout] = out
        return built[family, layout]

    return get


def reference_run(ref, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = ref(out[:, :-1]).logits[0, len(ids) - 1:]
    tokens = out[0, len(ids):]
    return tokens.tolist(), torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0]


def our_run(model, ids: list[int], n: int = GEN_TOKENS) -> tuple[list[int], torch.Tensor]:
    steps = list(generate(model, ids, make_sampler(SamplingParams()), max_tokens=n, prefill_chunk=7))
    return [s.token for s in steps], torch.tensor([s.logprob for s in steps])


def prompt(n: int = 20, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(107, VOCAB, (n - 1,), generator=gen).tolist()


def assert_same_run(ours, expected) -> None:
    (tokens, lp), (ref_tokens, ref_lp) = ours, expected
    assert tokens == ref_tokens
    assert (lp - ref_lp).abs().max() < 1e-3


# Qwen3-MoE and Mixtral ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_families_match_transformers(moe_checkpoint, family, layout, attention_path):
    model_dir = moe_checkpoint(family, layout)
    cls = transformers.AutoModelForCausalLM
    ref = cls.from_pretrained(moe_checkpoint(family), dtype=torch.float32).eval()
    ours = load_model(model_dir, dtype=torch.float32, experts="bf16").model
    assert_same_run(our_run(ours, prompt()), reference_run(ref, prompt()))
    assert len(set(our_run(ours, prompt(), 16)[0])) >= 6  # not degenerate: a misread tensor would show


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_families_4bit_same_tokens_whatever_the_placement(moe_checkpoint, family):
    model_dir = moe_checkpoint(family)
    runs = {}
    for fraction in (None, 1.0, 0.25, 0.0):
        loaded = load_model(model_dir, dtype=torch.float32, experts="nf4", resident_fraction=fraction)
        runs[fraction] = our_run(loaded.model, prompt(), 16)
        if fraction == 0.0:
            assert loaded.store is not None and loaded.store.stats()["misses"] > 0
    for fraction, (tokens, lp) in runs.items():
        assert tokens == runs[None][0], fraction
        assert torch.equal(lp, runs[None][1]), fraction


@pytest.mark.parametrize("most, most_bytes, per_read", [(3, 1 << 30, 3), (16, 2, 1)])  # by count; by bytes
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_families_quantize_a_chunk_of_experts_at_a_time(moe_checkpoint, family, layout, most, most_bytes,
                                                            per_read, monkeypatch):
    """Host RAM holds one chunk of a layer's bf16 experts while they are quantized (the plan's host reserve
    covers that), not the whole layer: Mixtral 8x7B's is 2.6 GiB, Qwen3-30B-A3B's 1.1 GiB."""
    model_dir = moe_checkpoint(family, layout)
    whole = load_model(model_dir, dtype=torch.float32, experts="nf4", resident_fraction=0.5)
    read = []
    real = loader.checkpoint_experts
    monkeypatch.setattr(loader, "QUANT_CHUNK_EXPERTS", most)
    monkeypatch.setattr(loader, "QUANT_CHUNK_BYTES", most_bytes)
    monkeypatch.setattr(loader, "checkpoint_experts", lambda *a: read.append(out := real(*a)) or out)
    chunked = load_model(model_dir, dtype=torch.float32, experts="nf4", resident_fraction=0.5)
    assert read and max(t.shape[0] for pair in read for t in pair) == per_read
    (tokens, lp), (whole_tokens, whole_lp) = our_run(chunked.model, prompt(), 12), our_run(whole.model, prompt(), 12)
    assert tokens == whole_tokens and torch.equal(lp, whole_lp)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_families_quantize_round_trips(moe_checkpoint, family, tmp_path):
    model_dir = moe_checkpoint(family)
    out = quantize_checkpoint(model_dir, tmp_path / "q", QuantSpec("nf4"))
    assert load_config(out).model_type == family
    direct, stored = load_model(model_dir, experts="nf4"), load_model(out)  # bf16: what OUT stores the rest in
    for a, b in zip(direct.model.layers, stored.model.layers):
        assert a.moe == b.moe
        if a.moe:
            assert all(torch.equal(x.buffer, y.buffer) for x, y in zip(a.experts.experts, b.experts.experts))
    (tokens, lp), (stored_tokens, stored_lp) = our_run(direct.model, prompt(), 12), our_run(stored.model, prompt(), 12)
    assert tokens == stored_tokens and torch.equal(lp, stored_lp)


def test_mixtral_names_map_onto_the_shared_model():
    args = mixtral.args_from_dict(json.loads((REFERENCE / "mixtral-8x7b.config.json").read_text()))
    names = {
        "model.layers.3.block_sparse_moe.gate.weight": "layers.3.mlp.gate.weight",
        "model.layers.3.block_sparse_moe.experts.7.w1.weight": "layers.3.mlp.experts.7.gate_proj.weight",
        "model.layers.3.block_sparse_moe.experts.7.w3.weight": "layers.3.mlp.experts.7.up_proj.weight",
        "model.layers.3.block_sparse_moe.experts.7.w2.weight": "layers.3.mlp.experts.7.down_proj.weight",
        "model.layers.3.self_attn.q_proj.weight": "layers.3.self_attn.q_proj.weight",
        "lm_head.weight": "lm_head.weight",
        "other.x": None,
    }
    assert {n: mixtral.sanitize(args, n) for n in names} == names
    assert (args.num_experts, args.top_k_experts, args.moe_intermediate_size, args.head_dim) == (8, 2, 14336, 128)
    assert args.norm_topk_prob and not args.qk_norm and args.rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_family_checkpoint_runs_through_the_cli(cli, moe_checkpoint, family):
    model_dir = moe_checkpoint(family)
    code, out, err = cli("run", model_dir, "hello", "--json", "-n", "4", "--dtype", "float32", "--device", "cpu",
                         "--ignore-eos", "--resident-experts", "0.5")
    assert code == 0, err
    res = json.loads(out)
    assert len(res["tokens"]) == 4
    memory = res["memory"]  # what the loader placed is what the plan said, to the byte
    assert memory["device_bytes"] == memory["planned_device_bytes"], memory
    assert memory["host_bytes"] == memory["planned_host_bytes"] > 0, memory
    if family == "mixtral":
        return
    code, out, err = cli("fit", model_dir, "--vram", "2GiB", "--json")
    assert code == 0, err
    assert json.loads(out)["resident_experts_per_layer"] == 8


# Gemma 4 as transformers writes it ---------------------------------------------------------------

def gemma_from_transformers(out: Path, layout: str, dtype: torch.dtype, kind: str = "moe") -> Path:
    """A tiny Gemma 4 built by transformers' own classes and saved with save_pretrained (its spelling)."""
    text = {k: v for k, v in tiny_config(kind).items() if k != "model_type"}
    text_config = transformers.Gemma4TextConfig(**text)
    if layout == "text":
        model = transformers.Gemma4ForCausalLM(text_config)
        prefix = "model."
    else:
        vision = {k: v for k, v in _VISION_CONFIG.items() if k != "model_type"}
        config = transformers.Gemma4Config(text_config=text_config.to_dict(), vision_config=vision,
                                           audio_config=None, eos_token_id=[1, 106])
        model = transformers.Gemma4ForConditionalGeneration(config)
        prefix = "model.language_model."
    randomize(model.eval(), prefix)
    model.to(dtype).save_pretrained(out)
    write_side_files(out, chat_template=None)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_gemma4_saved_by_transformers_matches_it(tmp_path, layout, dtype):
    model_dir = gemma_from_transformers(tmp_path / "g", layout, dtype)
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    assert "per_layer_config" in text or "global_head_dim" in text  # a new spelling fails here, not for a user
    # A bf16 checkpoint is compared with transformers loading it in fp32 (not bf16 then .float(), which
    # would keep buffers such as the embedding scale rounded to bf16).
    ref = transformers.AutoModelForImageTextToText if layout == "multimodal" else transformers.AutoModelForCausalLM
    ref = ref.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = load_model(model_dir, dtype=torch.float32, experts="bf16").model
    assert_same_run(our_run(ours, prompt()), reference_run(ref, prompt()))


def test_gemma4_both_spellings_are_the_same_model(tiny_checkpoint, tmp_path):
    old = tiny_checkpoint("moe", "text")
    new = tmp_path / "new"
    shutil.copytree(old, new)
    config = json.loads((old / "config.json").read_text())
    assert "global_head_dim" in config and "per_layer_config" not in config
    head_dim, kv_heads = config.pop("global_head_dim"), config.pop("num_global_key_value_heads")
    full = [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"]
    config["per_layer_config"] = {str(i): {"head_dim": head_dim, "num_key_value_heads": kv_heads} for i in full}
    (new / "config.json").write_text(json.dumps(config))
    a, b = load_config(old), load_config(new)
    assert [(a.layer_head_dim(i), a.layer_kv_heads(i)) for i in range(6)] == \
           [(b.layer_head_dim(i), b.layer_kv_heads(i)) for i in range(6)] == [(16, 2), (16, 2), (32, 1)] * 2
    ids = torch.tensor([prompt(24)])
    with torch.no_grad():
        expected = load_model(old, dtype=torch.float32, experts="bf16").model(ids)
        got = load_model(new, dtype=torch.float32, experts="bf16").model(ids)
    assert torch.equal(expected, got)


# checkpoint_shapes: the layout fit plans, bench --random-weights draws and the factory writes ---------

GEMMA_BIAS = tiny_config("moe", attention_bias=True)  # transformers' Gemma4TextAttention then has four biases


@pytest.mark.parametrize("config", [
    GEMMA_BIAS, tiny_config("moe_v", attention_bias=True, tie_word_embeddings=False),
    tiny_config("dense_e2b", attention_bias=True),
    dict(SMALL, model_type="qwen3_moe", intermediate_size=96, num_experts=8, num_experts_per_tok=2,
         moe_intermediate_size=128, attention_bias=True, decoder_sparse_step=2, mlp_only_layers=[3]),
    dict(SMALL, model_type="mixtral", intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
], ids=["gemma4-bias", "gemma4-v-bias-untied", "gemma4-e2b-bias", "qwen3_moe-bias-sparse-step", "mixtral"])
def test_checkpoint_shapes_name_every_tensor_the_model_reads(config):
    args = args_from_dict(config)
    with torch.device("meta"):
        model = family(args.model_type).Model(args)
    assert family(args.model_type).checkpoint_shapes(args) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_gemma4_with_attention_biases_is_planned_as_placed(tmp_path):
    """fit's plan counts the biases the loader places, and random weights (bench --random-weights) hold them."""
    from localrun.synthetic import RandomCheckpoint

    model_dir = write_checkpoint(tmp_path / "bias", GEMMA_BIAS)
    for ckpt in (None, RandomCheckpoint(load_config(model_dir))):
        loaded = load_model(model_dir, dtype=torch.float32, experts="bf16", checkpoint=ckpt)
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None
        assert loader.memory_report(loaded)["device_bytes"] == loaded.plan.placed_device_bytes


@pytest.mark.parametrize("family, layout", [("qwen3_moe", "per_expert"), ("qwen3_moe", "fused"),
                                            ("mixtral", "per_expert"), ("gemma4", "fused")])
def test_experts_of_another_size_than_the_config_says_are_named(cli, capsys, moe_checkpoint, tiny_moe, family,
                                                               layout, tmp_path):
    """Only the experts hold the expert intermediate size: weights of another one than config.json's are the
    one-line shape error on every path (fit, run at either precision, quantize), never a crash in a copy
    nor a model run at the weights' size under a plan made for the config's."""
    model = shutil.copytree(tiny_moe if family == "gemma4" else moe_checkpoint(family, layout), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    size = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    cfg[size] *= 2
    (model / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # transformers' progress while the fixture saved the checkpoint
    for argv in (["fit", model, "--cpu"], ["run", model, "hi", "-n", "1", "--experts", "bf16"],
                 ["run", model, "hi", "-n", "1"], ["quantize", model, tmp_path / "q"]):
        code, out, err = cli(*argv)
        assert code == 1 and err.count("\n") == 1 and "experts" in err and "config" in err, (argv, err)
        assert "Traceback" not in err and not (tmp_path / "q").exists()


# What localrun refuses, in one line ---------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama4"}, "unsupported model_type 'llama4'; supported: " + ", ".join(SUPPORTED_MODEL_TYPES)),
    ({"per_layer_config": {"2": {"head_dim": 32, "sliding_window": 3}}}, "per_layer_config['2'] sets 'sliding_window'"),
    ({"per_layer_config": {"9": {"head_dim": 32}}}, "per_layer_config['9'] must be a dict for a layer in 0..5"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}}, "rope_type 'yarn'"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention 'all' is not implemented"),
    # other families' flat spelling would leave every layer on the defaults: transformers fails on it too
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}},
     "rope_parameters must be keyed by layer type (sliding_attention, full_attention), not 'rope_type'"),
])
def test_gemma4_settings_localrun_lacks_are_errors(change, message):
    with pytest.raises(LocalrunError) as e:
        args_from_dict({**tiny_config("moe"), **change})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_null_rope_parameters_are_the_defaults():
    assert args_from_dict({**tiny_config("moe"), "rope_parameters": None}).rope_parameters == \
        args_from_dict({k: v for k, v in tiny_config("moe").items() if k != "rope_parameters"}).rope_parameters


def test_per_layer_values_equal_to_the_global_ones_are_fine():
    per_layer = {"2": {"head_dim": 32, "sliding_window": 8}, "5": {"head_dim": 32}}
    args = args_from_dict({**tiny_config("moe"), "per_layer_config": per_layer})
    assert args.layer_head_dim(2) == 32 and args.layer_kv_heads(2) == 2  # the older kv override is not implied
    with pytest.raises(LocalrunError, match=r"full_attention layers with different head dims \[16, 32\]"):
        args_from_dict({**tiny_config("moe"), "per_layer_config": {"2": {"head_dim": 32}}})


def test_moe_family_settings_localrun_lacks_are_errors():
    qwen = json.loads((REFERENCE / "qwen3-30b-a3b.config.json").read_text())
    with pytest.raises(LocalrunError, match="rope_type 'dynamic' is not implemented"):
        args_from_dict({**qwen, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    with pytest.raises(LocalrunError, match="rope_scaling.original_max_position_embeddings must be a positive integer"):
        args_from_dict({**qwen, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(LocalrunError, match="rope_scaling.factor must be a number >= 1"):
        args_from_dict({**qwen, "rope_scaling": {"type": "linear", "factor": "2"}})
    with pytest.raises(LocalrunError, match="hidden_act 'relu2' is not implemented"):
        args_from_dict({**qwen, "hidden_act": "relu2"})


# Scaled RoPE: Qwen's cards extend the context with YaRN in config.json -----------------------------

QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # the model card's


def test_qwen3_with_the_model_cards_yarn_reaches_128k():
    qwen = json.loads((REFERENCE / "qwen3-30b-a3b.config.json").read_text())
    assert args_from_dict(qwen).max_position_embeddings == 40960
    assert args_from_dict({**qwen, "rope_scaling": QWEN_YARN}).max_position_embeddings == 131072
    # added to a config transformers 5 wrote (rope_parameters): it scales them, their theta kept
    saved = {k: v for k, v in qwen.items() if k not in ("rope_theta", "rope_scaling")}
    saved["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    args = args_from_dict({**saved, "rope_scaling": {"type": "yarn", **{k: v for k, v in QWEN_YARN.items()
                                                                         if k != "rope_type"}}})
    assert args.rope_parameters == {**QWEN_YARN, "rope_theta": 1e6} and args.max_position_embeddings == 131072
    assert args_from_dict({**saved, "rope_scaling": None}).rope_parameters == saved["rope_parameters"]


@pytest.mark.parametrize("family, scaling", [
    # tiny original contexts, so a 60-token run goes well past them
    ("qwen3_moe", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    ("qwen3_moe", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 8,
                   "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5}),
    ("mixtral", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 24, "attention_factor": 1.3}),
    # factor null (DeepSeek-V3's spelling): transformers takes max_position_embeddings (4096) / 512
    ("qwen3_moe", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 512}),
    ("mixtral", {"rope_type": "linear", "factor": 3.0}),
])
def test_scaled_rope_matches_transformers(tmp_path, family, scaling, attention_path):
    torch.manual_seed(0)
    config = FAMILIES[family]().config
    config.rope_parameters = {**config.rope_parameters, **scaling}
    config.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads  # transformers' YaRN needs it
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model, "model.", embed_scale=8.0)
    model.save_pretrained(tmp_path)
    write_side_files(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path, dtype=torch.float32, experts="bf16").model
    expected = reference_run(ref, prompt())
    assert_same_run(our_run(ours, prompt()), expected)
    static = list(generate(ours, prompt(), make_sampler(SamplingParams()), max_tokens=GEN_TOKENS, step="static"))
    assert [s.token for s in static] == expected[0]


# fit on the real configs -------------------------------------------------------------------------

def reference_plan(name: str, vram_gib: float, context: int = 8192):
    args = args_from_dict(json.loads((REFERENCE / name).read_text()))
    return make_plan(args, Budget(device_bytes=int(vram_gib * 2**30), context=context))


def test_fit_qwen3_30b_a3b():
    plan = reference_plan("qwen3-30b-a3b.config.json", 24)
    experts = plan.component("experts_resident").nbytes
    non_expert = sum(plan.component(g).nbytes for g in ("embed", "attention", "mlp", "router", "norms"))
    assert 3.0e9 < non_expert < 3.2e9  # bf16: 2 x 151936 x 2048 embed/lm_head + 48 x attention
    assert abs(experts - 48 * 128 * 3 * 768 * 2048 * 4.5 / 8) < 0.01e9  # 4.5 bits a weight: 16.3 GB
    assert plan.fits and plan.resident_experts_per_layer == 128
    small = reference_plan("qwen3-30b-a3b.config.json", 16)
    assert small.fits and 0 < small.resident_experts_per_layer < 128 and small.cache_slots == 8  # per layer


def test_fit_mixtral_8x7b():
    plan = reference_plan("mixtral-8x7b.config.json", 24)
    assert plan.fits and 0 < plan.resident_experts_per_layer < 8
    assert f"the other {8 - plan.resident_experts_per_layer} per layer" in plan.reason
    assert plan.kv_bytes == 2 * 8192 * 8 * 128 * 2 * 32


def test_qwen_chat_template_from_tokenizer_config(moe_checkpoint, tmp_path):
    from localrun.engine import Engine

    engine = Engine.load(moe_checkpoint("qwen3_moe"), dtype=torch.float32, experts="bf16")
    assert engine.tokenizer.bos_id is None
    text = engine.tokenizer.decode(engine.encode_prompt("hi"))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert engine.tokenizer.decode(engine.encode_prompt("hi", enable_thinking=True)).endswith("assistant\n")
    engine.template = None  # a checkpoint that ships none: raw prompts only, and the error says so
    with pytest.raises(LocalrunError, match="no chat template.*--raw"):
        engine.encode_prompt("hi")
    assert engine.encode_prompt("hi", raw=True) == engine.tokenizer.encode("hi")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_families_static_decode_step_is_the_eager_one(moe_checkpoint, family):
    model = load_model(moe_checkpoint(family), dtype=torch.float32, experts="bf16").model
    runs = [list(generate(model, prompt(), make_sampler(SamplingParams()), max_tokens=12, step=step))
            for step in ("eager", "static")]
    assert [s.token for s in runs[0]] == [s.token for s in runs[1]]
    assert torch.allclose(torch.tensor([s.logprob for s in runs[0]]), torch.tensor([s.logprob for s in runs[1]]),
                          atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_moe_families_segmented_step_is_the_eager_one(moe_checkpoint, family, fraction):
    """With experts in host RAM, the step cut at each MoE layer's experts (what SegmentedGraphStep
    captures between them on CUDA; here its segments run in order) gives the eager tokens and
    logprobs, dense MLP layers (Qwen3's mlp_only_layers) included."""
    from localrun.step import SegmentedGraphStep, make_step

    loaded = load_model(moe_checkpoint(family), dtype=torch.float32, resident_fraction=fraction, context=64)
    assert isinstance(make_step(loaded.model, loaded.kv, "segments"), SegmentedGraphStep)
    runs = [list(generate(loaded.model, prompt(), make_sampler(SamplingParams()), max_tokens=12, step=step,
                          cache=loaded.kv)) for step in ("eager", "segments")]
    assert [s.token for s in runs[0]] == [s.token for s in runs[1]]
    assert [s.logprob for s in runs[0]] == [s.logprob for s in runs[1]]


def test_qwen3_static_step_writes_kv_in_one_kernel_where_cuda_would(moe_checkpoint, monkeypatch):
    """The device check patched as if on CUDA, Qwen3's static step hands each layer's k (normed,
    RoPE'd), v (as projected, norm_v False) and q (normed, RoPE'd, returned) to one qkv_write, and decodes the
    eager tokens."""
    from localrun import kvcache
    from localrun.models import gemma4, qwen3_moe

    calls = []
    write = kvcache.qkv_write
    monkeypatch.setattr(kvcache, "qkv_write", lambda *args: calls.append(args) or write(*args))
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", False)  # the write alone (below: with it)
    model = load_model(moe_checkpoint("qwen3_moe"), dtype=torch.float32, experts="bf16").model
    eager = list(generate(model, prompt(), make_sampler(SamplingParams()), max_tokens=8, step="eager"))
    for module in (gemma4, qwen3_moe):
        monkeypatch.setattr(module, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
    static = list(generate(model, prompt(), make_sampler(SamplingParams()), max_tokens=8, step="static"))
    assert [s.token for s in static] == [s.token for s in eager]
    assert len(calls) == 7 * len(model.layers) and not any(args[-1] for args in calls)


def test_qwen3_static_step_attends_in_the_write_launch(moe_checkpoint, monkeypatch):
    """With fused_qkv_attention (the default) Qwen3's static step attends in the q/k/v write's launch
    (`qkv_attention`, here its CPU formula): v as projected (norm_v False), the layer's own scale (with
    YaRN's factor), no separate qkv_write; the tokens and logprobs are those of the write then attention."""
    from localrun import kvcache
    from localrun.models import gemma4, qwen3_moe

    fused, writes = [], []
    attend_in_write, write = kvcache.qkv_attention, kvcache.qkv_write
    monkeypatch.setattr(kvcache, "qkv_attention", lambda *args: fused.append(args) or attend_in_write(*args))
    monkeypatch.setattr(kvcache, "qkv_write", lambda *args: writes.append(args) or write(*args))
    for module in (gemma4, qwen3_moe):
        monkeypatch.setattr(module, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
    model = load_model(moe_checkpoint("qwen3_moe"), dtype=torch.float32, experts="bf16").model
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", False)
    apart = [(s.token, s.logprob) for s in generate(model, prompt(), make_sampler(SamplingParams()), max_tokens=8,
                                                    step="static")]
    assert writes and not fused
    writes.clear()
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", True)
    together = [(s.token, s.logprob) for s in generate(model, prompt(), make_sampler(SamplingParams()),
                                                       max_tokens=8, step="static")]
    assert together == apart
    assert len(fused) == 7 * len(model.layers) and not writes
    assert {args[13] for args in fused} == {False}  # norm_v
    assert {args[-1] for args in fused} == {model.layers[0].self_attn.scale}
