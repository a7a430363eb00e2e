"""Speed measurements: prefill and decode tokens/s, time to first token, peak memory, for
localrun and (optionally) transformers or llama.cpp on the same checkpoint and prompt ids.

Method, identical for every engine: after a warm-up generation, `repeat` greedy generations of
N tokens with end-of-sequence disabled, each on a fresh cache, timed at the first token and at the
end (the best of each over the generations):
  time to first token = t(first)                 (prefill + one sampling step)
  prefill tokens/s    = prompt_tokens / t(first)
  decode tokens/s     = (N - 1) / (t(end) - t(first))   (within one generation, so a slow prefill
                                                         elsewhere never shows up as fast decode)
llama.cpp runs the checkpoint converted to GGUF by its own converter (localrun/llamacpp.py), at
bf16, at localrun NF4's precision mix (routed experts Q4_0, the rest bf16) and all-Q4_0.
With `rounds` > 1 the engines take turns (see run_bench) and each keeps its best over all rounds.
Returns values; the `bench` command and scripts/bench.py print them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import UsageError
from .tiny import tiny_config, write_checkpoint

BENCH_NAME = "bench"
# --graphs: which decode steps to measure (localrun/step.py); "both" puts graphs off and on side by side
GRAPH_MODES = {"auto": ("auto",), "on": ("graphs",), "off": ("eager",), "both": ("eager", "graphs")}
BENCH_SEED = 0


def bench_config() -> dict:
    """A ~110M-parameter Gemma 4 MoE with 26B-A4B's proportions (k_eq_v, global head dim 2x,
    32 experts top-8, 5:1 sliding:full, p-RoPE, intermediate 3/4 and expert width 1/4 of hidden)."""
    sliding, full = tiny_config()["layer_types"][0], tiny_config()["layer_types"][2]
    return tiny_config(
        "moe",
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=384,
        num_hidden_layers=12,
        layer_types=([sliding] * 5 + [full]) * 2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        global_head_dim=128,
        num_global_key_value_heads=1,
        sliding_window=128,
        num_experts=32,
        top_k_experts=8,
        moe_intermediate_size=128,
        vocab_size_per_layer_input=16384,
    )


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the instruction-set flags (/proc/cpuinfo spelling) that the kernels here or llama.cpp's choose from
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_features() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")) and ":" in line:
                flags = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FEATURES if f in flags]
    except OSError:
        pass
    return []


def kernel_isa() -> str:
    """The instruction sets localrun's CPU code runs on: its C kernels' build (bf16 and 4-bit experts,
    localrun/kernels) and torch's ATen/oneDNN dispatch."""
    from . import kernels

    built = kernels.isa()  # the -march=native build: "avx512" (both kernels), "avx2" or "scalar"
    ours = "off (plain torch)" if built is None else \
        f"{built} (bf16 matrices: {'avx512' if built == 'avx512' else 'compiler-vectorized'}; 4-bit experts: {built})"
    return f"C kernels {ours}; torch {torch.backends.cpu.get_cpu_capability()}"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localrun"


def bench_model_dir(root: str | Path | None = None) -> Path:
    """The bench checkpoint, written once (atomically) under `root`; the name hashes its config."""
    config = bench_config()
    digest = hashlib.sha256(json.dumps([config, BENCH_SEED], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root) if root is not None else cache_root()
    out = root / f"bench-model-{digest}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-model-", dir=root))
    try:
        write_checkpoint(tmp, config, seed=BENCH_SEED, max_shard_bytes=None)
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # not a concurrent writer winning the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def bench_prompt(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """`n` deterministic prompt ids: BOS then ids past Gemma's special tokens (any id in a vocab without them)."""
    gen = torch.Generator().manual_seed(seed)
    low = 107 if vocab_size > 107 else 0
    return [2] + torch.randint(low, vocab_size, (n - 1,), generator=gen).tolist()


# Memory -------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


# Measuring ----------------------------------------------------------------------------------

