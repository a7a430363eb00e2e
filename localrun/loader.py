"""Build a decoder (of the family config.json names) from a checkpoint directory, streaming tensors into place.

The skeleton is built on the meta device (no memory); every tensor is then read from its
shard, cast and moved, and set in place. Tensors the model fuses (q/k/v, the dense MLP's
gate/up: `plan.fused_groups`) are allocated once at their fused size and each checkpoint tensor
is read straight into its slice, so fusing copies nothing. Routed experts are read one layer at a
time, QUANT_CHUNK_EXPERTS experts per read, and quantized one expert at a time straight into their
row of the layer's buffer (device rows for resident experts, host rows for the rest): the device
never holds more than one expert's bf16 weights beyond the plan, and host RAM one chunk.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import hostmem, kernels
from .checkpoint import Checkpoint, check_shape, open_checkpoint, read_rows
from .config import ModelArgs, load_config
from .errors import LocalrunError, LocalrunWarning, UsageError
from .experts import POLICIES, ExpertStore, calibrate
from .hardware import detect_host_ram, format_size
from .kvcache import KVCache
from .models import family, is_expert_tensor
from .models.common import expert_shapes
from .models.gemma4 import EXPERT_KEYS
from .moe import DenseExperts, activation
from .plan import (CUDA_CONTEXT_BYTES, QUANT_CHUNK_BYTES, QUANT_CHUNK_EXPERTS, Budget, Plan, device_budget,
                   fused_groups, make_plan)
from .plan import longest_context as plan_longest_context
from .prequant import is_prequantized, manifest_spec, read_manifest
from .resolve import ROUTING_PROFILE
from quant.ffn import (BufferedExperts, CpuLayerCompute, DeviceRowsCompute, DeviceRowsPrefill, QuantizedExperts,
                       ffn_4bit)
from quant.layer import ExpertBuffer
from quant.io import load_packed_experts
from quant.nf4 import ExpertLayout, PackedExpert, expert_layout, pack_expert
from quant.spec import QuantSpec

EXPERT_CHOICES = ("nf4", "fp4", "bf16")
DEFAULT_EXPERTS = "nf4"
DEFAULT_CONTEXT = 8192
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
    kv_slots: list[KVCache] = field(default_factory=list)  # every sequence's cache (kv is the first)
    warnings: tuple[str, ...] = ()  # one-line notes from loading (e.g. free GPU memory below the plan)

    def expert_stats(self) -> dict | None:
        """Expert cache counters (hits, misses, bytes_copied, cpu_experts, ...) when a store is in use."""
        return self.store.stats() if self.store is not None else None


def layer_buffer(rows: torch.Tensor, layout: ExpertLayout) -> ExpertBuffer | None:
    """The layer's expert rows as an ExpertBuffer (what the `localrun::moe_4bit` op reads), or None
    where the layout does not meet its alignment."""
    try:
        return ExpertBuffer(rows, layout)
    except ValueError:
        return None


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
        first = missing[0] if missing[0].startswith("lm_head.") else args.weight_prefix + missing[0]  # lm_head: unprefixed
        raise LocalrunError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {first}")
    for key, shape in expected.items():
        check_shape(ckpt, names[key], shape)
    total = sum(info.nbytes for info in ckpt.tensors.values())
    done = 0

    def stored_dtype(key: str):
        return kernels.storage_dtype(dtype, device, ckpt.tensors[names[key]].dtype) if len(expected[key]) > 1 else dtype

    # a group is one allocation in one dtype: members stored in different dtypes keep their own
    fused = {key: group for group in fused_groups(expected) if len({stored_dtype(k) for k in group}) == 1
             for key in group}
    buffers: dict[tuple[str, ...], torch.Tensor] = {}
    for key, shape in expected.items():
        info = ckpt.tensors[names[key]]
        stored = stored_dtype(key)
        group = fused.get(key)
        if group is None:
            _set_tensor(model, key, hostmem.keep(ckpt.read(names[key]), device, stored))
        else:  # one allocation for the fused tensor; this member is read into its slice (no fusing copy)
            if group not in buffers:
                rows = sum(expected[k][0] for k in group)
                buffers[group] = hostmem.empty((rows, *shape[1:]), dtype=stored, device=device)
            start = sum(expected[k][0] for k in group[: group.index(key)])
            part = buffers[group][start : start + shape[0]]
            part.copy_(ckpt.read(names[key]))
            _set_tensor(model, key, part)
        done += info.nbytes
        if progress:
            progress("weights", done, total)
    del buffers
    hostmem.release_freed()
    for i, layer in enumerate(model.layers):
        if layer.moe:
            layer.set_experts(build_experts(i))
            hostmem.release_freed()  # the layer's read temporaries: freed, not kept as the process's
            if progress:
                progress("experts", done + (total - done) * (i + 1) // len(model.layers), total)
    model.init_buffers(device)
    model.fuse_projections()  # the fused tensors are already one storage each: this only records them


def checkpoint_experts(ckpt: Checkpoint, args: ModelArgs, layer: int, start: int = 0,
                       stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's expert tensors in localrun's fused layout (gate_up [E, 2I, H], down [E, H, I]),
    whether the checkpoint stores them fused or per expert; experts [start, stop) when given."""
    return family(args.model_type).read_experts(ckpt, args, layer, start=start, stop=stop)


