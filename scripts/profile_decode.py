"""Where does a decoded token's time go? Per-module wall time (forward hooks) and torch.profiler's top ops.

    python scripts/profile_decode.py                      # the generated bench model, fp32
    python scripts/profile_decode.py MODEL_DIR --dtype bfloat16 --prompt-tokens 512 --tokens 32

Module times are inclusive wall times of each layer's children (attention, dense MLP, router,
experts, norms) summed over layers, measured on the module path: hooks on those modules keep a
Gemma 4 layer off its one-call C decode (DecoderLayer.forward_decode), so the first line also gives
the unhooked decode speed, the path `run` and `bench` take; "rest" is everything else in the step (embedding, RoPE,
layer glue, final norm, lm_head, sampling, generate's bookkeeping). The hooks add a little
overhead of their own; the profiler table is a separate, unhooked run.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from localrun.bench import bench_model_dir, bench_prompt
from localrun.engine import DTYPES
from localrun.generate import generate
from localrun.loader import load_model
from localrun.sampling import SamplingParams, make_sampler


def category(name: str) -> str | None:
    """layers.3.self_attn -> attention; the direct children of a decoder layer only (no double counting)."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers":
        return None
    child = parts[2]
    return {"self_attn": "attention", "mlp": "dense mlp", "router": "router", "experts": "experts"}.get(
        child, "norms" if child.endswith("norm") or "layernorm" in child else None)


def module_breakdown(model, ids, tokens: int) -> tuple[dict[str, float], float]:
    """{category: seconds per decoded token}, total seconds per decoded token."""
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []
    for name, mod in model.named_modules():
        cat = category(name)
        if cat is None:
            continue

        def pre(m, args, cat=cat):
            starts[id(m)] = time.perf_counter()

        def post(m, args, out, cat=cat):
            spent[cat] += time.perf_counter() - starts.pop(id(m))

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    sampler = make_sampler(SamplingParams())
    try:
        steps = generate(model, ids, sampler, max_tokens=tokens + 1)
        next(steps)  # prefill and the first token are not decode
        spent.clear()
        start = time.perf_counter()
        for _ in steps:
            pass
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return {k: v / tokens for k, v in spent.items()}, total / tokens


def decode_seconds(model, ids, tokens: int) -> float:
    """Seconds per decoded token without hooks (the path run and bench take)."""
    steps = generate(model, ids, make_sampler(SamplingParams()), max_tokens=tokens + 1)
    next(steps)
    start = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - start) / tokens


def profiler_table(model, ids, tokens: int, rows: int) -> str:
    sampler = make_sampler(SamplingParams())
    steps = generate(model, ids, sampler, max_tokens=tokens + 1)
    next(steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in steps:
            pass
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="bench", help="model directory, or 'bench' (generated)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--experts", default="bf16", help="routed expert precision (bf16, nf4, fp4)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32, help="decode steps to measure")
    p.add_argument("--repeat", type=int, default=3, help="breakdown runs; the fastest is shown")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--rows", type=int, default=25, help="profiler rows")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = bench_model_dir() if a.model == "bench" else a.model
    model = load_model(model_dir, dtype=DTYPES[a.dtype], experts=a.experts).model
    ids = bench_prompt(a.prompt_tokens, model.args.vocab_size)
    module_breakdown(model, ids, 2)  # warm-up
    parts, total = min((module_breakdown(model, ids, a.tokens) for _ in range(a.repeat)), key=lambda r: r[1])
    parts["rest"] = total - sum(parts.values())
    plain = min(decode_seconds(model, ids, a.tokens) for _ in range(a.repeat))
    print(f"decode, {a.dtype}, experts {a.experts}, prompt {a.prompt_tokens}, {a.tokens} tokens, {torch.get_num_threads()} threads: "
          f"{plain * 1e3:.2f} ms/token ({1 / plain:.1f} tok/s) as run decodes; with the hooks below (module path) "
          f"{total * 1e3:.2f} ms/token")
    for cat, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<10} {s * 1e3:8.2f} ms/token  {s / total:6.1%}")
    print()
    print(profiler_table(model, ids, a.tokens, a.rows))


if __name__ == "__main__":
    main()
