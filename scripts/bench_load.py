"""Load-time benchmark: `localrun quantize` once vs quantizing the experts on every load.

    python scripts/bench_load.py                 # synthetic checkpoint in a temp dir, removed at the end
    python scripts/bench_load.py --dir /big/disk  # write it there instead (still removed unless --keep)

Writes a random Gemma 4 MoE checkpoint whose routed experts are >= 2 GiB of bf16, then runs each
step in its own process, so each peak RSS (ru_maxrss) is that step's alone:

    quantize   quantize_checkpoint(SRC, OUT): GB/s of bf16 expert bytes in
    load OUT   load_model(OUT)                  the pre-quantized checkpoint
    load SRC   load_model(SRC, experts="nf4")   quantize-on-load

Goals: loading OUT >= 5x faster than quantize-on-load, and every peak RSS within
    final resident bytes (all tensors the loaded model holds) + 1.5 x one layer's bf16 experts + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
SPEEDUP_GOAL = 5.0
ROOT = Path(__file__).resolve().parents[1]


def bench_config(layers: int, experts: int, hidden: int, moe_intermediate: int) -> dict:
    from localrun.tiny import tiny_config

    kinds = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6 + 1)
    return tiny_config("moe", hidden_size=hidden, moe_intermediate_size=moe_intermediate, num_experts=experts,
                       num_hidden_layers=layers, layer_types=kinds[:layers - 1] + ["full_attention"],
                       intermediate_size=2 * hidden, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                       global_head_dim=256, num_global_key_value_heads=1, top_k_experts=8)


def layer_expert_bytes(cfg: dict) -> int:
    """bf16 bytes of one layer's routed experts (gate_up [E, 2I, H] + down [E, H, I])."""
    return cfg["num_experts"] * 3 * cfg["moe_intermediate_size"] * cfg["hidden_size"] * 2


# -- the steps, each run in a child process -----------------------------------------------------


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def step_write(src: Path, cfg: dict) -> dict:
    from localrun.tiny import write_checkpoint

    t = time.perf_counter()
    write_checkpoint(src, cfg, max_shard_bytes=8 * GIB)  # one big shard, like a real 5 GB one
    return {"seconds": time.perf_counter() - t}


def step_quantize(src: Path, out: Path) -> dict:
    from localrun.prequant import quantize_checkpoint
    from quant.spec import QuantSpec

    t = time.perf_counter()
    quantize_checkpoint(src, out, QuantSpec("nf4"))
    return {"seconds": time.perf_counter() - t}


def held_tensors(loaded) -> list:
    """Every tensor the loaded model holds: parameters, buffers, packed expert buffers (resident or host)."""
    model, store = loaded.model, loaded.store
    tensors = list(model.parameters()) + list(model.buffers())
    for layer in model.layers:
        if getattr(layer, "moe", False) and hasattr(layer.experts, "experts"):
            tensors += [e.buffer for e in layer.experts.experts]
    if store is not None:
        for payloads in list(store._resident.values()) + list(store._host.values()):
            tensors += [p.buffer for p in payloads.values()]
    unique = {id(t): t for t in tensors}
    return list(unique.values())


def step_load(model_dir: Path, experts: str | None) -> dict:
    import torch

    from localrun.loader import load_model

    t = time.perf_counter()
    loaded = load_model(model_dir, experts=experts)
    seconds = time.perf_counter() - t
    # Pre-quantized experts may come back memory-mapped (read on first use): touch one byte per
    # page of every tensor, so "ready" counts reading all the bytes whichever way they were loaded.
    tensors = held_tensors(loaded)
    for x in tensors:
        x.reshape(-1).view(torch.uint8)[::4096].sum()
    ready = time.perf_counter() - t
    with torch.no_grad():  # the model must work, not just exist
        loaded.model(torch.tensor([[2, 300, 301, 302]]))
    return {"seconds": seconds, "ready_seconds": ready,
            "resident_bytes": sum(x.numel() * x.element_size() for x in tensors)}


def child(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    step, *rest = argv
    if step == "write":
        result = step_write(Path(rest[0]), json.loads(rest[1]))
    elif step == "quantize":
        result = step_quantize(Path(rest[0]), Path(rest[1]))
    else:
        result = step_load(Path(rest[0]), rest[1] if len(rest) > 1 else None)
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))


def run_child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"step {args[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-intermediate", type=int, default=512)
    a = p.parse_args()

    cfg = bench_config(a.layers, a.experts, a.hidden, a.moe_intermediate)
    layer_bytes = layer_expert_bytes(cfg)
    expert_bytes = layer_bytes * cfg["num_hidden_layers"]
    base = Path(tempfile.mkdtemp(prefix="bench_load-", dir=a.dir))
    src, out = base / "src", base / "out"
    try:
        print(f"checkpoint: {a.layers} layers x {a.experts} experts, H={a.hidden}, I={a.moe_intermediate}: "
              f"routed experts {gib(expert_bytes)} bf16 ({gib(layer_bytes)} per layer), in {base}", flush=True)
        w = run_child("write", str(src), json.dumps(cfg))
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"wrote {gib(src_bytes)} in {w['seconds']:.1f} s", flush=True)
        q = run_child("quantize", str(src), str(out))
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"quantized to {gib(out_bytes)} in {q['seconds']:.1f} s", flush=True)
        lo = run_child("load", str(out))
        ls = run_child("load", str(src), "nf4")
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)

    final = lo["resident_bytes"]
    bound = final + 1.5 * layer_bytes + GIB
    speedup = ls["ready_seconds"] / lo["ready_seconds"]
    rows = [
        ("quantize SRC -> OUT", q["seconds"], q["seconds"], f"{expert_bytes / q['seconds'] / 1e9:.3f} GB/s in",
         q["peak_rss"]),
        ("load OUT (pre-quantized)", lo["seconds"], lo["ready_seconds"], f"{speedup:.1f}x faster", lo["peak_rss"]),
        ("load SRC (quantize on load)", ls["seconds"], ls["ready_seconds"], "", ls["peak_rss"]),
    ]
    print()
    print(f"{'step':<30}{'load_model s':>13}{'ready s':>9}  {'':<18}{'peak RSS':>10}{'RSS bound':>11}  RSS")
    for name, sec, ready, note, rss in rows:
        print(f"{name:<30}{sec:>13.2f}{ready:>9.2f}  {note:<18}{gib(rss):>10}{gib(bound):>11}  "
              f"{'PASS' if rss <= bound else 'FAIL'}")
    print("\nready = load_model + first touch of every page the model holds (OUT's experts may be memory-mapped)")
    print(f"bound = final resident {gib(final)} + 1.5 x layer experts {gib(layer_bytes)} + 1 GiB = {gib(bound)}"
          f" (quantize-on-load resident: {gib(ls['resident_bytes'])})")
    print(f"load OUT >= {SPEEDUP_GOAL:.0f}x faster than quantize-on-load (ready): {speedup:.1f}x  "
          f"{'PASS' if speedup >= SPEEDUP_GOAL else 'FAIL'}")
    ok = speedup >= SPEEDUP_GOAL and all(r[4] <= bound for r in rows)
    print(f"overall: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
