"""`localrun profile MODEL --prompts FILE`: count which experts the router picks, so the plan keeps those resident."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..engine import DTYPES, Engine
from ..errors import UsageError
from ..profile import profile_prompts, read_prompts, write_routing_profile, write_trace
from ..resolve import resolve_model


def profile(
    model: str = typer.Argument(..., help="Model directory, HF repo id, or 'demo'."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompts file: one per line, or a JSON list of strings."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Tokens to generate per prompt (greedy)."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Also write the per-token routing trace "
                                         "(per token, per layer: expert ids) for scripts/bench_cache.py."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Compute dtype: bfloat16 or float32."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Routed expert precision: nf4 (default), fp4 or bf16."),
) -> None:
    """Profile expert routing on prompts; writes routing_profile.json into the model directory."""
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be bfloat16 or float32, not {dtype!r}")
    texts = read_prompts(prompts)  # before loading: a bad file fails fast
    engine = Engine.load(resolve_model(model), device=device, dtype=DTYPES[dtype], experts=experts)
    result = profile_prompts(engine, texts, max_tokens=max_tokens, trace=trace is not None)
    path = write_routing_profile(engine.loaded.model_dir, result)
    print(f"profiled {len(texts)} prompt(s), {result.tokens} tokens, {len(result.counts)} MoE layers -> {path}")
    if trace is not None:
        write_trace(trace, result.trace)
        print(f"trace of {len(result.trace)} tokens -> {trace}")


command = profile
