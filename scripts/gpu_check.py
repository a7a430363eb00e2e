#!/usr/bin/env python3
"""The one prepared command for a session lent a GPU: prove and measure localrun's CUDA paths.

    python scripts/gpu_check.py OUTDIR            # on a CUDA machine (see ../shared/gpu/README.md)
    python scripts/gpu_check.py OUTDIR --dry      # on the CPU: every step, CPU stand-ins for CUDA

Each step runs in a child process of its own under a time limit, so a CUDA error or a hang costs
that step, not the report. Results stream to stdout as they come and end up in OUTDIR as
`gpu_check.json` (everything) and `gpu_check.md` (the report to commit under docs/gpu/), rewritten
after every measurement: a step stopped by its limit or by the end of the lease keeps what it measured
(under `partial`). `--deadline SECONDS` starts no measurement after that many seconds from the start
(they are reported as skipped), so a run sized to the lease ends with its report whole.

Steps:
  env        versions, device, measured device-to-device and pinned host-to-device bandwidth
  exact      CUDA fp32 vs CPU fp32 greedy tokens and logprobs at resident 1.0 / 0.5 / 0 (tiny, bench);
             CUDA bf16: first divergence from fp32 and the logprob difference before it, also of the graphs
             step without the half-precision kernels (bf16's own noise); the graphs step with those kernels
             (fused glue, qkv_write, the next norm, rope_rows) vs the same step without them, and each fed
             fp32's tokens vs fp32
  demo       the demo model answers "What is 17 + 25?" with 42 on CUDA with every expert in host RAM
  big        random-weight model with the real 26B-A4B config (built in memory, quantized to NF4
             on the device): planned vs placed vs peak vs reserved bytes; decode and prefill tok/s;
             kernel launches and host syncs per decoded token; once every expert resident, once
             under a forced 16 GiB budget; all resident, decode tok/s of the graphs step by default
             and with each open switch (v4 MoE, v4's gate_up alone, PDL, parallel_mlp, norms_route,
             fused_qkv_attention off, the in-place combine, every open switch at once, the L2 prefetch
             of three target sets, the down matrices asked of the L2 by gate_up) in alternating
             rounds (decode_ab_graphs: each side's rounds, median, spread, ratio to the default;
             GPU_CHECK_AB_ROUNDS, 3), then with GPU_CHECK_DECIDED=1 (the default; 0 for a lease's first
             call) each default decode kernel off and each other opt-in one on in the same rounds;
             then the winners together (each side that beat the default after both prompts by more
             than the spreads, the best of each family) against the
             default in the same rounds (decode_ab_graphs_winners, tokens_graphs_winners;
             GPU_CHECK_WINNERS=tag,tag names the sides instead); each switch's launches a token and first greedy
             divergence from the default (per_token_graphs_TAG, tokens_graphs_TAG; GPU_CHECK_SIDE_ROWS=winners:
             the winners' alone, ~5 s a side less; a dry run counts the winners' launches alone, the
             CPU profiler's ~4 s a side); the 512-token prefill
             through the grouped 4-bit GEMMs vs each hit expert dequantized for dense matmuls
             (prefill_grouped_gemm, prefill_dequantize_per_expert), and with the full layers' flash
             attention kernel off (prefill_without_flash_attention); at 16 GiB the 512-token prefill
             through the grouped GEMMs in waves over the device rows vs each expert on its own after its
             copy (prefill_grouped_waves, prefill_per_expert); memory against the plan: what the
             device holds outside torch's allocator vs plan.CUDA_CONTEXT_BYTES (memory_outside_torch_
             after_load, at no cost, then after all of the above: _after_decode, _at_end), what
             capturing the decode graphs adds per span bucket (graph_memory), and at 16 GiB an
             8K-token prompt under the plan's budget: peak vs budget and workspace, out of memory or
             not, prefill tok/s (long_prompt; GPU_CHECK_LONG_PROMPT sets its tokens, 0 skips it)
  kernels    4-bit MoE kernels vs bitsandbytes at 26B-A4B's shapes (decode: v4 and v2 with every
             autotune config's time; the grouped GEMMs at 512 tokens); split-key
             decode attention vs SDPA; a full layer's prefill attention (512 new tokens after 0 / 8192 /
             32768 keys), the flash kernel vs SDPA's math backend (time, error, peak bytes; its tile
             choices after 8192); the Triton GEMV vs cuBLAS at each dense projection shape
  bench      `localrun bench bench --device cuda --graphs both` as a user runs it (the CLI's own report:
             decode and prefill tok/s, bytes a token, copy bandwidth, fraction of the floor)
  attention  which SDPA backends take each of 26B-A4B's layer kinds (decode and prefill), and timings
  compiled   the torch.compile'd static step in CUDA graphs against plain graphs (may take minutes)

--dry replaces CUDA with the CPU and 26B-A4B with a scaled-down model of the same structure, so
the test suite runs every step's code (tests/test_gpu_check.py) and the script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE_CONFIG = ROOT / "scripts" / "configs" / "gemma-4-26B-A4B-it.config.json"
GIB = 1 << 30
# name -> seconds it may take on one H100, in the order they run: what #12 is judged on first. `big`
# (26B-A4B's decode against the floor, the open switches) before `exact` (CUDA fp32 = CPU tokens, which
# held on every run so far): on 2026-11-27 one 540 s call ran exact (246 s) and then only big's resident
# placement (208 s) before the deadline
STEPS = {
    "env": 60,
    "big": 300,  # resident ~210-260 s on the H200 with the switched rows; 16 GiB ~185 s more
    "exact": 250,
    "demo": 60,
    "kernels": 150,
    "bench": 90,
    "attention": 60,
    "compiled": 200,
}
DRY_TIMEOUT = 300


# Helpers shared by the steps -----------------------------------------------------------------

def _torch():
    import torch

    return torch


def device_for(dry: bool):
    torch = _torch()
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry on a machine without a GPU")
    return torch.device("cuda")


def sync(dev) -> None:
    if dev.type == "cuda":
        _torch().cuda.synchronize(dev)


def best_seconds(fn, repeat: int, dev) -> float:
    fn()
    sync(dev)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - start)
    return best


def greedy(model, ids: list[int], n: int, dev, step: str = "eager", cache=None,
           params=None) -> tuple[list[int], list[float]]:
    """n greedy tokens (no stop ids) and their logprobs, through decode step `step` (localrun/step.py);
    with `params` (SamplingParams), sampled that way instead."""
    tokens, logprobs = [], []
    for out in generation(model, ids, n, dev, step, cache, params):
        tokens.append(out.token)
        logprobs.append(out.logprob)
    return tokens, logprobs


def token_ids(model, ids: list[int], n: int, dev, step: str = "eager", cache=None, params=None) -> list[int]:
    """The ids of `generation`'s n tokens, nothing else read (as `localrun run` reads them)."""
    return [out.token for out in generation(model, ids, n, dev, step, cache, params)]


@contextlib.contextmanager
def event_waits_counted():
    """Within: each torch.cuda.Event.synchronize (how generate reads a token's id: a host wait that torch's
    sync debug mode does not report) appended to the yielded list."""
    torch = _torch()
    waits: list[int] = []
    original = torch.cuda.Event.synchronize

    def counted(self):
        waits.append(1)
        return original(self)

    torch.cuda.Event.synchronize = counted
    try:
        yield waits
    finally:
        torch.cuda.Event.synchronize = original


def generation(model, ids: list[int], n: int, dev, step: str = "eager", cache=None, params=None):
    """localrun.generate's iterator of n tokens after `ids` through decode step `step`: greedy (no stop
    ids), or sampled by `params` (SamplingParams)."""
    from localrun.generate import generate
    from localrun.sampling import SamplingParams, make_sampler

    return generate(model, ids, make_sampler(params or SamplingParams(), device=dev), max_tokens=n, step=step,
                    cache=cache)