def _fused_expert_names(ckpt: Checkpoint, args, layer: int) -> list[str] | None:
    """The checkpoint names of a layer's fused expert tensors (Gemma 4's layout), when it has them."""
    names = [f"{args.weight_prefix}layers.{layer}.{k}" for k in EXPERT_KEYS]
    return names if all(n in ckpt for n in names) else None


def chunk_experts(ckpt, args: ModelArgs) -> int:
    """Experts per checkpoint read when quantizing on load: QUANT_CHUNK_EXPERTS, fewer where their weights
    (in the checkpoint's dtype) would pass QUANT_CHUNK_BYTES."""
    elem = (ckpt.matrix_dtype() or torch.bfloat16).itemsize
    expert = 3 * args.moe_intermediate_size * args.hidden_size * elem
    return max(1, min(QUANT_CHUNK_EXPERTS, QUANT_CHUNK_BYTES // expert))


@dataclass
class LayerSource:
    """One MoE layer's packed experts, ready to be written where the loader wants them:
    `write(e, row)` fills `row` (a contiguous uint8 row of `nbytes`, on any device) with expert e and
    returns it as a PackedExpert over that row. Call it in expert id order."""

    num_experts: int
    layout: ExpertLayout
    write: object  # Callable[[int, torch.Tensor], PackedExpert]

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def packed_experts_source(model_dir: Path, ckpt: Checkpoint, args: ModelArgs, spec: QuantSpec | None, device):
    """layer -> LayerSource: read from a pre-quantized directory, or quantized from the checkpoint
    as it streams (on `device`: the GPU when there is one)."""
    device = torch.device(device)
    if spec is None:
        manifest = read_manifest(model_dir)
        files = manifest["expert_files"]

        def read(layer: int) -> LayerSource:
            if str(layer) not in files:
                raise LocalrunError(f"pre-quantized model has no experts for layer {layer}")
            experts = load_packed_experts(model_dir / files[str(layer)], [layer])[layer]  # one [E, N] host tensor

            def write(e: int, row: torch.Tensor) -> PackedExpert:
                row.copy_(experts[e].buffer)
                return experts[e].with_buffer(row)

            return LayerSource(len(experts), experts[0].layout, write)

        return read

    scratch: list[torch.Tensor] = []  # one packed expert on the device, for experts bound to host rows

    def quantize(layer: int) -> LayerSource:
        per_read = chunk_experts(ckpt, args)  # here, not before: a dense model (E2B, 31B) has no expert size
        names = _fused_expert_names(ckpt, args, layer)
        if names is not None:  # fused [E, ...] tensors: read `per_read` experts at a time
            for name, shape in zip(names, expert_shapes(args)):
                check_shape(ckpt, name, shape)
            infos = [ckpt.tensors[n] for n in names]
            shapes, dtype = [tuple(i.shape) for i in infos], infos[0].dtype

            def read(start: int, stop: int) -> list[torch.Tensor]:
                return [read_rows(ckpt, n, start, stop) for n in names]
        else:  # per-expert checkpoints (the family stacks them): `per_read` experts at a time too
            def read(start: int, stop: int) -> list[torch.Tensor]:
                return list(checkpoint_experts(ckpt, args, layer, start, stop))

            first = read(0, min(per_read, args.num_experts))  # the first chunk gives shapes and dtype
            shapes, dtype = [(args.num_experts, *t.shape[1:]) for t in first], first[0].dtype
        E = shapes[0][0]
        layout = expert_layout(shapes[0][1:], shapes[1][1:], spec, dtype)
        chunk: dict = {} if names is not None else {"start": 0, "tensors": first}

        def write(e: int, row: torch.Tensor) -> PackedExpert:
            # `per_read` experts per read: a whole layer in bf16 is 1.5 GiB for 26B-A4B, 2.6 GiB for Mixtral 8x7B
            start = e - e % per_read
            if chunk.get("start") != start:
                chunk.clear()
                chunk.update(start=start, tensors=read(start, min(start + per_read, E)))
            gu, dn = (t[e - start].to(device) for t in chunk["tensors"])
            if row.device == device:
                return pack_expert(gu, dn, spec, out=row)
            if not scratch or scratch[0].numel() != layout.nbytes:
                scratch[:] = [torch.empty(layout.nbytes, dtype=torch.uint8, device=device)]
            row.copy_(pack_expert(gu, dn, spec, out=scratch[0]).buffer)  # one copy per expert to its host row
            return PackedExpert(row, layout)

        return LayerSource(E, layout, write)

    return quantize


def read_routing_profile(model_dir: Path) -> dict | None:
    """{layer: [count per expert]} from `localrun profile`, if the model directory has one."""
    path = model_dir / ROUTING_PROFILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalrunError(f"invalid {path}: not JSON ({e}); `localrun profile` writes it anew") from None
    try:
        return {int(k): [int(c) for c in v] for k, v in data["layers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        raise LocalrunError(f'invalid {path}: expected {{"layers": {{"<layer>": [count per expert, ...]}}}}; '
                            "`localrun profile` writes it anew") from None


def default_context(args: ModelArgs, context: int | None) -> int:
    """The context to plan for: as asked, else 8K or the model's limit if that is shorter."""
    return context or min(DEFAULT_CONTEXT, args.max_position_embeddings)


def expert_spec(model_dir: Path, experts: str | None, args: ModelArgs | None = None) -> QuantSpec | str:
    """What the routed experts will be: a pre-quantized model's own QuantSpec (its blocksize and
    double quant set the bytes, not just the 4-bit type), else `experts` (default nf4) or "bf16".
    With `args`, a 4-bit spec whose blocksize bitsandbytes' kernel can't use for this model is an error."""
    if is_prequantized(model_dir):
        stored = manifest_spec(read_manifest(model_dir))
        if experts not in (None, stored.quant_type):
            raise UsageError(f"{model_dir} is pre-quantized with {stored.quant_type} experts; "
                             f"--experts {experts} can't apply")
        _check_blocksize(stored, args, f"{model_dir} was quantized with ")
        return stored
    experts = DEFAULT_EXPERTS if experts is None else experts  # --experts "" is a mistake, not the default
    if experts not in EXPERT_CHOICES:
        raise UsageError(f"--experts must be one of {', '.join(EXPERT_CHOICES)}, not {experts!r}")
    if experts == "bf16":
        return "bf16"
    spec = QuantSpec(experts)
    _check_blocksize(spec, args, "")
    return spec


def _check_blocksize(spec: QuantSpec, args: ModelArgs | None, what: str) -> None:
    if args is None or not (args.enable_moe_block and args.num_experts):
        return
    try:
        spec.check_kernel_sizes(args.hidden_size, args.moe_intermediate_size)
    except ValueError as e:
        # run and chat take no --blocksize: say where another one comes from, and that bf16 experts need none
        how = "; quantize it again" if what else ("; --experts bf16 keeps them unquantized (`localrun quantize "
                                                  "--blocksize` writes 4-bit experts at another blocksize)")
        raise UsageError(f"{what}{e}{how}") from None


def placement_plan(args: ModelArgs, model_dir: Path, spec: QuantSpec | str, *, gpu_bytes: int | None,
                   host_bytes: int | None, context: int | None, resident_fraction: float | None,
                   dtype: str = "bfloat16", matrix_dtype: str | None = None,
                   tensor_shapes: dict | None = None, gpu_bandwidth: float | None = None,
                   pcie_bandwidth: float | None = None, host_bandwidth: float | None = None,
                   sequences: int = 1) -> Plan:
    """The plan for a model directory: the one function behind `localrun fit` and the loader.

    gpu_bytes: the GPU's memory (or --vram); the plan gets `plan.device_budget(gpu_bytes)`, the
    budget rule both share. None: compute on the CPU (only resident_fraction splits the experts).
    """
    budget = Budget(device_bytes=None if gpu_bytes is None else device_budget(gpu_bytes), host_bytes=host_bytes,
                    context=default_context(args, context), gpu_bandwidth=gpu_bandwidth,
                    pcie_bandwidth=pcie_bandwidth, host_bandwidth=host_bandwidth, sequences=sequences)
    return make_plan(args, budget, experts=spec, tensor_shapes=tensor_shapes,
                     routing_profile=read_routing_profile(model_dir), dtype=dtype, matrix_dtype=matrix_dtype,
                     resident_fraction=resident_fraction)


def longest_context(plan: Plan, args: ModelArgs, model_dir: Path, spec: QuantSpec | str, *, gpu_bytes: int | None,
                    host_bytes: int | None, resident_fraction: float | None, tensor_shapes: dict | None = None,
                    sequences: int = 1, matrix_dtype: str | None = None) -> int:
    """The longest context any placement of `plan`'s model and budget fits (`plan.longest_context`), in
    the plan's dtype; 0 when the plan does not fit, its own max_context under a fixed resident fraction
    (one placement). matrix_dtype: as placement_plan was given it."""
    if not plan.fits or resident_fraction is not None:
        return plan.max_context if plan.fits else 0
    budget = Budget(device_bytes=None if gpu_bytes is None else device_budget(gpu_bytes), host_bytes=host_bytes,
                    context=plan.context, sequences=sequences)
    return plan_longest_context(args, budget, plan.max_context, experts=spec, tensor_shapes=tensor_shapes,
                                routing_profile=read_routing_profile(model_dir), dtype=plan.dtype,
                                matrix_dtype=matrix_dtype)


def load_plan(args: ModelArgs, model_dir: Path, dev: torch.device, spec: QuantSpec | str, dtype: torch.dtype,
              *, vram: int | None, context: int | None, resident_fraction: float | None,
              stored_dtype: torch.dtype | None = None, sequences: int = 1) -> Plan:
    """The plan this load builds: on a GPU for `vram` or the card's total memory (`placement_plan`).
    stored_dtype: the checkpoint's matrix dtype, which decides what they are kept in (kernels.storage_dtype)."""
    gpu_bytes = None
    if dev.type == "cuda":
        gpu_bytes = vram if vram is not None else _gpu_memory(dev)[1]
    elif vram is not None:
        warnings.warn("--vram plans GPU memory; running on the CPU it changes nothing (--resident-experts "
                      "splits the experts there)", LocalrunWarning, stacklevel=2)
    stored = kernels.storage_dtype(dtype, dev, stored_dtype)
    plan = placement_plan(args, model_dir, spec, gpu_bytes=gpu_bytes, host_bytes=detect_host_ram(), context=context,
                          resident_fraction=resident_fraction, dtype=str(dtype).removeprefix("torch."),
                          matrix_dtype=str(stored).removeprefix("torch."), sequences=sequences)
    if not plan.fits:
        raise LocalrunError(f"{plan.reason} (see `localrun fit {model_dir}`)")  # the reason says "does not fit"
    return plan


def _gpu_memory(dev: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the CUDA device `dev`."""
    free, total = torch.cuda.mem_get_info(dev)
    return int(free), int(total)


def check_free_memory(plan: Plan, free: int, total: int) -> str | None:
    """None when `free` device bytes hold the plan; else a one-line note naming what something else
    holds. LocalrunError when even the plan without its reserve cannot fit (it would run out)."""
    if free >= plan.device_bytes:
        return None
    others = max(0, total - free - CUDA_CONTEXT_BYTES)
    msg = (f"only {format_size(free)} of the GPU's {format_size(total)} is free but the plan needs "
           f"{format_size(plan.device_bytes)}: something else (another process or a display) holds about "
           f"{format_size(others)} beyond this process's CUDA context; free it, or plan for less with "
           f"--vram {int((total - others) / 2**20)}MiB")
    if free < plan.device_bytes - plan.reserve_bytes:
        raise LocalrunError(msg)
    return msg


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype `--dtype auto` means: float32 on the CPU when the C kernels are built (they
    keep bf16 matrices bf16 and compute in fp32, several times torch's bf16 CPU speed at the same
    bytes), else bfloat16 (a GPU; or a CPU without the kernels, where fp32 would double the bytes)."""
    return torch.float32 if device.type == "cpu" and kernels.library() is not None else torch.bfloat16


def load_model(
    model_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    experts: str | None = None,
    vram: int | None = None,
    context: int | None = None,
    resident_fraction: float | None = None,
    cache_policy: str = DEFAULT_CACHE_POLICY,
    progress=None,
    checkpoint=None,
    parallel: int = 1,
) -> LoadedModel:
    """Load a checkpoint directory of a supported family (or a pre-quantized localrun one) for inference.

    experts: "nf4" (default), "fp4" or "bf16" for the routed experts; a pre-quantized
    directory always uses what it holds. vram / context / resident_fraction shape the
    placement plan: experts that are not resident live in host RAM behind an ExpertStore,
    whose cache slots are replaced per `cache_policy` ("lru" or "lfu"). checkpoint: tensors to
    read instead of the directory's safetensors (`synthetic.RandomCheckpoint`: a full-size config
    without its weights on disk); the directory still gives config.json. parallel: KV caches to
    allocate side by side (`serve --parallel`), each for the planned context; the plan counts them all.
    """
    model_dir = Path(model_dir)
    args = load_config(model_dir)
    ckpt = checkpoint if checkpoint is not None else open_checkpoint(model_dir)
    dev = resolve_device(device)
    dtype = default_dtype(dev) if dtype is None else dtype
    if cache_policy not in POLICIES:
        raise UsageError(f"cache policy must be one of {', '.join(POLICIES)}, not {cache_policy!r}")
    spec = expert_spec(model_dir, experts, args)
    experts = spec if spec == "bf16" else spec.quant_type
    plan = load_plan(args, model_dir, dev, spec, dtype, vram=vram, context=context,
                     resident_fraction=resident_fraction, stored_dtype=ckpt.matrix_dtype(), sequences=parallel)
    notes = []
    if dev.type == "cuda":
        note = check_free_memory(plan, *_gpu_memory(dev))
        if note:
            notes.append(note)
            warnings.warn(note, LocalrunWarning, stacklevel=2)
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
            pending = {moe_layers[0]: source(moe_layers[0])}
            cost = None
            if dev.type == "cuda":  # calibration needs a real expert: the first one, in a row of its own
                first = pending[moe_layers[0]]
                sample = first.write(0, torch.zeros(first.nbytes, dtype=torch.uint8))
                cost = calibrate(sample, compute, dev, args.hidden_size, torch.float32)  # the CPU side runs fp32
                del sample
            # on the CPU a layer's experts run in one C call wherever they lie (QuantizedExperts' kernel)
            layout = pending[moe_layers[0]].layout
            layer_compute = CpuLayerCompute(layout, args.hidden_activation)
            # on CUDA a decoded token whose experts are all on the device (resident, cached, just copied)
            # runs as one MoE kernel over the layer's device rows; a prompt as grouped GEMMs over them, in waves
            rows_compute = DeviceRowsCompute(layout, args.hidden_activation) if dev.type == "cuda" else None
            rows_prefill = DeviceRowsPrefill(layout, args.hidden_activation) if dev.type == "cuda" else None
            store = ExpertStore(None, compute, dev, slots=plan.cache_slots, policy=POLICIES[cache_policy],
                                cost_model=cost, compute_layer=layer_compute, device_compute=rows_compute,
                                device_prefill=rows_prefill)

            def build(layer):
                # quantized (or copied) straight into the layer's rows: resident ones on the device,
                # the rest in page-locked host rows; the layer's slot rows are allocated here too
                src = pending.pop(layer) if layer in pending else source(layer)
                store.build_layer(layer, src.num_experts, src.nbytes, plan.resident_experts[layer], src.write)
                return store(layer)
        elif dev.type == "cuda":
            def build(layer):  # one device buffer per layer, quantized into; the MoE runs as one op
                src = source(layer)
                buf = ExpertBuffer.empty(src.layout, src.num_experts, dev)
                for e in range(src.num_experts):
                    src.write(e, buf.data[e])
                return BufferedExperts(buf, args.hidden_activation)
        else:
            def build(layer):
                src = source(layer)
                rows = hostmem.empty((src.num_experts, src.nbytes), dtype=torch.uint8, device=dev)  # one buffer
                experts = [src.write(e, rows[e]) for e in range(src.num_experts)]
                return QuantizedExperts(experts, args.hidden_activation, buffer=layer_buffer(rows, src.layout))

    load_weights(model, ckpt, args, device=dev, dtype=dtype, build_experts=build, progress=progress)
    model.eval().requires_grad_(False)
    kv_slots = [KVCache(args, dtype=dtype, device=dev, capacity=plan.context) for _ in range(parallel)]
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # hand back load-time scratch (one expert, calibration) to the driver
    return LoadedModel(model, args, model_dir, dev, dtype, experts, plan=plan, store=store, kv=kv_slots[0],
                       kv_slots=kv_slots, warnings=tuple(notes))


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


def _tensors_in(obj, depth: int = 3) -> list[torch.Tensor]:
    """Every tensor reachable from `obj` (a tensor, a list/tuple/dict of them, or an object's attributes)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or obj is None:
        return []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return []
    return [t for item in items for t in _tensors_in(item, depth - 1)]


def memory_report(loaded: LoadedModel) -> dict:
    """What the plan promised against what the loader holds, per tier: `run --json`'s `memory`.

    planned_device_bytes: the tensors the plan places on the compute tier (weights, resident
    experts, cache slots, KV: `plan.placed_device_bytes`); device_bytes: the distinct storages the
    loader holds there, summed (the KV cache when it is allocated at load, `loaded.kv`); they are
    equal. The plan's allocator rounding, workspace and reserve come apart. host_bytes: the expert
    store's host-RAM tier. On CUDA also the allocator's peak and reserved bytes.
    """
    model = loaded.model
    dev = loaded.device
    seen: set = set()
    # parameters and persistent buffers: what the plan places (the non-persistent ones, RoPE frequencies
    # and the like, are derived at load and small: the plan's reserve holds them)
    tensors = list(model.state_dict(keep_vars=True).values())
    for layer in model.layers:
        experts = getattr(layer, "experts", None)
        tensors += [p.buffer for p in getattr(experts, "experts", [])]
    store = loaded.store
    host = 0
    if store is not None:
        tensors += store.device_tensors()
        host = _distinct_storage_bytes(store.host_tensors(), set())
    kv = getattr(loaded, "kv", None)
    caches = getattr(loaded, "kv_slots", None) or ([kv] if kv is not None else [])
    kv_tensors = [t for c in caches for t in (c.tensors() if hasattr(c, "tensors") else _tensors_in(c))
                  if t.device.type == dev.type]
    kv_bytes = _distinct_storage_bytes(kv_tensors, set()) if kv is not None else None
    tensors += kv_tensors
    device = _distinct_storage_bytes([t for t in tensors if t.device.type == dev.type], seen)
    plan = loaded.plan
    out = {
        "planned_device_bytes": plan.placed_device_bytes if plan else None,
        "device_bytes": device,
        "planned_kv_bytes": plan.kv_bytes + plan.kv_position_bytes if plan else None,
        "kv_bytes": kv_bytes,  # None: the KV cache is not allocated at load
        "planned_rounding_bytes": plan.rounding_bytes if plan else None,
        "planned_workspace_bytes": plan.workspace_bytes if plan else None,
        "planned_reserve_bytes": plan.reserve_bytes if plan else None,
        "planned_host_bytes": plan.host_bytes if plan else None,
        "host_bytes": host,
        "cache_slots": plan.cache_slots if plan else 0,
        "cache_slots_bytes": plan.cache_slots_bytes if plan else 0,
    }
    if dev.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["reserved_device_bytes"] = torch.cuda.memory_reserved(dev)
        out["allocated_device_bytes"] = torch.cuda.memory_allocated(dev)
    return out
