"""Exact-match accuracy of the demo model on held-out arithmetic, per expert setting.

Greedy decoding through the chat template, as `localrun run localrun/data/demo "What is 17 + 25?"`
does it. The held-out (a, b, op) triples never appear in training (see localrun.demo).

    python scripts/eval_demo.py                                  # bf16 experts, all held-out questions
    python scripts/eval_demo.py --experts bf16 --experts nf4 --resident-experts 0.25 -n 200
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from localrun.demo import demo_model_dir, held_out_questions  # noqa: E402
from localrun.engine import Engine  # noqa: E402
from localrun.errors import LocalrunError  # noqa: E402
from localrun.sampling import SamplingParams  # noqa: E402


def answer(engine: Engine, question: str, max_tokens: int = 8) -> str:
    ids = engine.encode_prompt(question)
    steps = engine.stream(ids, SamplingParams(temperature=0.0), max_tokens=max_tokens)
    return "".join(text for text, _ in engine.stream_text(steps)).strip()


def accuracy(engine: Engine, questions: list[tuple[str, str]]) -> tuple[float, list[tuple[str, str, str]]]:
    wrong = []
    for q, want in questions:
        got = answer(engine, q)
        if got != want:
            wrong.append((q, want, got))
    return 1 - len(wrong) / len(questions), wrong


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=demo_model_dir())
    ap.add_argument("--experts", action="append", help="expert precision(s) passed to Engine.load (default bf16)")
    ap.add_argument("--resident-experts", type=float, action="append",
                    help="fraction(s) of experts kept resident, passed to Engine.load if it accepts it")
    ap.add_argument("-n", type=int, default=None, help="evaluate only the first n held-out questions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show-wrong", type=int, default=5, help="print up to this many wrong answers per setting")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    questions = held_out_questions(a.n)
    load_params = inspect.signature(Engine.load).parameters
    from localrun.loader import load_model  # Engine.load forwards its keywords to load_model
    load_params = {**load_params, **inspect.signature(load_model).parameters}
    resident = a.resident_experts or [None]
    # the loader's keyword for it (the CLI's --resident-experts maps to load_model's resident_fraction)
    resident_kw = next((k for k in ("resident_fraction", "resident_experts") if k in load_params), None)
    if a.resident_experts and resident_kw is None:
        print("--resident-experts: not available yet (Engine.load has no resident-experts option); ignored")
        resident = [None]

    rows = []
    for experts in a.experts or ["bf16"]:
        for frac in resident:
            kwargs = {"experts": experts, "dtype": None}  # dtype None: what `run` and `chat` use (--dtype auto)
            if frac is not None:
                kwargs[resident_kw] = frac
            label = f"experts={experts}" + ("" if frac is None else f" resident={frac:g}")
            try:
                engine = Engine.load(a.model, device="cpu", **kwargs)
            except LocalrunError as e:
                rows.append((label, None, f"not available: {e}"))
                continue
            t0 = time.time()
            acc, wrong = accuracy(engine, questions)
            rows.append((label, acc, f"{len(questions)} questions, {time.time() - t0:.1f}s"))
            for q, want, got in wrong[: a.show_wrong]:
                print(f"  [{label}] {q!r}: want {want!r}, got {got!r}")

    width = max(len(r[0]) for r in rows)
    print(f"\n{'setting':<{width}}  accuracy  note")
    for label, acc, note in rows:
        print(f"{label:<{width}}  {'   -    ' if acc is None else f'{acc:8.3f}'}  {note}")


if __name__ == "__main__":
    main()
