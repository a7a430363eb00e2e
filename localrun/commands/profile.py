"""`localrun profile MODEL --prompts FILE`: count which experts the router picks, so the plan keeps those resident."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from ..resolve import ROUTING_PROFILE
from . import _options as opt

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the installed localrun package: never written to


def profile(
    model: str = typer.Argument(..., help="Model directory, HF repo id, or 'demo'."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompts file: one per line, or a JSON list of strings."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", min=1, help="Tokens to generate per prompt (greedy)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the profile (default: MODEL/"
                                       "routing_profile.json, where the plan reads it)."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Also write the per-token routing trace "
                                         "(per token, per layer: expert ids) for scripts/bench_cache.py."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = opt.DTYPE,
    experts: Optional[str] = opt.EXPERTS,
    threads: Optional[int] = opt.THREADS,
) -> None:
    """Profile expert routing on prompts; writes routing_profile.json into the model directory (or --out)."""
    opt.check_device(device)
    opt.check_dtype(dtype)
    threads = opt.check_threads(threads)
    if not prompts.is_file():
        raise UsageError(f"prompts file {prompts} not found")
    opt.check_out("--out", out, directory_ok=True)  # routing_profile.json into a directory
    opt.check_out("--trace", trace)
    check_distinct({"--prompts": prompts, "--out": profile_file(out, None), "--trace": trace})

    from ..engine import DTYPES, Engine
    from ..profile import profile_prompts, read_prompts, write_routing_profile, write_trace
    from ..resolve import resolve_model

    texts = read_prompts(prompts)  # before loading: a bad file fails fast
    model_dir = resolve_model(model)
    if out is None and PACKAGE_DIR in model_dir.resolve().parents:
        raise UsageError(f"{model_dir} is part of the installed localrun package; give --out FILE for the profile")
    if out is None and not os.access(model_dir, os.W_OK):  # the default place: known before minutes of profiling
        raise UsageError(f"cannot write the profile into {model_dir} (read-only); give --out FILE")
    target = profile_file(out, model_dir)
    if out is None:  # the default place, known now: the trace must not go there either
        check_distinct({"--prompts": prompts, "the profile": target, "--trace": trace})
    opt.use_threads(threads)
    engine = Engine.load(model_dir, device=device, dtype=None if dtype == "auto" else DTYPES[dtype], experts=experts)
    result = profile_prompts(engine, texts, max_tokens=max_tokens, trace=trace is not None)
    path = write_routing_profile(target, result)
    print(f"profiled {len(texts)} prompt(s), {result.tokens} tokens, {len(result.counts)} MoE layers, "
          f"{threads} thread{'s' if threads != 1 else ''} -> {path}")
    if trace is not None:
        write_trace(trace, result.trace)
        print(f"trace of {len(result.trace)} tokens -> {trace}")


def profile_file(out: Optional[Path], model_dir: Optional[Path]) -> Optional[Path]:
    """The file the profile is written to: --out (a directory: its routing_profile.json), else MODEL's."""
    if out is None:
        return None if model_dir is None else model_dir / ROUTING_PROFILE
    return out / ROUTING_PROFILE if out.is_dir() else out


def check_distinct(files: dict[str, Optional[Path]]) -> None:
    """The prompts, the profile and the trace must be three files: writing one over another would silently lose
    the profile (the trace is written after it) or the user's prompts. Resolved first: `x`, `./x` and a link to x
    are one file."""
    seen: dict[Path, str] = {}
    for name, path in files.items():
        if path is None:
            continue
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13); writing it fails later
            real = path.absolute()
        if real in seen:
            raise UsageError(f"{seen[real]} and {name} name the same file ({path}); give them different paths")
        seen[real] = name


command = profile
