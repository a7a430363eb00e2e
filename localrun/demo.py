"""The built-in demo model's task: a deterministic chat dataset, and where the checkpoint ships.

Two-number addition and subtraction with operands below 100, asked in varied phrasings and
answered with the bare number, plus a small fixed table of capitals and a few greetings.
Subtraction always takes the smaller number from the larger (answers are never negative).
Held-out (a, b, op) triples are chosen by a hash of the triple itself, so the split does not
depend on generation order and train/held-out are disjoint by construction.
"""

from __future__ import annotations

import random
import re
import zlib
from importlib import resources
from pathlib import Path

from .tiny import default_corpus

ADD_PHRASES = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "What's {a} plus {b}?",
    "{a} plus {b}?",
    "{a} + {b}?",
    "{a} + {b} =",
    "Add {a} and {b}.",
    "Add {a} to {b}.",
    "What is the sum of {a} and {b}?",
    "How much is {a} + {b}?",
    "Compute {a} + {b}.",
    "Calculate {a} plus {b}.",
    "What do you get if you add {a} and {b}?",
    "Please add {a} and {b}.",
)
SUB_PHRASES = (
    "What is {a} - {b}?",
    "What is {a} minus {b}?",
    "What's {a} minus {b}?",
    "{a} minus {b}?",
    "{a} - {b}?",
    "{a} - {b} =",
    "Subtract {b} from {a}.",
    "Subtract {b} from {a}",
    "Take {b} away from {a}.",
    "What is the difference between {a} and {b}?",
    "How much is {a} - {b}?",
    "Compute {a} - {b}.",
    "Calculate {a} minus {b}.",
    "What do you get if you subtract {b} from {a}?",
)
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Peru": "Lima", "Russia": "Moscow", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Portugal": "Lisbon", "Mexico": "Mexico City",
    "Australia": "Canberra",
}
CAPITAL_PHRASES = (
    "What is the capital of {c}?",
    "What's the capital of {c}?",
    "Capital of {c}?",
    "Name the capital of {c}.",
    "Which city is the capital of {c}?",
)
CHAT = (
    ("Hello", "Hello! Ask me to add or subtract two numbers."),
    ("Hi", "Hello! Ask me to add or subtract two numbers."),
    ("Hello!", "Hello! Ask me to add or subtract two numbers."),
    ("Who are you?", "I am the localrun demo model, a tiny Gemma 4 MoE."),
    ("What can you do?", "I can add and subtract numbers below 100."),
    ("Thanks!", "You're welcome."),
    ("Thank you", "You're welcome."),
)
DEMO_PAIRS = {(17, 25, "+"), (40, 9, "-")}  # the README's examples are always trained on
HELD_OUT_MOD = 20  # 1 in 20 (a, b, op) triples is held out


def answer(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def is_held_out(a: int, b: int, op: str) -> bool:
    if (a, b, op) in DEMO_PAIRS:
        return False
    return zlib.crc32(f"{a}{op}{b}".encode()) % HELD_OUT_MOD == 0


def arithmetic_triples(held_out: bool) -> list[tuple[int, int, str]]:
    """Every (a, b, op) with operands below 100 (a >= b for "-") on one side of the split."""
    out = [(a, b, "+") for a in range(100) for b in range(100)]
    out += [(a, b, "-") for a in range(100) for b in range(a + 1)]
    return [t for t in out if is_held_out(*t) == held_out]


def arithmetic_question(a: int, b: int, op: str, rng: random.Random) -> tuple[str, str]:
    phrase = rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES)
    return phrase.format(a=a, b=b), str(answer(a, b, op))


def held_out_questions(n: int | None = None, seed: int = 1) -> list[tuple[str, str]]:
    """(question, answer) for held-out triples, in a fixed shuffled order; `n` limits how many."""
    rng = random.Random(seed)
    triples = arithmetic_triples(held_out=True)
    rng.shuffle(triples)
    return [arithmetic_question(*t, rng) for t in triples[:n]]


def has_carry(a: int, b: int, op: str) -> bool:
    """Whether the units digits carry (addition) or borrow (subtraction): the usual mistakes."""
    return (a % 10 + b % 10 >= 10) if op == "+" else (a % 10 < b % 10)


