"""Replay expert routing traces through the expert cache: hit rate and bytes moved per token, LRU vs LFU.

    python scripts/bench_cache.py                    # synthetic Zipf trace + generated "locality" trace
    python scripts/bench_cache.py --trace trace.json # JSON: [token][layer] -> list of expert ids
                                                     # (`localrun profile MODEL --prompts F --trace OUT`)
    python scripts/bench_cache.py --record           # + a trace recorded from a tiny 32-expert model,
                                                     #   and decode tok/s of that model per policy

--record writes a tiny random checkpoint (32 experts, top-4), runs a few prompts greedily through
`localrun.profile.RoutingRecorder` and replays that trace too; then it times 64 greedy tokens with
resident_fraction=0.25 under each policy (one CPU thread). The policy kept is the one that moves
fewer bytes on the recorded trace (summed over the slot counts), else on the generated one.

Decode only (one token per call), nothing resident unless --resident, every miss copied (device=cpu
cost model); the replay goes through `localrun.experts.LayerCache`, the bookkeeping the store runs.
Payloads are not materialized: each expert counts --expert-mib (3.2 MiB = one 26B-A4B NF4 expert).
"OPT" is Belady's offline optimum (evict the expert used furthest in the future): an upper bound.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from localrun.experts import POLICIES, Counters, LayerCache

Trace = list[list[list[int]]]  # [token][layer] -> expert ids
MIB = 2**20


def zipf_popularity(n_experts: int, s: float, g: torch.Generator) -> torch.Tensor:
    """Zipf(s) weights over experts in a random order (each layer favours different experts)."""
    ranks = torch.arange(1, n_experts + 1, dtype=torch.float64)
    return (ranks**-s)[torch.randperm(n_experts, generator=g)]


def zipf_trace(tokens: int, layers: int, n_experts: int, top_k: int, s: float, seed: int) -> Trace:
    """(a) Independent tokens, skewed fixed popularity per layer."""
    g = torch.Generator().manual_seed(seed)
    per_layer = []
    for _ in range(layers):
        p_E = zipf_popularity(n_experts, s, g)
        per_layer.append(torch.multinomial(p_E.expand(tokens, -1), top_k, generator=g).tolist())
    return [[per_layer[l][t] for l in range(layers)] for t in range(tokens)]


def locality_trace(
    tokens: int, layers: int, n_experts: int, top_k: int, s: float, seed: int,
    reuse: float = 0.4, topic_len: int = 96,
) -> Trace:
    """(b) fallback: a generated stand-in for a recorded trace, with the structure real routers show:
    a per-layer base popularity mixed with a topic popularity that changes every ~topic_len tokens,
    and consecutive tokens sharing experts (each of the previous token's experts kept with p=reuse)."""
    g = torch.Generator().manual_seed(seed)
    trace: Trace = [[[] for _ in range(layers)] for _ in range(tokens)]
    for l in range(layers):
        base_E = zipf_popularity(n_experts, s, g)
        prev: list[int] = []
        for t in range(tokens):
            if t % topic_len == 0:
                p_E = 0.5 * base_E / base_E.sum() + 0.5 * (topic := zipf_popularity(n_experts, s, g)) / topic.sum()
            keep = [e for e in prev if torch.rand((), generator=g).item() < reuse][: top_k - 1]
            q_E = p_E.clone()
            q_E[keep] = 0.0
            fresh = torch.multinomial(q_E, top_k - len(keep), generator=g).tolist()
            prev = keep + fresh
            trace[t][l] = prev
    return trace


def replay(trace: Trace, n_experts: int, slots: int, policy: str, nbytes: int, resident: list[set[int]]) -> Counters:
    caches = [LayerCache([nbytes] * n_experts, resident[l], slots, POLICIES[policy]()) for l in range(len(trace[0]))]
    for token in trace:
        for cache, ids in zip(caches, token):
            cache.plan((e, 1) for e in ids)
    total = Counters()
    for cache in caches:
        total = total + cache.counters
    return total


def belady(trace: Trace, n_experts: int, slots: int, nbytes: int, resident: list[set[int]]) -> Counters:
    """Offline optimum per layer: on a miss with full slots, evict the member whose next use is furthest."""
    hits = misses = 0
    never = len(trace)
    for l in range(len(trace[0])):
        # next_use[t][e]: first token > t that routes layer l to e
        next_use, upcoming = [None] * len(trace), [never] * n_experts
        for t in range(len(trace) - 1, -1, -1):
            next_use[t] = list(upcoming)
            for e in trace[t][l]:
                upcoming[e] = t
        members: set[int] = set()
        for t, token in enumerate(trace):
            ids = token[l]
            missing = [e for e in ids if e not in resident[l] and e not in members]
            hits += len(ids) - len(missing)  # on-device experts are served first, as the store does
            for e in missing:
                misses += 1
                if slots == 0:
                    continue
                if len(members) >= slots:
                    # Every member needed by this token was already served (hits first, then earlier
                    # misses), so any of them may go, as in the store.
                    members.remove(max(members, key=lambda m: next_use[t][m]))
                members.add(e)
    return Counters(hits=hits, misses=misses, copies=misses, bytes_copied=misses * nbytes)


def most_used(trace: Trace, n_experts: int, fraction: float) -> list[set[int]]:
    """Resident set per layer: the trace's most used experts (what a profiling plan would pick)."""
    k = round(fraction * n_experts)
    out = []
    for l in range(len(trace[0])):
        counts = torch.zeros(n_experts)
        for token in trace:
            counts[token[l]] += 1
        out.append(set(torch.topk(counts, k).indices.tolist()) if k else set())
    return out


def report(name: str, trace: Trace, slot_fractions: list[float], nbytes: int, resident_frac: float) -> dict[str, int]:
    n_experts = 1 + max(e for token in trace for ids in token for e in ids)
    layers, tokens, top_k = len(trace[0]), len(trace), len(trace[0][0])
    resident = most_used(trace, n_experts, resident_frac)
    print(f"\n{name}: {tokens} tokens, {layers} layers, {n_experts} experts, top-{top_k}, "
          f"resident {resident_frac:.0%}, expert {nbytes / MIB:.1f} MiB")
    print(f"{'slots/layer':>11} | {'hit rate':^23} | {'MiB copied per token':^26} | winner")
    print(f"{'':>11} | {'LRU':>7} {'LFU':>7} {'OPT':>7} | {'LRU':>8} {'LFU':>8} {'OPT':>8} |")
    wins = {"lru": 0, "lfu": 0, "tie": 0}
    moved = {"lru": 0, "lfu": 0}
    for slots in sorted({max(1, round(frac * n_experts)) for frac in slot_fractions}):
        runs = {p: replay(trace, n_experts, slots, p, nbytes, resident) for p in ("lru", "lfu")}
        runs["opt"] = belady(trace, n_experts, slots, nbytes, resident)
        rate = {p: c.as_dict()["hit_rate"] for p, c in runs.items()}
        mib = {p: c.bytes_copied / tokens / MIB for p, c in runs.items()}
        for p in moved:
            moved[p] += runs[p].bytes_copied
        winner = "lfu" if mib["lfu"] < mib["lru"] else "lru" if mib["lru"] < mib["lfu"] else "tie"
        wins[winner] += 1
        print(f"{slots:>11} | {rate['lru']:7.1%} {rate['lfu']:7.1%} {rate['opt']:7.1%} | "
              f"{mib['lru']:8.1f} {mib['lfu']:8.1f} {mib['opt']:8.1f} | {winner.upper()}")
    best = "LFU" if moved["lfu"] < moved["lru"] else "LRU" if moved["lru"] < moved["lfu"] else "neither"
    print(f"-> {best} moves fewer bytes (LRU {moved['lru'] / tokens / MIB:.1f}, LFU {moved['lfu'] / tokens / MIB:.1f} "
          f"MiB/token summed over slot counts; slot counts won: LRU {wins['lru']}, LFU {wins['lfu']}, "
          f"tied {wins['tie']})")
    return moved


RECORD_PROMPTS = [
    "What is 17 + 25?",
    "Write a short story about a cat (and a dog).",
    "Count: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.",
    "Hello! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):",
]


def tiny_moe_dir(root: Path) -> Path:
    """A tiny random Gemma 4 MoE checkpoint with enough experts for a cache to matter."""
    from localrun.tiny import tiny_config, write_checkpoint

    return write_checkpoint(root / "tiny-moe-32", tiny_config("moe", num_experts=32, top_k_experts=4))


def record_trace(model_dir: Path, max_tokens: int) -> Trace:
    """Routing of RECORD_PROMPTS (greedy, chat template), every token the model saw."""
    from localrun.engine import Engine
    from localrun.profile import profile_prompts

    engine = Engine.load(model_dir, device="cpu", dtype=torch.float32)
    return profile_prompts(engine, RECORD_PROMPTS, max_tokens=max_tokens, trace=True).trace


def decode_speed(model_dir: Path, policy: str, tokens: int = 64, resident: float = 0.25, repeats: int = 3) -> tuple[float, dict]:
    """Best decode tok/s of `tokens` greedy tokens (ignore eos) under `policy`, and that run's cache counters."""
    from localrun.engine import Engine
    from localrun.sampling import SamplingParams

    best, stats = 0.0, {}
    for _ in range(repeats):  # a fresh load per run: every run starts from an empty cache
        engine = Engine.load(model_dir, device="cpu", dtype=torch.float32, resident_fraction=resident,
                             cache_policy=policy)
        ids = engine.encode_prompt(RECORD_PROMPTS[1])
        last = None
        for last in engine.stream(ids, SamplingParams(), max_tokens=tokens, ignore_eos=True):
            pass
        if last.timings.decode_tokens_per_s > best:
            best, stats = last.timings.decode_tokens_per_s, engine.loaded.store.stats()
    return best, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, help="JSON routing trace: [token][layer] -> expert ids")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity skew exponent")
    ap.add_argument("--slots", default="0.03125,0.0625,0.125,0.25,0.5", help="slots per layer, fractions of experts")
    ap.add_argument("--resident", type=float, default=0.0, help="fraction of each layer's most used experts kept resident")
    ap.add_argument("--expert-mib", type=float, default=3.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="also record and replay a tiny 32-expert model's "
                    "trace, and time its decoding per policy")
    ap.add_argument("--record-tokens", type=int, default=64, help="tokens generated per prompt when recording")
    ap.add_argument("--save-trace", type=Path, help="with --record: write the recorded trace here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # shared CPUs: more threads than cores makes torch far slower
    start = time.perf_counter()
    fractions = [float(f) for f in args.slots.split(",")]
    nbytes = round(args.expert_mib * MIB)
    shape = (args.tokens, args.layers, args.experts, args.top_k, args.zipf, args.seed)
    report(f"(a) synthetic Zipf(s={args.zipf})", zipf_trace(*shape), fractions, nbytes, args.resident)
    if args.trace:
        deciding = report(f"(b) recorded trace {args.trace}", json.loads(args.trace.read_text()), fractions, nbytes,
                          args.resident)
    else:
        deciding = report("(b) generated locality trace (no --trace given)", locality_trace(*shape), fractions,
                          nbytes, args.resident)
    if args.record:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = tiny_moe_dir(Path(tmp))
            trace = record_trace(model_dir, args.record_tokens)
            if args.save_trace:
                args.save_trace.write_text(json.dumps(trace))
            deciding = report(f"(c) recorded from a tiny random MoE ({len(RECORD_PROMPTS)} prompts, "
                              f"{args.record_tokens} tokens each)", trace, fractions, nbytes, args.resident)
            print("\ndecode on the tiny 32-expert model, resident_fraction=0.25, 64 greedy tokens, 1 thread:")
            for policy in ("lru", "lfu"):
                tps, stats = decode_speed(model_dir, policy)
                print(f"  {policy.upper()}: {tps:7.1f} tok/s  hit rate {stats['hit_rate']:.1%}  "
                      f"copies {stats['copies']}  bytes copied {stats['bytes_copied']}")
    kept = "lfu" if deciding["lfu"] < deciding["lru"] else "lru"
    print(f"\npolicy kept (fewer bytes moved on the last trace above): {kept.upper()}")
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
