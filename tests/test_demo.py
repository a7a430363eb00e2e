"""The shipped demo model (localrun/data/demo) answers arithmetic, and its dataset is sound."""

from __future__ import annotations

import pytest
import torch

import importlib.util
import random
import re
from pathlib import Path

from localrun.chat import ChatSession, Settings, default_context, trim_to_fit
from localrun.demo import (
    ENDINGS,
    PREFIXES,
    WIDE_ENDINGS,
    arithmetic_triples,
    demo_model_dir,
    has_carry,
    held_out_conversations,
    held_out_questions,
    is_held_out,
    reword,
    train_conversations,
    train_examples,
)
from localrun.engine import Engine
from localrun.text import encode_chat
from localrun.sampling import SamplingParams

DEMO = demo_model_dir()


def ask(engine: Engine, question: str) -> str:
    steps = engine.stream(engine.encode_prompt(question), SamplingParams(temperature=0.0), max_tokens=8)
    return "".join(text for text, _ in engine.stream_text(steps)).strip()


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return Engine.load(DEMO, device="cpu", dtype=torch.bfloat16, experts="bf16")


def test_checkpoint_is_small_and_complete():
    names = {p.name for p in DEMO.iterdir()}
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "model.safetensors.index.json"):
        assert f in names
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 25 * 10**6


def test_answers_the_readme_question(engine):
    assert ask(engine, "What is 17 + 25?") == "42"


# The shipped checkpoint (README, "The demo model": window 32, six training steps) scores 0.985 on all
# 777 held-out questions with bf16 and with nf4 experts; issue 15 asks for at least 0.95.
def test_held_out_accuracy(engine):
    questions = held_out_questions(200)
    wrong = [(q, want, got) for q, want in questions if (got := ask(engine, q)) != want]
    assert 1 - len(wrong) / len(questions) >= 0.95, wrong


def test_dataset_is_deterministic_and_split():
    assert train_examples(300, seed=3) == train_examples(300, seed=3)
    assert held_out_questions(50) == held_out_questions(50)
    train, held = arithmetic_triples(held_out=False), arithmetic_triples(held_out=True)
    assert not set(train) & set(held)
    assert len(train) + len(held) == 100 * 100 + 100 * 101 // 2
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.08
    assert all(is_held_out(*t) for t in held)
    assert (17, 25, "+") in train
    # the training stream never asks a held-out triple
    held_texts = {q for q, _ in held_out_questions()}
    assert not held_texts & {q for q, _ in train_examples(5000)}
    assert not held_texts & {q for q, _ in train_examples(5000, carry=0.5)}
    # over-sampling carries/borrows is deterministic and still only draws training triples
    assert train_examples(300, carry=0.5) == train_examples(300, carry=0.5)
    assert [has_carry(*t) for t in [(17, 25, "+"), (40, 9, "-"), (12, 3, "+"), (55, 5, "-")]] == [True, True, False, False]


def test_transformers_loads_it_and_agrees():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ref, info = transformers.Gemma4ForCausalLM.from_pretrained(DEMO, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ours = Engine.load(DEMO, device="cpu", dtype=torch.float32, experts="bf16")
    ids = ours.encode_prompt("What is 17 + 25?")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), ref(x).logits, atol=1e-4, rtol=0)
        out = ref.generate(x, max_new_tokens=4, do_sample=False)
    assert ours.tokenizer.decode(out[0, len(ids):].tolist()) == "42<turn|>"


def asked(q: str) -> tuple[int, int, str]:
    """The (a, b, op) triple a question asks ("Subtract b from a" names b first)."""
    x, y = map(int, re.findall(r"\d+", q))
    op = "-" if re.search(r"-|minus|[Ss]ubtract|away|difference", q) else "+"
    return (y, x, op) if re.search(r"[Ss]ubtract|away", q) else (x, y, op)


def test_conversations_are_deterministic_and_never_ask_held_out():
    convs = train_conversations(200, seed=4)
    assert convs == train_conversations(200, seed=4)
    assert any(len(ex) == 1 for _, ex in convs) and max(len(ex) for _, ex in convs) > 30
    assert any(s for s, _ in convs) and any(s is None for s, _ in convs)
    for _, exchanges in convs:
        for q, a in exchanges:
            if a.isdigit():
                x, y, op = asked(q)
                assert str(x + y if op == "+" else x - y) == a, q
                assert not is_held_out(x, y, op), q
    for _, exchanges in held_out_conversations(50):
        x, y, op = asked(exchanges[-1][0])
        assert is_held_out(x, y, op) and str(x + y if op == "+" else x - y) == exchanges[-1][1]