class _Forced:
    """A sampler that returns the given ids in turn, whatever the logits (teacher forcing)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.n = tokens, 0

    def token(self, logits_V, seen):
        token = self.tokens[min(self.n, len(self.tokens) - 1)]
        self.n += 1
        return _torch().tensor([token], device=logits_V.device)


def forced_logprobs(model, ids: list[int], tokens: list[int], step: str = "eager", cache=None) -> list[float]:
    """The logprobs of `tokens` fed as the reply to `ids` (teacher forcing) through decode step `step`:
    two runs compare on every token, not only up to where their greedy tokens first differ."""
    from localrun.generate import generate

    return [out.logprob for out in generate(model, ids, _Forced(tokens), max_tokens=len(tokens), step=step,
                                            cache=cache)]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logprob_diff_before(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> dict:
    """Two greedy runs (tokens, logprobs): where their tokens first differ, and the largest logprob
    difference before that (at least the first token's)."""
    at = first_divergence(a[0], b[0])
    upto = max(1, len(a[0]) if at is None else at)
    return {"first_divergence": at,
            "max_logprob_diff_before_it": max(abs(x - y) for x, y in zip(a[1][:upto], b[1][:upto]))}


class Progress:
    """The running step's measurements so far, handed to `flush` after each one (so a step stopped
    from outside still reports them), and the check's deadline."""

    def __init__(self) -> None:
        self.open: list[str] = []  # labels of the timed() calls now running, outermost first
        self.done: dict = {}  # "outer / inner" label -> value, of the running step
        self.deadline: float | None = None  # time.time() after which no measurement starts
        self.flush = lambda: None

    def out_of_time(self, needs: float = 0.0) -> bool:
        """Past the deadline, or (`needs` seconds) a measurement that long would end past it."""
        return self.deadline is not None and time.time() + needs > self.deadline

    def record(self, label: str, value) -> None:
        self.done[" / ".join([*self.open, label])] = value
        self.flush()


PROGRESS = Progress()
SKIPPED = {"skipped": "out of time (--deadline)"}


def timed(label: str, fn, results: dict, needs: float = 0.0):
    """Run fn; record its value (or its error) under `label`; print as it goes. Past the deadline,
    or when it `needs` more seconds than are left before it, record that it was skipped instead."""
    if PROGRESS.out_of_time(needs):
        results[label] = SKIPPED if not needs or PROGRESS.out_of_time() else \
            {"skipped": f"out of time (--deadline): it needs about {needs:.0f} s"}
        print(f"  {label}: skipped, out of time", flush=True)
        return results[label]
    start = time.perf_counter()
    PROGRESS.open.append(label)
    try:
        value = fn()
        results[label] = value
        print(f"  {label}: {json.dumps(value, default=str)[:400]} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception as e:  # one check failing must not hide the others
        results[label] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(f"  {label}: FAILED {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
    finally:
        PROGRESS.open.pop()
    PROGRESS.record(label, results[label])
    return results[label]


# Steps ---------------------------------------------------------------------------------------

def step_env(dry: bool) -> dict:
    torch = _torch()
    out: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    for pkg in ("bitsandbytes", "triton", "transformers"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:
            out[pkg] = f"unavailable ({type(e).__name__}: {e})"
    dev = device_for(dry)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update(device=props.name, memory_bytes=props.total_memory, sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
        out["bandwidth"] = bandwidth(dev)
    else:
        out["device"] = "cpu (dry run)"
    return out


def bandwidth(dev) -> dict:
    """Device copy bandwidth (bytes read + written per second) and pinned host-to-device bandwidth."""
    torch = _torch()
    n = 1 * GIB
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    d2d = 2 * n / best_seconds(lambda: b.copy_(a), 5, dev)
    del a, b
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    d = torch.empty(host.shape, dtype=torch.uint8, device=dev)
    h2d = host.numel() / best_seconds(lambda: d.copy_(host, non_blocking=True), 5, dev)
    small = torch.empty(3_350_000, dtype=torch.uint8).pin_memory()  # one 26B-A4B NF4 expert
    ds = torch.empty(small.shape, dtype=torch.uint8, device=dev)
    expert = best_seconds(lambda: ds.copy_(small, non_blocking=True), 20, dev)
    return {"device_copy_bytes_per_s": d2d, "h2d_pinned_bytes_per_s": h2d, "h2d_one_expert_us": expert * 1e6}


def step_attention(dry: bool) -> dict:
    """For each 26B-A4B layer kind: which SDPA backends accept decode (T=1, enable_gqa) and prefill
    (T=512, boolean mask), how long each takes, and what localrun's `attend` costs there."""
    torch = _torch()
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from localrun.models.gemma4 import attend

    dev = device_for(dry)
    args = config_args(dry)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    context = 8192 if not dry else 256
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    out = {}
    kinds = {"sliding": args.layer_types.index("sliding_attention"), "full": args.layer_types.index("full_attention")}
    for kind, layer in kinds.items():
        N, KV, D = args.num_attention_heads, args.layer_kv_heads(layer), args.layer_head_dim(layer)
        window = args.sliding_window if kind == "sliding" else None
        for phase, T in (("decode", 1), ("prefill", 512 if not dry else 32)):
            S = (min(context, window) if window and phase == "decode" else context if phase == "decode"
                 else (window + T if window else T))
            q = torch.randn(1, N, T, D, device=dev, dtype=dtype)
            k = torch.randn(1, KV, S, D, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            mask = None
            if phase == "prefill":
                mask = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T)
            row = {"N": N, "KV": KV, "D": D, "T": T, "S": S, "backends": {}}
            for name, backend in backends.items():
                try:
                    with sdpa_kernel([backend]):
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,  # noqa: E731
                                                                    enable_gqa=KV != N)
                        row["backends"][name] = round(best_seconds(fn, 5, dev) * 1e6, 1)
                except Exception as e:
                    row["backends"][name] = f"rejected: {str(e).splitlines()[0][:120]}"
            pos_S = torch.arange(S, device=dev)
            pos_T = pos_S[S - T:]
            try:
                fn = lambda: attend(q, k, v, pos_T, pos_S, window)  # noqa: E731
                row["localrun_attend_us"] = round(best_seconds(fn, 5, dev) * 1e6, 1)
                row["localrun_backend"] = profiled_backend(fn, dev)
            except Exception as e:
                row["localrun_attend_us"] = f"failed: {type(e).__name__}: {e}"
            out[f"{kind}_{phase}"] = row
    return out


def profiled_backend(fn, dev) -> str:
    """The attention kernel family `fn` launched, read off a profile (flash / efficient / cudnn / math)."""
    if dev.type != "cuda":
        return "cpu"
    torch = _torch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        sync(dev)
    names = " ".join(e.name.lower() for e in prof.events())
    for family, keys in (("localrun triton flash", ("_causal_attention_kernel",)), ("flash", ("flash",)),
                         ("efficient", ("fmha", "efficient", "mem_eff")), ("cudnn", ("cudnn",))):
        if any(key in names for key in keys):
            return family
    return "math (matmul + softmax kernels)"


def config_args(dry: bool):
    """ModelArgs of 26B-A4B, or in a dry run the same structure scaled down to run on a CPU in seconds."""
    from localrun.config import ModelArgs

    config = json.loads(REFERENCE_CONFIG.read_text())
    if dry:
        text = config["text_config"]
        text.update(hidden_size=128, intermediate_size=96, moe_intermediate_size=64, num_experts=16, top_k_experts=4,
                    num_hidden_layers=6, layer_types=text["layer_types"][:6], vocab_size=1024,
                    vocab_size_per_layer_input=1024, head_dim=32, global_head_dim=64, num_attention_heads=4,
                    num_key_value_heads=2, num_global_key_value_heads=1, sliding_window=64)
    return ModelArgs.from_dict(config)


def write_config(dry: bool, where: Path) -> Path:
    config = json.loads(REFERENCE_CONFIG.read_text())
    if dry:
        args = config_args(True)
        text = config["text_config"]
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts", "top_k_experts",
                    "num_hidden_layers", "layer_types", "vocab_size", "vocab_size_per_layer_input", "head_dim",
                    "global_head_dim", "num_attention_heads", "num_key_value_heads", "num_global_key_value_heads",
                    "sliding_window"):
            text[key] = getattr(args, key)
    config.pop("_comment", None)
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps(config))
    return where


def step_exact(dry: bool) -> dict:
    torch = _torch()
    from localrun.bench import bench_model_dir, bench_prompt
    from localrun.loader import load_model
    from localrun.tiny import tiny_config, write_checkpoint

    dev = device_for(dry)
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    models = {"tiny": write_checkpoint(tmp / "tiny", tiny_config("moe"))}
    if not dry:  # the bench model only adds size; the dry run checks the code paths on the tiny one
        models["bench"] = bench_model_dir(tmp)
    n = 24 if not dry else 8
    for name, path in models.items():
        rows: dict = {}
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        ids = bench_prompt(40, vocab)
        ref_tokens, ref_lp = greedy(load_model(path, device="cpu", dtype=torch.float32).model, ids, n, "cpu")
        # graphs with offloaded experts: the segmented step (graphs between the layers' experts)
        steps = ("eager", "graphs") if dev.type == "cuda" else ("eager", "static", "segments")
        for frac in (1.0, 0.5, 0.0):
            for mode in steps if frac == 1.0 else ("eager", steps[-1]):
                def run(frac=frac, mode=mode):
                    loaded = load_model(path, device=str(dev), dtype=torch.float32, resident_fraction=frac)
                    tokens, lp = greedy(loaded.model, ids, n, dev, mode, loaded.kv)
                    return {"tokens_identical": tokens == ref_tokens,
                            "first_divergence": first_divergence(tokens, ref_tokens),
                            "max_logprob_diff": max(abs(a - b) for a, b in zip(lp, ref_lp))}
                timed(f"{name} fp32 {dev.type} vs cpu, resident {frac}, {mode} step", run, rows)

        # bf16's own rounding noise: the default bf16 run, and the unfused one in the glue row's step, vs fp32
        # (the rows above: fp32 on the device is the CPU's); the glue row is read against it (docs/gpu/README.md)
        def bf16(mode=steps[1]) -> dict:
            loaded = load_model(path, device=str(dev), dtype=torch.bfloat16)
            ref = (ref_tokens, ref_lp)
            default = greedy(loaded.model, ids, n, dev)
            with kernel_switched("fused_glue", False, loaded.kv):
                plain = greedy(loaded.model, ids, n, dev, mode, loaded.kv)
            ours = logprob_diff_before(default, ref)
            return {"first_divergence_bf16_vs_fp32": ours["first_divergence"], "tokens": n,
                    "max_logprob_diff_before_it": ours["max_logprob_diff_before_it"],
                    f"unfused, {mode} step": logprob_diff_before(plain, ref)}
        timed(f"{name} bf16 vs fp32 on {dev.type}", bf16, rows)

        def glue(mode=steps[1]) -> dict:  # the half-precision kernels (fp32 runs the unfused ops) vs those ops
            loaded = load_model(path, device=str(dev), dtype=torch.bfloat16)
            fused = greedy(loaded.model, ids, n, dev, mode, loaded.kv)
            fused_lp = forced_logprobs(loaded.model, ids, ref_tokens, mode, loaded.kv)
            with kernel_switched("fused_glue", False, loaded.kv):
                plain = greedy(loaded.model, ids, n, dev, mode, loaded.kv)
                plain_lp = forced_logprobs(loaded.model, ids, ref_tokens, mode, loaded.kv)
            # both fed fp32's tokens: compared on all n, not cut at a divergence; fused should be no farther
            same = {k: max(abs(a - b) for a, b in zip(lp, ref_lp)) for k, lp in (("fused", fused_lp),
                                                                               ("unfused", plain_lp))}
            return {**logprob_diff_before(fused, plain), "tokens": n,
                    "max_logprob_diff_vs_fp32_on_its_tokens": same}
        timed(f"{name} bf16 fused glue vs unfused, {steps[1]} step", glue, rows)
        out[name] = rows
    return out


def step_demo(dry: bool) -> dict:
    torch = _torch()
    from localrun.demo import demo_model_dir
    from localrun.engine import Engine
    from localrun.sampling import SamplingParams

    dev = device_for(dry)
    engine = Engine.load(demo_model_dir(), device=str(dev), dtype=torch.bfloat16, resident_fraction=0.0)
    ids = engine.encode_prompt("What is 17 + 25?")
    text = "".join(t for t, _ in engine.stream_text(engine.stream(ids, SamplingParams(), max_tokens=8)))
    return {"answer": text, "correct": text.strip() == "42", "expert_cache": engine.loaded.expert_stats()}


def step_big(dry: bool) -> dict:
    """26B-A4B with random weights: once every expert resident, once under a 16 GiB budget."""
    torch = _torch()
    dev = device_for(dry)
    out = {}
    placements = {"resident": {}, "16GiB": {"vram": 16 * GIB}} if not dry else \
        {"resident": {}, "half": {"resident_fraction": 0.5}}
    only = os.environ.get("GPU_CHECK_PLACEMENTS")  # e.g. "resident": a shorter check
    if only:
        placements = {k: v for k, v in placements.items() if k in only.split(",")}
    for name, kwargs in placements.items():
        rows: dict = {}
        # the long prompt where the budget is tight (the dry run's offloaded placement stands in for 16 GiB)
        timed(name, lambda: big_model_run(dry, dev, kwargs, rows, long_prompt=name != "resident"), rows)
        out[name] = rows
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def big_model_run(dry: bool, dev, load_kwargs: dict, rows: dict, long_prompt: bool = False) -> dict:
    torch = _torch()
    from localrun.bench import bench_prompt, decode_bytes_per_token
    from localrun.config import load_config
    from localrun.loader import load_model, memory_report
    from localrun.synthetic import RandomCheckpoint

    model_dir = write_config(dry, Path(tempfile.mkdtemp(prefix="gpu-check-big-")))
    args = load_config(model_dir)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    loaded = load_model(model_dir, device=str(dev), dtype=torch.bfloat16, experts="nf4",
                        checkpoint=RandomCheckpoint(args, device=dev), **load_kwargs)
    sync(dev)
    rows["load_s"] = round(time.perf_counter() - start, 2)
    rows["plan"] = {k: loaded.plan.to_dict()[k] for k in ("resident_experts_per_layer", "cache_slots", "device_bytes",
                                                           "host_bytes", "context", "device_budget_bytes")}
    rows["memory_after_load"] = memory_report(loaded)
    rows["bytes_read_per_decoded_token"] = decode_bytes_per_token(loaded.plan)
    PROGRESS.record("plan and memory_after_load", {k: rows[k] for k in ("load_s", "plan", "memory_after_load")})
    print(f"  loaded in {rows['load_s']} s: {json.dumps(rows['memory_after_load'])}", flush=True)
    timed("memory_outside_torch_after_load", lambda: memory_outside_torch(dev), rows)  # no device time
    model = loaded.model
    prompt, gen = (512, int(os.environ.get("GPU_CHECK_GEN", 48))) if not dry else (32, 8)
    if loaded.store is not None:  # offloaded decodes 10-30x slower: keep its three step variants within minutes
        gen = min(gen, 48)
    ids = bench_prompt(prompt, args.vocab_size)
    short = bench_prompt(16, args.vocab_size)
    # graphs: one graph a step when every expert is resident, else graphs between the layers' experts
    modes = ["eager"] + (["graphs"] if dev.type == "cuda" else ["static"] if loaded.store is None else ["segments"])
    for mode in modes:  # graphs off and on in the same run, each on a warm model
        def rates(mode=mode) -> dict:
            # each from its own stamps: the prompt's time to its first token, then first to last token (a
            # difference of two runs' totals moved with the prefill: at 16 GiB its copies take ~1 s of a run)
            greedy(model, ids, 2, dev, mode, loaded.kv)  # warm: this span's graphs, autotuning
            greedy(model, short, 2, dev, mode, loaded.kv)
            # eager: 10-30 tok/s, seconds a run, its own noise small: one run of at most 48 tokens
            runs, n = (1, min(gen, 48)) if mode == "eager" else (2, gen)
            long_runs = [generation_times(model, ids, n, dev, mode, loaded.kv) for _ in range(runs)]
            short_runs = [generation_times(model, short, n, dev, mode, loaded.kv) for _ in range(runs)]
            return {"prefill_tokens_per_s": round(prompt / min(t for t, _ in long_runs), 1),
                    f"decode_tokens_per_s_after_{prompt}": round(max(r for _, r in long_runs), 2),
                    "decode_tokens_per_s_after_16": round(max(r for _, r in short_runs), 2)}
        timed(f"speed_{mode}", rates, rows)
        timed(f"per_token_{mode}", lambda mode=mode: per_token_counts(model, short, dev, mode, loaded.kv), rows)
        if loaded.store is not None:  # offloaded: the GPU idles ~2/3 of a token; where does the host spend it?
            timed(f"host_profile_{mode}", lambda mode=mode: host_profile(model, short, dev, mode, loaded.kv), rows)
        if dev.type == "cuda":  # the figures fit's expected speed takes (hardware.MeasuredEfficiency)
            timed(f"fit_efficiency_{mode}", lambda mode=mode: fit_efficiency(
                rows[f"speed_{mode}"]["decode_tokens_per_s_after_16"], rows[f"per_token_{mode}"],
                rows["bytes_read_per_decoded_token"], args.num_hidden_layers, dev), rows)
        if mode != "eager":  # the H200 once decoded 2.4x slower after 512 than after 16 (at 16 GiB still 1.8x)
            timed(f"per_token_{mode}_after_{prompt}", lambda mode=mode: per_token_counts(
                model, ids, dev, mode, loaded.kv), rows)
            if loaded.store is not None:
                timed(f"host_profile_{mode}_after_{prompt}", lambda mode=mode: host_profile(
                    model, ids, dev, mode, loaded.kv), rows)
        if mode != "eager":  # sampling on the device: still one sync a token with every filter on
            timed(f"per_token_{mode}_sampled", lambda mode=mode: per_token_counts(
                model, short, dev, mode, loaded.kv, sampled_params()), rows)
        if mode in ("graphs", "static") and loaded.store is None:  # the step with one setting switched
            sides = open_switches(loaded.kv)
            if os.environ.get("GPU_CHECK_DECIDED", "1") != "0":  # a short lease: the settled switches wait
                sides.update(decided_switches(loaded.kv))
            # decode tok/s of the default and each switch in alternating rounds: one run each moved by +-5%
            # on the 2026-11-27 H200 (a switch's "after 512" above its "after 16"), too much to decide on
            rounds = 1 if dry else int(os.environ.get("GPU_CHECK_AB_ROUNDS", 3))
            ab_gen = gen if dry else min(gen, 96)
            timed(f"decode_ab_{mode}", lambda mode=mode: decode_ab(
                model, {"16": short, str(prompt): ids}, ab_gen, dev, mode, loaded.kv,
                {"default": lambda: steps_anew(loaded.kv), **sides}, rounds), rows)
            ab = rows.get(f"decode_ab_{mode}")
            chosen = winners_named(sides) or winners(ab if isinstance(ab, dict) else {})
            if chosen:  # the winners together, against the default again: what flipping them all would give
                both = combined(*(sides[tag] for tag in chosen))
                timed(f"decode_ab_{mode}_winners", lambda mode=mode, both=both: {"sides": chosen, **decode_ab(
                    model, {"16": short, str(prompt): ids}, ab_gen, dev, mode, loaded.kv,
                    {"default": lambda: steps_anew(loaded.kv), "winners": both}, rounds)}, rows)
                timed(f"tokens_{mode}_winners", lambda both=both, mode=mode: divergence_when(
                    both, model, short, dev, mode, loaded.kv), rows)
            every = os.environ.get("GPU_CHECK_SIDE_ROWS", "all") != "winners"  # a short lease: the winners' alone
            for tag, switch in sides.items():  # what each switch launches, and whether its tokens stay
                if tag in COMBINED_SIDES or not (every or tag in chosen):
                    continue
                if tag in chosen or not dry:  # dry: the CPU profiler's ~4 s a side for the winners' alone
                    with switch():
                        timed(f"per_token_{mode}_{tag}", lambda mode=mode: per_token_counts(
                            model, short, dev, mode, loaded.kv), rows)
                timed(f"tokens_{mode}_{tag}", lambda switch=switch, mode=mode: divergence_when(
                    switch, model, short, dev, mode, loaded.kv), rows)
    # prefill through the grouped GEMMs (default) vs each hit expert dequantized once (all resident), or, with
    # experts in host RAM, vs each expert computed on its own after its copy (ExpertStore's per-expert path)
    from quant import ffn

    from localrun.models import gemma4

    switch = "GROUPED_PREFILL" if loaded.store is None else "GROUPED_PREFILL_OFFLOADED"

    def prefill(grouped: bool, flash: bool = True, timing: bool = True) -> dict:
        before = getattr(ffn, switch), gemma4.PREFILL_KERNELS["flash_attention"]
        setattr(ffn, switch, grouped)
        gemma4.PREFILL_KERNELS["flash_attention"] = flash
        try:
            tokens, _ = greedy(model, ids, 1, dev, "eager", loaded.kv)
            if not timing:
                return {"first_token": tokens[0]}
            seconds = best_seconds(lambda: greedy(model, ids, 1, dev, "eager", loaded.kv), 2, dev)
        finally:
            setattr(ffn, switch, before[0])
            gemma4.PREFILL_KERNELS["flash_attention"] = before[1]
        return {"prefill_tokens_per_s": round(prompt / seconds, 1), "first_token": tokens[0]}
    if loaded.store is None:
        timed("prefill_grouped_gemm", lambda: prefill(True), rows)
        timed("prefill_dequantize_per_expert", lambda: prefill(False), rows)
        # the full layers through SDPA's math backend (the CPU has no flash kernel to switch: the dry run only runs it)
        timed("prefill_without_flash_attention", lambda: prefill(True, flash=False, timing=dev.type == "cuda"), rows)
    else:  # with the cache's counters over each row's three prefills of the same prompt
        def offloaded(grouped: bool) -> dict:
            since = loaded.store.snapshot()
            out = prefill(grouped)
            return {**out, "expert_cache": loaded.store.stats(since=since)}
        timed("prefill_grouped_waves", lambda: offloaded(True), rows)
        timed("prefill_per_expert", lambda: offloaded(False), rows)
    store = loaded.store
    if store is not None and store.device_compute is not None:  # the same decode, an op per expert (as before)
        rows_compute, store.device_compute = store.device_compute, None
        try:
            timed("speed_eager_per_expert", lambda: rates("eager"), rows)
        finally:
            store.device_compute = rows_compute
        # that one call a layer through the op's dispatch, as before it called the op's kernel directly
        # (DeviceRowsCompute.untraced: ~30 us of Python a call on one EPYC core, on the host's path between segments)
        store.device_compute.untraced = False
        try:
            timed(f"speed_{modes[-1]}_experts_through_the_op", lambda: rates(modes[-1]), rows)
        finally:
            store.device_compute.untraced = True
    rows["memory_after_decode"] = memory_report(loaded)
    if loaded.store is not None:
        rows["expert_cache"] = loaded.expert_stats()
    # Memory the plan has not been measured against, after every measurement above (a few seconds
    # each, the long prompt ~30 s on an H200 at 16 GiB): see memory_outside_torch, graph_memory, long_prompt_run
    timed("graph_memory", lambda: graph_memory(model, loaded, dev, modes[-1], args.vocab_size), rows)
    # with graph_memory's graphs alive (the switches above drop theirs on the way out: `setting`)
    timed("memory_outside_torch_after_decode", lambda: memory_outside_torch(dev, loaded.kv), rows)
    tokens = int(os.environ.get("GPU_CHECK_LONG_PROMPT", LONG_PROMPT if not dry else LONG_PROMPT_DRY))
    if long_prompt and tokens > 0:
        over = rows["memory_outside_torch_after_decode"].get("over_plan_bytes")
        rate = rows.get("speed_eager", {}).get("prefill_tokens_per_s") or 100.0
        timed("long_prompt", lambda: long_prompt_run(model, loaded, dev, modes[-1], args.vocab_size, tokens, over),
              rows, needs=15 + 2 * tokens / rate)  # attention over 8K keys: about half the rate at 512
    timed("memory_outside_torch_at_end", lambda: memory_outside_torch(dev, loaded.kv), rows)  # every kernel loaded
    return {k: rows[k] for k in ("load_s", "bytes_read_per_decoded_token") if k in rows}


# Memory against the plan -----------------------------------------------------------------------
# The plan (localrun/plan.py) budgets a card as total - CUDA_CONTEXT_BYTES - display allowance and
# fills that with placed tensors, rounding, workspace and reserve; at 16 GiB and 8K context it leaves
# tens of MiB. These measure what it has not been checked against: the memory outside torch's
# allocator, the CUDA graphs' pools, and a prompt as long as the context.

LONG_PROMPT = 8192  # tokens of long_prompt_run (the default context); GPU_CHECK_LONG_PROMPT overrides, 0 skips
LONG_PROMPT_DRY = 1024  # the dry run's: two prefill chunks and a span bucket, in a second on the CPU
GRAPH_BUCKETS = (256, 512, 1024)  # span buckets graph_memory captures, in the order a growing chat reaches them


def memory_counters(dev) -> dict:
    """Allocated and reserved bytes now and at their peak since `reset_peaks`: torch's caching allocator on
    CUDA; on the CPU (dry runs) the process's resident set stands in for all four, so the arithmetic runs."""
    torch = _torch()
    if dev.type == "cuda":
        return {"allocated": torch.cuda.memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev),
                "peak_allocated": torch.cuda.max_memory_allocated(dev),
                "peak_reserved": torch.cuda.max_memory_reserved(dev), "t": time.perf_counter()}
    from localrun.bench import peak_rss_bytes

    rss = _rss_bytes()
    peak = peak_rss_bytes() or rss
    return {"allocated": rss, "reserved": rss, "peak_allocated": peak, "peak_reserved": peak, "t": time.perf_counter()}


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux: the stand-in reads 0
        pass
    return 0


def reset_peaks(dev) -> None:
    if dev.type == "cuda":
        _torch().cuda.reset_peak_memory_stats(dev)
    else:
        from localrun.bench import reset_peak_rss

        reset_peak_rss()


def memory_outside_torch(dev, cache=None) -> dict:
    """Device memory in use that torch's allocator does not hold (total - free - reserved): the CUDA
    context, cuBLAS / cuDNN handles, the loaded Triton and bitsandbytes modules, the instantiated CUDA
    graphs (`graph_spans`: those alive in `cache`'s steps). plan.CUDA_CONTEXT_BYTES stands for it in
    every budget; if `over_plan_bytes` is positive, a card that fills its plan runs out by that much.
    The lent GPU runs nothing else, so it is all this process's."""
    from localrun.plan import CUDA_CONTEXT_BYTES

    if dev.type != "cuda":
        return {"skipped": "CPU: no CUDA context (mem_get_info has no CPU meaning)"}
    torch = _torch()
    free, total = torch.cuda.mem_get_info(dev)
    reserved = torch.cuda.memory_reserved(dev)
    outside = total - free - reserved
    steps = {} if cache is None else cache.steps
    return {"outside_torch_bytes": outside, "planned_bytes": CUDA_CONTEXT_BYTES,
            "over_plan_bytes": outside - CUDA_CONTEXT_BYTES, "device_total_bytes": total, "device_free_bytes": free,
            "reserved_bytes": reserved, "graph_spans": {mode: sorted(getattr(step, "_graphs", {}))
                                                        for mode, step in steps.items()}}


@contextlib.contextmanager
def spans_watched(step, dev, spans: dict):
    """Within: each decoded token of `step` (a StaticStep: static, graphs, segments) notes the allocator's
    counters as it starts (`step._load`). The first token of a span bucket captures its graphs
    (step._capture_once), so the counters at the next token's start, less those at its start, are what
    the capture took (its warm-up's side-stream blocks included); the prompt's prefill falls outside.
    spans: span -> {"position", "before", "after"}, filled as buckets are reached. The peaks are reset
    at each bucket's first token: its "before" peaks are the prefill's (reset before the prompt)."""
    load = step._load
    open_: list[dict] = []  # the bucket whose first token ran last, waiting for its "after"

    def noted(token_11, position):
        if open_:
            sync(dev)
            open_.pop()["after"] = memory_counters(dev)
        span = load(token_11, position)
        if span not in spans:
            sync(dev)  # its "t" is then when the prompt's prefill (and first sample) ended
            spans[span] = {"position": position, "before": memory_counters(dev)}
            reset_peaks(dev)
            open_.append(spans[span])
        return span
    step._load = noted
    try:
        yield
    finally:
        del step._load  # the class's again
        if open_:
            sync(dev)
            open_.pop()["after"] = memory_counters(dev)


def growth(seen: dict) -> dict:
    """What one bucket's first token added (spans_watched): bytes allocated and reserved, the peak it reached
    above its start, and its seconds (the capture, warm-up and first replay)."""
    before, after = seen["before"], seen.get("after")
    if after is None:
        return {"position": seen["position"], "unfinished": True}
    return {"position": seen["position"], "allocated_bytes": after["allocated"] - before["allocated"],
            "reserved_bytes": after["reserved"] - before["reserved"],
            "peak_allocated_above_start_bytes": after["peak_allocated"] - before["allocated"],
            "seconds": round(after["t"] - before["t"], 3)}


def graph_memory(model, loaded, dev, mode: str, vocab: int) -> dict:
    """What the decode step's CUDA graphs hold, which no plan component counts: the step dropped (its
    graphs freed, the allocator's cache emptied), then for each of GRAPH_BUCKETS a prompt of half the
    bucket and two decoded tokens (the first captures the bucket, the second replays it). `buckets`:
    each capture's growth (spans_watched; the graphs of a step share one pool, so a later bucket reuses
    what an earlier one freed); `allocated_bytes` / `reserved_bytes`: their sum, what a chat that has
    reached the largest bucket holds for graphs. On the CPU nothing is captured (static / segments
    run uncaptured) and the process's RSS stands in, so the figures there mean little."""
    torch = _torch()
    from localrun.bench import bench_prompt
    from localrun.step import make_step

    cache = loaded.kv
    cache.steps.clear()  # the graphs the measurements above captured, freed (their pools with them)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out: dict = {"mode": mode, "counters": "torch allocator" if dev.type == "cuda" else "process RSS (CPU stand-in)",
                 "reserved_after_dropping_graphs_bytes": memory_counters(dev)["reserved"]}
    step = make_step(model, cache, mode)  # the one greedy's generate takes from cache.steps
    spans: dict = {}
    with spans_watched(step, dev, spans):
        for bucket in GRAPH_BUCKETS:
            if bucket // 2 + 2 <= cache.capacity:
                reset_peaks(dev)
                greedy(model, bench_prompt(bucket // 2, vocab), 3, dev, mode, cache)
    out["buckets"] = {str(span): growth(seen) for span, seen in spans.items()}
    done = [g for g in out["buckets"].values() if "allocated_bytes" in g]
    out["allocated_bytes"] = sum(g["allocated_bytes"] for g in done)
    out["reserved_bytes"] = sum(g["reserved_bytes"] for g in done)
    out["reserved_at_end_bytes"] = memory_counters(dev)["reserved"]
    out["captured"] = sorted(getattr(step, "_graphs", {}))  # spans with graphs (none on the CPU)
    out["graphs_disabled"] = getattr(step, "disabled", None)  # a capture that failed (out of memory too)
    return out


def long_prompt_run(model, loaded, dev, mode: str, vocab: int, tokens: int, context_over_plan: int | None) -> dict:
    """A prompt of `tokens` (at most the context less two) prefilled at this placement, then two tokens
    decoded in `mode` (the first captures the context's largest span bucket). On CUDA the allocator is
    held to the plan's device budget (set_per_process_memory_fraction), as a card of that size would
    hold it, so `out_of_memory` says whether the plan's workspace and reserve cover an 8K prompt (caught,
    reported, freed; the check goes on). Peaks are reset before the prompt: `peak_*` are the prefill's,
    `prefill_transient_bytes` what it allocated above what was already held, against
    plan.workspace_bytes; `headroom_bytes` the budget less the peak reserved; `margin_bytes` that less
    what the memory outside torch exceeds plan.CUDA_CONTEXT_BYTES by: what a card of this size keeps."""
    torch = _torch()
    from localrun.bench import bench_prompt
    from localrun.step import make_step

    cache, plan = loaded.kv, loaded.plan
    n = min(tokens, cache.capacity - 2)
    ids = bench_prompt(n, vocab)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # what a process that never ran the measurements above would hold
    total = torch.cuda.mem_get_info(dev)[1] if dev.type == "cuda" else None
    limit = plan.device_budget if total and plan.device_budget and plan.device_budget < total else None
    out: dict = {"prompt_tokens": n, "context": cache.capacity, "mode": mode, "device_limit_bytes": limit,
                 "device_budget_bytes": plan.device_budget, "workspace_bytes": plan.workspace_bytes,
                 "counters": "torch allocator" if dev.type == "cuda" else "process RSS (CPU stand-in)"}
    before = memory_counters(dev)
    step = make_step(model, cache, mode)
    spans: dict = {}
    if limit:
        torch.cuda.set_per_process_memory_fraction(limit / total, device_index(dev))
    reset_peaks(dev)
    start = time.perf_counter()
    try:
        with spans_watched(step, dev, spans):
            first, _ = greedy(model, ids, 2, dev, mode, cache)
        out["out_of_memory"] = None
        out["first_token"] = first[0]
    except torch.cuda.OutOfMemoryError as e:  # the answer, not a failure of the check
        out["out_of_memory"] = str(e)[:800]
        out["at_out_of_memory"] = memory_counters(dev)
    finally:
        if limit:
            torch.cuda.set_per_process_memory_fraction(1.0, device_index(dev))
    gc.collect()  # the failed prompt's tensors, held by the traceback's frames until now
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    prefill = next(iter(spans.values()), None)  # its first decoded token's start ends the prefill
    end = prefill["before"] if prefill else out.get("at_out_of_memory")
    if prefill:
        seconds = prefill["before"]["t"] - start
        out.update(prefill_s=round(seconds, 3), prefill_tokens_per_s=round(n / seconds, 1))
    if end:
        out.update(peak_allocated_bytes=end["peak_allocated"], peak_reserved_bytes=end["peak_reserved"],
                   allocated_before_bytes=before["allocated"],
                   prefill_transient_bytes=end["peak_allocated"] - before["allocated"])
        if plan.device_budget is not None and dev.type == "cuda":
            out["headroom_bytes"] = plan.device_budget - end["peak_reserved"]
            if context_over_plan is not None:
                out["margin_bytes"] = out["headroom_bytes"] - context_over_plan
    out["decode"] = {str(span): growth(seen) for span, seen in spans.items()}
    out["graphs_disabled"] = getattr(step, "disabled", None)
    return out


def device_index(dev) -> int:
    """dev's CUDA device index ("cuda" alone is the current device): what torch.cuda calls that take no
    unindexed device want (set_per_process_memory_fraction; the 2026-11-27 H200 run's long_prompt died there)."""
    return dev.index if dev.index is not None else _torch().cuda.current_device()


def sampled_params():
    """Every sampling filter on (the issue's list: temperature, top-k, top-p, min-p, repetition penalty)."""
    from localrun.sampling import SamplingParams

    return SamplingParams(temperature=0.8, top_k=64, top_p=0.95, min_p=0.05, repetition_penalty=1.1, seed=0)


@contextlib.contextmanager
def setting(target, name: str, value, cache):
    """Within: `target[name]` (a dict) or `target.name` (a module) set to `value`; the cache's decode
    steps are dropped on the way in and out, so their graphs are captured anew."""
    get, put = ((target.__getitem__, target.__setitem__) if isinstance(target, dict)
                else (lambda n: getattr(target, n), lambda n, v: setattr(target, n, v)))
    before = get(name)
    put(name, value)
    cache.steps.clear()
    try:
        yield
    finally:
        put(name, before)
        cache.steps.clear()


def kernel_switched(name: str, on: bool, cache):
    """Within: the decoder's kernel `name` (models/gemma4.DECODE_KERNELS) on or off (off: its torch ops run)."""
    from localrun.models import gemma4

    return setting(gemma4.DECODE_KERNELS, name, on, cache)


def moe_v4_switched(on: bool, cache):
    """Within: the v4 4-bit MoE decode kernels on or off (on: v4 wherever `chunks_fit`, not v2)."""
    from localrun.kernels import triton_moe

    return setting(triton_moe, "USE_V4", on, cache)


def pdl_switched(on: bool, cache):
    """Within: programmatic dependent launch of the decode step's Triton kernels on or off (opt-in)."""
    from localrun.kernels import triton_pdl

    return setting(triton_pdl, "ENABLED", on, cache)


@contextlib.contextmanager
def steps_anew(cache):
    """Within: the cache's decode steps dropped on the way in and out (the default side of an A/B,
    captured anew as each switch's side is)."""
    cache.steps.clear()
    try:
        yield
    finally:
        cache.steps.clear()


def combined(*switches):
    """A switch (a context manager factory) of several at once."""
    @contextlib.contextmanager
    def within():
        with contextlib.ExitStack() as stack:
            for switch in switches:
                stack.enter_context(switch())
            yield
    return within


COMBINED_SIDES = {"with_every_open_switch"}  # A/B sides whose launches and tokens their parts' rows show


def open_switches(cache) -> dict:
    """The decode step's open questions as A/B sides: tag -> switch (a context manager factory). The
    switches 2026-11-27's H200 run turned on come back switched off, to see them hold."""
    from localrun.kernels import triton_attention, triton_moe
    from localrun.models import gemma4

    v4 = lambda: moe_v4_switched(True, cache)  # noqa: E731
    l2 = lambda: kernel_switched("l2_prefetch", True, cache)  # noqa: E731
    targets = lambda *names: lambda: setting(gemma4, "L2_PREFETCH", names, cache)  # noqa: E731
    pdl = lambda: pdl_switched(True, cache)  # noqa: E731
    mlp = lambda: kernel_switched("parallel_mlp", True, cache)  # noqa: E731
    route = lambda: kernel_switched("norms_route", True, cache)  # noqa: E731
    return {
        "with_v4_moe": v4,  # the table in the lanes (triton_moe.USE_V4)
        "with_v4_gate_up_moe": combined(v4, lambda: setting(triton_moe, "V4_DOWN", False, cache)),  # v2's down
        # a decoded token's experts in one launch: gate_up rows, then their down columns added atomically
        "with_fused_moe": lambda: setting(triton_moe, "USE_FUSED", True, cache),
        "with_pdl": pdl,  # each kernel placed while the one before ends
        "with_parallel_mlp": mlp,  # the dense MLP on a second stream in the graph
        "with_parallel_mlp_and_norms_route": combined(mlp, route),
        "without_fused_qkv_attention": lambda: kernel_switched("fused_qkv_attention", False, cache),
        "with_in_place_combine": lambda: setting(triton_attention, "COMBINE_IN_PLACE_MAX", 1 << 16, cache),
        # the two-row MLP + router GEMM went back to cuBLAS (gemv.ROUTED_ROWS): against two one-row GEMVs
        "without_mlp_router_gemm": lambda: kernel_switched("mlp_router_gemm", False, cache),
        "with_every_open_switch": combined(v4, pdl, mlp, route),
        # weights asked of the L2 on a side stream while latency-bound kernels leave the bandwidth idle
        "with_l2_prefetch": combined(l2, targets("o_proj", "next_qkv")),
        "with_l2_prefetch_of_the_next_qkv": combined(l2, targets("next_qkv")),
        "with_l2_prefetch_and_the_mlp": combined(l2, targets("o_proj", "mlp", "next_qkv")),
        # the gate_up programs ask the L2 for their expert's down matrix (triton_moe.PREFETCH_DOWN)
        "with_down_prefetch": lambda: setting(triton_moe, "PREFETCH_DOWN", True, cache),
        # with PDL the MoE kernels request their first step before the wait (triton_moe.EARLY_LOADS)
        "with_pdl_and_early_moe": combined(pdl, lambda: setting(triton_moe, "EARLY_LOADS", True, cache)),
        # the MLP's gate / up and the router's projections as one-row GEMVs and their consumers in one launch
        "with_gated_gemv": lambda: kernel_switched("gated_gemv", True, cache),
        # the attention that writes q/k/v asks its L1 for its raw rows and first key / value tiles after its wait
        "with_attention_prefetch": lambda: setting(triton_attention, "L1_PREFETCH", True, cache),
    }


# What makes each open switch's side the default: the edit a session makes once the A/B and the winners' run
# say it holds (the report's winners table names them). Every side open_switches has but the combined ones.
SIDE_EDITS = {
    "with_v4_moe": "localrun/kernels/triton_moe.py: USE_V4 = True",
    "with_v4_gate_up_moe": "localrun/kernels/triton_moe.py: USE_V4 = True, V4_DOWN = False",
    "with_fused_moe": "localrun/kernels/triton_moe.py: USE_FUSED = True",
    "with_pdl": "localrun/kernels/triton_pdl.py: ENABLED = True",
    "with_parallel_mlp": 'localrun/models/gemma4.py: DECODE_KERNELS["parallel_mlp"] = True',
    "with_parallel_mlp_and_norms_route": 'localrun/models/gemma4.py: DECODE_KERNELS["parallel_mlp"] = True, '
                                         'DECODE_KERNELS["norms_route"] = True',
    "without_fused_qkv_attention": 'localrun/models/gemma4.py: DECODE_KERNELS["fused_qkv_attention"] = False',
    "with_in_place_combine": "localrun/kernels/triton_attention.py: COMBINE_IN_PLACE_MAX = 1 << 16",
    "without_mlp_router_gemm": 'localrun/models/gemma4.py: DECODE_KERNELS["mlp_router_gemm"] = False',
    "with_l2_prefetch": 'localrun/models/gemma4.py: DECODE_KERNELS["l2_prefetch"] = True, '
                        'L2_PREFETCH = ("o_proj", "next_qkv")',
    "with_l2_prefetch_of_the_next_qkv": 'localrun/models/gemma4.py: DECODE_KERNELS["l2_prefetch"] = True, '
                                        'L2_PREFETCH = ("next_qkv",)',
    "with_l2_prefetch_and_the_mlp": 'localrun/models/gemma4.py: DECODE_KERNELS["l2_prefetch"] = True, '
                                    'L2_PREFETCH = ("o_proj", "mlp", "next_qkv")',
    "with_down_prefetch": "localrun/kernels/triton_moe.py: PREFETCH_DOWN = True",
    "with_pdl_and_early_moe": "localrun/kernels/triton_pdl.py: ENABLED = True; localrun/kernels/triton_moe.py: "
                              "EARLY_LOADS = True",
    "with_gated_gemv": 'localrun/models/gemma4.py: DECODE_KERNELS["gated_gemv"] = True',
    "with_attention_prefetch": "localrun/kernels/triton_attention.py: L1_PREFETCH = True",
}


def side_edit(tag: str) -> str | None:
    """The edit that makes side `tag` the default (SIDE_EDITS; decided_switches' sides by their names)."""
    if tag in SIDE_EDITS:
        return SIDE_EDITS[tag]
    for prefix, on in (("without_", False), ("with_", True)):
        if tag.startswith(prefix):
            return f'localrun/models/gemma4.py: DECODE_KERNELS["{tag.removeprefix(prefix)}"] = {on}'
    return None


# Open switches that are alternatives of one another: the winners' run takes the best of each family.
# The dense MLP's and the attention's paths too: `gated_gemv` applies only where the two-row GEMM runs (not with
# parallel_mlp, not without mlp_router_gemm), the attention prefetch only where fused_qkv_attention does.
FAMILIES = {"with_v4_moe": "moe kernels", "with_v4_gate_up_moe": "moe kernels", "with_fused_moe": "moe kernels",
            "with_parallel_mlp": "dense mlp path", "with_parallel_mlp_and_norms_route": "dense mlp path",
            "with_gated_gemv": "dense mlp path", "without_mlp_router_gemm": "dense mlp path",
            "without_fused_qkv_attention": "attention launch", "with_attention_prefetch": "attention launch",
            "with_l2_prefetch": "l2 prefetch", "with_l2_prefetch_of_the_next_qkv": "l2 prefetch",
            "with_l2_prefetch_and_the_mlp": "l2 prefetch", "with_pdl": "pdl", "with_pdl_and_early_moe": "pdl"}


def winners(ab: dict) -> list[str]:
    """The sides of a decode A/B (`decode_ab`'s result) that beat the default after every prompt by more
    than their rounds' spread and the default's, the best of each family (FAMILIES: by the lower of its
    ratios to the default), sides that combine others left out; sorted."""
    base = ab.get("default")
    if not isinstance(base, dict) or "error" in base:
        return []
    best: dict[str, tuple[float, str]] = {}
    for tag, row in ab.items():
        if tag == "default" or tag in COMBINED_SIDES or not isinstance(row, dict) or "error" in row:
            continue
        prompts = [p for p in row if p.startswith("after_")]
        if not prompts or any(p not in base for p in prompts):
            continue
        if any(row[p]["vs_default"] - 1 <= max(row[p]["spread"], base[p]["spread"]) for p in prompts):
            continue
        score = min(row[p]["vs_default"] for p in prompts)
        family = FAMILIES.get(tag, tag)
        if family not in best or score > best[family][0]:
            best[family] = (score, tag)
    return sorted(tag for _, tag in best.values())


def winners_named(sides: dict) -> list[str]:
    """GPU_CHECK_WINNERS (comma-separated side tags): the sides to combine in the winners' A/B instead of the
    A/B's winners (a combination to measure by name); names no side has are left out."""
    named = [t.strip() for t in os.environ.get("GPU_CHECK_WINNERS", "").split(",") if t.strip()]
    return sorted(t for t in named if t in sides and t not in COMBINED_SIDES)


def decided_switches(cache) -> dict:
    """A/B sides of the settled switches: each default decode kernel off, each other opt-in one on."""
    from localrun.models.gemma4 import CPU_ONLY_KERNELS, DECODE_KERNELS

    opened = {"parallel_mlp", "norms_route", "fused_qkv_attention", "mlp_router_gemm", "l2_prefetch",
              "gated_gemv"}  # open_switches
    sides = {}
    for name, on in DECODE_KERNELS.items():
        if name not in CPU_ONLY_KERNELS and name not in opened:
            sides[f"{'without' if on else 'with'}_{name}"] = lambda name=name, on=on: kernel_switched(
                name, not on, cache)
    return sides


def generation_times(model, ids: list[int], n: int, dev, mode: str, cache) -> tuple[float, float]:
    """(seconds to the first token, decoded tokens a second) of n greedy tokens after `ids`: the prefill
    and first token, then from the first token's arrival on the host to the last's (each token is read
    back: the one sync a token the step has)."""
    sync(dev)
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in generation(model, ids, n, dev, mode, cache)]
    sync(dev)
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_rate(model, ids: list[int], n: int, dev, mode: str, cache) -> float:
    """Decoded tokens a second over n greedy tokens after `ids`' prefill (`generation_times`)."""
    return generation_times(model, ids, n, dev, mode, cache)[1]


def decode_ab(model, prompts: dict[str, list[int]], n: int, dev, mode: str, cache, sides: dict,
              rounds: int) -> dict:
    """Decode tok/s of each side (tag -> a switch: a context manager factory; the first is the baseline)
    after each prompt, in `rounds` rounds that alternate the sides, each round starting one side later,
    each side warmed (autotuning, compiling, its graphs captured in its first round and kept for the
    others) before it is timed. Per side and prompt: every round's rate, the median, the spread
    ((max - min) / median) and the median over the baseline's median. A side that raises is reported
    (`error`) and left out of the later rounds; the baseline raising ends the rounds (`stopped`), or
    the A/B where it has no round yet. Near the check's deadline no side starts that would end past it (the
    longest a side has taken in this round or the one before: the first round's capture too): the rates so
    far stand (`stopped`), rather than the lease ending mid-A/B with none of them written."""
    names = list(sides)
    rates: dict = {name: {p: [] for p in prompts} for name in names}
    kept: dict = {}  # graphs: a side's steps, their graphs captured in its first round, replayed in the others
    failed: dict = {}  # a side that raised (a kernel no GPU ran before): its error, and it runs no more rounds
    stopped = None  # the baseline raised after its first round (a sticky CUDA error): the rounds so far stand
    longest = 0.0  # seconds the slowest side took, of the round before and this one so far
    for r in range(rounds):
        if stopped:
            break
        before, longest = longest, 0.0
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in failed or stopped:
                continue
            if rates[names[0]][next(iter(prompts))] and PROGRESS.out_of_time(max(longest, before)):
                stopped = f"out of time (--deadline) in round {r + 1}"
                break
            began = time.time()  # the deadline's clock
            try:
                with sides[name]():
                    if mode == "graphs" and name in kept:  # what a replay runs was fixed when it was captured
                        cache.steps.update(kept[name])
                    for prompt, ids in prompts.items():
                        greedy(model, ids, 2, dev, mode, cache)  # capture this span's graphs, autotune
                        rates[name][prompt].append(decode_rate(model, ids, n, dev, mode, cache))
                    if mode == "graphs":
                        kept[name] = dict(cache.steps)
                longest = max(longest, time.time() - began)
            except Exception as e:  # noqa: BLE001 - the other sides' rounds still decide
                error = f"{type(e).__name__}: {e}"[:300]
                if name != names[0]:
                    failed[name] = error
                    kept.pop(name, None)
                elif all(rates[name].values()):
                    stopped = error
                else:
                    raise
    out: dict = {"rounds": rounds, "tokens": n, **({"stopped": stopped} if stopped else {})}
    base = {p: _median(rates[names[0]][p]) for p in prompts}
    for name in names:
        if name in failed or not all(rates[name].values()):
            out[name] = {"error": failed.get(name, "not measured before the A/B stopped")}
            continue
        disabled = getattr(kept.get(name, {}).get(mode), "disabled", None)
        out[name] = {"graphs_disabled": disabled} if disabled else {}  # its capture failed: it ran uncaptured
        for prompt in prompts:
            got = rates[name][prompt]
            median = _median(got)
            out[name][f"after_{prompt}"] = {"tokens_per_s": round(median, 2),
                                            "rounds": [round(x, 2) for x in got],
                                            "spread": round((max(got) - min(got)) / median, 3),
                                            "vs_default": round(median / base[prompt], 3)}
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def divergence_when(switch, model, ids: list[int], dev, mode: str, cache, n: int = 16) -> dict:
    """Greedy tokens by default vs within `switch()` (a context manager): where they first differ."""
    default, _ = greedy(model, ids, n, dev, mode, cache)
    with switch():
        switched, _ = greedy(model, ids, n, dev, mode, cache)
    return {"first_divergence_from_default": first_divergence(switched, default), "tokens": n}


def host_profile(model, ids: list[int], dev, mode: str, cache, n: int = 16, top: int = 25) -> dict:
    """Where the host's time goes while decoding: cProfile over `n` greedy tokens after the first (the
    prompt's prefill left out: on 2026-11-27 a 16-token prompt's per-expert matmuls filled the rows), the
    functions with the most time of their own, per decoded token. cProfile slows Python calls, so
    `wall_ms_per_token` (profiled) is above the unprofiled speed; compare rows, not totals."""
    import cProfile
    import pstats

    greedy(model, ids, 4, dev, mode, cache)  # warm: graphs captured, kernels compiled
    profile = cProfile.Profile()
    start = None
    for i, _ in enumerate(generation(model, ids, n + 1, dev, mode, cache)):
        if i == 0:  # the prompt's first token is out: from here, decoding alone
            sync(dev)
            start = time.perf_counter()
            profile.enable()
    sync(dev)
    profile.disable()
    wall = time.perf_counter() - start
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profile).stats.items():
        where = f"{os.path.basename(path)}:{line}({name})" if line else name
        rows.append([where, round(calls / n, 2), round(own * 1e3 / n, 3), round(cumulative * 1e3 / n, 3)])
    rows.sort(key=lambda r: -r[2])
    return {"tokens": n, "wall_ms_per_token": round(wall * 1e3 / n, 3),
            "columns": ["function", "calls a token", "own ms a token", "cumulative ms a token"], "top": rows[:top]}


