"""`localrun bench MODEL`: prefill/decode tokens/s, time to first token and peak memory, optionally
side by side with transformers on the same checkpoint (see localrun/bench.py for the method)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UsageError
from . import _options as opt

GRAPH_MODES = ("auto", "on", "off", "both")  # localrun.bench.GRAPH_MODES' keys, here so parsing needs no torch


def resolve_bench_model(model: str) -> Path:
    """`bench` -> the generated bench checkpoint (written on first use); anything else as `run` resolves it."""
    from .. import bench as lbench
    from ..resolve import resolve_model

    if model == lbench.BENCH_NAME and not Path(model).exists():
        return lbench.bench_model_dir()
    return resolve_model(model)


def bench(
    model: str = typer.Argument(..., help="'bench' (a generated ~100M-parameter 26B-A4B-shaped MoE), a model "
                                "directory, HF repo id, or 'demo'."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Also measure 'transformers' in the same run."),
    prompt_tokens: List[int] = typer.Option([128, 512], "--prompt-tokens", help="Prompt length (repeatable)."),
    gen_tokens: List[int] = typer.Option([64], "--gen-tokens", help="Tokens to generate (repeatable)."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: bfloat16 or float32."),
    experts: str = typer.Option("bf16", "--experts", help="Routed expert precision (bf16 = the compute dtype)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    resident_experts: Optional[float] = opt.RESIDENT_EXPERTS,
    repeat: int = typer.Option(3, "--repeat", help="Timed runs per measurement; the best is kept."),
    rounds: int = typer.Option(2, "--rounds", help="Alternate localrun and the compared side this many times "
                               "(each keeps its best), so a drift in machine speed hits both alike."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for both sides (default: the "
                                          "cores no other process is busy on, at most the physical cores)."),
    graphs: str = typer.Option("auto", "--graphs", help="Decode step: on (CUDA graphs), off (eager), both (side "
                               "by side in one run), auto (graphs where every expert routes on the GPU)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the markdown table to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw numbers as JSON instead of the table."),
) -> None:
    """Measure prefill and decode speed (and compare with transformers)."""
    opt.check_dtype(dtype)
    if compare not in (None, "transformers"):
        raise UsageError(f"--compare can only be 'transformers', not {compare!r}")
    if graphs not in GRAPH_MODES:
        raise UsageError(f"--graphs must be one of {', '.join(GRAPH_MODES)}, not {graphs!r}")
    if graphs in ("on", "both") and device == "cpu":
        raise UsageError("--graphs on needs --device cuda (CUDA graphs)")
    if min(repeat, rounds, *prompt_tokens, *gen_tokens) < 1:
        raise UsageError("--repeat, --rounds, --prompt-tokens and --gen-tokens must be at least 1")
    threads = opt.check_threads(threads)

    from .. import bench as lbench
    from ..engine import DTYPES

    opt.use_threads(threads)  # the report's "threads" reads it back
    cases = [(p, g) for p in prompt_tokens for g in gen_tokens]
    report = lbench.run_bench(resolve_bench_model(model), cases, device=device, dtype=DTYPES[dtype],
                              experts=experts, repeat=repeat, compare=compare, resident_fraction=resident_experts,
                              rounds=rounds, graphs=graphs)
    table = lbench.markdown(report)
    if out is not None:
        out.write_text(table)
    print(json.dumps(report.to_dict(), indent=2) if as_json else table, end="" if not as_json else "\n")


command = bench
