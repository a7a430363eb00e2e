"""Packed experts to and from safetensors, with explicit, validated string metadata (never pickle).

Shape letters: E experts, N bytes per packed expert.
One uint8 tensor per layer, `model.layers.{i}.experts.packed` [E, N]: row e is expert e's
buffer, so loading a layer gives every expert as a zero-copy row view. Metadata (all strings):

    format             "localrun.packed_experts"
    format_version     "1"
    quant_type         "nf4" | "fp4"
    blocksize          "64"
    double_quant       "true" | "false"
    layers             JSON list of layer indices, e.g. "[0, 1]"
    model.layers.{i}.experts.layout   JSON: num_experts, dtype, gate_up_shape, down_shape,
                                      nbytes, parts {"gate_up.codes": [offset, shape, dtype], ...}

Loading recomputes each layout from shapes + spec and requires the stored offsets to match,
so a file written by a different packing scheme is refused rather than misread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from localrun.errors import LocalrunError
from quant.nf4 import DTYPES, MATRICES, ExpertLayout, PackedExpert, dtype_name, expert_layout
from quant.spec import QuantSpec

FORMAT = "localrun.packed_experts"
FORMAT_VERSION = "1"


def packed_key(layer: int) -> str:
    return f"model.layers.{layer}.experts.packed"


def layout_key(layer: int) -> str:
    return f"model.layers.{layer}.experts.layout"


# -- layout <-> JSON ------------------------------------------------------------------------


def _parts_dict(layout: ExpertLayout) -> dict[str, list]:
    return {
        f"{m}.{name}": [p.offset, list(p.shape), p.dtype]
        for m in MATRICES
        for name, p in layout.matrix(m).parts().items()
    }


def layout_to_dict(layout: ExpertLayout, num_experts: int) -> dict:
    """The JSON-able description of one layer's layout (spec fields live at file level)."""
    return {
        "num_experts": num_experts,
        "dtype": dtype_name(layout.dtype),
        "gate_up_shape": list(layout.gate_up.shape),
        "down_shape": list(layout.down.shape),
        "nbytes": layout.nbytes,
        "parts": _parts_dict(layout),
    }


def _shape(value, what: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(d, int) and d > 0 for d in value)):
        raise LocalrunError(f"packed experts metadata: {what} must be two positive ints, got {value!r}")
    return tuple(value)


def layout_from_dict(d: Mapping, spec: QuantSpec, where: str) -> tuple[ExpertLayout, int]:
    """(layout, num_experts) from layout_to_dict's output, checked against this version's packing."""
    missing = {"num_experts", "dtype", "gate_up_shape", "down_shape", "nbytes", "parts"} - set(d)
    if missing:
        raise LocalrunError(f"packed experts metadata: {where} lacks {', '.join(sorted(missing))}")
    if d["dtype"] not in DTYPES:
        raise LocalrunError(f"packed experts metadata: {where} has unsupported dtype {d['dtype']!r}")
    num_experts = d["num_experts"]
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise LocalrunError(f"packed experts metadata: {where} num_experts must be a positive int")
    gate_up_shape = _shape(d["gate_up_shape"], f"{where} gate_up_shape")
    down_shape = _shape(d["down_shape"], f"{where} down_shape")
    try:
        layout = expert_layout(gate_up_shape, down_shape, spec, DTYPES[d["dtype"]])
    except ValueError as e:
        raise LocalrunError(f"packed experts metadata: {where}: {e}") from None
    if d["nbytes"] != layout.nbytes or d["parts"] != _parts_dict(layout):
        raise LocalrunError(f"packed experts metadata: {where} byte layout differs from this version's packing")
    return layout, num_experts


# -- tensors + metadata ---------------------------------------------------------------------


def _spec_metadata(spec: QuantSpec) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quant_type": spec.quant_type,
        "blocksize": str(spec.blocksize),
        "double_quant": "true" if spec.double_quant else "false",
    }


