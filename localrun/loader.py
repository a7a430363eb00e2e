"""Build a decoder (of the family config.json names) from a checkpoint directory, streaming tensors into place.

The skeleton is built on the meta device (no memory); every tensor is then read from its
shard, cast and moved, and set in place. Routed experts are read one layer at a time and
handed to an expert backend builder, so at most one layer of full-precision experts is in
host memory while loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import kernels
from .checkpoint import Checkpoint
from .config import ModelArgs, load_config
from .errors import LocalrunError, UsageError
from .experts import POLICIES, ExpertStore, calibrate
from .hardware import detect_gpu, detect_host_ram
from .kvcache import KVCache
from .models import family, is_expert_tensor
from .moe import DenseExperts, activation
from .plan import Budget, Plan, make_plan
from .prequant import is_prequantized, manifest_spec, read_manifest
from quant.ffn import BufferedExperts, QuantizedExperts, ffn_4bit
from quant.layer import ExpertBuffer
from quant.io import load_packed_experts
from quant.nf4 import pack_expert
from quant.spec import QuantSpec

EXPERT_CHOICES = ("nf4", "fp4", "bf16")
DEFAULT_EXPERTS = "nf4"
DEFAULT_CONTEXT = 8192
ROUTING_PROFILE = "routing_profile.json"
DEFAULT_CACHE_POLICY = "lru"  # scripts/bench_cache.py compares the policies on recorded routing


@dataclass
class LoadedModel:
    model: nn.Module  # the family's Model (localrun.models)
    args: ModelArgs
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    experts: str
    plan: Plan | None = None
    store: ExpertStore | None = None  # set when some experts live in host RAM
    kv: KVCache | None = None  # allocated once for the plan's context; every generation reuses it

    def expert_stats(self) -> dict | None:
        """Expert cache counters (hits, misses, bytes_copied, cpu_experts, ...) when a store is in use."""
        return self.store.stats() if self.store is not None else None


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


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(key)


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Model keys (parameters and persistent buffers) the checkpoint must provide, expert tensors excluded."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not is_expert_tensor(k)}


def load_weights(
    model: nn.Module, ckpt: Checkpoint, args: ModelArgs, *, device, dtype, build_experts, progress=None
) -> None:
    """Fill a meta-device skeleton from `ckpt`: plain tensors cast to `dtype`, experts through `build_experts`.

    build_experts(layer) -> expert backend; it reads what it needs itself (one layer at a time).
    progress(stage, done, total) follows the bytes read.
    """
    expected = expected_tensors(model)
    sanitize = family(args.model_type).sanitize
    names = {}
    for name in ckpt.tensors:
        key = sanitize(args, name)
        if key is not None:
            names[key] = name
    missing = [k for k in expected if k not in names]
    if missing:
        raise LocalrunError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {args.weight_prefix}{missing[0]}")
    total = sum(info.nbytes for info in ckpt.tensors.values())
    done = 0
    for key, shape in expected.items():
        info = ckpt.tensors[names[key]]
        if info.shape != shape:
            raise LocalrunError(f"tensor {names[key]} has shape {list(info.shape)}, config says {list(shape)}")
        tensor = ckpt.read(names[key])
        stored = kernels.storage_dtype(dtype, device, tensor.dtype) if tensor.ndim > 1 else dtype
        _set_tensor(model, key, tensor.to(device=device, dtype=stored))
        done += info.nbytes
        if progress:
            progress("weights", done, total)
    for i, layer in enumerate(model.layers):
        if layer.moe:
            layer.set_experts(build_experts(i))
            if progress:
                progress("experts", done + (total - done) * (i + 1) // len(model.layers), total)
    model.init_rope(device)
    model.fuse_projections()


def checkpoint_experts(ckpt: Checkpoint, args: ModelArgs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's expert tensors in localrun's fused layout (gate_up [E, 2I, H], down [E, H, I]),
    whether the checkpoint stores them fused or per expert."""
    return family(args.model_type).read_experts(ckpt, args, layer)


