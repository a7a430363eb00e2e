"""Options shared by the commands that load and sample a model (run, chat, bench, profile), declared once.

Nothing here imports torch: `--help` and usage errors must answer before it loads.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from ..hardware import check_threads, parse_size, use_idle_cores

DTYPE_NAMES = ("auto", "bfloat16", "bf16", "float32", "fp32")

SYSTEM = typer.Option(None, "--system", help="System prompt.")
# The ranges SamplingParams checks, declared here too so a bad value is a usage error before torch loads.
TEMPERATURE = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy.")
TOP_K = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0 = off).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, more than 0 and at most 1 (1 = off).")
MIN_P = typer.Option(0.0, "--min-p", min=0.0, max=1.0, help="Drop tokens below min_p x the top probability (0 = off).")
REPEAT_PENALTY = typer.Option(1.0, "--repeat-penalty", help="Penalize tokens already seen: more than 0 (1 = off).")
SEED = typer.Option(None, "--seed", min=-(1 << 63), max=(1 << 64) - 1,  # sampling.SEED_MIN / SEED_MAX
                    help="Seed for reproducible sampling.")
IGNORE_EOS = typer.Option(False, "--ignore-eos", help="Don't stop at end-of-turn tokens.")
THINK = typer.Option(False, "--think", help="Let the model think first (the chat template's enable_thinking).")

DEVICE = typer.Option("auto", "--device", help="cpu, cuda or auto.")
DTYPE = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on the CPU, where the C kernels keep the matrices bf16 and compute in fp32; bfloat16 on a GPU), bfloat16 or float32.")
EXPERTS = typer.Option(None, "--experts", help="Routed expert precision: nf4 (default), fp4 or bf16.")
VRAM = typer.Option(None, "--vram", help="GPU memory to plan for, e.g. 16GiB (default: the GPU's total; the "
                    "plan keeps a CUDA context and display allowance out of it, as `fit` does).")
RESIDENT_EXPERTS = typer.Option(
    None, "--resident-experts", min=0.0, max=1.0, help="Force this fraction (0..1) of each layer's experts resident; the rest in RAM.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or status lines on stderr.")
THREADS = typer.Option(None, "--threads", min=1, help="CPU compute threads (default: the cores no other process is "
                       "busy on, at most the physical cores).")


def check_sampling(top_p: float | None, repeat_penalty: float | None) -> None:
    """The ranges open at 0 (typer's `min` is inclusive, and its help would say so)."""
    if top_p is not None and not 0 < top_p <= 1:  # None: chat's "the model's default"
        raise UsageError(f"--top-p must be more than 0 and at most 1, not {top_p}")
    if repeat_penalty is not None and not repeat_penalty > 0:
        raise UsageError(f"--repeat-penalty must be more than 0, not {repeat_penalty}")


def check_stdout(command: str, what: str) -> None:
    """A command started with stdout closed (`>&-`) would lose what it prints (print() to None writes
    nothing): a usage error before anything is loaded."""
    if sys.stdout is None:
        raise UsageError(f"{command} writes {what} to stdout, which is closed")


def check_out(option: str, path: Optional[Path], *, directory_ok: bool = False) -> None:
    """An output path names a file in an existing folder (or, where `directory_ok`, an existing directory
    to write into), checked before minutes of work so a typo loses no run."""
    if path is None or (directory_ok and path.is_dir()):
        return
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; name a file")
    folder = Path(os.path.realpath(path)).parent  # a symlink is written where it points (atomic.write_text_atomic)
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder if path.is_symlink() else path.parent} does not exist")


def check_device(device: str) -> None:
    """cpu, auto, cuda or cuda:N (what the loader's resolve_device takes), else a usage error."""
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, not {device!r}")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be auto, bfloat16 or float32, not {dtype!r}")


def load_kwargs(device: str, dtype: str, experts: Optional[str], vram: Optional[str],
                resident_experts: Optional[float], context: Optional[int]) -> dict:
    """Validated keyword arguments for Engine.load from the shared command-line options."""
    check_device(device)
    check_dtype(dtype)
    if context is not None and context < 1:
        raise UsageError(f"--context must be at least 1, not {context}")
    size = parse_size(vram) if vram else None
    from ..engine import DTYPES  # torch: only once the options are known to be good

    return {"device": device, "dtype": None if dtype == "auto" else DTYPES[dtype], "experts": experts,
            "vram": size, "context": context, "resident_fraction": resident_experts}


def use_threads(threads: Optional[int]) -> int:
    """Set torch's (and so the C kernels' OpenMP) intra-op threads: `threads` (checked by check_threads
    already), else the idle cores now (`hardware.use_idle_cores`, what chat and serve repeat later)."""
    if threads is None:
        return use_idle_cores()
    import torch

    torch.set_num_threads(threads)
    return threads
