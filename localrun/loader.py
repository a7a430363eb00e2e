"""Build a Gemma 4 decoder from a checkpoint directory, streaming tensors into place.

The skeleton is built on the meta device (no memory); every tensor is then read from its
shard, cast and moved, and set in place. Routed experts are read one layer at a time and
handed to an expert backend builder, so at most one layer of full-precision experts is in
host memory while loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import Checkpoint
from .config import ModelArgs, load_config
from .errors import LocalrunError
from .models.gemma4 import Gemma4Model, sanitize
from .moe import DenseExperts

EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")

# (layer, gate_up_E2IH, down_EHI) -> an expert backend (x_TH, ids_TK, w_TK) -> y_TH
ExpertBuilder = Callable[[int, torch.Tensor, torch.Tensor], nn.Module]


@dataclass
class LoadedModel:
    model: Gemma4Model
    args: ModelArgs
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    experts: str
    extras: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available else cpu; "cuda" without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LocalrunError("--device cuda asked for, but no CUDA GPU is available (try --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LocalrunError(f"unknown device {device!r} (expected cpu, cuda or auto)") from None


def dense_experts(device, dtype) -> ExpertBuilder:
    """Experts kept as the checkpoint's 3-D tensors in the compute dtype (`--experts bf16`)."""

    def build(layer: int, gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, act: str) -> nn.Module:
        return DenseExperts(gate_up_E2IH.to(device, dtype), down_EHI.to(device, dtype), act)

    return build


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(key)


def expected_tensors(model: Gemma4Model) -> dict[str, tuple[int, ...]]:
    """Model keys (parameters and persistent buffers) the checkpoint must provide, expert tensors excluded."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(EXPERT_KEYS)}


def load_weights(
    model: Gemma4Model, ckpt: Checkpoint, args: ModelArgs, *, device, dtype, build_experts, progress=None
) -> None:
    """Fill a meta-device skeleton from `ckpt`: plain tensors cast to `dtype`, experts through `build_experts`."""
    expected = expected_tensors(model)
    names = {}
    for name in ckpt.tensors:
        key = sanitize(args, name)
        if key is not None:
            names[key] = name
    missing = [k for k in expected if k not in names]
    if missing:
        raise LocalrunError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {args.weight_prefix}{missing[0]}")
    for key, shape in expected.items():
        info = ckpt.tensors[names[key]]
        if info.shape != shape:
            raise LocalrunError(f"tensor {names[key]} has shape {list(info.shape)}, config says {list(shape)}")
        _set_tensor(model, key, ckpt.read(names[key]).to(device=device, dtype=dtype))
        if progress:
            progress(info.nbytes)
    for i, layer in enumerate(model.layers):
        if not layer.moe:
            continue
        gate_up, down = (ckpt.read(names[f"layers.{i}.{k}"]) for k in EXPERT_KEYS)
        layer.experts = build_experts(i, gate_up, down, args.hidden_activation)
        if progress:
            progress(gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size())
        del gate_up, down
    model.init_rope(device)


def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    experts: str = "bf16",
    build_experts: ExpertBuilder | None = None,
    progress=None,
) -> LoadedModel:
    """Load a Gemma 4 checkpoint directory for inference."""
    args = load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    dev = resolve_device(device)
    with torch.device("meta"):
        model = Gemma4Model(args)
    if build_experts is None:
        if experts != "bf16":
            raise LocalrunError(f"unknown --experts {experts!r}")
        build_experts = dense_experts(dev, dtype)
    load_weights(model, ckpt, args, device=dev, dtype=dtype, build_experts=build_experts, progress=progress)
    model.eval().requires_grad_(False)
    return LoadedModel(model, args, Path(model_dir), dev, dtype, experts)