def idle_between(intervals: list[tuple[float, float]]) -> float:
    """How long the device ran nothing between the first interval's start and the last one's end:
    the gaps between kernels (and copies), where intervals on several streams may overlap."""
    idle, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is not None and start > reach:
            idle += start - reach
        reach = end if reach is None else max(reach, end)
    return idle


def per_token_counts(model, ids: list[int], dev, mode: str = "eager", cache=None, params=None) -> dict:
    """Kernels, host launch calls and host syncs of one decoded token (the difference of 3 and 4
    generated tokens, so prefill and the first sampling step cancel), with the Python line of each sync
    (torch's sync debug warning names it; the id's read, an event's synchronize, which that mode does not
    see, counted as `generate.py:token read`) and the microseconds the device idled between kernels
    (launch gaps, host waits); greedy, or sampled by `params`. The tokens are read as a user's run reads
    them, ids alone (`token_ids`): a logprob is a full-vocabulary reduction and a read of its own."""
    torch = _torch()

    def counts(n: int) -> tuple[int, int, int]:
        if dev.type != "cuda":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                token_ids(model, ids, n, dev, mode, cache, params)
            return sum(1 for e in prof.events() if e.name.startswith("aten::")), 0, 0
        import warnings

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            token_ids(model, ids, n, dev, mode, cache, params)
            sync(dev)
        events = prof.events()
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
        launches = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU
                       and e.name.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch")))
        idle[n] = idle_between([(e.time_range.start, e.time_range.end) for e in events
                                if e.device_type == torch.autograd.DeviceType.CUDA])
        table: dict = {}  # where the device time goes: kernel name -> (count, microseconds)
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                count, total = table.get(e.name[:70], (0, 0.0))
                table[e.name[:70]] = (count + 1, total + e.device_time)
        tables[n] = table
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught, event_waits_counted() as waits:
                warnings.simplefilter("always")
                token_ids(model, ids, n, dev, mode, cache, params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        found = [w for w in caught if "synchroniz" in str(w.message).lower()]
        sites[n] = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in found)  # the Python line that synced
        if waits:
            sites[n]["generate.py:token read"] += len(waits)
        return kernels, launches, len(found) + len(waits)

    from collections import Counter

    tables: dict = {}
    sites: dict = {}
    idle: dict = {}
    greedy(model, ids, 4 if dev.type == "cuda" else 1, dev, mode, cache, params)  # warm: graphs, kernels
    k3, l3, s3 = counts(3)
    k4, l4, s4 = counts(4)
    if dev.type != "cuda":
        return {"aten_ops_per_token": k4 - k3}
    per_token = per_token_table(tables[3], tables[4], top=None)
    return {"kernels_per_token": k4 - k3, "host_launch_calls_per_token": l4 - l3, "host_syncs_per_token": s4 - s3,
            "device_us_per_token": round(sum(t for _, t in tables[4].values()) - sum(t for _, t in tables[3].values()), 1),
            "weight_kernels_us_per_token": round(sum(us for name, _, us in per_token if is_weight_kernel(name)), 1),
            "host_sync_sites_per_token": dict(sites[4] - sites[3]),
            "device_idle_us_per_token": round(idle[4] - idle[3], 1),
            "top_kernels_per_token": per_token[:20]}


