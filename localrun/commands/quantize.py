"""`localrun quantize SRC OUT`: write a pre-quantized checkpoint (4-bit experts, bf16 rest)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from . import _options as opt


def quantize(
    src: str = typer.Argument(..., help="Hugging Face checkpoint directory, HF repo id, or 'demo'."),
    out: Path = typer.Argument(..., help="Where to write the pre-quantized model: a new or empty directory, "
                               "or (with --force) an earlier localrun output, keeping the files you added to it."),
    experts: str = typer.Option("nf4", "--experts", help="4-bit format of the routed experts: nf4 or fp4."),
    double_quant: bool = typer.Option(False, "--double-quant", help="Quantize the absmax statistics too."),
    blocksize: int = typer.Option(64, "--blocksize", help="Values per absmax block."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an earlier localrun output "
                               "(never any other directory)."),
    device: str = typer.Option("auto", "--device", help="Where to quantize: cuda (fast), cpu or auto."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize a checkpoint's routed experts to 4-bit once, so loading it later is fast."""
    from quant.spec import QUANT_TYPES, QuantSpec

    opt.check_device(device)
    if experts not in QUANT_TYPES:
        raise UsageError(f"--experts must be one of {', '.join(QUANT_TYPES)}, not {experts!r}")
    try:
        spec = QuantSpec(experts, blocksize, double_quant)
    except ValueError as e:
        raise UsageError(str(e)) from None

    from ..loader import resolve_device
    from ..prequant import quantize_checkpoint, user_files
    from ..resolve import resolve_model
    from ._progress import progress_bar

    source = resolve_model(src)
    kept = user_files(out) if force else []  # what quantize_checkpoint carries over; told after it succeeds
    with progress_bar("quantizing", enabled=not quiet) as update:
        quantize_checkpoint(source, out, spec, force=force, progress=update, device=str(resolve_device(device)))
    if kept:  # even with --quiet: the user should know their files are still there
        typer.echo(kept_line(out, kept), err=True)
    if not quiet:
        typer.echo(f"wrote {out} ({experts} experts{', double quant' if double_quant else ''})", err=True)


def kept_line(out: Path, names: list[str], shown: int = 5) -> str:
    """One line naming the user's files carried from the earlier OUT (the first few, then a count)."""
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"kept {len(names)} file(s) you added to the earlier {out}: {listed}"


command = quantize
