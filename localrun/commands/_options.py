"""Options shared by the commands that load and sample a model (run, chat, bench), declared once."""

from __future__ import annotations

from typing import Optional

import typer

from ..engine import DTYPES
from ..errors import UsageError
from ..hardware import parse_size

SYSTEM = typer.Option(None, "--system", help="System prompt.")
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", help="0 = greedy.")
TOP_K = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off).")
MIN_P = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 = off).")
REPEAT_PENALTY = typer.Option(1.0, "--repeat-penalty", help="Penalize tokens already seen (1 = off).")
SEED = typer.Option(None, "--seed", help="Seed for reproducible sampling.")
IGNORE_EOS = typer.Option(False, "--ignore-eos", help="Don't stop at end-of-turn tokens.")
THINK = typer.Option(False, "--think", help="Let the model think first (the chat template's enable_thinking).")

DEVICE = typer.Option("auto", "--device", help="cpu, cuda or auto.")
DTYPE = typer.Option("bfloat16", "--dtype", help="Compute dtype: bfloat16 or float32 (for exactness checks).")
EXPERTS = typer.Option(None, "--experts", help="Routed expert precision: nf4 (default), fp4 or bf16.")
VRAM = typer.Option(None, "--vram", help="GPU memory to plan for, e.g. 16GiB (default: the GPU's total; the "
                    "plan keeps a CUDA context and display allowance out of it, as `fit` does).")
RESIDENT_EXPERTS = typer.Option(
    None, "--resident-experts", help="Force this fraction (0..1) of each layer's experts resident; the rest in RAM.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or status lines on stderr.")


def load_kwargs(device: str, dtype: str, experts: Optional[str], vram: Optional[str],
                resident_experts: Optional[float], context: Optional[int]) -> dict:
    """Validated keyword arguments for Engine.load from the shared command-line options."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be bfloat16 or float32, not {dtype!r}")
    if context is not None and context < 1:
        raise UsageError(f"--context must be at least 1, not {context}")
    return {"device": device, "dtype": DTYPES[dtype], "experts": experts,
            "vram": parse_size(vram) if vram else None, "context": context, "resident_fraction": resident_experts}
