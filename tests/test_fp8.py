"""Block-scaled FP8 checkpoints (Qwen's and DeepSeek's `quant_method: fp8`), read as bf16.

The oracle is transformers loading the same FP8 files (on a machine without FP8 kernels it
dequantizes them to the model's dtype) and its own dequantization routine; every other
quantization a config.json can name is a one-line error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from localrun.checkpoint import open_checkpoint
from localrun.config import FloatWeights, load_config, read_quantization
from localrun.errors import LocalrunError
from localrun.fp8 import Fp8Checkpoint, dequantize
from localrun.loader import load_model
from localrun.prequant import quantize_checkpoint
from quant.spec import QuantSpec

from test_families import (FAMILIES, assert_same_run, gemma_from_transformers, our_run, prompt, randomize,
                           reference_run, write_side_files)

transformers = pytest.importorskip("transformers")

FP8_MAX = 448.0  # the largest e4m3 value


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, fp32 scale per block) of a [..., rows, cols] matrix, as the FP8 releases are made:
    each block scaled so its largest magnitude is FP8_MAX; a partial last block is a block of its own."""
    rows, cols = w.shape[-2:]
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(*w.shape[:-2], grid[0] * block[0], grid[1] * block[1])
    padded[..., :rows, :cols] = w.float()
    blocks = padded.unflatten(-1, (grid[1], block[1])).unflatten(-3, (grid[0], block[0]))
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX
    codes = (blocks / scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :rows, :cols]
    return codes.to(torch.float8_e4m3fn), scale


def quantize_ct(w: torch.Tensor, strategy: str, block=(16, 16), group=16) -> dict[str, torch.Tensor]:
    """compressed-tensors' FP8 of a [rows, cols] matrix, as llm-compressor writes it: {"": codes, "_scale": scales
    (bf16, as its releases hold them), "_shape_original": for blocks that needed padding}."""
    rows, cols = w.shape
    if strategy == "tensor":
        grid = (1, 1)
    elif strategy == "channel":
        grid = (rows, 1)
    elif strategy == "group":
        grid = (rows, cols // group)
    else:
        grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    height, width = block if strategy == "block" else (math.ceil(rows / grid[0]), math.ceil(cols / grid[1]))
    padded = torch.zeros(grid[0] * height, grid[1] * width)
    padded[:rows, :cols] = w.float()
    blocks = padded.unflatten(1, (grid[1], width)).unflatten(0, (grid[0], height))
    scale = (blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX).to(torch.bfloat16)
    codes = (blocks / scale.float()[:, None, :, None]).flatten(2).flatten(0, 1)
    out = {"_scale": scale.reshape(1) if strategy == "tensor" else scale}
    if strategy == "block" and padded.shape != w.shape:
        out["_shape_original"] = torch.tensor([rows, cols])
    else:
        codes = codes[:rows, :cols]
    out[""] = codes.to(torch.float8_e4m3fn)
    return out


def ct_config(strategy: str, block=(16, 16), group=16) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = list(block)
    if strategy == "group":
        weights["group_size"] = group
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": {
                "num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}}},
            "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"]}


def to_compressed_tensors(src: Path, out: Path, strategy: str, **shape) -> Path:
    """A copy of checkpoint `src` in compressed-tensors' FP8 (`strategy`: tensor, channel, group or block)."""
    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if is_quantized_matrix(name, t) and t.dim() == 2:
            return {name + suffix: v for suffix, v in quantize_ct(t, strategy, **shape).items()}
        return {name: t}

    return rewrite_checkpoint(src, out, convert, ct_config(strategy, **shape))


def rewrite_checkpoint(src: Path, out: Path, convert, quantization_config: dict) -> Path:
    """A copy of checkpoint `src` in one shard, each tensor replaced by what convert(name, tensor) gives
    ({name: tensor}), and config.json's quantization_config set."""
    shutil.copytree(src, out)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v for name, t in tensors.items() for k, v in convert(name, t).items()}, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def is_quantized_matrix(name: str, t: torch.Tensor) -> bool:
    """What the FP8 releases quantize: projection matrices and experts; not embeddings, norms, routers, lm_head."""
    skip = ("embed", "norm", "lm_head", "mlp.gate.weight", "block_sparse_moe.gate.weight", "router", "vision")
    return t.dim() >= 2 and t.is_floating_point() and not any(s in name for s in skip)


