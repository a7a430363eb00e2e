"""The prefix cache (localrun/session.py): fp32 greedy tokens with it equal the tokens without it,
across the sliding window, rollbacks within and beyond the ring's reach, /undo, /retry, a
template that drops thinking, and the static step; the plan counts the rings' rollback slots."""

from __future__ import annotations

import pytest
import torch

from localrun.chat import ChatSession, Settings
from localrun.engine import Engine
from localrun.generate import generate
from localrun.kvcache import KVCache, RingKV
from localrun.plan import KV_ROLLBACK, kv_layer_positions
from localrun.sampling import SamplingParams, make_sampler
from localrun.session import Session

torch.set_num_threads(1)
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def engine(tiny_moe):
    return Engine.load(tiny_moe, device="cpu", dtype=torch.float32, context=512)


def fresh(engine, ids, n, step="eager"):
    """Greedy tokens with no prefix cache: the whole prompt prefilled into new buffers."""
    cache = KVCache(engine.loaded.args, dtype=torch.float32, capacity=512)
    return [s.token for s in generate(engine.model, ids, make_sampler(GREEDY), max_tokens=n,
                                      stop_ids=engine.eos_ids, cache=cache, step=step)]


def cached(engine, session, ids, n, step="eager"):
    return [s.token for s in generate(engine.model, ids, make_sampler(GREEDY), max_tokens=n,
                                      stop_ids=engine.eos_ids, session=session, step=step)]


def user(i: int, n: int, vocab: int) -> list[int]:
    return [(37 * i + 11 * j) % (vocab - 10) + 5 for j in range(n)]


@pytest.mark.parametrize("step", ["eager", "static"])
def test_conversation_across_the_window_matches_no_cache(engine, step, attention_path):
    """Ten turns over a ring of window 8 + rollback 12: it wraps many times; replies re-rendered
    shorter than generated (thinking dropped) roll back within reach, an /undo beyond it starts over."""
    args = engine.loaded.args
    session = Session(KVCache(args, dtype=torch.float32, capacity=512, rollback=12))
    assert {layer.size for layer in session.cache.layers if isinstance(layer, RingKV)} == {args.sliding_window + 12}
    history, reused = [2], []
    for turn in range(10):
        ids = history + user(turn, 9, args.vocab_size)
        reply = cached(engine, session, ids, 10, step)
        assert reply == fresh(engine, ids, 10, step), f"turn {turn}"
        reused.append(session.reused)
        assert session.tokens == (ids + reply)[: session.cache.offset]
        # the next prompt re-renders the reply without its first tokens when the turn is odd
        # (Gemma 4 drops past thinking): the common prefix ends inside the reply
        history = ids + (reply[3:] if turn % 2 else reply)
    assert all(r > 0 for r in reused[1:]), reused
    assert max(reused) > 60
    # /undo of two exchanges (~40 positions, beyond the 12 the ring keeps): prefilled from 0, same tokens
    ids = history[:25] + user(99, 5, args.vocab_size)
    assert cached(engine, session, ids, 8, step) == fresh(engine, ids, 8, step)
    assert session.reused == 0


def test_retry_and_exact_repeat(engine):
    args = engine.loaded.args
    session = Session(KVCache(args, dtype=torch.float32, capacity=512))
    ids = [2] + user(1, 40, args.vocab_size)
    first = cached(engine, session, ids, 12)
    again = cached(engine, session, ids, 12)  # /retry: the same prompt, the reply rolled back
    assert first == again == fresh(engine, ids, 12)
    assert session.reused == len(ids) - 1  # all but the last prompt token, whose logits start the reply


def test_chat_undo_retry_and_thinking_dropped_match(engine, monkeypatch, attention_path):
    """ChatSession through the engine's session, every reply checked against a fresh prefill of
    the very prompt the chat sent."""
    calls = []
    stream = engine.stream

    def recording(ids, params, **kw):
        out = []
        calls.append((list(ids), kw.get("session"), out))

        def steps():
            for step in stream(ids, params, **kw):
                out.append(step.token)
                yield step
        return steps()

    monkeypatch.setattr(engine, "stream", recording)
    chat = ChatSession(engine, Settings(max_tokens=10), system="be brief", context=512)
    reused = []

    def say(text=None, retry=False):
        if retry:
            assert chat.command("retry", "").respond
        else:
            chat.ask(text)
        reply = chat.respond()
        list(reply)
        chat.commit(reply)
        ids, session, tokens = calls[-1]
        assert session is engine.session and tokens
        assert tokens == fresh(engine, ids, 10)
        reused.append(session.reused)

    for i in range(4):
        say(f"message number {i} about the weather in town")
    say(retry=True)
    chat.command("undo", "")
    say("another question entirely")
    # a past reply that carried thinking: the template drops it when it renders the history
    chat.conversation.turns[-1]["content"] = "<|channel>thought\nhmm<channel|>" + chat.conversation.turns[-1]["content"]
    say("and one more")
    assert "hmm" not in engine.tokenizer.decode(calls[-1][0])  # the template dropped it
    chat.conversation.turns[-1]["content"] = "<|channel>thought\nlet me see<channel|>final"
    say("last one")
    assert all(r > 0 for r in reused[1:]), reused


def test_fit_counts_the_rollback_slots(tiny_moe):
    from localrun.config import load_config
    from localrun.loader import load_model, memory_report
    from localrun.plan import kv_cache_bytes

    args = load_config(tiny_moe)
    sliding = [i for i in range(args.num_hidden_layers) if args.is_sliding(i) and args.kv_source_layer(i) == i]
    assert kv_layer_positions(args, sliding[0], 4096) == args.sliding_window + KV_ROLLBACK
    assert kv_layer_positions(args, sliding[0], 100) == 100
    loaded = load_model(tiny_moe, dtype=torch.float32, context=1024, parallel=2)
    assert len(loaded.kv_slots) == 2 and loaded.kv is loaded.kv_slots[0]
    assert loaded.kv_slots[0].layers[sliding[0]].size == args.sliding_window + KV_ROLLBACK
    report = memory_report(loaded)
    assert report["kv_bytes"] == report["planned_kv_bytes"] == 2 * (sum(kv_cache_bytes(args, 1024, 4))
                                                                     + loaded.plan.kv_position_bytes // 2)


def test_ring_rolls_back_within_its_reach_only():
    from localrun.config import ModelArgs
    from localrun.tiny import tiny_config

    args = ModelArgs.from_dict(tiny_config("moe"))  # window 8
    cache = KVCache(args, capacity=64, rollback=4)
    ring = next(layer for layer in cache.layers if isinstance(layer, RingKV))
    assert ring.size == 12
    for pos in range(30):
        for layer in cache.layers:
            if layer is not None:
                n, d = layer.k.shape[1], layer.k.shape[3]
                layer.update(torch.randn(1, n, 1, d), torch.randn(1, n, 1, d), torch.tensor([pos]))
    cache.offset = 30
    assert not ring.can_truncate(25) and ring.can_truncate(26)  # positions 18..29 held: 26 needs 18 on
    assert cache.truncate(27) and cache.offset == 27
    assert sorted(p for p in ring.pos.tolist() if p >= 0) == list(range(18, 27))  # 27..29 emptied
    assert not cache.truncate(20) and cache.offset == 0  # beyond reach: reset, prefill from 0
    assert all(p == -1 for p in ring.pos.tolist())
