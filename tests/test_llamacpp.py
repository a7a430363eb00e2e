"""`bench --compare llama.cpp`: the pieces that need no llama.cpp (GGUF cache names, the quantization
mix, the tokenizer fixes, the GGUF header reader, the side-by-side table), the one-line hint when
llama-cpp-python is missing, and, where it is installed, the checkpoint through it end to end."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest

from localrun import bench, llamacpp
from localrun.errors import LocalrunError
from localrun.llamacpp import GGML_BF16, GGML_F32, GGML_Q4_0
from localrun.tiny import build_tokenizer

# Gemma 4 26B-A4B's GGUF tensors for one layer (shapes in ggml order), as the converter names them
GEMMA4_LAYER = {
    "token_embd.weight": ((512, 16384), GGML_BF16),
    "rope_freqs.weight": ((64,), GGML_F32),
    "output_norm.weight": ((512,), GGML_F32),
    "blk.0.attn_norm.weight": ((512,), GGML_F32),
    "blk.0.attn_q.weight": ((512, 512), GGML_BF16),
    "blk.0.attn_k.weight": ((512, 256), GGML_BF16),
    "blk.0.attn_output.weight": ((512, 512), GGML_BF16),
    "blk.0.ffn_gate.weight": ((512, 384), GGML_BF16),
    "blk.0.ffn_down.weight": ((384, 512), GGML_BF16),
    "blk.0.ffn_gate_inp.weight": ((512, 32), GGML_BF16),
    "blk.0.ffn_gate_up_exps.weight": ((512, 256, 32), GGML_BF16),
    "blk.0.ffn_down_exps.weight": ((128, 512, 32), GGML_BF16),
    "blk.0.ffn_down_exps.scale": ((32,), GGML_F32),
    "blk.10.attn_q.weight": ((512, 512), GGML_BF16),
}


def test_without_llama_cpp_python_bench_says_how_to_install_it(cli, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    code, out, err = cli("bench", "bench", "--compare", "llama.cpp")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: --compare llama.cpp needs llama-cpp-python: pip install") and "[llamacpp]" in err


def test_compare_and_gguf_options_are_checked(cli):
    code, _, err = cli("bench", "bench", "--compare", "llama")
    assert code == 2 and "transformers or llama.cpp" in err
    code, _, err = cli("bench", "bench", "--compare", "llama.cpp", "--gguf", "q4_k")
    assert code == 2 and "--gguf must be one of bf16, q4_0-experts, q4_0" in err
    code, _, err = cli("bench", "bench", "--compare", "llama.cpp", "--device", "cuda")
    assert code == 2 and "--device cpu" in err
    code, _, err = cli("bench", "bench", "--experts", "int8")
    assert code == 2 and "--experts" in err


def test_gguf_cached_beside_the_checkpoint_under_its_fingerprint(tmp_path):
    model = tmp_path / "bench-model-abc"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 10)
    key = llamacpp.fingerprint(model, "0.3.36")
    assert re.fullmatch(r"[0-9a-f]{10}", key)
    assert llamacpp.gguf_path(model, "q4_0-experts", key) == tmp_path / f"bench-model-abc.{key}.q4_0-experts.gguf"
    assert llamacpp.gguf_path(model / ".", "bf16", key).parent == tmp_path
    assert llamacpp.fingerprint(model, "0.3.36") == key
    assert llamacpp.fingerprint(model, "0.3.37") != key  # another llama.cpp converts afresh
    (model / "model.safetensors").write_bytes(b"y" * 11)
    assert llamacpp.fingerprint(model, "0.3.36") != key  # so does a rewritten checkpoint
    with pytest.raises(ValueError, match="q4_0-experts"):
        llamacpp.gguf_path(model, "q4_k_m", key)


def test_the_demos_gguf_goes_to_the_cache_not_into_the_package(monkeypatch, tmp_path):
    from localrun.demo import demo_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = llamacpp.gguf_path(demo_model_dir(), "bf16", "k")
    assert path == tmp_path / "localrun" / "gguf" / f"{demo_model_dir().name}.k.bf16.gguf"


def test_the_same_mix_keeps_everything_bf16_but_the_routed_experts():
    overrides = llamacpp.tensor_type_overrides(GEMMA4_LAYER, "q4_0-experts")
    types = {name: kind for name in GEMMA4_LAYER for pattern, kind in overrides if re.search(pattern, name)}
    assert types == {
        "token_embd.weight": GGML_BF16, "blk.0.attn_q.weight": GGML_BF16, "blk.0.attn_k.weight": GGML_BF16,
        "blk.0.attn_output.weight": GGML_BF16, "blk.0.ffn_gate.weight": GGML_BF16,
        "blk.0.ffn_down.weight": GGML_BF16, "blk.0.ffn_gate_inp.weight": GGML_BF16,
        "blk.0.ffn_gate_up_exps.weight": GGML_Q4_0, "blk.0.ffn_down_exps.weight": GGML_Q4_0,
        "blk.10.attn_q.weight": GGML_BF16,
    }  # vectors (norms, scales, rope factors) get no entry: llama.cpp never quantizes them
    for name in GEMMA4_LAYER:  # anchored: blk.1's pattern is not blk.10's
        assert sum(1 for pattern, _ in overrides if re.search(pattern, name)) <= 1
    assert llamacpp.tensor_type_overrides(GEMMA4_LAYER, "q4_0") == []
    assert llamacpp.tensor_type_overrides(GEMMA4_LAYER, "bf16") == []
    with pytest.raises(ValueError):
        llamacpp.tensor_type_overrides(GEMMA4_LAYER, "nf4")


def test_check_mix_refuses_a_gguf_that_is_not_the_precision_asked_for(tmp_path):
    path = tmp_path / "m.gguf"
    quantized = {n: (s, GGML_Q4_0 if llamacpp.ROUTED_EXPERT.match(n) else t) for n, (s, t) in GEMMA4_LAYER.items()}
    llamacpp.check_mix(quantized, "q4_0-experts", path)
    llamacpp.check_mix({**quantized, "blk.0.attn_q.weight": ((512, 512), GGML_Q4_0)}, "q4_0", path)
    with pytest.raises(LocalrunError, match="blk.0.attn_q.weight is q4_0"):
        llamacpp.check_mix({**quantized, "blk.0.attn_q.weight": ((512, 512), GGML_Q4_0)}, "q4_0-experts", path)
    with pytest.raises(LocalrunError, match="blk.0.ffn_down_exps.weight is q8_0"):  # a fallback type
        llamacpp.check_mix({**quantized, "blk.0.ffn_down_exps.weight": ((128, 512, 32), 8)}, "q4_0", path)
    with pytest.raises(LocalrunError, match="no routed experts"):
        llamacpp.check_mix({"blk.0.attn_q.weight": ((512, 512), GGML_BF16)}, "q4_0-experts", path)


def test_pad_tokenizer_gives_every_row_a_token():
    tok = json.loads(build_tokenizer().to_str())
    n = len(tok["model"]["vocab"])
    padded = llamacpp.pad_tokenizer(tok, n + 300)
    vocab = padded["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(n + 300))
    assert {t: i for t, i in vocab.items() if i < n} == tok["model"]["vocab"]  # the real tokens unchanged
    new = [t for t, i in vocab.items() if i >= n]
    assert all(re.fullmatch(r"<unused\d+>", t) for t in new) and len(set(new)) == 300
    assert not set(new) & set(tok["model"]["vocab"])  # numbered past the <unusedN> already there
    assert llamacpp.pad_tokenizer(tok, n) is tok
    from tokenizers import Tokenizer

    assert Tokenizer.from_str(json.dumps(padded)).get_vocab_size() == n + 300


def test_declare_special_tokens_lists_gemmas_turn_tokens():
    tok = json.loads(build_tokenizer().to_str())
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "mask_token": "<mask>"}
    declared = llamacpp.declare_special_tokens(tok, config)
    extra = declared["extra_special_tokens"]
    assert {"<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"} <= set(extra)
    assert not {"<bos>", "<eos>", "<pad>"} & set(extra) and len(extra) == len(set(extra))
    assert declared["additional_special_tokens"] == extra
    assert llamacpp.declare_special_tokens(tok, declared) == declared  # idempotent
    assert config == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                      "mask_token": "<mask>"}  # not modified in place


def test_prepared_checkpoint_reads_as_the_converter_reads_it(tiny_moe, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = llamacpp.prepare_checkpoint(tiny_moe, tmp_path / "prepared", 700)
    assert (out / "model.safetensors.index.json").is_symlink()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.vocab_size == 700  # the converter's LlamaHfVocab takes this as the vocabulary
    assert 105 in tok.all_special_ids and 106 in tok.all_special_ids  # <|turn> typed CONTROL
    assert json.loads((tiny_moe / "tokenizer_config.json").read_text()).get("extra_special_tokens") is None


def _gguf(path, kv: list, tensors: list) -> None:
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    data = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, kind, payload in kv:
        data += s(key) + struct.pack("<I", kind) + payload
    for name, shape, kind in tensors:
        data += s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape) + \
            struct.pack("<IQ", kind, 0)
    path.write_bytes(data)


def test_read_gguf_tensors_skips_metadata_and_reads_the_tensor_table(tmp_path):
    path = tmp_path / "m.gguf"
    strings = struct.pack("<IQ", 8, 2) + b"".join(struct.pack("<Q", len(t)) + t for t in (b"<pad>", b"<eos>"))
    _gguf(path, [("general.architecture", 8, struct.pack("<Q", 6) + b"gemma4"),
                 ("gemma4.block_count", 4, struct.pack("<I", 12)),
                 ("gemma4.sliding", 9, struct.pack("<IQ", 7, 3) + b"\x01\x00\x01"),
                 ("tokenizer.ggml.tokens", 9, strings),
                 ("general.scale", 12, struct.pack("<d", 1.5))],
          [("token_embd.weight", (512, 16384), GGML_BF16), ("blk.0.ffn_down_exps.weight", (128, 512, 32), GGML_Q4_0)])
    assert llamacpp.read_gguf_tensors(path) == {"token_embd.weight": ((512, 16384), GGML_BF16),
                                                "blk.0.ffn_down_exps.weight": ((128, 512, 32), GGML_Q4_0)}
    (tmp_path / "no.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(LocalrunError, match="not a GGUF"):
        llamacpp.read_gguf_tensors(tmp_path / "no.gguf")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(LocalrunError, match="truncated"):
        llamacpp.read_gguf_tensors(path)


def test_llama_cpp_system_info_keeps_what_is_set():
    text = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 0 | AMX_INT8 = 0 | OPENMP = 1 | REPACK = 1 | "
    assert llamacpp.features_set(text) == "SSE3 AVX2 AVX512 OPENMP REPACK"


def test_the_sides_take_turns_and_each_pair_gets_its_ratios(monkeypatch, tmp_path):
    calls = []

    def localrun(model_dir, cases, *, experts, **kwargs):
        calls.append(("localrun", experts))
        return [bench.Measurement("localrun", p, g, 0.1, 200.0 if experts == "bf16" else 100.0,
                                  80.0 + len(calls), variant=experts) for p, g in cases]

    def llama(gguf, cases, *, precision, vocab_size, **kwargs):
        calls.append(("llama.cpp", precision))
        assert vocab_size == 99
        return [bench.Measurement("llama.cpp", p, g, 0.2, 50.0, 40.0 + len(calls), variant=precision)
                for p, g in cases]

    monkeypatch.setattr(bench, "bench_localrun", localrun)
    monkeypatch.setattr(bench, "bench_llama_cpp", llama)
    monkeypatch.setattr(llamacpp, "version", lambda: "0.3.36")
    monkeypatch.setattr(llamacpp, "system_info", lambda: "AVX2 AVX512 REPACK")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)  # device "auto" is the CPU
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 99}))
    ggufs = {p: tmp_path / f"{p}.gguf" for p in llamacpp.GGUF_PRECISIONS}
    report = bench.run_bench(tmp_path, [(512, 32)], experts=["bf16", "nf4"], compare="llama.cpp", rounds=2,
                             gguf=ggufs, device="auto")
    once = [("localrun", "bf16"), ("localrun", "nf4"), ("llama.cpp", "bf16"), ("llama.cpp", "q4_0-experts"),
            ("llama.cpp", "q4_0")]
    assert calls == once + once
    assert [(m.engine, m.variant) for m in report.measurements] == once
    nf4 = report.measurements[1]
    assert nf4.decode_tokens_per_s == 87.0 and nf4.rounds_decode == [82.0, 87.0]
    table = bench.markdown(report)
    assert "llama.cpp (llama-cpp-python 0.3.36)" in table and "; llama.cpp: AVX2 AVX512 REPACK" in table
    assert f"CPU {bench.cpu_model()}" in table and "localrun: C kernels" in table
    assert "| 512 | 32 | nf4 | q4_0-experts | 100.0 / 50.0 | 2.00x | 87.0 / 49.0 | 1.78x |" in table
    pair_rows = [line for line in table.splitlines() if line.startswith("| 512 | 32 |")]
    assert len(pair_rows) == 6 and all("(ours / llama.cpp)" not in r for r in pair_rows)
    assert "| llama.cpp q4_0 | 512 | 32 | 50.0, 50.0 | 45.0, 50.0 |" in table  # each round, for the spread


# With llama-cpp-python installed -------------------------------------------------------------

def _llama_cpp_ready():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    try:
        llamacpp.find_converter()
    except LocalrunError as e:
        pytest.skip(str(e))


def test_tiny_model_through_llama_cpp(tiny_moe, tmp_path):
    _llama_cpp_ready()
    model = tmp_path / "tiny"
    model.mkdir()
    for f in tiny_moe.iterdir():
        os.symlink(f, model / f.name)
    paths = {p: llamacpp.ensure_gguf(model, p, threads=1) for p in llamacpp.GGUF_PRECISIONS}
    key = llamacpp.fingerprint(model, llamacpp.version())
    assert paths == {p: tmp_path / f"tiny.{key}.{p}.gguf" for p in llamacpp.GGUF_PRECISIONS}
    mix = llamacpp.read_gguf_tensors(paths["q4_0-experts"])
    assert mix["token_embd.weight"][1] == GGML_BF16 and mix["blk.0.attn_q.weight"][1] == GGML_BF16
    assert all(t == GGML_Q4_0 for n, (_, t) in mix.items() if llamacpp.ROUTED_EXPERT.match(n))
    assert llamacpp.read_gguf_tensors(paths["q4_0"])["blk.0.attn_q.weight"][1] == GGML_Q4_0
    (m,) = bench.bench_llama_cpp(paths["bf16"], [(8, 3)], precision="bf16", vocab_size=512, repeat=1, threads=1)
    assert (m.engine, m.variant, m.prompt_tokens) == ("llama.cpp", "bf16", 8) and m.prefill_tokens_per_s > 0
    runner = llamacpp.Runner(paths["bf16"], 64, 1)
    try:
        ids = bench.bench_prompt(8, 512)
        assert runner.generate(ids, 4) == runner.generate(ids, 4)  # the KV cache is cleared between runs
    finally:
        runner.close()