@dataclass
class Measurement:
    engine: str  # "localrun", "transformers" or "llama.cpp"
    prompt_tokens: int
    gen_tokens: int
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_bytes: int | None = None  # process peak since this engine started loading
    peak_vram_bytes: int | None = None
    expert_hit_rate: float | None = None  # when the expert backend counts hits
    step: str = "eager"  # the decode step (localrun/step.py): eager, or graphs (CUDA graph replay)
    bytes_per_token: int | None = None  # what one decoded token reads (weights, top-k experts, KV)
    floor_tokens_per_s: float | None = None  # measured device copy bandwidth / bytes_per_token
    memory: dict | None = None  # localrun: loader.memory_report after the case (planned vs placed bytes)
    variant: str | None = None  # localrun: its expert precision; llama.cpp: the GGUF's (llamacpp.GGUF_PRECISIONS)
    rounds_prefill: list[float] | None = None  # with several rounds: each round's prefill tok/s (best_of)
    rounds_decode: list[float] | None = None


@dataclass
class BenchReport:
    info: dict
    measurements: list[Measurement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"info": self.info, "measurements": [asdict(m) for m in self.measurements]}


def best_time(fn: Callable[[], None], repeat: int, sync: Callable[[], None] = lambda: None) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure(engine: str, generate_n: Callable[[int, Callable[[], None]], None], prompt_tokens: int,
            gen_tokens: int, repeat: int, sync: Callable[[], None] = lambda: None) -> Measurement:
    """Time `generate_n(gen_tokens, tick)`, which calls tick() as each token comes, `repeat` times after
    a warm-up; see the module docstring."""
    generate_n(min(gen_tokens, 2), lambda: None)  # warm-up: allocator, kernels, lazy inits
    first, rest = float("inf"), float("inf")
    for _ in range(repeat):
        ticks: list[float] = []  # the first token's time, then one entry per later token

        def tick() -> None:
            if not ticks:
                sync()
            ticks.append(time.perf_counter())

        sync()
        start = time.perf_counter()
        generate_n(gen_tokens, tick)
        sync()
        end = time.perf_counter()
        if len(ticks) != gen_tokens:  # a rate over tokens that never came would be fiction
            raise RuntimeError(f"{engine} generated {len(ticks)} of the {gen_tokens} tokens asked for")
        first, rest = min(first, ticks[0] - start), min(rest, end - ticks[0])
    decode = (gen_tokens - 1) / rest if gen_tokens > 1 and rest > 0 else 0.0
    return Measurement(engine, prompt_tokens, gen_tokens, first, prompt_tokens / first, decode)


def decode_bytes_per_token(plan) -> int:
    """Bytes a decoded token reads at least: non-expert weights (the embedding lookup aside; the tied
    lm_head reads it whole), top_k experts of every MoE layer, and the KV cache at the planned context
    (the most a token reads: what fit's ceiling takes)."""
    return plan.decode_weight_bytes + plan.active_expert_bytes + plan.decode_kv_bytes


def decode_bytes_at(plan, cache, position: int) -> int:
    """decode_bytes_per_token for a token at `position`: the keys and values it attends to, not the
    whole cache (bench's floor for a case)."""
    return plan.decode_weight_bytes + plan.active_expert_bytes + kv_bytes_read(cache, position)


def kv_bytes_read(cache, position: int) -> int:
    """KV bytes a token at `position` attends to: each full layer's keys so far, a sliding layer's
    window of them (a layer sharing another's KV reads nothing more)."""
    from .kvcache import RingKV

    total = 0
    for layer in cache.layers:
        if layer is not None:
            slots = layer.k.shape[2]
            keys = min(position + 1, layer.window) if isinstance(layer, RingKV) else position + 1
            total += (layer.k.nbytes + layer.v.nbytes) // slots * min(keys, slots)
    return total


