"""One-shot accuracy of the demo model per phrasing: the ones it was trained on, the soak's, and
probes that only move the numbers relative to the end of the prompt.

The shipped demo reads the operands at fixed distances from the end of the prompt: a phrasing
that puts one more token after the last number ("What is {a} + {b} ?", "... now?") or drops the
spaces around the operator ("{a}+{b}") gets the tens digit wrong, in a chat as in one question
(issue 15). Greedy, through the chat template, as `localrun run demo QUESTION` answers.

    python scripts/probe_demo_phrasings.py                     # every group, 60 questions each
    python scripts/probe_demo_phrasings.py --group probe -n 200 --model /tmp/demo
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localrun import demo  # noqa: E402
from localrun.engine import Engine  # noqa: E402
from localrun.sampling import SamplingParams  # noqa: E402

# (phrasing, op): one token more or less after the last number, operator spacing, trailing words,
# the numbers in the other order. The shipped model was trained on none of them; most of their
# endings are among localrun.demo.ENDINGS now (what a rebuild trains on), so "unseen" keeps a set
# that no training data has, for what a user types next.
PROBES = (
    ("What is {a} + {b} ?", "+"), ("What is {a} + {b}  ?", "+"), ("What is {a} + {b} now?", "+"),
    ("What is {a} + {b}, please?", "+"), ("{a} + {b}=", "+"), ("{a}+{b}?", "+"), ("{a} +{b}?", "+"),
    ("{a}+ {b}?", "+"), ("Add {b} to {a}.", "+"), ("So, what is {a} + {b}?", "+"),
    ("What is {a} - {b} ?", "-"), ("What is {a} - {b} now?", "-"), ("{a}-{b}?", "-"), ("{a} - {b}=", "-"),
    ("Subtract {b} from {a} please.", "-"), ("Take {b} from {a}.", "-"), ("So, what is {a} - {b}?", "-"),
)
UNSEEN = (
    ("What is {a} + {b} right now?", "+"), ("What is {a} + {b}, my friend?", "+"), ("{a} + {b} equals what?", "+"),
    ("Tell me {a} + {b}.", "+"), ("{a} plus {b} is?", "+"), ("What is {a} + {b}? Answer fast.", "+"),
    ("What is {a} - {b} right now?", "-"), ("{a} - {b} equals what?", "-"), ("Tell me {a} - {b}.", "-"),
    ("Subtract {b} from {a}, my friend.", "-"), ("{a} minus {b} is?", "-"), ("What is {a} - {b}? Answer fast.", "-"),
)


def soak_phrasings() -> list[tuple[str, str]]:
    spec = importlib.util.spec_from_file_location("soak_chat", REPO / "scripts" / "soak_chat.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    return [(p, "+") for p in soak.ADD] + [(p, "-") for p in soak.SUB]


def groups() -> dict[str, list[tuple[str, str]]]:
    return {
        "trained": [(p, "+") for p in demo.ADD_PHRASES] + [(p, "-") for p in demo.SUB_PHRASES],
        "trained-chat": [(p, "+") for p in demo.CHAT_ADD_PHRASES] + [(p, "-") for p in demo.CHAT_SUB_PHRASES],
        "soak": soak_phrasings(),
        "probe": list(PROBES),
        "unseen": list(UNSEEN),
    }


def answer(engine: Engine, question: str) -> str:
    steps = engine.stream(engine.encode_prompt(question), SamplingParams(temperature=0.0), max_tokens=8)
    return "".join(text for text, _ in engine.stream_text(steps)).strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=demo.demo_model_dir())
    ap.add_argument("--group", action="append", choices=sorted(groups()), help="default: all")
    ap.add_argument("-n", type=int, default=60, help="questions per phrasing (random operands below 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", default="nf4", help="as the chat loads the demo (nf4)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    engine = Engine.load(a.model, device="cpu", experts=a.experts, dtype=None)  # as `chat` loads it (--dtype auto)
    t0 = time.time()
    for name in a.group or list(groups()):
        rng = random.Random(a.seed)
        right = total = 0
        print(f"{name}:")
        for phrase, op in groups()[name]:
            wrong = []
            for _ in range(a.n):
                x, y = rng.randrange(100), rng.randrange(100)
                if op == "-":
                    x, y = max(x, y), min(x, y)
                want = str(x + y if op == "+" else x - y)
                got = answer(engine, phrase.format(a=x, b=y))
                if got != want:
                    wrong.append(f"{x} {op} {y} -> {got!r}")
            right += a.n - len(wrong)
            total += a.n
            print(f"  {1 - len(wrong) / a.n:6.1%}  {phrase:48s} {', '.join(wrong[:3])}", flush=True)
        print(f"  {right / total:6.1%}  all {name} ({total} questions)\n", flush=True)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