def experts_to_tensors(
    experts_by_layer: Mapping[int, Sequence[PackedExpert]],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({key: uint8 [E, N] on CPU}, string metadata) for save_file; one quant spec for the file."""
    if not experts_by_layer:
        raise ValueError("no layers to serialize")
    specs = {e.layout.spec for experts in experts_by_layer.values() for e in experts}
    if len(specs) != 1:
        raise ValueError(f"all experts in one file must share one quant spec, found {len(specs)}")
    tensors, metadata = {}, _spec_metadata(specs.pop())
    for layer, experts in sorted(experts_by_layer.items()):
        layouts = {e.layout for e in experts}
        if len(layouts) != 1:
            raise ValueError(f"layer {layer}: experts must share one layout (got {len(layouts)} or none)")
        tensors[packed_key(layer)] = torch.stack([e.buffer.cpu() for e in experts])
        metadata[layout_key(layer)] = json.dumps(layout_to_dict(layouts.pop(), len(experts)))
    metadata["layers"] = json.dumps(sorted(experts_by_layer))
    return tensors, metadata


def _field(metadata: Mapping[str, str], key: str) -> str:
    if key not in metadata:
        raise LocalrunError(f"packed experts metadata: missing field {key!r}")
    return metadata[key]


def spec_from_metadata(metadata: Mapping[str, str]) -> QuantSpec:
    """The file's QuantSpec, after checking format and version."""
    if _field(metadata, "format") != FORMAT:
        raise LocalrunError(f"not a localrun packed-experts file (format {metadata['format']!r})")
    if _field(metadata, "format_version") != FORMAT_VERSION:
        raise LocalrunError(
            f"packed experts format version {metadata['format_version']!r} is not supported (expected {FORMAT_VERSION})"
        )
    double_quant = _field(metadata, "double_quant")
    if double_quant not in ("true", "false"):
        raise LocalrunError(f"packed experts metadata: double_quant must be 'true' or 'false', not {double_quant!r}")
    blocksize = _field(metadata, "blocksize")
    if not blocksize.isdigit():
        raise LocalrunError(f"packed experts metadata: blocksize must be an integer, not {blocksize!r}")
    try:
        return QuantSpec(_field(metadata, "quant_type"), int(blocksize), double_quant == "true")
    except ValueError as e:
        raise LocalrunError(f"packed experts metadata: {e}") from None


def _json(metadata: Mapping[str, str], key: str):
    try:
        return json.loads(_field(metadata, key))
    except json.JSONDecodeError:
        raise LocalrunError(f"packed experts metadata: field {key!r} is not valid JSON") from None


def layers_from_metadata(metadata: Mapping[str, str]) -> list[int]:
    layers = _json(metadata, "layers")
    if not (isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers)):
        raise LocalrunError("packed experts metadata: 'layers' must be a list of non-negative ints")
    return layers


def experts_from_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], layers: Iterable[int] | None = None
) -> dict[int, list[PackedExpert]]:
    """Inverse of experts_to_tensors: PackedExperts as row views of the tensors (no re-quantizing).

    Only `layers` (default: every layer the metadata lists) are rebuilt and need a tensor.
    """
    spec = spec_from_metadata(metadata)
    listed = layers_from_metadata(metadata)
    wanted = listed if layers is None else list(layers)
    out = {}
    for layer in wanted:
        if layer not in listed:
            raise LocalrunError(f"packed experts file has no layer {layer}")
        layout, num_experts = layout_from_dict(_json(metadata, layout_key(layer)), spec, f"layer {layer}")
        out[layer] = _rows(tensors, layer, layout, num_experts)
    return out


def _rows(tensors: Mapping[str, torch.Tensor], layer: int, layout: ExpertLayout, num_experts: int):
    key = packed_key(layer)
    if key not in tensors:
        raise LocalrunError(f"packed experts file lacks tensor {key!r}")
    t = tensors[key]
    if t.dtype != torch.uint8 or tuple(t.shape) != (num_experts, layout.nbytes):
        raise LocalrunError(
            f"{key} is {t.dtype} {list(t.shape)}, metadata says uint8 {[num_experts, layout.nbytes]}"
        )
    t = t.contiguous()
    return [PackedExpert(t[e], layout) for e in range(num_experts)]


# -- files ----------------------------------------------------------------------------------


def save_packed_experts(path: str | os.PathLike, experts_by_layer: Mapping[int, Sequence[PackedExpert]]) -> Path:
    """Write {layer: [PackedExpert]} to one safetensors file, atomically (temp file + rename)."""
    path = Path(path)
    tensors, metadata = experts_to_tensors(experts_by_layer)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_packed_experts(
    path: str | os.PathLike, layers: Iterable[int] | None = None, device: torch.device | str = "cpu"
) -> dict[int, list[PackedExpert]]:
    """Read packed experts written by save_packed_experts; only `layers` (default all) are read."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            spec_from_metadata(metadata)  # refuse foreign files before reading any tensor
            wanted = layers_from_metadata(metadata) if layers is None else list(layers)
            keys = set(f.keys())
            tensors = {packed_key(i): f.get_tensor(packed_key(i)) for i in wanted if packed_key(i) in keys}
    except (OSError, SafetensorError) as e:
        raise LocalrunError(f"cannot read packed experts from {path}: {str(e).splitlines()[0]}") from None
    return experts_from_tensors(tensors, metadata, wanted)