def train_examples(n: int, seed: int = 0, extras: float = 0.08, carry: float = 0.0,
                   reworded: float = 0.25, wide: bool = False) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs for training: arithmetic on training triples, plus a fraction
    `extras` of capitals and greetings. A fraction `carry` of the arithmetic is drawn from the
    training triples with a carry or borrow only (held-out triples are never among them), a
    fraction `reworded` gets another ending or operator spacing (`reword`, `wide`). Same arguments, same list."""
    rng = random.Random(seed)
    triples = arithmetic_triples(held_out=False)
    hard = [t for t in triples if has_carry(*t)]
    out = []
    for _ in range(n):
        if rng.random() < extras:
            if rng.random() < 0.75:
                country = rng.choice(sorted(CAPITALS))
                out.append((rng.choice(CAPITAL_PHRASES).format(c=country), CAPITALS[country]))
            else:
                out.append(rng.choice(CHAT))
        else:
            q, a = arithmetic_question(*rng.choice(hard if carry and rng.random() < carry else triples), rng)
            out.append((reword(q, rng, wide) if reworded and rng.random() < reworded else q, a))
    return out


# What follows the last number varies: a model that only saw "... {b}?" and "... {b}." learns to
# read the operands at fixed distances from the end of the prompt, and "What is 5 + 3 ?", "... now?"
# or "{a}+{b}" then get the tens digit wrong (issue 15). No digits, "-" or subtraction words here:
# the tests read the operation back from the question.
ENDINGS = ("", "?", " ?", "??", "!", ".", " =", "=", " = ?", " please", ", please?", " please.", " now?",
           " then?", " equal?", " for me?", " exactly?", " again?", ", thanks", "? Thanks!", " ok?", " quickly?")
OPERATOR_SPACING = ("{}", " {}", "{} ", "  {}  ")
_OPERATOR = re.compile(r" ([+-]) ")
# `wide`: words before the question and a second sentence after it too (the shipped model's last two
# training steps). None of them is among scripts/probe_demo_phrasings.py's unseen endings.
PREFIXES = ("Hey, ", "Quick question: ", "Question: ", "OK so ", "Hmm, ", "Please, ", "Now then, ", "Hi! ", "Well, ")
WIDE_ENDINGS = ("? Quick.", "? Be quick.", "? Just the number.", "? No rush.", ", buddy?", "? Thanks a lot.",
                ". Reply with the number.", "? I need it.", "? Hurry up!", ", pal.", "? Go.", ", if you can?")


def reword(q: str, rng: random.Random, wide: bool = False) -> str:
    """`q` with another ending (what follows its last number or word) and now and then other spacing
    around its + or -; the numbers and their order stay. `wide`: now and then words before it, and
    second sentences among the endings."""
    if _OPERATOR.search(q) and rng.random() < 0.4:
        q = _OPERATOR.sub(lambda m: rng.choice(OPERATOR_SPACING).format(m.group(1)), q, count=1)
    if wide and rng.random() < 0.3:
        q = rng.choice(PREFIXES) + q[0].lower() + q[1:]
    return q.rstrip("?.=! ") + rng.choice(ENDINGS + WIDE_ENDINGS if wide else ENDINGS)


def tokenizer_corpus() -> list[str]:
    """Text the demo tokenizer's BPE merges are learned from: every phrasing, answer and chat frame."""
    rng = random.Random(0)
    lines = []
    for phrase in ADD_PHRASES + SUB_PHRASES:
        for _ in range(20):
            lines.append(phrase.format(a=rng.randrange(100), b=rng.randrange(100)))
    for country, city in CAPITALS.items():
        lines += [p.format(c=country) for p in CAPITAL_PHRASES] + [city]
    for q, a in CHAT:
        lines += [q, a]
    # The chat frame around them, minus its special tokens (those never go through BPE).
    lines += ["user\n", "\n", "model\n", "thought\n", "system\n"] * 50
    return default_corpus() + lines


def demo_model_dir() -> Path:
    """Where the shipped demo checkpoint lives (inside the installed package)."""
    return Path(str(resources.files("localrun") / "data" / "demo"))


# Conversations -------------------------------------------------------------------------------
# A chat asks one question after another, the way people type them: besides the phrasings above
# (which the one-shot held-out set and the tokenizer keep using, unchanged), follow-up phrasings,
# lower case, a missing "?". Training only; the held-out split is the same (a, b, op) hash.