# the kernels that stream weights (4-bit MoE GEMVs and GEMMs, the dense GEMV, cuBLAS / cuBLASLt GEMMs); the
# rest (attention, norms, routing, glue) is what fit's per-layer time stands for
WEIGHT_KERNELS = ("_gate_up_", "_down_", "_gemv_kernel", "gemm", "gemv", "nvjet", "splitkreduce", "cutlass", "xmma")


def is_weight_kernel(name: str) -> bool:
    return any(key in name.lower() for key in WEIGHT_KERNELS)


def fit_efficiency(tokens_per_s: float, per_token: dict, bytes_per_token: int, layers: int, dev) -> dict:
    """hardware.MeasuredEfficiency's two figures from one decode measurement: the fraction of the vendor
    bandwidth (the `fit --gpu` preset of this device) that the weight kernels' time stands for, and the
    rest of a token's wall time per layer. Copy these into localrun/hardware.py after a run."""
    from localrun.hardware import preset_for_device_name

    preset = preset_for_device_name(_torch().cuda.get_device_name(dev))
    if preset is None:
        return {"skipped": "no fit preset for this device: its vendor bandwidth is unknown"}
    weight_s = per_token["weight_kernels_us_per_token"] * 1e-6
    return {"bandwidth_fraction": round(bytes_per_token / (preset.bandwidth * weight_s), 3),
            "layer_seconds": round((1 / tokens_per_s - weight_s) / layers, 7), "preset": preset.name,
            "from": {"tokens_per_s": tokens_per_s, "bytes_per_token": bytes_per_token, "layers": layers,
                     "weight_kernels_us_per_token": per_token["weight_kernels_us_per_token"]}}


