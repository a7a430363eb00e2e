"""A long chat with `localrun chat`, driven through a pseudo-terminal as a user would drive it.

Asks N arithmetic questions in a row (fresh operands below 100 and a varied phrasing each turn;
subtraction takes the smaller number from the larger), checks every answer, and reads the chat
process's resident memory after every turn. Prints each turn, the turn where the chat started
dropping the oldest messages, RSS every 10 turns, accuracy per block of 20 turns, the wrong
answers per phrasing and the RSS growth; `--log FILE` writes every turn as a JSON line (phrasing,
operands, answer, whether trimming had begun); `--check` exits 1 when the issue-15 acceptance is
not met.

    python scripts/soak_chat.py                       # 120 turns with the built-in demo model
    python scripts/soak_chat.py --turns 200 --seed 7 --check -- --context 512
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Phrasings a user types; some are not among the demo's training phrasings on purpose.
ADD = ("What is {a} + {b}?", "What is {a} plus {b}?", "{a} + {b}?", "{a}+{b}", "And {a} + {b}?",
       "How much is {a} + {b}?", "Add {a} and {b}.", "what's {a} plus {b}", "Compute {a} + {b}.",
       "What is the sum of {a} and {b}?", "Now {a} plus {b}?", "{a} + {b} =", "Calculate {a} plus {b}.",
       "What do you get if you add {a} and {b}?")
SUB = ("What is {a} - {b}?", "What is {a} minus {b}?", "{a} - {b}?", "{a}-{b}", "And {a} - {b}?",
       "How much is {a} - {b}?", "Subtract {b} from {a}.", "what's {a} minus {b}", "Compute {a} - {b}.",
       "Take {b} away from {a}.", "Now {a} minus {b}?", "{a} - {b} =", "Calculate {a} minus {b}.",
       "What is the difference between {a} and {b}?")
STATS = re.compile(r"(\d+) tokens? · ttft [^\n]*?RSS ([\d.]+) (MB|GB)[^\n]*\r?\n")
DROPPED = re.compile(r"\(context full: dropped the (\d+) oldest messages")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def question(rng: random.Random) -> tuple[str, int, str, int, int]:
    """(question, answer, phrasing, a, b)."""
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        phrase = rng.choice(ADD)
        return phrase.format(a=a, b=b), a + b, phrase, a, b
    a, b = max(a, b), min(a, b)
    phrase = rng.choice(SUB)
    return phrase.format(a=a, b=b), a - b, phrase, a, b


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MB per turn."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for one reply")
    ap.add_argument("--quiet", action="store_true", help="only every 10th turn and the summary")
    ap.add_argument("--check", action="store_true", help="exit 1 unless the issue-15 acceptance holds")
    ap.add_argument("--log", type=Path, help="write every turn here as a JSON line")
    ap.add_argument("chat_args", nargs="*", help="more `localrun chat` arguments (after --)")
    a = ap.parse_args(argv)
    import pexpect  # in the test extra

    rng = random.Random(a.seed)
    home = tempfile.mkdtemp(prefix="soak-")
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "LOCALRUN_HOME": home,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-c", "from localrun.cli import main; main()", "chat", a.model, "--quiet", *a.chat_args]
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=a.timeout,
                          dimensions=(50, 400), cwd=home)
    child.expect_exact(">>> ", timeout=300)
    print(f"chat process {child.pid}: {' '.join(cmd[2:])}", flush=True)
    results: list[bool] = []
    wrong_by_phrase: collections.Counter = collections.Counter()
    log = a.log.open("w") if a.log else None
    rss: dict[int, float] = {}
    trimmed_at = None
    t0 = time.time()
    for turn in range(1, a.turns + 1):
        q, want, phrase, x, y = question(rng)
        child.sendline(q)
        child.expect(STATS)
        out = ANSI.sub("", child.before).replace("\r", "")
        child.expect_exact(">>> ")
        lines = out.split("\n")
        if lines and lines[0].strip() == q.strip():  # the terminal's echo of what was typed
            lines = lines[1:]
        note = ""
        m = DROPPED.search(out)
        if m:
            note = f"  (dropped {m.group(1)})"
            trimmed_at = trimmed_at or turn
        got = "\n".join(l for l in lines if not DROPPED.search(l)).strip()
        ok = got == str(want)
        results.append(ok)
        wrong_by_phrase[phrase] += not ok
        rss[turn] = rss_mb(child.pid)
        if log:
            log.write(json.dumps({"turn": turn, "question": q, "phrasing": phrase, "a": x, "b": y, "want": want,
                                  "got": got, "ok": ok, "trimming": trimmed_at is not None}) + "\n")
        if not a.quiet or turn % 10 == 0 or not ok:
            print(f"turn {turn:4d} {'ok ' if ok else 'BAD'} {q!r} -> {got!r}" + ("" if ok else f" (want {want})")
                  + note, flush=True)
        if turn % 10 == 0:
            print(f"  RSS at turn {turn}: {rss[turn]:.1f} MB ({time.time() - t0:.0f} s)", flush=True)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    if log:
        log.close()

    n = len(results)
    print(f"\n{a.turns} turns, seed {a.seed}: {sum(results)}/{n} right ({sum(results) / n:.1%})")
    print(f"trimming began at turn {trimmed_at}" if trimmed_at else "the context never filled (no trimming)")
    blocks = []
    for s in range(0, n, 20):
        block = results[s:s + 20]
        blocks.append(sum(block) / len(block))
        print(f"  turns {s + 1:3d}-{s + len(block):3d}: {sum(block)}/{len(block)} right ({blocks[-1]:.0%})")
    if sum(wrong_by_phrase.values()):
        print("wrong answers by phrasing: " + ", ".join(f"{p!r} {n}" for p, n in wrong_by_phrase.most_common() if n))
    print("RSS (MB): " + ", ".join(f"{t}: {rss[t]:.1f}" for t in sorted(rss) if t % 10 == 0 or t == 1))
    ok = sum(results) / n >= 0.90 and min(blocks) >= 0.85
    if n >= 120:
        growth = rss[120] / rss[20] - 1
        per_turn = slope([(t, rss[t]) for t in range(60, 121)])
        print(f"RSS turn 120 vs turn 20: {growth:+.1%}; turns 60-120: {per_turn:+.3f} MB/turn")
        ok = ok and abs(growth) <= 0.15 and per_turn < 0.2
    print("acceptance (>= 90% overall, >= 85% per 20 turns, RSS flat): " + ("met" if ok else "NOT met"))
    return 0 if ok or not a.check else 1


if __name__ == "__main__":
    sys.exit(main())