CHAT_ADD_PHRASES = (
    "And {a} + {b}?", "Now {a} + {b}?", "Next: what is {a} + {b}?", "what is {a}+{b}?", "{a}+{b}",
    "How about {a} plus {b}?", "What is {a} plus {b}", "Sum of {a} and {b}?", "{a} + {b}",
    "What does {a} + {b} equal?", "Can you add {a} and {b}?", "And {a} plus {b}?", "{a} plus {b}",
    "what's {a} + {b}", "Now add {a} and {b}.", "OK, {a} + {b}?", "What is {a} + {b} ?", "{a} and {b} added?",
)
CHAT_SUB_PHRASES = (
    "And {a} - {b}?", "Now {a} - {b}?", "Next: what is {a} - {b}?", "what is {a}-{b}?", "{a}-{b}",
    "How about {a} minus {b}?", "What is {a} minus {b}", "{a} - {b}", "What does {a} - {b} equal?",
    "Can you subtract {b} from {a}?", "And {a} minus {b}?", "{a} minus {b}", "what's {a} - {b}",
    "Now subtract {b} from {a}.", "OK, {a} - {b}?", "What is {a} - {b} ?",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.", "You are a calculator. Answer with the number only.",
    "Be brief.", "Answer every question.", "You are the localrun demo model.", "Keep answers short.",
)


class ExchangeDrawer:
    """Draws single exchanges (question, answer) as `train_examples` does, with chat phrasings mixed in."""

    def __init__(self, rng: random.Random, carry: float = 0.5, extras: float = 0.08, variety: float = 0.35,
                 reworded: float = 0.25, wide: bool = False):
        self.rng, self.carry, self.extras, self.variety, self.reworded = rng, carry, extras, variety, reworded
        self.wide = wide
        self.triples = arithmetic_triples(held_out=False)
        self.hard = [t for t in self.triples if has_carry(*t)]

    def arithmetic(self, a: int, b: int, op: str) -> tuple[str, str]:
        rng = self.rng
        if rng.random() < self.variety:
            q = rng.choice(CHAT_ADD_PHRASES if op == "+" else CHAT_SUB_PHRASES).format(a=a, b=b)
        else:
            q = rng.choice(ADD_PHRASES if op == "+" else SUB_PHRASES).format(a=a, b=b)
        if rng.random() < 0.1:
            q = q[0].lower() + q[1:]
        if rng.random() < 0.1:
            q = q.rstrip("?").rstrip()
        if self.reworded and rng.random() < self.reworded:
            q = reword(q, rng, self.wide)
        return q, str(answer(a, b, op))

    def __call__(self) -> tuple[str, str]:
        rng = self.rng
        if rng.random() < self.extras:
            if rng.random() < 0.75:
                country = rng.choice(sorted(CAPITALS))
                return rng.choice(CAPITAL_PHRASES).format(c=country), CAPITALS[country]
            return rng.choice(CHAT)
        pool = self.hard if self.carry and rng.random() < self.carry else self.triples
        return self.arithmetic(*rng.choice(pool))


def train_conversations(n: int, seed: int = 0, max_turns: int = 48, single: float = 0.15, system: float = 0.25,
                        carry: float = 0.5, reworded: float = 0.25,
                        wide: bool = False) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """`n` conversations (system prompt or None, [(question, answer), ...]) on training triples:
    a fraction `single` has one exchange, the rest 2..`max_turns` (long enough that `chat` trims
    them at its default context). Same arguments, same list."""
    rng = random.Random(seed)
    draw = ExchangeDrawer(rng, carry=carry, reworded=reworded, wide=wide)
    out = []
    for _ in range(n):
        k = 1 if rng.random() < single else rng.randint(2, max_turns)
        sys_prompt = rng.choice(SYSTEM_PROMPTS) if rng.random() < system else None
        out.append((sys_prompt, [draw() for _ in range(k)]))
    return out


def held_out_conversations(n: int, seed: int = 2, max_turns: int = 48) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """Conversations whose last question is a held-out triple (the history is training data).
    Not reworded, so the trainer's chat score stays comparable with the shipped model's."""
    rng = random.Random(seed)
    held = arithmetic_triples(held_out=True)
    convs = train_conversations(n, seed=seed + 1000, max_turns=max_turns, single=0.1, reworded=0.0)
    draw = ExchangeDrawer(rng, reworded=0.0)
    return [(s, ex[:-1] + [draw.arithmetic(*rng.choice(held))]) for s, ex in convs]