def per_token_table(three: dict, four: dict, top: int | None = 20) -> list:
    """[name, launches, microseconds] of one decoded token, the kernels that took most device time
    first: what 4 generated tokens ran minus what 3 did (prefill and first sampling cancel)."""
    rows = []
    for name, (count, total) in four.items():
        c3, t3 = three.get(name, (0, 0.0))
        rows.append([name, count - c3, round(total - t3, 1)])
    return sorted(rows, key=lambda r: -r[2])[:top]  # top None: every kernel


def step_kernels(dry: bool) -> dict:
    try:
        from localrun.kernels.triton_moe_bench import benchmark_moe_4bit as bench
    except ImportError as e:  # no triton
        return {"skipped": f"the 4-bit MoE kernels need triton ({e})"}
    dev = device_for(dry)
    out = {}
    # the one-launch v5 against the two-launch v4 and v2 (the default), one token, in a graph
    one_launch = lambda: bench(device=str(dev), configs=("v5", "v4", "v2"), baseline=False, dry=dry)  # noqa: E731
    if os.environ.get("GPU_CHECK_KERNELS") == "probes":  # what bounds the MoE kernels and the GEMVs, first in a lease
        timed("v4 probes", lambda: v4_probes(dev, dry), out)
        timed("decode nf4 bs64 one launch", one_launch, out)
        dense_gemv_cases(dev, dry, out)
        return out
    timed("zero_copy", lambda: zero_copy_probe(dry), out)
    cases = {"decode nf4 bs64": {}, "decode nf4 bs64 double-quant": {"double_quant": True},
             "decode fp4 bs64": {"quant_type": "fp4"}, "8 tokens nf4": {"tokens": 8},
             "prefill 512 tokens nf4 (grouped GEMMs)": {"tokens": 512}}
    if os.environ.get("GPU_CHECK_KERNELS") == "quick":
        cases = {k: v for k, v in cases.items() if k in ("decode nf4 bs64", "8 tokens nf4")}
    elif dry:  # the same code as the one-token cases, interpreted over 8 rows (15 s of the suite's budget)
        cases.pop("8 tokens nf4")
    for name, kwargs in cases.items():
        timed(name, lambda kwargs=kwargs: bench(device=str(dev), dry=dry, **kwargs), out)
    timed("v4 probes", lambda: v4_probes(dev, dry), out)
    timed("decode nf4 bs64 one launch", one_launch, out)
    shapes = {"sliding layer, 256 keys": (8, 2, 256, 256), "sliding layer, 1536 keys": (8, 2, 1536, 256),
              "full layer, 256 keys": (2, 8, 256, 512), "full layer, 4096 keys": (2, 8, 4096, 512),
              "full layer, 32768 keys": (2, 8, 32768, 512)} if not dry else {"dry": (2, 2, 100, 32)}
    for name, shape in shapes.items():
        timed(f"decode attention, {name}", lambda shape=shape: decode_attention_case(dev, *shape), out)
    prefill = {f"full layer, 512 after {old} keys": (2, 8, 512, old, 512) for old in (0, 8192, 32768)} if not dry \
        else {"dry": (2, 2, 40, 60, 64)}
    for i, (name, shape) in enumerate(prefill.items()):
        timed(f"prefill attention, {name}", lambda shape=shape, i=i: prefill_attention_case(
            dev, dry, *shape, tile_choices=i == min(1, len(prefill) - 1)), out)
    dense_gemv_cases(dev, dry, out)
    return out


