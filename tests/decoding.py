"""Helpers the decoder tests share: greedy tokens of a load's static step, and a call recorder."""

from __future__ import annotations

from localrun.bench import bench_prompt
from localrun.generate import generate
from localrun.sampling import SamplingParams, make_sampler


def static_greedy(loaded, n: int, prompt: int = 12) -> list[tuple[int, float]]:
    """(token, logprob) of n greedy tokens through the static decode step after a `prompt`-token prompt."""
    ids = bench_prompt(prompt, loaded.args.vocab_size)
    steps = generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=n, step="static", cache=loaded.kv)
    return [(s.token, s.logprob) for s in steps]


def counting(fn, calls: list):
    """fn, each call's arguments appended to `calls` first."""
    def wrapped(*args):
        calls.append(args)
        return fn(*args)
    return wrapped