def packed_experts_source(model_dir: Path, ckpt: Checkpoint, args: ModelArgs, spec: QuantSpec | None, device):
    """layer -> [PackedExpert]: read from a pre-quantized directory, or quantized from the checkpoint
    as it streams (on `device`: the GPU when there is one)."""
    if spec is None:
        manifest = read_manifest(model_dir)
        files = manifest["expert_files"]

        def read(layer: int):
            if str(layer) not in files:
                raise LocalrunError(f"pre-quantized model has no experts for layer {layer}")
            return load_packed_experts(model_dir / files[str(layer)], [layer])[layer]

        return read

    def quantize(layer: int):
        # one expert at a time on the device: a whole layer in bf16 (1.5 GiB for 26B-A4B) would not
        # fit beside the resident experts of a full card
        gate_up, down = checkpoint_experts(ckpt, args, layer)
        return [pack_expert(gate_up[e].to(device), down[e].to(device), spec) for e in range(gate_up.shape[0])]

    return quantize


def read_routing_profile(model_dir: Path) -> dict | None:
    """{layer: [count per expert]} from `localrun profile`, if the model directory has one."""
    path = model_dir / ROUTING_PROFILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return {int(k): [int(c) for c in v] for k, v in data["layers"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as e:
        raise LocalrunError(f"invalid {path}: {e}") from None


def default_context(args: ModelArgs, context: int | None) -> int:
    """The context to plan for: as asked, else 8K or the model's limit if that is shorter."""
    return context or min(DEFAULT_CONTEXT, args.max_position_embeddings)


def expert_spec(model_dir: Path, experts: str | None) -> QuantSpec | str:
    """What the routed experts will be: a pre-quantized model's own QuantSpec (its blocksize and
    double quant set the bytes, not just the 4-bit type), else `experts` (default nf4) or "bf16"."""
    if is_prequantized(model_dir):
        stored = manifest_spec(read_manifest(model_dir))
        if experts not in (None, stored.quant_type):
            raise UsageError(f"{model_dir} is pre-quantized with {stored.quant_type} experts; "
                             f"--experts {experts} can't apply")
        return stored
    experts = experts or DEFAULT_EXPERTS
    if experts not in EXPERT_CHOICES:
        raise UsageError(f"--experts must be one of {', '.join(EXPERT_CHOICES)}, not {experts!r}")
    return "bf16" if experts == "bf16" else QuantSpec(experts)


def placement_plan(args: ModelArgs, model_dir: Path, dev: torch.device, spec: QuantSpec | str, dtype: torch.dtype,
                   *, vram: int | None, context: int | None, resident_fraction: float | None,
                   stored_dtype: torch.dtype | None = None) -> Plan:
    """The plan this load builds: the same `make_plan` that `localrun fit` prints. stored_dtype: the
    checkpoint's matrix dtype, which decides what they are kept in (kernels.storage_dtype)."""
    device_bytes = vram
    if device_bytes is None and dev.type == "cuda":
        gpu = detect_gpu()
        device_bytes = gpu.free_bytes if gpu else None
    if dev.type == "cpu":
        device_bytes = None  # the CPU's "device" tier is host RAM: only resident_fraction splits it
    budget = Budget(device_bytes=device_bytes, host_bytes=detect_host_ram(), context=default_context(args, context))
    stored = kernels.storage_dtype(dtype, dev, stored_dtype)
    plan = make_plan(args, budget, experts=spec, routing_profile=read_routing_profile(model_dir),
                     dtype=str(dtype).removeprefix("torch."), matrix_dtype=str(stored).removeprefix("torch."),
                     resident_fraction=resident_fraction)
    if not plan.fits:
        raise LocalrunError(f"does not fit: {plan.reason} (see `localrun fit {model_dir}`)")
    return plan


def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    experts: str | None = None,
    vram: int | None = None,
    context: int | None = None,
    resident_fraction: float | None = None,
    cache_policy: str = DEFAULT_CACHE_POLICY,
    progress=None,
    checkpoint=None,
) -> LoadedModel:
    """Load a checkpoint directory of a supported family (or a pre-quantized localrun one) for inference.

    experts: "nf4" (default), "fp4" or "bf16" for the routed experts; a pre-quantized
    directory always uses what it holds. vram / context / resident_fraction shape the
    placement plan: experts that are not resident live in host RAM behind an ExpertStore,
    whose cache slots are replaced per `cache_policy` ("lru" or "lfu"). checkpoint: tensors to
    read instead of the directory's safetensors (`synthetic.RandomCheckpoint`: a full-size config
    without its weights on disk); the directory still gives config.json.
    """
    model_dir = Path(model_dir)
    args = load_config(model_dir)
    ckpt = checkpoint if checkpoint is not None else Checkpoint(model_dir)
    dev = resolve_device(device)
    if cache_policy not in POLICIES:
        raise UsageError(f"cache policy must be one of {', '.join(POLICIES)}, not {cache_policy!r}")
    spec = expert_spec(model_dir, experts)
    experts = spec if spec == "bf16" else spec.quant_type
    plan = placement_plan(args, model_dir, dev, spec, dtype, vram=vram, context=context,
                          resident_fraction=resident_fraction, stored_dtype=ckpt.matrix_dtype())
    with torch.device("meta"):
        model = family(args.model_type).Model(args)
    store = None
    moe_layers = [i for i in range(args.num_hidden_layers) if args.has_experts(i)]
    offload = any(len(plan.resident_experts[i]) < args.num_experts for i in moe_layers)
    if experts == "bf16":
        if offload:
            raise UsageError("experts in host RAM need 4-bit experts (--experts nf4 or fp4), not bf16")

        def build(layer):
            gate_up, down = checkpoint_experts(ckpt, args, layer)
            stored = kernels.storage_dtype(dtype, dev, gate_up.dtype)
            return DenseExperts(gate_up.to(dev, stored), down.to(dev, stored), args.hidden_activation)
    else:
        source = packed_experts_source(model_dir, ckpt, args, None if is_prequantized(model_dir) else spec, dev)
        if offload:
            act = activation(args.hidden_activation)
            compute = lambda payload, x_TH: ffn_4bit(x_TH, payload, act)  # noqa: E731
            pending = {moe_layers[0]: source(moe_layers[0])}  # read early: calibration needs a real expert
            cost = calibrate(pending[moe_layers[0]][0], compute, dev, args.hidden_size, dtype) \
                if dev.type == "cuda" else None
            store = ExpertStore(None, compute, dev, slots=plan.cache_slots, policy=POLICIES[cache_policy],
                                cost_model=cost)

            def build(layer):
                # one layer of packed experts in flight: the store keeps the resident ones on the
                # device and the rest (pinned on CUDA) in host RAM
                payloads = pending.pop(layer) if layer in pending else source(layer)
                store.add_layer(layer, payloads, plan.resident_experts[layer])
                return store(layer)
        elif dev.type == "cuda":
            def build(layer):  # one device buffer per layer; the MoE runs as one op (graph-capturable)
                return BufferedExperts(ExpertBuffer.from_experts(source(layer), device=dev), args.hidden_activation)
        else:
            def build(layer):
                return QuantizedExperts([e.to(dev) for e in source(layer)], args.hidden_activation)

    load_weights(model, ckpt, args, device=dev, dtype=dtype, build_experts=build, progress=progress)
    model.eval().requires_grad_(False)
    kv = KVCache(args, dtype=dtype, device=dev, capacity=plan.context)
    return LoadedModel(model, args, model_dir, dev, dtype, experts, plan=plan, store=store, kv=kv)


def _distinct_storage_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage two tensors share counts once)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.device.type, storage.data_ptr())
        if key not in seen and storage.nbytes():
            seen.add(key)
            total += storage.nbytes()
    return total