def to_fp8(src: Path, out: Path, block: tuple[int, int], method: dict | None = None) -> Path:
    """A copy of checkpoint `src` with its matrices in block-scaled FP8 (weight + weight_scale_inv)."""
    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if is_quantized_matrix(name, t):
            return dict(zip((name, name + "_scale_inv"), quantize_fp8(t, block)))
        return {name: t}

    return rewrite_checkpoint(src, out, convert, method or {"quant_method": "fp8", "fmt": "e4m3",
                                                            "activation_scheme": "dynamic",
                                                            "weight_block_size": list(block)})


def per_expert_checkpoint(family: str, out: Path) -> Path:
    """A tiny checkpoint saved by transformers (per-expert names, as the FP8 releases store them), in bf16."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    randomize(model, "model.", embed_scale=8.0)
    model.to(torch.bfloat16).save_pretrained(out)
    write_side_files(out)
    return out


# Dequantization --------------------------------------------------------------------------------

def test_dequantize_is_transformers_dequantization():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    gen = torch.Generator().manual_seed(0)
    for shape, block in [((256, 384), (128, 128)), ((3, 64, 96), (32, 16)), ((48, 48), (48, 48))]:
        codes, scale = quantize_fp8(torch.randn(shape, generator=gen), block)
        expected = Fp8Dequantize(None)._dequantize_one(codes, scale, output_dtype=torch.bfloat16)
        assert torch.equal(dequantize(codes, scale, block), expected)


def test_dequantize_gives_each_partial_block_its_own_scale():
    codes = torch.ones(5, 7).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # blocks of 3 x 3 over 5 x 7
    out = dequantize(codes, scale, (3, 3)).float()
    expected = torch.tensor([[scale[i // 3, j // 3].item() for j in range(7)] for i in range(5)])
    assert torch.equal(out, expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), cols=st.integers(1, 20), b0=st.integers(1, 16), b1=st.integers(1, 16),
       cut=st.tuples(st.integers(0, 40), st.integers(0, 40)), experts=st.sampled_from([0, 3]))
def test_rows_read_alone_are_the_rows_of_the_whole_matrix(tmp_path_factory, rows, cols, b0, b1, cut, experts):
    """The loader reads experts and shards of rows on their own: each piece dequantizes as in the whole."""
    shape = (experts, rows, cols) if experts else (rows, cols)
    codes, scale = quantize_fp8(torch.randn(shape, generator=torch.Generator().manual_seed(rows * cols)), (b0, b1))
    d = tmp_path_factory.mktemp("fp8rows")
    save_file({"w": codes, "w_scale_inv": scale, "w.input_scale": torch.ones(1)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                      "weight_block_size": [b0, b1]}}))
    ckpt = open_checkpoint(d)
    assert set(ckpt.tensors) == {"w"} and ckpt.tensors["w"].dtype == torch.bfloat16
    whole = ckpt.read("w")
    assert torch.equal(whole, dequantize(codes, scale, (b0, b1)))
    start, stop = sorted(min(c, shape[0]) for c in cut)
    assert torch.equal(ckpt.read_rows("w", start, stop), whole[start:stop])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), groups=st.integers(1, 4), b0=st.integers(1, 16), b1=st.integers(1, 16),
       cut=st.tuples(st.integers(0, 40), st.integers(0, 40)),
       strategy=st.sampled_from(["tensor", "channel", "group", "block"]))
def test_compressed_tensors_rows_read_alone_are_the_rows_of_the_whole_matrix(tmp_path_factory, rows, groups, b0, b1,
                                                                             cut, strategy):
    cols = groups * b1
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    stored = quantize_ct(w, strategy, block=(b0, b1), group=b1)
    d = tmp_path_factory.mktemp("ctrows")
    save_file({"w" + suffix: t for suffix, t in stored.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"quantization_config": ct_config(strategy, (b0, b1), b1)}))
    ckpt = open_checkpoint(d)
    assert set(ckpt.tensors) == {"w"} and ckpt.tensors["w"].shape == (rows, cols)
    whole = ckpt.read("w")
    assert whole.is_contiguous() and (whole.float() - w).abs().max() <= w.abs().max() / 8  # FP8: 3 mantissa bits
    start, stop = sorted(min(c, rows) for c in cut)
    piece = ckpt.read_rows("w", start, stop)
    assert piece.is_contiguous() and torch.equal(piece, whole[start:stop])


# Models against transformers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    built: dict = {}

    def get(family: str, block=(32, 32)) -> Path:  # transformers takes only blocks that divide every matrix
        if (family, block) not in built:
            root = tmp_path_factory.mktemp(f"fp8-{family}")
            built[family, block] = to_fp8(per_expert_checkpoint(family, root / "bf16"), root / "fp8", block)
        return built[family, block]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp8_checkpoint_matches_transformers(fp8_checkpoint, family):
    pytest.importorskip("accelerate")  # transformers' FP8 loading needs it
    model_dir = fp8_checkpoint(family)
    # transformers dequantizes into the model's dtype (bf16, what localrun keeps), then computes in fp32
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).float().eval()
    ours = load_model(model_dir, dtype=torch.float32, experts="bf16").model
    assert_same_run(our_run(ours, prompt()), reference_run(ref, prompt()))


def test_gemma4_fp8_is_the_bf16_checkpoint_of_its_dequantized_weights(tmp_path):
    """Gemma 4's fused [E, 2I, H] experts carry one grid of scales per expert: the FP8 checkpoint gives,
    bit for bit, what a bf16 checkpoint holding the dequantized weights gives."""
    src = gemma_from_transformers(tmp_path / "g", "text", torch.bfloat16)
    fp8 = to_fp8(src, tmp_path / "fp8", (16, 24))
    plain = tmp_path / "plain"
    shutil.copytree(fp8, plain)
    stored = load_file(plain / "model.safetensors")
    save_file({n: dequantize(t, stored[n + "_scale_inv"], (16, 24)) if t.dtype == torch.float8_e4m3fn else t
               for n, t in stored.items() if not n.endswith("_scale_inv")}, str(plain / "model.safetensors"))
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    assert any(t.dim() == 3 and t.dtype == torch.float8_e4m3fn for t in stored.values())
    runs = [our_run(load_model(d, dtype=torch.float32, experts="bf16").model, prompt()) for d in (fp8, plain)]
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("family, strategy, shape", [
    ("qwen3_moe", "channel", {}),  # FP8-dynamic: what llm-compressor's FP8_DYNAMIC scheme writes
    ("mixtral", "tensor", {}),
])
def test_compressed_tensors_fp8_matches_transformers(tmp_path, family, strategy, shape):
    pytest.importorskip("compressed_tensors")  # transformers' compressed-tensors loading needs it
    model_dir = to_compressed_tensors(per_expert_checkpoint(family, tmp_path / "bf16"), tmp_path / "ct", strategy,
                                      **shape)
    config = transformers.CompressedTensorsConfig(run_compressed=False)  # dequantized into the model's bf16
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                            quantization_config=config).float().eval()
    ours = load_model(model_dir, dtype=torch.float32, experts="bf16").model
    assert_same_run(our_run(ours, prompt()), reference_run(ref, prompt()))
    ckpt = open_checkpoint(model_dir)
    assert not any(n.endswith(("_scale", "_shape_original")) for n in ckpt.tensors)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ckpt.read(name), ref.state_dict()[name].bfloat16())  # the very weights transformers has


@pytest.mark.parametrize("family, strategy, shape", [
    ("qwen3_moe", "group", {"group": 32}),
    ("mixtral", "block", {"block": (48, 40)}),  # blocks that do not divide the matrices: padded codes
    ("qwen3_moe", "block", {"block": (16, 32)}),
])
def test_compressed_tensors_fp8_is_what_compressed_tensors_dequantizes(tmp_path, family, strategy, shape):
    """Groups and blocks (transformers 5.24 cannot load them into MoE experts): every matrix localrun reads
    is what compressed-tensors' own dequantize gives, and the model runs as the bf16 checkpoint of them."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    model_dir = to_compressed_tensors(per_expert_checkpoint(family, tmp_path / "bf16"), tmp_path / "ct", strategy,
                                      **shape)
    weights = ct_config(strategy, **shape)["config_groups"]["group_0"]["weights"]
    args = ct.QuantizationArgs(**{k: v for k, v in weights.items() if k != "dynamic"})
    stored = load_file(model_dir / "model.safetensors")
    ckpt = open_checkpoint(model_dir)
    plain = {}
    for name, t in stored.items():
        if t.dtype == torch.float8_e4m3fn:
            expected = ct_dequantize(t, stored[name + "_scale"], args=args, dtype=torch.float32)
            if name + "_shape_original" in stored:
                rows, cols = stored[name + "_shape_original"].tolist()
                expected = expected[:rows, :cols]
            plain[name] = expected.to(torch.bfloat16).contiguous()
            assert torch.equal(ckpt.read(name), plain[name]), name
        elif not name.endswith(("_scale", "_shape_original")):
            plain[name] = t
    reference = tmp_path / "plain"
    reference.mkdir()
    save_file(plain, str(reference / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "bf16" / f, reference / f)
    runs = [our_run(load_model(d, dtype=torch.float32, experts="bf16").model, prompt()) for d in (model_dir, reference)]
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_quantize_of_an_fp8_checkpoint_is_a_plain_localrun_checkpoint(fp8_checkpoint, tmp_path):
    model_dir = fp8_checkpoint("qwen3_moe")
    out = quantize_checkpoint(model_dir, tmp_path / "q", QuantSpec("nf4"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    direct = our_run(load_model(model_dir, dtype=torch.float32, experts="nf4").model, prompt())
    tokens, logprobs = our_run(load_model(out, dtype=torch.float32).model, prompt())
    assert tokens == direct[0] and torch.equal(logprobs, direct[1])


# What localrun refuses -------------------------------------------------------------------------

@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "gptq", "bits": 4}, "pre-quantized (quant_method 'gptq')"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "pre-quantized (quant_method 'bitsandbytes')"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
     "pre-quantized (compressed-tensors int 4-bit weights (pack-quantized, group))"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": False}}}}, "compressed-tensors float 8-bit"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "tensor"}}}, "sparsity_config": {"format": "sparse-24-bitmask"}},
     "compressed-tensors with sparse-24-bitmask sparsity"),
    ({"quant_method": "compressed-tensors"}, "config_groups must be an object"),
    ({"bits": 4}, "without quant_method"),
    ("fp8", "without quant_method"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be [rows, columns]"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size must be [rows, columns]"),
])
def test_quantizations_localrun_cannot_read_are_named(tiny_checkpoint, tmp_path, quant, message):
    d = tmp_path / "m"
    shutil.copytree(tiny_checkpoint(), d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = quant
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(LocalrunError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(d)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=8))
def test_any_quantization_config_is_read_or_refused_in_one_line(value):
    for config in ({"quantization_config": value},
                   {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                            "config_groups": value}},
                   {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                            "config_groups": {"g": {"weights": value}}}},
                   {"quantization_config": {"quant_method": "fp8", "weight_block_size": value}}):
        try:
            layout = read_quantization(config)
        except LocalrunError as e:
            assert "\n" not in str(e)
        else:
            assert layout is None or isinstance(layout, FloatWeights)
            assert layout is None or layout.block is None or all(isinstance(b, int) and b > 0 for b in layout.block)


