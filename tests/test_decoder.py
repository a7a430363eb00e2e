"""The decoder against transformers' Gemma 4 (the oracle): logits, greedy tokens, logprobs."""

from __future__ import annotations

import pytest
import torch

from localrun.generate import generate
from localrun.kvcache import KVCache
from localrun.loader import load_model
from localrun.sampling import SamplingParams, make_sampler
from localrun.tiny import KINDS, LAYOUTS

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

GEN_TOKENS = 64  # with sliding_window 8: generation is 8x the window


def reference(model_dir, layout):
    cls = transformers.Gemma4ForCausalLM if layout == "text" else transformers.Gemma4ForConditionalGeneration
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def prompt_ids(n: int = 30, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(107, 512, (n - 1,), generator=gen).tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tiny_checkpoint, kind, layout, attention_path):
    model_dir = tiny_checkpoint(kind, layout)
    ref = reference(model_dir, layout)
    ours = load_model(model_dir, dtype=torch.float32, experts="bf16").model
    ids = torch.tensor([prompt_ids(40)])
    with torch.no_grad():
        expected = ref(ids).logits
        whole = ours(ids)
        cache = KVCache(ours.args)  # chunked prefill through the cache, chunks not aligned to the window
        chunked = torch.cat([ours(ids[:, i : i + 7], cache) for i in range(0, 40, 7)], dim=1)
    assert (whole - expected).abs().max() < 1e-4
    assert (chunked - expected).abs().max() < 1e-4


def test_between_runs_between_prefill_chunks_and_tokens_and_changes_no_value(tiny_checkpoint):
    """generate's `between` hook (hardware.IdleCoreWatch.poll: the thread count follows the idle cores)
    runs before every prefill chunk after the first and every decoded token after the first; a thread
    count that changes there changes no token and no logit (the CPU kernels' sums do not depend on it)."""
    model = load_model(tiny_checkpoint(KINDS[0], LAYOUTS[0]), dtype=torch.float32, experts="nf4").model
    ids, before, calls = prompt_ids(20, seed=2), torch.get_num_threads(), []

    def between():
        calls.append(torch.get_num_threads())
        torch.set_num_threads(1 + len(calls) % 2)

    try:
        torch.set_num_threads(2)
        plain = list(generate(model, ids, make_sampler(SamplingParams()), max_tokens=6, prefill_chunk=6))
        followed = list(generate(model, ids, make_sampler(SamplingParams()), max_tokens=6, prefill_chunk=6,
                                 between=between))
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 3 + 5 and set(calls) == {1, 2}  # 4 chunks of the 20-token prompt, 6 tokens
    assert [s.token for s in followed] == [s.token for s in plain]
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(followed, plain))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_and_logprobs_match_transformers(tiny_checkpoint, kind, layout, attention_path):
    model_dir = tiny_checkpoint(kind, layout)
    ref = reference(model_dir, layout)
    ours = load_model(model_dir, dtype=torch.float32, experts="bf16").model
    ids = prompt_ids(20, seed=1)
    steps = list(generate(ours, ids, make_sampler(SamplingParams()), max_tokens=GEN_TOKENS, prefill_chunk=6))
    tokens = [s.token for s in steps]
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=GEN_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0, min_new_tokens=GEN_TOKENS)
        expected = out[0, len(ids):].tolist()
        logits = ref(out[:, :-1]).logits[0, len(ids) - 1:]
    assert len(tokens) == GEN_TOKENS and steps[-1].finish_reason == "length"
    assert tokens == expected
    expected_lp = torch.log_softmax(logits.float(), dim=-1).gather(1, out[0, len(ids):, None])[:, 0]
    assert (torch.tensor([s.logprob for s in steps]) - expected_lp).abs().max() < 1e-4


def test_generation_stops_on_eos(tiny_moe):
    ours = load_model(tiny_moe, dtype=torch.float32, experts="bf16").model
    ids = prompt_ids(12)
    free = [s.token for s in generate(ours, ids, make_sampler(SamplingParams()), max_tokens=6)]
    stop = free[3]
    steps = list(generate(ours, ids, make_sampler(SamplingParams()), max_tokens=6, stop_ids=[stop]))
    first = free.index(stop)
    assert [s.token for s in steps] == free[: first + 1]
    assert steps[-1].finish_reason == "stop" and all(s.finish_reason is None for s in steps[:-1])


def test_bf16_matches_transformers_bf16(tiny_moe):
    ids = torch.tensor([prompt_ids(24)])
    with torch.no_grad():
        expected = transformers.Gemma4ForCausalLM.from_pretrained(tiny_moe, dtype=torch.bfloat16)(ids).logits
        ours = load_model(tiny_moe, dtype=torch.bfloat16, experts="bf16").model(ids)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - expected.float()).abs().max() < 1e-2  # same roundings, same order


def test_loaded_tensors_are_the_compute_dtype(tiny_moe):
    model = load_model(tiny_moe, dtype=torch.bfloat16, experts="bf16").model
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    rope = {id(b) for n, b in model.named_buffers() if n.startswith("inv_freq")}
    assert all(t.dtype == torch.bfloat16 for t in floats if id(t) not in rope)
    assert not any(t.requires_grad for t in model.parameters())


@pytest.mark.parametrize("top_tie, text_tie", [(False, True), (True, False)])
def test_multimodal_checkpoint_ties_by_the_top_level_flag_and_reads_placeholders_as_pad(tmp_path, top_tie, text_tie):
    """transformers' Gemma4ForConditionalGeneration ties lm_head by the top-level tie_word_embeddings (a
    text_config of its own default says otherwise when only the top level is given), and its text-only
    pass embeds an image placeholder id as the pad id: logits and decoding as its, written by its own
    save_pretrained."""
    from localrun.tiny import _VISION_CONFIG, tiny_config

    torch.manual_seed(0)
    text = {k: v for k, v in tiny_config("moe").items() if k != "model_type"} | {"tie_word_embeddings": text_tie}
    vision = {k: v for k, v in _VISION_CONFIG.items() if k != "model_type"}
    cfg = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                                    tie_word_embeddings=top_tie, image_token_id=300)
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    ref = reference(tmp_path, "multimodal")
    loaded = load_model(tmp_path, dtype=torch.float32, experts="bf16", context=64)
    assert loaded.args.tie_word_embeddings == top_tie and loaded.args.placeholder_token_ids == (300,)
    ids = [2, 17, 99, 300, 31, 400, 7, 88]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits
        assert (loaded.model(torch.tensor([ids])) - expected).abs().max() < 1e-4
        steps = list(generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=8, cache=loaded.kv))
        out = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0, min_new_tokens=8)
    assert [s.token for s in steps] == out[0, len(ids):].tolist()
