"""Replay expert routing traces through the expert cache: hit rate and bytes moved per token, LRU vs LFU.

    python scripts/bench_cache.py                    # synthetic Zipf trace + generated "locality" trace
    python scripts/bench_cache.py --trace trace.json # JSON: [token][layer] -> list of expert ids

Decode only (one token per call), nothing resident unless --resident, every miss copied (device=cpu
cost model); the replay goes through `localrun.experts.LayerCache`, the bookkeeping the store runs.
Payloads are not materialized: each expert counts --expert-mib (3.2 MiB = one 26B-A4B NF4 expert).
"OPT" is Belady's offline optimum (evict the expert used furthest in the future): an upper bound.
"""

from __future__ import annotations

import argparse
import json
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


def report(name: str, trace: Trace, slot_fractions: list[float], nbytes: int, resident_frac: float) -> None:
    n_experts = 1 + max(e for token in trace for ids in token for e in ids)
    layers, tokens, top_k = len(trace[0]), len(trace), len(trace[0][0])
    resident = most_used(trace, n_experts, resident_frac)
    print(f"\n{name}: {tokens} tokens, {layers} layers, {n_experts} experts, top-{top_k}, "
          f"resident {resident_frac:.0%}, expert {nbytes / MIB:.1f} MiB")
    print(f"{'slots/layer':>11} | {'hit rate':^23} | {'MiB copied per token':^26} | winner")
    print(f"{'':>11} | {'LRU':>7} {'LFU':>7} {'OPT':>7} | {'LRU':>8} {'LFU':>8} {'OPT':>8} |")
    wins = {"lru": 0, "lfu": 0, "tie": 0}
    for slots in sorted({max(1, round(frac * n_experts)) for frac in slot_fractions}):
        runs = {p: replay(trace, n_experts, slots, p, nbytes, resident) for p in ("lru", "lfu")}
        runs["opt"] = belady(trace, n_experts, slots, nbytes, resident)
        rate = {p: c.as_dict()["hit_rate"] for p, c in runs.items()}
        mib = {p: c.bytes_copied / tokens / MIB for p, c in runs.items()}
        winner = "lfu" if rate["lfu"] > rate["lru"] else "lru" if rate["lru"] > rate["lfu"] else "tie"
        wins[winner] += 1
        print(f"{slots:>11} | {rate['lru']:7.1%} {rate['lfu']:7.1%} {rate['opt']:7.1%} | "
              f"{mib['lru']:8.1f} {mib['lfu']:8.1f} {mib['opt']:8.1f} | {winner.upper()}")
    best = "LFU" if wins["lfu"] > wins["lru"] else "LRU" if wins["lru"] > wins["lfu"] else "neither"
    print(f"-> {best} wins (slot counts won: LRU {wins['lru']}, LFU {wins['lfu']}, tied {wins['tie']})")


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
    args = ap.parse_args()
    start = time.perf_counter()
    fractions = [float(f) for f in args.slots.split(",")]
    nbytes = round(args.expert_mib * MIB)
    shape = (args.tokens, args.layers, args.experts, args.top_k, args.zipf, args.seed)
    report(f"(a) synthetic Zipf(s={args.zipf})", zipf_trace(*shape), fractions, nbytes, args.resident)
    if args.trace:
        report(f"(b) recorded trace {args.trace}", json.loads(args.trace.read_text()), fractions, nbytes, args.resident)
    else:
        report("(b) generated locality trace (no --trace given)", locality_trace(*shape), fractions, nbytes, args.resident)
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
