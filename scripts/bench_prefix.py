"""Time to first token per turn of a 20-turn chat on the bench model, with and without the prefix
cache (localrun/session.py), in one run: python scripts/bench_prefix.py [--turns 20] [--words 40] [--threads 1]

With the cache a turn prefills only its new message (and the reply tokens the cache has not fed),
so its time to first token stays flat; without it every turn prefills the whole conversation.
Both runs are greedy with fixed-length replies, and must give the same replies (checked).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from localrun.bench import bench_model_dir  # noqa: E402
from localrun.chat import ChatSession, Settings  # noqa: E402
from localrun.engine import DTYPES, Engine  # noqa: E402

WORDS = ("the model reads every expert it routes to and keeps the cache warm while the user types "
         "another question about sliding windows prefill chunks and memory").split()


class NoPrefixCache:
    """The engine without its `session`: ChatSession then prefills the whole conversation every turn."""

    session = None

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)


def message(turn: int, words: int) -> str:
    return f"Question {turn}: " + " ".join(WORDS[(turn * 7 + i) % len(WORDS)] for i in range(words))


def chat(engine, turns: int, words: int, reply_tokens: int, context: int) -> list[tuple[int, int, float, str]]:
    session = ChatSession(engine, Settings(max_tokens=reply_tokens, ignore_eos=True), context=context)
    rows = []
    for turn in range(1, turns + 1):
        session.ask(message(turn, words))
        reply = session.respond()
        for _ in reply:
            pass
        session.commit(reply)
        rows.append((reply.prompt_tokens, reply.timings.cached_tokens, reply.timings.ttft_s, reply.answer))
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--words", type=int, default=40, help="words per user message")
    p.add_argument("--reply", type=int, default=32, help="tokens per reply")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=3, help="chats per mode; each turn's fastest time is shown")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    engine = Engine.load(bench_model_dir(), device=a.device, dtype=DTYPES[a.dtype], context=a.context)
    chat(engine, 2, 10, 4, a.context)  # warm-up: lazy inits, allocator
    start = time.perf_counter()
    runs = {mode: [chat(engine if mode == "cached" else NoPrefixCache(engine), a.turns, a.words, a.reply, a.context)
                   for _ in range(a.repeat)] for mode in ("cached", "plain")}
    # per turn, the fastest of the repeats (a busy machine only ever adds time)
    cached, plain = ([(*rows[0][:2], min(r[i][2] for r in runs[mode]), rows[0][3])
                      for i, rows in enumerate(zip(*runs[mode]))] for mode in ("cached", "plain"))
    took = time.perf_counter() - start
    device = cpu_name() if engine.loaded.device.type == "cpu" else torch.cuda.get_device_name(engine.loaded.device)
    print(f"bench model ({bench_model_dir().name}), {a.dtype} on {device}, {torch.get_num_threads()} threads; "
          f"{a.turns} turns of ~{a.words} words, {a.reply}-token replies, context {a.context}, fastest of {a.repeat}")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'ttft cached':>12} {'ttft no cache':>14}")
    for turn, ((n, hit, t1, _), (_, _, t0, _)) in enumerate(zip(cached, plain), 1):
        print(f"{turn:>4} {n:>7} {hit:>7} {t1 * 1000:>10.1f}ms {t0 * 1000:>12.1f}ms")
    same = all([c[3] for c in rows] == [q[3] for q in runs["plain"][0]] for rows in runs["cached"] + runs["plain"])
    r_cached = cached[-1][2] / cached[1][2]
    r_plain = plain[-1][2] / plain[1][2]
    print(f"turn {a.turns} / turn 2 time to first token: {r_cached:.2f}x with the prefix cache, "
          f"{r_plain:.2f}x without; replies identical: {same}; {took:.0f} s in all")


if __name__ == "__main__":
    main()