def v4_probes(dev, dry: bool) -> dict:
    """What bounds the v4 MoE kernels (kernels/triton_moe_probe.py: each stage as it runs, without its
    table's shuffles, its loads alone, an empty launch; experts in the L2 and from memory)."""
    from localrun.kernels.triton_moe_probe import probe_v4

    return probe_v4(device=str(dev), dry=dry)


def zero_copy_probe(dry: bool) -> dict:
    """scripts/zero_copy.py in a child process (a device that cannot read mapped host memory faults, which
    would end this process's CUDA context): can a kernel read expert rows in host RAM in place, and how
    fast against copying them (the offloaded step's next design, the script's docstring)."""
    script = Path(__file__).resolve().parent / "zero_copy.py"
    done = subprocess.run([sys.executable, str(script)] + (["--dry"] if dry else []), capture_output=True,
                          text=True, timeout=180)
    if done.returncode:
        return {"error": f"exit {done.returncode}", "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def projection_shapes(args) -> dict[str, tuple[int, int, int, int]]:
    """name -> (N, K, launches per decoded token, rows) of the dense projections y = x @ W[N, K]^T of a
    Gemma 4 decode step: the fused q/k/v, o_proj, the dense MLP's fused gate/up (in an MoE layer with
    the router's rows, one GEMM of two rows: DecoderLayer._mlp_and_router) and down, lm_head."""
    shapes: dict[str, tuple[int, int, int, int]] = {}

    def add(name: str, n: int, k: int, rows: int = 1) -> None:
        shapes[name] = (n, k, shapes.get(name, (0, 0, 0, 0))[2] + 1, rows)

    H = args.hidden_size
    for layer in range(args.num_hidden_layers):
        kind = "sliding" if args.is_sliding(layer) else "full"
        N, KV, D = args.num_attention_heads, args.layer_kv_heads(layer), args.layer_head_dim(layer)
        shared = args.kv_source_layer(layer) != layer
        add(f"qkv {kind}", (N + (0 if shared else KV * (2 if args.has_v_proj(layer) else 1))) * D, H)
        add(f"o_proj {kind}", H, N * D)
        if args.has_experts(layer):
            add("mlp gate_up + router, 2 rows", 2 * args.mlp_intermediate(layer) + args.num_experts, H, rows=2)
        else:
            add("mlp gate_up", 2 * args.mlp_intermediate(layer), H)
        add("mlp down", H, args.mlp_intermediate(layer))
    add("lm_head", args.vocab_size, H)
    return shapes


def dense_gemv_cases(dev, dry: bool, out: dict) -> None:
    """The Triton GEMV (localrun::gemv on CUDA) against F.linear (cuBLAS) at each dense projection shape
    of a 26B-A4B decode step, one bf16 row (and 4 rows at the sliding q/k/v shape): `gemv <name>` rows,
    and `gemv per token`: the microseconds of one token's projections each way (launches x us), and with
    what kernels/gemv.py routes (MIN_N <= N <= MAX_N, at most ROUTED_ROWS rows) on the Triton side."""
    try:
        from localrun.kernels import gemv as gemv_ops
        from localrun.kernels.triton_gemv import benchmark_gemv
    except ImportError as e:
        out["gemv"] = {"skipped": f"no Triton GEMV ({e})"}
        return
    iters = 2 if dry else 20
    totals = {"weight_bytes": 0, "us_triton": 0.0, "us_torch": 0.0, "us_routed": 0.0}
    for name, (N, K, count, rows) in projection_shapes(config_args(dry)).items():
        row = timed(f"gemv {name}", lambda N=N, K=K, rows=rows: {
            **benchmark_gemv(N, K, rows=rows, device=dev, iters=iters), "per_token": count}, out)
        if "us_triton" not in row:
            continue
        routed = gemv_ops.MIN_N <= N <= gemv_ops.MAX_N and rows <= gemv_ops.ROUTED_ROWS
        row["routed"] = routed
        totals["weight_bytes"] += count * row["weight_bytes"]
        totals["us_triton"] += count * row["us_triton"]
        totals["us_torch"] += count * row["us_torch"]
        totals["us_routed"] += count * row["us_triton" if routed else "us_torch"]
    N, K, _, _ = projection_shapes(config_args(dry))["qkv sliding"]
    timed("gemv qkv sliding, 4 rows", lambda: benchmark_gemv(N, K, rows=4, device=dev, iters=iters), out)
    out["gemv per token"] = {k: round(v, 1) if isinstance(v, float) else v for k, v in totals.items()}
    timed("gated_gemv_route", lambda: gated_gemv_case(dev, dry, iters), out)


def gated_gemv_case(dev, dry: bool, iters: int) -> dict:
    """A decoded token's dense MLP gate / up and router projections with their consumers (26B-A4B's MoE
    layer): one launch (`gated_gemv`, kernels/triton_fused.py) against the step's default, cuBLAS's two-row
    GEMM then gated_route, each over enough copies of the weights to stream from memory, in a CUDA graph;
    the same ids, and act(gate) * up within bf16 rounding of each other (the GEMM sums in its own order)."""
    torch = _torch()
    import torch.nn.functional as F

    from localrun.kernels import triton_fused
    from localrun.kernels.timing import calls_us
    from localrun.kernels.triton_gemv import rotation_copies

    args = config_args(dry)
    I, E, H, K = args.mlp_intermediate(0), args.num_experts, args.hidden_size, args.top_k_experts
    g = torch.Generator(device=dev).manual_seed(0)
    nbytes = (2 * I + E) * H * 2
    copies = rotation_copies(nbytes, dev)
    ws = [(torch.randn(2 * I + E, H, device=dev, generator=g) * H ** -0.5).bfloat16() for _ in range(copies)]
    rows = torch.randn(2, H, device=dev, generator=g).bfloat16()
    scale = torch.rand(E, device=dev, generator=g).bfloat16() + 0.5

    def fused(w):
        return triton_fused.gated_gemv_route_triton(rows, w, I, scale, K, "gelu_pytorch_tanh")

    def apart(w):
        y = F.linear(rows, w)
        return triton_fused.gated_route_triton(y[:1, : 2 * I].reshape(1, 1, 2 * I), y[1:, 2 * I:], scale, K,
                                               "gelu_pytorch_tanh")

    (a, ids, wts), (b, ids_b, wts_b) = fused(ws[0]), apart(ws[0])
    out = {"I": I, "E": E, "H": H, "weight_bytes": nbytes, "weight_copies": copies,
           "ids_equal": bool(torch.equal(ids, ids_b)),
           "max_rel_diff_activated": float((a.float() - b.float().reshape(a.shape)).abs().max() / b.float().abs().max()),
           "max_abs_diff_routing_weights": float((wts - wts_b).abs().max()),
           "config": None if dry else str(getattr(triton_fused._gated_gemv_tuned, "best_config", None))}
    for side, fn in (("fused", fused), ("apart", apart)):
        out[f"us_{side}"] = round(calls_us([lambda w=w, fn=fn: fn(w) for w in ws], iters, dev), 2)
    out["speedup"] = round(out["us_apart"] / out["us_fused"], 3)
    return out


def decode_attention_case(dev, KV: int, G: int, S: int, D: int) -> dict:
    """One decoded token's attention at a 26B-A4B layer shape (bf16, a fifth of the keys masked):
    the split-key Triton kernel (as the step launches it, and with its combine as a launch of its own:
    `combine_in_place` says which the default is) against grouped_sdpa (cuDNN / flash), each in a CUDA
    graph."""
    torch = _torch()
    from localrun.kernels.attention import decode_attention, grouped_sdpa
    from localrun.kernels.triton_attention import decode_attention_triton

    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, KV * G, 1, D, device=dev, generator=g).bfloat16()
    k, v = (torch.randn(1, KV, S, D, device=dev, generator=g).bfloat16() for _ in range(2))
    visible = torch.arange(S, device=dev)[None, :] < S - S // 5
    scale = D ** -0.5
    ref = grouped_sdpa(q.float(), k.float(), v.float(), visible, scale)
    out = {"max_rel_err_vs_fp32": float((decode_attention(q, k, v, visible, scale).float() - ref).abs().max()
                                        / ref.abs().max())}
    apart = decode_attention_triton(q, k, v, visible, scale, in_place=False)
    out["combine_in_place"] = {"default": _combines_in_place(dev, KV, G, S, D),
                               "identical_to_combine_kernel": bool(torch.equal(
                                   decode_attention_triton(q, k, v, visible, scale, in_place=True), apart))}
    nbytes = 2 * k.numel() * k.element_size()
    for side, fn in (("triton split-key", lambda: decode_attention(q, k, v, visible, scale)),
                     ("triton split-key, combine kernel", lambda: decode_attention_triton(q, k, v, visible, scale,
                                                                                          in_place=False)),
                     ("grouped_sdpa", lambda: grouped_sdpa(q, k, v, visible, scale))):
        us = graph_us(fn, dev)
        out[side] = {"us": round(us, 2), "gbps": round(nbytes / us / 1e3, 1)}
    out["tiles_us"] = decode_attention_tiles(dev, q, k, v, visible, scale)
    return out