def test_reworded_questions_keep_their_numbers():
    """Other endings and operator spacing (issue 15: the shipped model read the operands at fixed
    distances from the prompt's end) still ask a training triple, and the held-out set is unchanged."""
    rng = random.Random(0)
    variants = {reword("What is 13 + 4?", rng) for _ in range(200)}
    assert len(variants) > 30 and all(re.findall(r"\d+", v) == ["13", "4"] for v in variants)
    assert {"What is 13 + 4 now?", "What is 13 + 4"} <= variants and any(v.startswith("What is 13+4") for v in variants)
    examples = train_examples(3000, seed=5)
    endings = {e for e in ENDINGS if e}
    assert sum(any(q.endswith(e) for e in endings - {"?", ".", "!"}) for q, _ in examples) > 100
    for q, a in examples + [x for _, ex in train_conversations(50, seed=6) for x in ex]:
        if a.isdigit():
            x, y, op = asked(q)
            assert str(x + y if op == "+" else x - y) == a and not is_held_out(x, y, op), q
    assert train_examples(300, seed=3, reworded=0.0) != train_examples(300, seed=3)


def test_wide_rewording_keeps_the_numbers_and_leaves_the_default_data_alone():
    """`wide` (words before the question, second sentences after) asks the same training triples, draws
    nothing when off (the data of the shipped model's first steps is unchanged), and stays clear of
    the probe script's unseen endings, which measure what no training data has."""
    rng = random.Random(1)
    variants = {reword("What is 13 + 4?", rng, wide=True) for _ in range(300)}
    assert all(re.findall(r"\d+", v) == ["13", "4"] for v in variants)
    assert any(v.startswith(PREFIXES) for v in variants) and any(v.endswith(WIDE_ENDINGS) for v in variants)
    assert train_examples(500, seed=7) == train_examples(500, seed=7, wide=False)
    assert train_conversations(20, seed=8) == train_conversations(20, seed=8, wide=False)
    wide = train_examples(3000, seed=5, wide=True) + [x for _, ex in train_conversations(50, seed=6, wide=True)
                                                       for x in ex]
    assert wide != train_examples(3000, seed=5) and any(q.startswith(PREFIXES) for q, _ in wide)
    for q, a in wide:
        if a.isdigit():
            x, y, op = asked(q)
            assert str(x + y if op == "+" else x - y) == a and not is_held_out(x, y, op), q
    probe = _probe_script()
    unseen_tails = {p.split("{b}")[-1] for p, _ in probe.UNSEEN}
    assert not unseen_tails & set(WIDE_ENDINGS)


def _script(name: str):
    """A module of scripts/ (not a package), loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe_script():
    return _script("probe_demo_phrasings")


def _trainer():
    return _script("train_demo_model")


def test_training_conversations_are_what_chat_sends(engine):
    """The trainer's token sequences equal what `chat` encodes after trim_to_fit, replies included."""
    train = _trainer()
    enc = train.ChatEncoder(engine.tokenizer, engine.template)
    rng = random.Random(0)
    for budget in (512, 160):
        for system, exchanges in train_conversations(12, seed=9, max_turns=30):
            ids, tgt = enc.sequence(system, exchanges, budget, rng, wrong=0.0)
            messages = ([{"role": "system", "content": system}] if system else [])
            for q, a in exchanges[:-1]:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": exchanges[-1][0]})

            def count(m):
                return len(encode_chat(engine.tokenizer, engine.template, m, add_generation_prompt=True))

            kept, _ = trim_to_fit(messages, count, budget)
            prompt = encode_chat(engine.tokenizer, engine.template, kept, add_generation_prompt=True)
            reply = engine.tokenizer.encode(exchanges[-1][1], add_special_tokens=False) + [106]
            assert ids == (prompt + reply)[:-1]
            # the loss is on every reply that was kept (its text and <turn|>), nothing else
            replies = [m["content"] for m in kept if m["role"] == "assistant"] + [exchanges[-1][1]]
            want = sum(len(engine.tokenizer.encode(r, add_special_tokens=False)) + 1 for r in replies)
            assert sum(t != -100 for t in tgt) == want
            assert tgt[-len(reply):] == reply


def test_demo_holds_a_conversation(engine):
    """40 questions in one chat at the demo's default context: the oldest turns get dropped, and
    the answers stay right (scripts/soak_chat.py drives the real CLI for 120 turns)."""
    session = ChatSession(engine, Settings(),  # the CLI's defaults: half the context kept for the reply
                          context=default_context(engine.loaded.args.max_position_embeddings, None))
    rng = random.Random(11)
    right, trimmed = 0, False
    for _ in range(40):
        a, b = rng.randrange(100), rng.randrange(100)
        if rng.random() < 0.5:
            q, want = f"What is {a} + {b}?", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, want = f"What is {a} minus {b}?", a - b
        session.ask(q)
        reply = session.respond()
        list(reply)
        session.commit(reply)
        trimmed = trimmed or bool(reply.dropped)
        right += reply.answer.strip() == str(want)
    assert trimmed
    assert right >= 34, right