@pytest.mark.parametrize("other", ["channel", "tensor", "block"])
def test_compressed_tensors_groups_of_different_blocks_are_refused(other):
    """A block group beside a group of other scales: the block cannot come from the scale grid (a
    192-row matrix in 128-row blocks has a 2-row grid, read as 96-row blocks), nor apply to both."""
    config = ct_config("block", block=(128, 128))
    config["config_groups"]["group_1"] = ct_config(other, block=(64, 64))["config_groups"]["group_0"]
    with pytest.raises(LocalrunError, match="groups of different scale blocks"):
        read_quantization({"quantization_config": config})
    same = ct_config("block", block=(128, 128))
    same["config_groups"]["group_1"] = ct_config("block", block=(128, 128))["config_groups"]["group_0"]
    assert read_quantization({"quantization_config": same}).block == (128, 128)
    plain = ct_config("channel")
    plain["config_groups"]["group_1"] = ct_config("tensor")["config_groups"]["group_0"]
    assert read_quantization({"quantization_config": plain}).block is None


def test_fp8_tensors_without_a_quantization_config_are_refused(fp8_checkpoint, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fp8_checkpoint("mixtral"), d)
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(LocalrunError, match="stored in FP8 but config.json has no quantization_config"):
        open_checkpoint(d)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("model.layers.0.self_attn.q_proj.weight_scale_inv"),
     "FP8 tensor model.layers.0.self_attn.q_proj.weight has no model.layers.0.self_attn.q_proj.weight_scale_inv"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(1, 1)}),
     r"q_proj.weight_scale_inv is float32 \[1, 1\], no scale grid for .*q_proj.weight \[64, 64\]: blocks of 32 x 32 "
     r"need \[2, 2\], in floating point"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(1, 2, 2)}),
     r"q_proj.weight_scale_inv is float32 \[1, 2, 2\], no scale grid"),  # not read past its end
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(2)}),
     r"q_proj.weight_scale_inv is float32 \[2\], no scale grid"),
    (lambda t: t["model.layers.0.self_attn.q_proj.weight_scale_inv"].__setitem__((0, 1), float("nan")),
     "q_proj.weight_scale_inv holds a NaN or infinite scale"),
])
def test_damaged_fp8_pairs_are_named(fp8_checkpoint, tmp_path, damage, message):
    d = tmp_path / "m"
    shutil.copytree(fp8_checkpoint("qwen3_moe"), d)
    tensors = load_file(d / "model.safetensors")
    damage(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(LocalrunError, match=message):
        load_model(d, dtype=torch.float32, experts="bf16")


@pytest.mark.parametrize("strategy, shape, message", [
    ("channel", torch.ones(2), r"w_scale is float32 \[2\], no scale grid"),
    ("channel", torch.ones(1, 6, 1), r"w_scale is float32 \[1, 6, 1\], no scale grid"),
    ("block", torch.tensor([6.0, 5.0]), r"w_shape_original is float32 \[2\], not a shape"),
])
def test_misshapen_compressed_tensors_scales_are_named(tmp_path, strategy, shape, message):
    stored = {"w" + suffix: t for suffix, t in quantize_ct(torch.randn(6, 5), strategy, block=(4, 4)).items()}
    stored["w_shape_original" if strategy == "block" else "w_scale"] = shape
    save_file(stored, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": ct_config(strategy, (4, 4))}))
    with pytest.raises(LocalrunError, match=message):
        open_checkpoint(tmp_path).read("w")


@pytest.mark.parametrize("rows, cols, block", [(64, 64, (48, 40)), (704, 256, (128, 128)), (100, 60, (32, 32))])
def test_compressed_tensors_fp8_blocks_as_compressed_tensors_writes_them(tmp_path, rows, cols, block):
    """compressed-tensors (0.20) stores block-quantized codes unpadded: the last block row and column are
    partial, and the config's block_structure, not the grid, says how many rows and columns a scale covers
    (Gemma 4's 704 expert rows, 2112 MLP rows, are no multiple of 128)."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor

    weights = ct_config("block", block)["config_groups"]["group_0"]["weights"]
    args = ct.QuantizationArgs(**{k: v for k, v in weights.items() if k != "dynamic"})
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).bfloat16()
    scale = quantize_ct(w.float(), "block", block=block)["_scale"]
    state = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, ct.QuantizationScheme(
        targets=["Linear"], weights=args))
    assert state["weight"].shape == (rows, cols)  # not padded to whole blocks
    save_file({"w": state["weight"].contiguous(), "w_scale": scale}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": ct_config("block", block)}))
    expected = FloatQuantizationCompressor.decompress(dict(state), ct.QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(open_checkpoint(tmp_path).read("w"), expected["weight"].to(torch.bfloat16))


def test_cli_names_the_quantization_it_cannot_read(cli, tiny_checkpoint, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_checkpoint(), d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (d / "config.json").write_text(json.dumps(config))
    for command in (["run", str(d), "hi"], ["fit", str(d), "--vram", "16GB"]):
        code, out, err = cli(*command)
        assert code != 0
        assert "pre-quantized (quant_method 'awq')" in err and "Traceback" not in out + err


def test_an_fp8_checkpoint_lists_bf16_matrices_and_no_scales(fp8_checkpoint):
    ckpt = open_checkpoint(fp8_checkpoint("mixtral"))
    assert isinstance(ckpt, Fp8Checkpoint) and ckpt.matrix_dtype() == torch.bfloat16
    assert not any(n.endswith("_scale_inv") for n in ckpt.tensors)


def test_dequantize_in_chunks_of_rows_is_the_whole_product(monkeypatch):
    """dequantize bounds its fp32 temporaries by working a few rows at a time: the same bits as one product."""
    import localrun.fp8 as fp8

    gen = torch.Generator().manual_seed(3)
    for shape, block, first in [((3, 40, 24), (16, 8), 0), ((37, 24), (5, 8), 11)]:
        codes = torch.randn(shape, generator=gen).to(torch.float8_e4m3fn)
        grid = (math.ceil((first + shape[-2]) / block[0]) - first // block[0], math.ceil(shape[-1] / block[1]))
        scale = torch.rand(*shape[:-2], *grid, generator=gen)
        rows = torch.arange(first, first + shape[-2]) // block[0] - first // block[0]
        whole = (codes.float() * scale.index_select(-2, rows).index_select(-1, torch.arange(shape[-1]) // block[1]))
        monkeypatch.setattr(fp8, "DEQUANTIZE_CHUNK", 7)  # a row or two at a time
        assert torch.equal(fp8.dequantize(codes, scale, block, first_row=first), whole.to(torch.bfloat16))
