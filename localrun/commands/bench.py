"""`localrun bench MODEL`: prefill/decode tokens/s, time to first token and peak memory, optionally
side by side with transformers or llama.cpp on the same checkpoint (see localrun/bench.py for the method)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .. import llamacpp
from ..errors import LocalrunError, UsageError
from . import _options as opt

GRAPH_MODES = ("auto", "on", "off", "both")  # localrun.bench.GRAPH_MODES' keys, here so parsing needs no torch
COMPARE = ("transformers", "llama.cpp")  # localrun.bench.COMPARE
EXPERT_KINDS = ("bf16", "nf4", "fp4")  # localrun.loader.EXPERT_CHOICES


def resolve_bench_model(model: str, config_only: bool = False) -> Path:
    """`bench` -> the generated bench checkpoint (written on first use); anything else as `run` resolves it
    (as `fit` does with config_only: --random-weights needs config.json alone)."""
    from .. import bench as lbench
    from ..resolve import has_weights, resolve_model

    if model == lbench.BENCH_NAME and not Path(model).exists():
        return lbench.bench_model_dir()
    model_dir = resolve_model(model, config_only=config_only)
    if not config_only and not has_weights(model_dir):  # config.json alone (what fit reads), or a download under way
        raise LocalrunError(f"{model_dir} has config.json but not its weights (every safetensors shard): add "
                            "--random-weights to measure it with weights drawn in their shapes")
    return model_dir


def bench(
    model: str = typer.Argument(..., help="'bench' (a generated ~100M-parameter 26B-A4B-shaped MoE), a model "
                                "directory, HF repo id, or 'demo'."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Also measure 'transformers' or 'llama.cpp' (the "
                                          "checkpoint converted to GGUF, cached beside it) in the same run."),
    prompt_tokens: List[int] = typer.Option([128, 512], "--prompt-tokens", help="Prompt length (repeatable)."),
    gen_tokens: List[int] = typer.Option([64], "--gen-tokens", help="Tokens to generate (repeatable)."),
    dtype: str = opt.DTYPE,
    experts: List[str] = typer.Option(["bf16"], "--experts", help="Routed expert precision: bf16 (the compute "
                                      "dtype), nf4 or fp4; repeat it to measure several in the same run."),
    gguf: List[str] = typer.Option(list(llamacpp.GGUF_PRECISIONS), "--gguf", help="With --compare llama.cpp: its "
                                   "precisions, bf16, q4_0-experts (bf16 but routed experts Q4_0: localrun NF4's "
                                   "mix) and q4_0 (every matrix); repeatable, default all three."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    resident_experts: Optional[float] = opt.RESIDENT_EXPERTS,
    repeat: int = typer.Option(3, "--repeat", help="Timed runs per measurement; the best is kept."),
    rounds: int = typer.Option(2, "--rounds", help="Alternate localrun and the compared side this many times "
                               "(each keeps its best), so a drift in machine speed hits both alike."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for both sides (default: the "
                                          "cores no other process is busy on, at most the physical cores)."),
    graphs: str = typer.Option("auto", "--graphs", help="Decode step: on (CUDA graphs), off (eager), both (side "
                               "by side in one run), auto (what run takes: graphs on CUDA, between the experts "
                               "where some are in host RAM)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Draw the weights at random in config.json's "
                                        "shapes: a model's speed before its weights are downloaded (MODEL may hold "
                                        "config.json alone)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the markdown table to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw numbers as JSON instead of the table."),
) -> None:
    """Measure prefill and decode speed (and compare with transformers or llama.cpp)."""
    opt.check_device(device)
    opt.check_dtype(dtype)
    if compare not in (None, *COMPARE):
        raise UsageError(f"--compare can only be {' or '.join(COMPARE)}, not {compare!r}")
    if bad := [e for e in experts if e not in EXPERT_KINDS]:
        raise UsageError(f"--experts must be one of {', '.join(EXPERT_KINDS)}, not {bad[0]!r}")
    if bad := [g for g in gguf if g not in llamacpp.GGUF_PRECISIONS]:
        raise UsageError(f"--gguf must be one of {', '.join(llamacpp.GGUF_PRECISIONS)}, not {bad[0]!r}")
    if compare and random_weights:
        raise UsageError(f"--compare {compare} reads the checkpoint's weights: leave out --random-weights")
    if compare == "llama.cpp" and device != "cpu":
        raise UsageError("--compare llama.cpp runs on the CPU: use --device cpu")
    if graphs not in GRAPH_MODES:
        raise UsageError(f"--graphs must be one of {', '.join(GRAPH_MODES)}, not {graphs!r}")
    if graphs in ("on", "both") and device == "cpu":
        raise UsageError(f"--graphs {graphs} needs --device cuda (CUDA graphs)")
    if min(repeat, rounds, *prompt_tokens, *gen_tokens) < 1:
        raise UsageError("--repeat, --rounds, --prompt-tokens and --gen-tokens must be at least 1")
    if "bf16" in experts and resident_experts is not None and resident_experts < 1:  # checked before any runs
        raise UsageError("experts in host RAM need 4-bit experts (--experts nf4 or fp4), not bf16")
    opt.check_out("--out", out)  # before minutes of measuring
    threads = opt.check_threads(threads)
    if compare == "llama.cpp" and not llamacpp.available():
        raise LocalrunError(llamacpp.INSTALL_HINT)

    import torch

    if graphs in ("on", "both") and device == "auto" and not torch.cuda.is_available():
        raise UsageError(f"--graphs {graphs} needs a CUDA GPU, and none is available")

    from .. import bench as lbench
    from ..atomic import write_text_atomic
    from ..engine import DTYPES

    threads = opt.use_threads(threads)  # the report's "threads" reads it back
    model_dir = resolve_bench_model(model, config_only=random_weights)
    ggufs = None
    if compare == "llama.cpp":
        ggufs = {}
        key = llamacpp.fingerprint(model_dir, llamacpp.version())
        for precision in dict.fromkeys(gguf):
            if not llamacpp.gguf_path(model_dir, precision, key).is_file():
                print(f"converting {model_dir.name} to a {precision} GGUF for llama.cpp (once)", file=sys.stderr)
            ggufs[precision] = llamacpp.ensure_gguf(model_dir, precision, threads)
    cases = [(p, g) for p in prompt_tokens for g in gen_tokens]
    report = lbench.run_bench(model_dir, cases, device=device, dtype=None if dtype == "auto" else DTYPES[dtype],
                              experts=experts, repeat=repeat, compare=compare, resident_fraction=resident_experts,
                              rounds=rounds, graphs=graphs, gguf=ggufs, random_weights=random_weights)
    table = lbench.markdown(report)
    print(json.dumps(report.to_dict(), indent=2) if as_json else table, end="" if not as_json else "\n")
    if out is not None:  # after printing: a file that cannot be written loses no measurement
        write_text_atomic(out, table)


command = bench