def memory_report(loaded: LoadedModel) -> dict:
    """What the plan promised against what the loader holds, per tier: `run --json`'s `memory`.

    device_bytes: distinct storages on the compute device (weights, experts, cache slots, KV);
    host_bytes: the expert store's host-RAM tier. On CUDA also the allocator's peak and reserved bytes.
    """
    model = loaded.model
    dev = loaded.device
    seen: set = set()
    tensors = [t for name, t in [*model.named_parameters(), *model.named_buffers()] if not name.startswith("inv_freq_")]
    for layer in model.layers:
        experts = getattr(layer, "experts", None)
        tensors += [p.buffer for p in getattr(experts, "experts", [])]
    if loaded.kv is not None:
        tensors += loaded.kv.tensors()
    store = loaded.store
    host = 0
    if store is not None:
        tensors += store.device_tensors()
        host = _distinct_storage_bytes(store.host_tensors(), set())
    device = _distinct_storage_bytes([t for t in tensors if t.device.type == dev.type], seen)
    plan = loaded.plan
    out = {
        "planned_device_bytes": plan.device_bytes if plan else None,
        "device_bytes": device,
        "planned_host_bytes": plan.host_bytes if plan else None,
        "host_bytes": host,
        "cache_slots": plan.cache_slots if plan else 0,
    }
    if dev.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["reserved_device_bytes"] = torch.cuda.memory_reserved(dev)
        out["allocated_device_bytes"] = torch.cuda.memory_allocated(dev)
    return out