def graph_us(fn, dev, repeat: int = 200) -> float:
    """Microseconds of fn replayed in a CUDA graph, warmed first (called twice on the CPU)."""
    from localrun.kernels import timing

    if dev.type != "cuda":
        return timing.graph_us(fn, 2, dev)
    fn()
    return timing.graph_us(fn, repeat, dev)


def decode_attention_tiles(dev, q, k, v, visible, scale) -> dict:
    """The partial kernel at each (keys a block, warps) of triton_attention.TILE_CHOICES for q's head dim:
    "BLOCK_Sxwarps" -> us in a graph and the largest difference from the default tile's output (summation
    order only: ~1e-3 in bf16), the default's pair named; make the fastest PARTIAL_TILES' entry for it."""
    import triton

    from localrun.kernels import triton_attention as ta

    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    default = ta.decode_attention_triton(q, k, v, visible, scale).float()
    out: dict = {"default": "x".join(map(str, ta.partial_tile(block_d)))}
    before = ta.PARTIAL_TILES.get(block_d)
    try:
        for block_s, warps in ta.TILE_CHOICES.get(block_d, (ta.partial_tile(block_d),)):
            ta.PARTIAL_TILES[block_d] = (block_s, warps)
            try:
                diff = float((ta.decode_attention_triton(q, k, v, visible, scale).float() - default).abs().max())
                us = graph_us(lambda: ta.decode_attention_triton(q, k, v, visible, scale), dev)
                out[f"{block_s}x{warps}"] = {"us": round(us, 2), "max_abs_diff_vs_default": diff}
            except Exception as e:  # one tile that cannot launch (shared memory) must not hide the others
                out[f"{block_s}x{warps}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        if before is None:
            ta.PARTIAL_TILES.pop(block_d, None)
        else:
            ta.PARTIAL_TILES[block_d] = before
    return out


def prefill_attention_case(dev, dry: bool, KV: int, G: int, T: int, old: int, D: int, tile_choices: bool) -> dict:
    """A prefill chunk's attention at a 26B-A4B full layer's shape (bf16, T new queries after `old`
    keys): the flash attention kernel (localrun::causal_attention on CUDA, PREFILL_KERNELS
    ["flash_attention"] on) against the blocks through SDPA's math backend (the switch off), each
    timed, its largest error against the blocks in fp32, and the bytes it allocated at its peak; with
    `tile_choices`, every TILE_CHOICES tile of the kernel timed too (pick the fastest as HALF_TILES)."""
    torch = _torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from localrun.kernels import triton_prefill_attention as tp
    from localrun.kernels.attention import blocked_attention

    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, T, KV * G, D, device=dev, generator=g).bfloat16().transpose(1, 2)  # as attend gets it
    k, v = (torch.randn(1, KV, old + T, D, device=dev, generator=g).bfloat16() for _ in range(2))
    pos_S = torch.arange(old + T, device=dev)
    pos_T = pos_S[old:]
    scale = D ** -0.5
    ref = blocked_attention(q.float(), k.float(), v.float(), pos_T, pos_S, None, None, scale)

    def math():
        with sdpa_kernel([SDPBackend.MATH]):
            return blocked_attention(q, k, v, pos_T, pos_S, None, {}, scale)

    sides = {"triton flash": lambda: tp.causal_attention_triton(q, k, v, pos_T, pos_S, None, scale),
             "sdpa math, blocks": math}
    repeat = 1 if dry else 5
    out: dict = {"shape": {"N": KV * G, "KV": KV, "T": T, "S": old + T, "D": D}}
    for side, fn in sides.items():
        peak = _peak_bytes(fn, dev)
        result = fn()
        out[side] = {"us": round(best_seconds(fn, repeat, dev) * 1e6, 1),
                     "max_abs_err_vs_fp32": float((result.float() - ref).abs().max()), "peak_bytes": peak}
    out["speedup"] = round(out["sdpa math, blocks"]["us"] / out["triton flash"]["us"], 2)
    if tile_choices:
        out["tiles_us"] = {name: round(best_seconds(lambda tiles=tiles: tp.causal_attention_triton(
            q, k, v, pos_T, pos_S, None, scale, tiles), repeat, dev) * 1e6, 1)
            for name, tiles in tp.TILE_CHOICES.items()}
    return out


def _peak_bytes(fn, dev) -> int | None:
    """Bytes fn allocated at its peak beyond what was allocated before it (CUDA; None elsewhere)."""
    if dev.type != "cuda":
        return None
    torch = _torch()
    sync(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def _combines_in_place(dev, KV: int, G: int, S: int, D: int) -> bool:
    from localrun.kernels import triton_attention as ta

    return ta.combines_in_place(KV, ta.launch_shape(S, D, KV, dev)[3], G, D)


def step_compiled(dry: bool) -> dict:
    """26B-A4B all resident: the torch.compile'd static step in CUDA graphs (LOCALRUN_DECODE_STEP=compiled)
    against plain graphs, compile time included, tokens compared. Last: it may take minutes to compile."""
    torch = _torch()
    from localrun.bench import bench_prompt
    from localrun.loader import load_model
    from localrun.synthetic import RandomCheckpoint
    from localrun.config import load_config

    dev = device_for(dry)
    if dev.type != "cuda":
        return {"skipped": "CUDA graphs need a GPU (the compiled step is traced on the CPU by tests/test_step.py)"}
    model_dir = write_config(dry, Path(tempfile.mkdtemp(prefix="gpu-check-big-")))
    args = load_config(model_dir)
    loaded = load_model(model_dir, device=str(dev), dtype=torch.bfloat16, experts="nf4",
                        checkpoint=RandomCheckpoint(args, device=dev))
    ids = bench_prompt(16, args.vocab_size)
    out: dict = {}
    reference, _ = greedy(loaded.model, ids, 24, dev, "graphs", loaded.kv)
    start = time.perf_counter()
    tokens, _ = greedy(loaded.model, ids, 24, dev, "compiled", loaded.kv)
    out["first_call_s"] = round(time.perf_counter() - start, 1)
    out["tokens_identical_to_graphs"] = tokens == reference
    gen = 48
    for mode in ("graphs", "compiled"):
        out[f"decode_tokens_per_s_{mode}"] = round(max(decode_rate(loaded.model, ids, gen, dev, mode, loaded.kv)
                                                       for _ in range(2)), 2)
    timed("per_token_compiled", lambda: per_token_counts(loaded.model, ids, dev, "compiled", loaded.kv), out)
    return out


def step_bench(dry: bool) -> dict:
    """The bench command in a child process, as a user runs it: its JSON report, and the table it prints."""
    from localrun.bench import BenchReport, Measurement, markdown

    device, graphs = ("cpu", "off") if dry else ("cuda", "both")
    cmd = [sys.executable, "-m", "localrun.cli", "bench", "bench", "--device", device, "--graphs", graphs,
           "--experts", "nf4", "--prompt-tokens", "128", "--gen-tokens", "64" if not dry else "4",
           "--repeat", "2", "--rounds", "1", "--json"]
    env = dict(os.environ) if dry else {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=DRY_TIMEOUT if dry else STEPS["bench"])
    if proc.returncode != 0:
        raise RuntimeError(f"bench exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    report = json.loads(proc.stdout)
    table = markdown(BenchReport(report["info"], [Measurement(**m) for m in report["measurements"]]))
    return {"command": " ".join(cmd[2:]), "report": report, "table": table}


STEP_FUNCTIONS = {"env": step_env, "attention": step_attention, "exact": step_exact, "demo": step_demo,
                  "big": step_big, "kernels": step_kernels, "bench": step_bench, "compiled": step_compiled}


# The driver ----------------------------------------------------------------------------------

class TritonCompiles:
    """What Triton's compiler cost a step: kernels compiled, their seconds (Triton's own timer: IR,
    lowering, ptxas, storing), and cache hits; what precompiling for the GPU machine could save of a
    lease. Counted through Triton's compilation listener (none under the interpreter)."""

    def __init__(self) -> None:
        self.compiled, self.seconds, self.hits = 0, 0.0, 0

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit: bool) -> None:
        if cache_hit:
            self.hits += 1
        else:
            self.compiled += 1
            self.seconds += times.total / 1e6

    def value(self) -> dict:
        return {"compiled": self.compiled, "compile_s": round(self.seconds, 1), "cache_hits": self.hits}

    @contextlib.contextmanager
    def listening(self):
        """Count while inside; the listener there before is put back after (no Triton: counts nothing)."""
        try:
            from triton import knobs
        except ImportError:  # no triton, or one older than its knobs
            knobs = None
        if knobs is None or not hasattr(knobs.compilation, "listener"):  # counts nothing
            yield self
            return
        before, knobs.compilation.listener = knobs.compilation.listener, self
        try:
            yield self
        finally:
            knobs.compilation.listener = before


def run_child(step: str, dry: bool, result: Path, on_progress=None) -> None:
    """Inside the child process (or inline): run one step and write its result as JSON; until it ends,
    the result file holds an `unfinished` error with what the step measured so far (`partial`), and
    `on_progress` gets that value too."""
    if dry:  # the Triton kernels run interpreted on CPU tensors (set before triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    start = time.perf_counter()

    compiles = TritonCompiles()

    def flush() -> None:  # what the compiler cost so far too: a step stopped from outside is where it matters
        value = {"seconds": round(time.perf_counter() - start, 1), "error": UNFINISHED, "partial": PROGRESS.done,
                 "triton_compiles": compiles.value()}
        result.write_text(json.dumps(value, default=str, indent=1))
        if on_progress is not None:
            on_progress(value)
    PROGRESS.done, PROGRESS.flush = {}, flush
    try:
        with compiles.listening():
            value = STEP_FUNCTIONS[step](dry)
    except BaseException as e:  # noqa: BLE001 - the report records whatever stopped the step
        traceback.print_exc()
        value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:],
                 "partial": PROGRESS.done}
    finally:
        PROGRESS.flush = lambda: None
    if isinstance(value, dict):
        value = {"seconds": round(time.perf_counter() - start, 1), "triton_compiles": compiles.value(), **value}
    result.write_text(json.dumps(value, default=str, indent=1))


UNFINISHED = "unfinished: stopped before the step's end (its time limit, or the lease's)"


