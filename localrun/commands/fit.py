"""`localrun fit MODEL`: will it fit, how many experts stay on the GPU, how long a context, how fast."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from .. import hardware
from ..errors import LocalrunError, UsageError
from ..hardware import format_rate, format_size



@dataclass(frozen=True)
class Target:
    """The GPU's memory (before the budget rule takes its allowances) and what we know of its speed;
    device_bytes None: the CPU, every weight in host RAM, read at `bandwidth` (the host RAM's)."""

    label: str
    device_bytes: int | None
    bandwidth: float | None
    pcie_bandwidth: float | None
    note: str | None = None  # why this target, when the user did not name it

    @property
    def cpu(self) -> bool:
        return self.device_bytes is None


NO_GPU_NOTE = "no GPU found: planned for the CPU (--gpu NAME or --vram SIZE plans a card)"


def resolve_target(vram: str | None, gpu: str | None, cpu: bool = False, host_bandwidth: float | None = None) -> Target:
    """--vram SIZE, --gpu NAME, --cpu, or the total memory of the GPU we find; the CPU (with a note
    saying so) when there is none. host_bandwidth: the host RAM's read rate, a CPU target's bandwidth."""
    if vram is not None and gpu is not None:
        raise UsageError("give --vram or --gpu, not both")
    if cpu and (vram is not None or gpu is not None):
        raise UsageError("--cpu plans for the CPU: leave out --vram and --gpu")
    if cpu:
        return Target("the CPU", None, host_bandwidth, None)
    if gpu is not None:
        preset = hardware.gpu_preset(gpu)
        return Target(preset.name, preset.memory_bytes, preset.bandwidth, preset.pcie_bandwidth)
    if vram is not None:
        return Target(f"{format_size(hardware.parse_size(vram))} VRAM", hardware.parse_size(vram), None,
                      hardware.DEFAULT_PCIE_BANDWIDTH)
    found = hardware.detect_gpu()
    if found is None:
        return Target("the CPU", None, host_bandwidth, None, note=NO_GPU_NOTE)
    preset = hardware.preset_for_device_name(found.name)
    return Target(f"{found.name} ({format_size(found.total_bytes)}, {format_size(found.free_bytes)} free)",
                  found.total_bytes,
                  preset.bandwidth if preset else None,
                  preset.pcie_bandwidth if preset else hardware.DEFAULT_PCIE_BANDWIDTH)


@dataclass(frozen=True)
class HostBandwidth:
    """Host RAM as the CPU reads cold experts: --host-bandwidth, or the documented default (assumed)."""

    bytes_per_s: float
    assumed: bool


def resolve_host_bandwidth(text: str | None) -> HostBandwidth:
    """--host-bandwidth RATE (UsageError when malformed), else hardware.DEFAULT_HOST_BANDWIDTH."""
    if text is None:
        return HostBandwidth(hardware.DEFAULT_HOST_BANDWIDTH, assumed=True)
    try:
        return HostBandwidth(hardware.parse_rate(text), assumed=False)
    except UsageError as e:
        raise UsageError(f"--host-bandwidth: {e}") from None


def rate(tokens_per_s: float) -> str:
    """Tokens/s as a person reads them: whole numbers, two significant digits below 10 (never "0")."""
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 10 else f"{tokens_per_s:.2g}"


def cold_experts_text(plan, target: Target, host: HostBandwidth) -> str | None:
    """One line: how the estimate serves missed experts (copied or computed on the CPU) and why; None
    when none miss or there is no estimate."""
    ceilings = plan.cold_expert_ceilings
    if plan.cold_experts is None or "cpu" not in ceilings:
        return None
    pcie = f"PCIe at {format_rate(target.pcie_bandwidth)}"
    ram = f"host RAM at {format_rate(host.bytes_per_s)}" + (" (assumed; --host-bandwidth sets it)" if host.assumed
                                                            else "")
    cpu, copy = (f"~{rate(ceilings[route])}" for route in ("cpu", "copy"))
    if plan.cold_experts == "cpu":
        return (f"cold experts: computed on the CPU where they lie in {ram}, faster than copying them over {pcie} "
                f"(ceiling {cpu} tokens/s vs {copy} copied)")
    return (f"cold experts: copied over {pcie}, faster than computing them on the CPU from {ram} "
            f"(ceiling {copy} tokens/s vs {cpu} on the CPU)")


def checkpoint_tensor_shapes(model_dir: Path, args) -> dict[str, tuple[int, ...]]:
    """Text tensor shapes: the config's layout, checked against safetensors headers when there are any.

    Only headers are read (never tensor data). A tensor the headers hold with another shape
    means config.json and the weights disagree, which is an error; names the headers lack
    (a pre-quantized layout, or no weights at all) keep the config's shapes.
    """
    from ..checkpoint import read_header
    from ..models import family

    model = family(args.model_type)
    shapes = model.checkpoint_shapes(args)
    for path in sorted(model_dir.glob("*.safetensors")):
        for full_name, info in read_header(path)[0].items():
            name = model.sanitize(args, full_name)
            implied = _implied_shape(shapes, name)
            if implied is not None and tuple(info.get("shape", ())) != implied:
                raise LocalrunError(f"config.json and weights disagree: {full_name} has shape "
                                    f"{tuple(info.get('shape', ()))}, the config implies {implied}")
    return shapes


_ONE_EXPERT = re.compile(r"(.*\.experts)\.\d+\.(gate_proj|up_proj|down_proj)\.weight")


def _implied_shape(shapes: dict[str, tuple[int, ...]], name: str | None) -> tuple[int, ...] | None:
    """The shape config.json implies for model key `name`: its own, or one expert's slice of the fused
    layout (a per-expert checkpoint's gate/up [I, H], down [H, I]); None for a tensor the model never reads."""
    if name in shapes:
        return shapes[name]
    one = _ONE_EXPERT.fullmatch(name or "")
    if one is None:
        return None
    if one[2] == "down_proj":
        fused = shapes.get(one[1] + ".down_proj")
        return None if fused is None else fused[1:]
    fused = shapes.get(one[1] + ".gate_up_proj")
    return None if fused is None else (fused[1] // 2, fused[2])


def cpu_dtypes(model_dir: Path) -> dict[str, str]:
    """What a CPU run computes and keeps its matrices in (`run --dtype auto` there, loader.default_dtype):
    fp32 with the checkpoint's bf16 matrices kept bf16 where the C kernels are (kernels.storage_dtype),
    bf16 where they are not (LOCALRUN_CPU_KERNELS=0, no compiler). The stored
    dtype is the weights' (their safetensors headers, as the loader reads them) when the directory
    holds them all, else config.json's (config.stored_matrix_dtype): a download under way plans as
    a directory holding only config.json does, as the GPU plan does."""
    import torch

    from .. import kernels
    from ..checkpoint import open_checkpoint
    from ..config import stored_matrix_dtype
    from ..loader import default_dtype
    from ..resolve import has_weights

    stored = None
    if has_weights(model_dir):
        stored = open_checkpoint(model_dir).matrix_dtype()  # headers only
    if stored is None:
        stored = stored_matrix_dtype(model_dir)
    compute = default_dtype(torch.device("cpu"))
    kept = kernels.storage_dtype(compute, torch.device("cpu"), stored)
    return {"dtype": str(compute).removeprefix("torch."), "matrix_dtype": str(kept).removeprefix("torch.")}


def context_text(plan, reach: int | None) -> str:
    """The longest context: at this placement, and with more experts in host RAM where that reaches further."""
    if not plan.fits:
        return (f"longest context that fits: {plan.max_context} tokens" if plan.max_context
                else "no context fits")
    text = f"longest context at this placement: {plan.max_context} tokens"
    if reach is not None and reach > plan.max_context:
        text += f"; up to {reach} with more experts in host RAM (--context {reach})"
    return text


def _where(plan, tier: str) -> str:
    from ..plan import DEVICE

    if plan.device == "cpu":
        return "CPU RAM"
    return "GPU" if tier == DEVICE else "RAM"


def _print_report(plan, target: Target, host: HostBandwidth, model: Path, sliding: bool = True,
                  reach: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..plan import CUDA_CONTEXT_BYTES, DEVICE, KV_ROLLBACK, display_allowance

    console = Console()
    if target.note:
        console.print(target.note, highlight=False)
    seqs = f" x {plan.sequences} sequences" if plan.sequences > 1 else ""
    table = Table(title=f"localrun fit: {model.name} on {target.label}, context {plan.context}{seqs}")
    table.add_column("component")
    table.add_column("precision")
    table.add_column("bytes", justify="right")
    table.add_column("where")
    for c in plan.breakdown:
        if c.nbytes:
            table.add_row(c.name, c.precision, format_size(c.nbytes), _where(plan, c.tier))
    table.add_section()
    table.add_row("total on " + _where(plan, DEVICE), "", format_size(plan.device_bytes), _where(plan, DEVICE))
    if plan.device == "cuda":
        table.add_row("usable (budget)", "", format_size(plan.device_budget), "GPU")
    if plan.host_bytes:
        table.add_row("total in host RAM", "", format_size(plan.host_bytes), "RAM")
    console.print(table)
    verdict = "[green]" if plan.fits else "[red]"
    console.print(f"{verdict}{plan.reason}[/]", highlight=False)
    if plan.device == "cuda":
        console.print(f"budget: {format_size(target.device_bytes)} minus {format_size(CUDA_CONTEXT_BYTES)} CUDA context "
                      f"and {format_size(display_allowance())} display allowance "
                      f"(LOCALRUN_DISPLAY_ALLOWANCE=0 on a headless card)", highlight=False)
    console.print(context_text(plan, reach), highlight=False)
    per_seq = f"; one cache for each of the {plan.sequences} sequences" if plan.sequences > 1 else ""
    if sliding:  # a model without sliding layers keeps every position anyway
        console.print(f"KV cache: sliding layers keep their window + {KV_ROLLBACK} positions, so the prefix cache "
                      f"can roll a conversation back{per_seq}", highlight=False)
    elif per_seq:
        console.print(f"KV cache: {per_seq[2:]}", highlight=False)
    if (cold := cold_experts_text(plan, target, host)) is not None:
        console.print(cold, highlight=False)
    if plan.device == "cpu" and plan.estimated_decode_tokens_per_s is not None:
        console.print(f"host RAM read at {format_rate(host.bytes_per_s)}"
                      + (" (assumed; --host-bandwidth sets it)" if host.assumed else ""), highlight=False)
    if plan.estimated_decode_tokens_per_s is not None:
        eff = plan.efficiency
        where = " with experts in host RAM" if plan.host_bytes else ""
        if plan.cold_experts == "cpu":  # the efficiency was measured with every miss copied
            where += " (copied: computing them on the CPU is not measured yet)"
        misses = "" if plan.device == "cpu" else f", expected expert miss rate {plan.expected_miss_rate:.0%}"
        console.print(f"decode speed: ceiling ~{rate(plan.estimated_decode_tokens_per_s)} tokens/s (memory bandwidth"
                      f"{misses}); expected "
                      f"~{rate(plan.expected_decode_tokens_per_s)} tokens/s: the {eff.bandwidth_fraction:.1%} of "
                      f"the bandwidth localrun's kernels reached on the weights and {eff.layer_seconds * 1e6:.0f} us "
                      f"a layer for the rest, measured{where} on an {eff.device} ({eff.date}, {eff.report})",
                      highlight=False)
    elif plan.fits:
        console.print("estimated decode speed: unknown (give --gpu NAME for a bandwidth-based estimate)",
                      highlight=False)


def fit(
    model: str = typer.Argument(..., help="Model directory holding config.json (weights optional), HF repo id, or 'demo'."),
    vram: Optional[str] = typer.Option(None, "--vram", help="GPU memory, e.g. 16GiB (GB means GiB: cards are sized in binary units)."),
    cpu: bool = typer.Option(False, "--cpu", help="Plan for the CPU: every weight in host RAM (also what fit does "
                             "when it finds no GPU and neither --vram nor --gpu is given)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="A GPU preset, e.g. 'RTX 4090', 4060ti, 5090."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Host RAM for offloaded experts (default: available RAM)."),
    context: Optional[int] = typer.Option(None, "--context", "-c", min=1,
                                          help="Context length in tokens to plan for (default 8192, or the model's limit)."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Routed expert precision: nf4 (default), fp4 or bf16."),
    resident_experts: Optional[float] = typer.Option(None, "--resident-experts", min=0.0, max=1.0,
                                                     help="Force this fraction (0..1) of each layer's experts onto the GPU."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Sequences served side by side (`serve --parallel`): "
                                 "each keeps its own KV cache."),
    host_bandwidth: Optional[str] = typer.Option(
        None, "--host-bandwidth", help="Host RAM read rate for experts the CPU computes, e.g. 60GB/s (decimal, as "
        f"vendors quote it; default {hardware.DEFAULT_HOST_BANDWIDTH / hardware.GB_S:.0f}GB/s, assumed)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON."),
) -> None:
    """Estimate whether a model fits a GPU: memory per component, resident experts, longest context, speed.

    Exits 1 when it does not fit, after the report.
    """
    host_bw = resolve_host_bandwidth(host_bandwidth)
    target = resolve_target(vram, gpu, cpu, host_bw.bytes_per_s)
    host = hardware.parse_size(ram) if ram is not None else hardware.detect_host_ram()

    from ..config import load_config
    from ..loader import expert_spec, longest_context, placement_plan
    from ..plan import CUDA_CONTEXT_BYTES, display_allowance
    from ..resolve import resolve_model

    model = resolve_model(model, config_only=True)
    args = load_config(model)
    spec = expert_spec(model, experts, args)
    dtypes = cpu_dtypes(model) if target.cpu else {}
    options = dict(gpu_bytes=target.device_bytes, host_bytes=host, resident_fraction=resident_experts,
                   tensor_shapes=checkpoint_tensor_shapes(model, args), sequences=parallel,
                   matrix_dtype=dtypes.get("matrix_dtype"))
    plan = placement_plan(args, model, spec, context=context, dtype=dtypes.get("dtype", "bfloat16"),
                          gpu_bandwidth=target.bandwidth,
                          pcie_bandwidth=target.pcie_bandwidth,
                          host_bandwidth=None if target.cpu else host_bw.bytes_per_s, **options)
    reach = longest_context(plan, args, model, spec, **options)
    if as_json:
        print(json.dumps({"model": str(model), "target": target.label, "gpu_bytes": target.device_bytes,
                          "cuda_context_bytes": None if target.cpu else CUDA_CONTEXT_BYTES,
                          "display_allowance_bytes": None if target.cpu else display_allowance(),
                          "gpu_bandwidth_bytes_per_s": None if target.cpu else target.bandwidth,
                          "pcie_bandwidth_bytes_per_s": target.pcie_bandwidth,
                          "host_bandwidth_bytes_per_s": host_bw.bytes_per_s,
                          "host_bandwidth_assumed": host_bw.assumed, "longest_context": reach,
                          **plan.to_dict()}, indent=2))
    else:
        sliding = any(args.is_sliding(i) for i in range(args.num_hidden_layers))
        _print_report(plan, target, host_bw, model, sliding=sliding, reach=reach)
    if not plan.fits:
        raise typer.Exit(1)


command = fit
fit._command_kwargs = {"name": "fit"}