def copy_bandwidth(device, nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (the floor's unit).
    Two 256 MiB buffers: several times any GPU's L2, and room for them before a model is loaded."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    b.copy_(a)
    seconds = best_time(lambda: b.copy_(a), repeat, sync)
    del a, b
    return 2 * nbytes / seconds


def load_engine(model_dir: Path, *, random_weights: bool = False, **load_kwargs):
    """The engine `bench` measures: the checkpoint's, or with `random_weights` one whose weights are
    drawn from config.json's shapes (`synthetic.RandomCheckpoint`, on the device it runs on), so a
    model's speed can be measured before its weights are downloaded. bench feeds token ids, so that
    engine has no tokenizer or template."""
    from .engine import Engine

    if not random_weights:
        return Engine.load(model_dir, **load_kwargs)
    from .config import load_config, stored_matrix_dtype
    from .loader import load_model, resolve_device
    from .synthetic import RandomCheckpoint

    args = load_config(model_dir)
    checkpoint = RandomCheckpoint(args, dtype=stored_matrix_dtype(model_dir),  # the dtype the release stores
                                  device=resolve_device(load_kwargs.get("device", "cpu")))
    loaded = load_model(model_dir, checkpoint=checkpoint, **load_kwargs)
    return Engine(loaded, tokenizer=None, template=None, eos_ids=[])


def bench_localrun(model_dir: Path, cases: list[tuple[int, int]], *, device: str, dtype: torch.dtype,
                   experts: str, repeat: int, resident_fraction: float | None = None,
                   info: dict | None = None, steps: tuple[str, ...] = ("auto",),
                   random_weights: bool = False) -> list[Measurement]:
    from .loader import memory_report, resolve_device
    from .sampling import SamplingParams
    from .step import resolve_mode

    dev = resolve_device(device)
    bandwidth = None
    if _cuda(dev):  # before the model takes the memory (a 16 GiB card has ~1 GiB left after it)
        bandwidth = copy_bandwidth(dev)
        if info is not None:
            info["copy_bandwidth_bytes_per_s"] = bandwidth
            info["gpu"] = torch.cuda.get_device_name(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)  # peak VRAM: since this engine started loading, as peak RSS
    reset_peak_rss()
    engine = load_engine(model_dir, random_weights=random_weights, device=device, dtype=dtype, experts=experts,
                         resident_fraction=resident_fraction)
    if info is not None:  # what the matrices are kept in: bf16 under an fp32 CPU run (kernels.storage_dtype)
        info["matrices"] = str(engine.loaded.model.embed_tokens.weight.dtype).removeprefix("torch.")
    plan = engine.loaded.plan
    check_cases(cases, plan.context if plan else None)
    sync = (lambda: torch.cuda.synchronize(dev)) if _cuda(dev) else (lambda: None)
    out = []
    for step in steps:
        for prompt_tokens, gen_tokens in cases:
            ids = bench_prompt(prompt_tokens, engine.loaded.args.vocab_size)

            def generate_n(n: int, tick: Callable[[], None]) -> None:
                for _ in engine.stream(ids, SamplingParams(), max_tokens=n, ignore_eos=True, step=step):
                    tick()

            store = engine.loaded.store  # None when every expert is resident
            before = store.snapshot() if store else None
            m = measure("localrun", generate_n, prompt_tokens, gen_tokens, repeat, sync)
            m.variant = experts
            m.step = resolve_mode(engine.model, step)
            if plan is not None:  # the KV at the middle of the case's decode
                m.bytes_per_token = decode_bytes_at(plan, engine.loaded.kv, prompt_tokens + (gen_tokens - 1) // 2)
            if bandwidth and m.bytes_per_token:
                m.floor_tokens_per_s = bandwidth / m.bytes_per_token
            if store:
                m.expert_hit_rate = store.stats(since=before)["hit_rate"]
            _memory(m, dev)
            m.memory = memory_report(engine.loaded)
            out.append(m)
    return out


def check_cases(cases: list[tuple[int, int]], context: int | None) -> None:
    """Every (prompt, gen) case fits the planned context, or a UsageError before any is measured."""
    for prompt_tokens, gen_tokens in cases:
        if context is not None and prompt_tokens + gen_tokens > context:
            raise UsageError(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} is more than the "
                             f"model's {context}-token context")


def bench_transformers(model_dir: Path, cases: list[tuple[int, int]], *, device: str, dtype: torch.dtype,
                       repeat: int) -> list[Measurement]:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # its "Loading weights" bars would cut into the table's output
    config = json.loads((Path(model_dir) / "config.json").read_text())
    multimodal = config.get("model_type") == "gemma4"
    cls = transformers.Gemma4ForConditionalGeneration if multimodal else transformers.Gemma4ForCausalLM
    reset_peak_rss()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    model = cls.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
    if _cuda(dev):
        torch.cuda.reset_peak_memory_stats(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if _cuda(dev) else (lambda: None)
    vocab = (config.get("text_config") or config)["vocab_size"]
    out = []
    for prompt_tokens, gen_tokens in cases:
        ids = torch.tensor([bench_prompt(prompt_tokens, vocab)], device=dev)

        @torch.inference_mode()
        def generate_n(n: int, tick: Callable[[], None]) -> None:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=0, streamer=_Ticks(tick))

        m = measure("transformers", generate_n, prompt_tokens, gen_tokens, repeat, sync)
        _memory(m, dev)
        out.append(m)
    return out


class _Ticks:
    """A transformers streamer (put/end) that ticks at each generated token; the first put is the prompt."""

    def __init__(self, tick: Callable[[], None]):
        self.tick, self.prompt = tick, True

    def put(self, value) -> None:
        if self.prompt:
            self.prompt = False
        else:
            self.tick()

    def end(self) -> None:
        pass


def bench_llama_cpp(gguf: Path, cases: list[tuple[int, int]], *, precision: str, vocab_size: int, repeat: int,
                    threads: int) -> list[Measurement]:
    """llama.cpp (llama-cpp-python's C API) on `gguf`, greedy from the same prompt ids, on the CPU."""
    from .llamacpp import Runner

    reset_peak_rss()
    n_ctx = -(-max(p + g for p, g in cases) // 256) * 256
    runner = Runner(gguf, n_ctx, threads)
    out = []
    try:
        for prompt_tokens, gen_tokens in cases:
            ids = bench_prompt(prompt_tokens, vocab_size)
            m = measure("llama.cpp", lambda n, tick: runner.generate(ids, n, tick), prompt_tokens, gen_tokens,
                        repeat)
            m.variant = precision
            _memory(m, "cpu")
            out.append(m)
    finally:
        runner.close()
    return out


def _memory(m: Measurement, dev) -> None:
    m.peak_rss_bytes = peak_rss_bytes()
    if _cuda(dev):
        m.peak_vram_bytes = torch.cuda.max_memory_allocated(dev)


def best_of(measurements: list[Measurement]) -> Measurement:
    """One engine's measurements of one case over several rounds, as one: the best time to first
    token, prefill and decode rates (each from whichever round did best). Peak memory is the first
    round's: later rounds start in a process holding what earlier engines left behind."""
    several = len(measurements) > 1
    return replace(measurements[0], ttft_s=min(m.ttft_s for m in measurements),
                   prefill_tokens_per_s=max(m.prefill_tokens_per_s for m in measurements),
                   decode_tokens_per_s=max(m.decode_tokens_per_s for m in measurements),
                   rounds_prefill=[m.prefill_tokens_per_s for m in measurements] if several else None,
                   rounds_decode=[m.decode_tokens_per_s for m in measurements] if several else None)


COMPARE = ("transformers", "llama.cpp")


def run_bench(model_dir: str | Path, cases: list[tuple[int, int]], *, device: str = "cpu",
              dtype: torch.dtype | None = torch.float32, experts: str | Sequence[str] = "bf16", repeat: int = 3,
              compare: str | None = None, resident_fraction: float | None = None, rounds: int = 1,
              graphs: str = "auto", gguf: dict[str, Path] | None = None,
              random_weights: bool = False) -> BenchReport:
    """Measure localrun (at each of `experts`) and `compare` ("transformers", or "llama.cpp" on each
    GGUF of `gguf`, precision -> path, made by llamacpp.ensure_gguf when not given) on every
    (prompt_tokens, gen_tokens) case.

    rounds > 1 alternates the engines (localrun, the other side, localrun, ...; each loaded afresh
    so their memory never mixes) and keeps each one's best: a machine whose speed drifts over
    minutes then weighs on both sides alike instead of on whichever ran in the slow spell.

    random_weights: localrun alone, its weights drawn from config.json's shapes (`load_engine`).
    """
    if compare not in (None, *COMPARE):
        raise ValueError(f"can only compare with {' or '.join(COMPARE)}, not {compare!r}")
    if compare and random_weights:
        raise ValueError("random weights are localrun's alone: a compared engine reads the checkpoint")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    steps = GRAPH_MODES.get(graphs)
    if steps is None:
        raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}, not {graphs!r}")
    experts = [experts] if isinstance(experts, str) else list(dict.fromkeys(experts))
    cases = list(dict.fromkeys(cases))  # a case given twice is measured once (twice would read as two rounds)
    threads = torch.get_num_threads()
    on_cpu = device == "cpu" or device == "auto" and not torch.cuda.is_available()
    if dtype is None:  # auto, as `run` takes it: fp32 on the CPU (bf16 matrices, fp32 compute), bf16 on a GPU
        dtype = torch.float32 if on_cpu else torch.bfloat16
    info = {
        "model": str(model_dir), "device": device, "dtype": str(dtype).removeprefix("torch."),
        "experts": ", ".join(experts), "resident_experts": resident_fraction, "repeat": repeat, "rounds": rounds,
        "threads": threads, "torch": torch.__version__, "cpu": cpu_model(), "cpu_features": cpu_features(),
    }
    if random_weights:
        info["weights"] = "random"
    if on_cpu:
        info["kernels"] = kernel_isa()
    if compare == "transformers":
        import transformers

        info["transformers"] = transformers.__version__
    if compare == "llama.cpp":
        from . import llamacpp

        if not on_cpu:
            raise ValueError("llama.cpp is compared on the CPU only (device 'cpu')")
        if gguf is None:
            gguf = {p: llamacpp.ensure_gguf(Path(model_dir), p, threads) for p in llamacpp.GGUF_PRECISIONS}
        info["llama.cpp"] = llamacpp.version()
        info["llama.cpp_system"] = llamacpp.system_info()
        info["gguf"] = {p: str(path) for p, path in gguf.items()}
    measured: list[Measurement] = []
    for _ in range(rounds):
        for kind in experts:
            measured += bench_localrun(Path(model_dir), cases, device=device, dtype=dtype, experts=kind,
                                       repeat=repeat, resident_fraction=resident_fraction, info=info, steps=steps,
                                       random_weights=random_weights)
            gc.collect()  # the engine is gone with bench_localrun's frame: free it before the next one loads
        if compare == "transformers":
            measured += bench_transformers(Path(model_dir), cases, device=device, dtype=dtype, repeat=repeat)
            gc.collect()
        if compare == "llama.cpp":
            for precision, path in gguf.items():
                measured += bench_llama_cpp(Path(path), cases, precision=precision, repeat=repeat, threads=threads,
                                            vocab_size=llamacpp.text_vocab_size(Path(model_dir)))
    report = BenchReport(info)
    for key in dict.fromkeys((m.engine, m.variant, m.step) for m in measured):
        for case in cases:
            same = [m for m in measured if (m.engine, m.variant, m.step) == key
                    and (m.prompt_tokens, m.gen_tokens) == case]
            if same:
                report.measurements.append(best_of(same))
    return report


# Rendering ----------------------------------------------------------------------------------

def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


THEIRS = {"transformers": "hf", "llama.cpp": "llama.cpp"}  # the compared side's name in column heads


def markdown(report: BenchReport) -> str:
    """A markdown table, one row per case (and localrun variant); with another engine measured, one
    row per pair, its numbers and our ratio beside ours; with several rounds, each round's numbers."""
    ours = [m for m in report.measurements if m.engine == "localrun"]
    others = [m for m in report.measurements if m.engine != "localrun"]
    info = report.info
    stored = info.get("matrices")
    matrices = f" (localrun keeps matrices in {stored})" if stored and stored != info["dtype"] else ""
    weights = " (random weights in config.json's shapes)" if info.get("weights") == "random" else ""
    lines = [f"model `{info['model']}`{weights}, device {info['device']}, dtype {info['dtype']}{matrices}, experts {info['experts']}, "
             f"{info['threads']} threads, best of {info['repeat']}"
             + (f" in each of {info['rounds']} alternating rounds" if info.get("rounds", 1) > 1 else "")
             + (f", transformers {info['transformers']}" if "transformers" in info else "")
             + (f", llama.cpp (llama-cpp-python {info['llama.cpp']})" if "llama.cpp" in info else "")]
    if info.get("cpu"):
        features = f" ({' '.join(info['cpu_features'])})" if info.get("cpu_features") else ""
        lines.append(f"CPU {info['cpu']}{features}" + (f"; localrun: {info['kernels']}" if info.get("kernels") else "")
                     + (f"; llama.cpp: {info['llama.cpp_system']}" if info.get("llama.cpp_system") else ""))
    lines.append("")
    name = THEIRS.get(others[0].engine, others[0].engine) if others else None
    head = ["prompt", "gen"]
    steps = len({m.step for m in ours}) > 1 or any(m.step != "eager" for m in ours)
    if steps:
        head.append("decode step")
    variants = len({m.variant for m in ours}) > 1
    if variants:
        head.append("localrun experts")
    their_variants = any(m.variant for m in others)
    if their_variants:
        head.append(name)
    if others:
        head += [f"prefill tok/s (ours / {name})", "x", f"decode tok/s (ours / {name})", "x",
                 f"TTFT ms (ours / {name})", f"peak RSS MiB (ours / {name})"]
    else:
        head += ["prefill tok/s", "decode tok/s", "TTFT ms", "peak RSS MiB"]
    floor = any(m.floor_tokens_per_s for m in ours)
    if floor:
        head += ["GB a token", "floor tok/s", "of floor"]
    if any(m.peak_vram_bytes is not None for m in report.measurements):
        head.append("peak VRAM MiB")
    if any(m.expert_hit_rate is not None for m in ours):
        head.append("expert hit rate")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ours:
        pairs = [t for t in others if (t.prompt_tokens, t.gen_tokens) == (m.prompt_tokens, m.gen_tokens)] or [None]
        for t in pairs:
            row = [str(m.prompt_tokens), str(m.gen_tokens)] + ([m.step] if steps else []) \
                + ([m.variant or "-"] if variants else []) + ([t.variant or "-"] if their_variants else [])
            if others and t is None:
                row += ["-"] * 6
            elif t is not None:
                row += [f"{m.prefill_tokens_per_s:.1f} / {t.prefill_tokens_per_s:.1f}",
                        _ratio(m.prefill_tokens_per_s, t.prefill_tokens_per_s),
                        f"{_rate(m.decode_tokens_per_s)} / {_rate(t.decode_tokens_per_s)}",
                        _ratio(m.decode_tokens_per_s, t.decode_tokens_per_s),
                        f"{m.ttft_s * 1e3:.0f} / {t.ttft_s * 1e3:.0f}",
                        f"{_mib(m.peak_rss_bytes)} / {_mib(t.peak_rss_bytes)}"]
            else:
                row += [f"{m.prefill_tokens_per_s:.1f}", _rate(m.decode_tokens_per_s), f"{m.ttft_s * 1e3:.0f}",
                        _mib(m.peak_rss_bytes)]
            if floor:
                f = m.floor_tokens_per_s
                row += [f"{m.bytes_per_token / 1e9:.3f}" if m.bytes_per_token else "-", _rate(f or 0),
                        f"{m.decode_tokens_per_s / f:.1%}" if f else "-"]
            if "peak VRAM MiB" in head:
                row.append(_mib(m.peak_vram_bytes) + (f" / {_mib(t.peak_vram_bytes)}" if t else ""))
            if "expert hit rate" in head:
                row.append("-" if m.expert_hit_rate is None else f"{m.expert_hit_rate:.1%}")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "prefill = prompt / t(first token); decode = (N-1) / (t(end) - t(first token)) within a "
                  "generation; TTFT = t(first token); greedy, eos off, same prompt ids on every side; peak RSS "
                  "is the process peak since that engine started loading."]
    if floor:
        lines += [f"floor = measured device copy bandwidth ({info['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s on "
                  f"{info.get('gpu', 'the GPU')}) / the GB a decoded token reads (non-expert weights, top-k experts "
                  "of every layer, and the keys and values a token in the middle of the case's decode attends to)."]
    if any(m.rounds_prefill for m in report.measurements):
        lines += ["", "| engine | prompt | gen | prefill tok/s per round | decode tok/s per round |",
                  "|---|---|---|---|---|"]
        for m in report.measurements:
            if m.rounds_prefill:
                lines.append(f"| {_engine_label(m)} | {m.prompt_tokens} | {m.gen_tokens} | "
                             f"{', '.join(f'{r:.1f}' for r in m.rounds_prefill)} | "
                             f"{', '.join(_rate(r) for r in m.rounds_decode)} |")
    return "\n".join(lines) + "\n"


def _engine_label(m: Measurement) -> str:
    variant = f" {m.variant} experts" if m.engine == "localrun" and m.variant else f" {m.variant}" if m.variant else ""
    return m.engine + variant + (f" ({m.step})" if m.step != "eager" else "")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a > 0 and b > 0 else "-"


def _rate(r: float) -> str:
    return f"{r:.1f}" if r > 0 else "-"  # 0: noise made t(N) <= t(1); more --repeat or --gen-tokens