def run_steps(steps: list[str], dry: bool, out_dir: Path, inline: bool = False,
              deadline: float | None = None) -> dict:
    """Each step in a child process under its time limit, or (inline) all in this one: no process
    start and CUDA initialisation per step, for a short lease, but no limit per step either.
    `deadline` (a time.time()): no step or measurement starts after it."""
    report: dict = {"dry": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}
    PROGRESS.deadline = deadline
    for step in steps:
        limit = DRY_TIMEOUT if dry else STEPS[step]
        if PROGRESS.out_of_time():
            report["steps"][step] = SKIPPED
            print(f"== {step}: skipped, out of time", flush=True)
            write_report(report, out_dir)
            continue
        print(f"== {step}" + ("" if inline else f" (limit {limit} s)"), flush=True)
        if inline:
            def progress(value, step=step) -> None:
                report["steps"][step] = compile_costs(report, step, dict(value))
                write_report(report, out_dir)
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "result.json"
                run_child(step, dry, result, progress)
                value = json.loads(result.read_text())
            report["steps"][step] = value = compile_costs(report, step, value)
            print(f"-- {step}: {'FAILED ' + value['error'] if 'error' in value else 'ok'} in {value['seconds']} s",
                  flush=True)
            write_report(report, out_dir)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, str(out_dir), "--child", step, "--result", str(result)]
            if dry:
                cmd.append("--dry")
            if deadline is not None:
                cmd += ["--deadline-at", str(deadline)]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=limit)
                value = json.loads(result.read_text()) if result.is_file() else \
                    {"error": f"child exited {proc.returncode} without a result"}
                if value.get("error") == UNFINISHED:  # it died (a CUDA fault kills the process)
                    value["error"] = f"child exited {proc.returncode} before the step's end"
            except subprocess.TimeoutExpired:
                left = json.loads(result.read_text()) if result.is_file() else {}
                value = {"error": f"timed out after {limit} s",
                         **{k: left[k] for k in ("partial", "triton_compiles") if left.get(k)}}
            value.setdefault("seconds", round(time.perf_counter() - start, 1))
        report["steps"][step] = value = compile_costs(report, step, value)
        print(f"-- {step}: {'FAILED ' + value['error'] if 'error' in value else 'ok'} in {value['seconds']} s",
              flush=True)
        write_report(report, out_dir)
    return report


def compile_costs(report: dict, step: str, value: dict) -> dict:
    """`value` without its `triton_compiles` (run_child's count), which goes to the report's own
    `triton_compiles` under `step`: the steps' values hold measurements alone."""
    costs = value.pop("triton_compiles", None)
    if costs is not None:
        report.setdefault("triton_compiles", {})[step] = costs
    return value


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    env = report["steps"].get("env", {})
    lines = [f"# localrun GPU check{' (dry run on the CPU)' if report['dry'] else ''}", "",
             f"Started {report['started']}; device: {env.get('device', '?')}; torch {env.get('torch', '?')} "
             f"(CUDA {env.get('cuda', '?')}), bitsandbytes {env.get('bitsandbytes', '?')}, triton {env.get('triton', '?')}.",
             ""]
    try:
        lines += bar_summary(report)
    except Exception as e:  # noqa: BLE001 - a report's odd figure must not stop the check writing it
        lines += [f"(issue 12's bar: not summarized: {type(e).__name__}: {e})", ""]
    for step, value in report["steps"].items():
        costs = report.get("triton_compiles", {}).get(step, {})
        spent = f"; Triton compiled {costs['compiled']} kernels in {costs['compile_s']} s" if costs.get("compiled") else ""
        lines += [f"## {step} ({value.get('seconds', '?')} s{spent})", ""]
        if "error" in value:
            lines += [f"**FAILED**: `{value['error']}`", ""]
            if value.get("traceback"):
                lines += ["```", value["traceback"].strip(), "```", ""]
            if value.get("partial"):
                lines += ["Measured before it stopped:", "", "```json",
                          json.dumps(value["partial"], indent=1, default=str), "```", ""]
            continue
        lines += ["```json", json.dumps({k: v for k, v in value.items() if k != "seconds"}, indent=1, default=str),
                  "```", ""]
        if step == "big":
            lines += ab_summary(value) + memory_summary(value)
    return "\n".join(lines)


BAR = 0.6  # issue 12: decode at 60% of the copy-bandwidth floor (bytes a token / measured device copy bandwidth)


def bar_summary(report: dict) -> list[str]:
    """Issue 12's bar against each all-resident placement's decode speeds in the report: the floor (the
    measured copy bandwidth over the bytes a token reads), the default step's tok/s after each prompt
    (`speed_graphs`, `speed_static` in a dry run), and the fastest of every other figure (a switched
    `speed_*` row, an A/B side, the winners together), each as a fraction of the floor. Empty where the
    report has no such figures."""
    bandwidth = report["steps"].get("env", {}).get("bandwidth", {}).get("device_copy_bytes_per_s")
    big = report["steps"].get("big", {})
    lines = []
    for name, rows in big.items():
        if (not isinstance(rows, dict) or not bandwidth or not rows.get("bytes_read_per_decoded_token")
                or rows.get("plan", {}).get("host_bytes")):  # the bar is every expert resident's
            continue
        floor = bandwidth / rows["bytes_read_per_decoded_token"]
        default, others = [], []  # (label, "after N", tok/s)
        for key, value in rows.items():
            if not isinstance(value, dict):
                continue
            if key.startswith("speed_") and not key.startswith("speed_eager"):
                rates = [(k.removeprefix("decode_tokens_per_s_").replace("_", " "), v) for k, v in value.items()
                         if k.startswith("decode_tokens_per_s_after_") and isinstance(v, (int, float))]
                into = default if key in ("speed_graphs", "speed_static") else others
                into += [(f"`{key}`", after, rate) for after, rate in rates]
            if key.startswith("decode_ab_"):
                others += [(f"`{key}.{tag}` ({row[after].get('vs_default', '?')}x its A/B's default)",
                            after.replace("_", " "), row[after]["tokens_per_s"])
                           for tag, row in value.items() if isinstance(row, dict) and "error" not in row
                           for after in row if after.startswith("after_") and tag != "default"]
        tokens = lambda after: int(after.split()[-1])  # noqa: E731 - "after 512" -> 512
        fastest = [max((o for o in others if o[1] == after), key=lambda o: o[2])
                   for after in sorted({o[1] for o in others}, key=tokens)]
        if not default and not fastest:
            continue
        lines += [f"Issue 12's bar, `{name}`: the floor is {floor:.0f} tok/s ({bandwidth / 1e9:.0f} GB/s copy bandwidth, "
                  f"{rows['bytes_read_per_decoded_token'] / 1e9:.2f} GB a token), the bar {BAR:.0%} of it, "
                  f"{BAR * floor:.0f} tok/s:", ""]
        rows_read = ([("the default", *d) for d in sorted(default, key=lambda d: tokens(d[1]))]
                     + [("the fastest other", *f) for f in fastest])
        lines += [f"- {which}, {label} {after}: {rate:.1f} tok/s, {rate / floor:.1%} of the floor"
                  f"{' (the bar reached)' if rate >= BAR * floor else ''}" for which, label, after, rate in rows_read]
        lines.append("")
    return lines


def ab_summary(big: dict) -> list[str]:
    """The big step's decode A/Bs (`decode_ab_*`) as tables: a side a row, its median tok/s after each
    prompt with its ratio to the default and its rounds' spread."""
    lines = []
    for name, rows in big.items():
        for key, ab in (rows.items() if isinstance(rows, dict) else ()):
            if not key.startswith("decode_ab_") or not isinstance(ab, dict) or "rounds" not in ab:
                continue
            sides = {k: v for k, v in ab.items() if isinstance(v, dict)}
            prompts = [p for p in next(iter(sides.values()), {}) if p.startswith("after_")]
            stopped = f" Stopped: {ab['stopped']}; a side's median is of the rounds it ran." if ab.get("stopped") else ""
            lines += [f"`{name}.{key}` ({ab['rounds']} alternating rounds of {ab['tokens']} tokens; "
                      f"median tok/s, x the default, spread):{stopped}", "",
                      "| side | " + " | ".join(p.replace("_", " ") for p in prompts) + " |",
                      "|---|" + "---|" * len(prompts)]
            for side, by_prompt in sides.items():
                if "error" in by_prompt:
                    cell = "not measured" if by_prompt["error"].startswith("not measured") else "error"
                    lines.append(f"| {side} | " + " | ".join([cell] * len(prompts)) + " |")
                    continue
                cells = [f"{r['tokens_per_s']} ({r['vs_default']}x, ±{r['spread'] * 50:.1f}%)"
                         for p, r in by_prompt.items() if p.startswith("after_")]
                note = " (graphs disabled: ran uncaptured)" if by_prompt.get("graphs_disabled") else ""
                lines.append(f"| {side}{note} | " + " | ".join(cells) + " |")
            lines.append("")
            if ab.get("sides"):  # the winners' run: what making them the defaults takes, if their tokens hold
                tokens = rows.get(key.replace("decode_ab_", "tokens_"), {})
                lines += [f"The winners ({', '.join(ab['sides'])}); tokens' first divergence from the default: "
                          f"{tokens.get('first_divergence_from_default', '?')}. As defaults:", ""]
                lines += [f"- `{side_edit(tag) or tag}`" for tag in ab["sides"]] + [""]
    return lines


def memory_summary(big: dict) -> list[str]:
    """The big step's memory measurements against the plan, a line per placement (the JSON has them all)."""
    from localrun.hardware import format_size

    def size(n) -> str:
        return "?" if not isinstance(n, (int, float)) else ("+" if n > 0 else "") + format_size(n)

    def ok(value) -> bool:
        return isinstance(value, dict) and not ({"skipped", "error"} & set(value))

    lines = []
    for name, rows in big.items():
        if not isinstance(rows, dict) or "memory_after_load" not in rows:
            continue
        parts = []
        outside = [(when.replace("_", " "), rows.get(f"memory_outside_torch_{when}"))
                   for when in ("after_load", "after_decode", "at_end")]
        if any(ok(v) for _, v in outside):
            planned = next(v["planned_bytes"] for _, v in outside if ok(v))
            parts.append("outside torch " + ", ".join(f"{format_size(v['outside_torch_bytes'])} {when}"
                                                    for when, v in outside if ok(v))
                         + f" (plan.CUDA_CONTEXT_BYTES {format_size(planned)})")
        graphs = rows.get("graph_memory")
        if ok(graphs):
            buckets = ", ".join(f"{span}: {size(g.get('reserved_bytes'))}" for span, g in graphs["buckets"].items())
            parts.append(f"{graphs['mode']} step, graphs for spans {graphs['captured'] or 'none'}: reserved "
                         f"{size(graphs['reserved_bytes'])}, allocated {size(graphs['allocated_bytes'])} (per bucket, "
                         f"reserved: {buckets or 'none'}; {graphs['counters']})"
                         + (f", disabled: {graphs['graphs_disabled']}" if graphs.get("graphs_disabled") else ""))
        long = rows.get("long_prompt")
        if ok(long):
            text = f"{long['prompt_tokens']}-token prompt: "
            text += (f"prefill {long['prefill_tokens_per_s']} tok/s ({long['prefill_s']} s), " if "prefill_s" in long
                     else "")
            text += (f"peak reserved {format_size(long['peak_reserved_bytes'])}, transient "
                     f"{format_size(long['prefill_transient_bytes'])} "
                     f"(plan workspace {format_size(long['workspace_bytes'])})"
                     if "peak_reserved_bytes" in long else "no peak")
            if "headroom_bytes" in long:
                text += (f", headroom {size(long['headroom_bytes'])} "
                         f"of the budget {format_size(long['device_budget_bytes'])}")
            if "margin_bytes" in long:
                text += f", {size(long['margin_bytes'])} less the context's excess"
            text += ", OUT OF MEMORY" if long.get("out_of_memory") else ", no out of memory"
            text += f" ({long['counters']})"
            parts.append(text)
        elif isinstance(long, dict):
            parts.append(f"long prompt: {long.get('skipped') or long.get('error')}")
        if parts:
            lines.append(f"- `{name}`: " + "; ".join(parts))
    return ["Memory against the plan (`memory_outside_torch_*`, `graph_memory`, `long_prompt`):", "", *lines, ""] \
        if lines else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dry", action="store_true", help="run on the CPU with a scaled-down model")
    p.add_argument("--only", default=None, help="comma-separated steps, run in this order (default: all)")
    p.add_argument("--inline", action="store_true", help="all steps in this process (faster; no per-step limit)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="start no step or measurement later than this many seconds from now (size it to the lease)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.deadline is not None and a.deadline <= 0:
        p.error("--deadline must be a positive number of seconds")
    if a.dry:  # it proves the paths, not their speed: one CPU thread (steps in child processes inherit it), so
        # a core another program takes cannot stall each parallel step (the big step took over 300 s, not 40,
        # beside a test run on two cores)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.child:
        PROGRESS.deadline = a.deadline_at
        run_child(a.child, a.dry, a.result)
        return 0
    steps = list(STEPS) if a.only is None else a.only.split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    deadline = None if a.deadline is None else time.time() + a.deadline
    report = run_steps(steps, a.dry, a.out_dir, a.inline, deadline)
    failed = [s for s, v in report["steps"].items() if "error" in v]
    skipped = [s for s, v in report["steps"].items() if v is SKIPPED]
    print(f"report: {a.out_dir / 'gpu_check.md'}" + (f" ({len(failed)} step(s) failed: {', '.join(failed)})" if failed else "")
          + (f" (skipped, out of time: {', '.join(skipped)})" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
