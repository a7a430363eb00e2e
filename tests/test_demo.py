"""The shipped demo model (localrun/data/demo) answers arithmetic, and its dataset is sound."""

from __future__ import annotations

import pytest
import torch

from localrun.demo import (
    arithmetic_triples,
    demo_model_dir,
    has_carry,
    held_out_questions,
    is_held_out,
    train_examples,
)
from localrun.engine import Engine
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


# The shipped checkpoint (scripts/train_demo_model.py defaults: 4000 steps, half the arithmetic
# drawn from carry/borrow cases) scores 0.976 on all 777 held-out questions, bf16 and nf4 alike.
def test_held_out_accuracy(engine):
    questions = held_out_questions(200)
    wrong = [(q, want, got) for q, want in questions if (got := ask(engine, q)) != want]
    assert 1 - len(wrong) / len(questions) >= 0.90, wrong


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
