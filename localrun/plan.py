"""The placement plan: where every tensor lives and in which precision, for a memory budget.

`make_plan` is a pure function of the config, the budget and the expert precision. Both
`localrun fit` and the loader call it, so the estimate is the plan that runs.

Rules (each one a named constant or function below, so a change is one edit):

- Every non-expert tensor (embeddings, attention, dense MLP, router, norms) sits on the
  compute device in the model dtype; the router is never quantized.
- The expert (layer, expert id) is the unit of placement. A plan keeps the same number of
  experts resident in every layer: `resident_experts_per_layer`. Which ones: the most-routed
  per a routing profile ({layer: [count per expert]}), else the lowest-numbered.
- Choice on a GPU: the requested context comes first (its KV cache is reserved), then as many
  experts resident as fit; `max_context` is then the longest context this placement leaves
  room for. So a bigger context costs resident experts, never the other way round, and a
  user who wants more experts resident asks for a shorter context.
- Experts that are not resident live in host RAM and reach the device through
  `cache_slots` shared slots: 2 x top_k, so the copies for the next layer's misses can land
  while the current layer computes (double buffering); one slot costs one expert's bytes.
- KV cache: sliding layers keep a ring buffer of `sliding_window` positions; full layers keep
  the whole context; attention_k_eq_v full layers store both K and V (K = rope(k_norm(raw)),
  V = v_norm(raw)); KV-shared layers store nothing (they read their source layer's cache).
- Workspace: activations of one prefill chunk (upper bound, fp32), an attention-score tile of
  SCORES_TILE_BYTES (the prefill chunk shrinks at long context so its fp32 scores fit in it:
  see `prefill_chunk`), one expert dequantized for many-token matmuls, and the last position's
  logits in fp32. It does not depend on the context length.
- Reserve: CUDA_RESERVE_BYTES on the device for the CUDA context, cuBLAS workspaces and
  allocator fragmentation, which no tensor accounts for; HOST_RESERVE_BYTES of RAM for Python,
  torch and the CUDA runtime's host allocations.
- Device None means the compute device is the CPU: every tier is host RAM. The expert split
  and slot count are still computed when `resident_fraction` forces them (the expert store
  is tested on CPU); otherwise all experts are "resident" on the CPU and no slots are used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from quant.spec import QuantSpec

from .config import ModelArgs
from .errors import UsageError
from .hardware import GIB, MIB, format_size
from .models import family

DEVICE, HOST = "device", "host"

CUDA_RESERVE_BYTES = 512 * MIB
HOST_RESERVE_BYTES = 1 * GIB
PREFILL_CHUNK = 512  # tokens per prefill step at short context
SCORES_TILE_BYTES = 256 * MIB  # fp32 attention scores of one prefill chunk over the context
ACTIVATION_SLACK = 2  # temporaries the allocator holds alongside the live activations
FP32 = 4

_DTYPES = {"bfloat16": ("bf16", 2), "float16": ("fp16", 2), "float32": ("fp32", 4)}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_EXPERT_NAME = re.compile(r"^layers\.(\d+)\.(?:\w+\.)?experts\.(gate_up_proj|down_proj)$")  # Gemma 4: layers.N.experts, Qwen3: layers.N.mlp.experts
EXPERT_MATRICES = ("gate_up_proj", "down_proj")

# The breakdown's components, in display order; "per_layer" only shows for models that have it.
_WEIGHT_GROUPS = ("embed", "per_layer", "attention", "mlp", "router", "norms")


@dataclass(frozen=True)
class Budget:
    """What the plan may use. device_bytes None: compute on the CPU. host_bytes None: unchecked.

    gpu_bandwidth / pcie_bandwidth (bytes/s) are optional; with them the plan carries a
    decode speed estimate.
    """

    device_bytes: int | None
    host_bytes: int | None = None
    context: int = 8192
    batch: int = 1
    gpu_bandwidth: float | None = None
    pcie_bandwidth: float | None = None


class Placement(NamedTuple):
    """Where one tensor lives: tier "device" | "host", precision ("bf16", "nf4", ...), bytes."""

    tier: str
    precision: str
    nbytes: int


@dataclass(frozen=True)
class Component:
    """One row of the breakdown."""

    name: str
    precision: str
    nbytes: int
    tier: str


@dataclass
class Plan:
    """The placement for one budget. See the module docstring for the rules.

    `placement` holds every non-expert tensor under its checkpoint name (after the weight
    prefix) and every expert matrix under `expert_matrix_name(layer, expert, matrix)`, i.e.
    the checkpoint's fused [E, ...] tensor split along its first dimension.
    """

    fits: bool
    reason: str
    device: str  # "cuda" or "cpu": the compute device that tier "device" means
    dtype: str
    expert_precision: str
    context: int
    num_experts: int
    top_k: int
    placement: dict[str, Placement]
    resident_experts: list[list[int]]  # per layer, sorted expert ids; [] for layers without experts
    resident_experts_per_layer: int
    cache_slots: int
    cache_slot_bytes: int
    device_bytes: int
    host_bytes: int
    kv_bytes: int
    kv_bytes_per_layer: list[int]
    workspace_bytes: int
    reserve_bytes: int
    host_reserve_bytes: int
    prefill_chunk: int
    max_context: int
    expected_miss_rate: float
    decode_weight_bytes: int  # non-expert weights read per decoded token (lm_head, not the embedding lookup)
    active_expert_bytes: int  # top_k experts of every layer, per decoded token
    breakdown: list[Component]
    device_budget: int | None
    host_budget: int | None
    estimated_decode_tokens_per_s: float | None = None
    _resident_sets: list[frozenset] = field(default_factory=list, repr=False)

    def expert_tier(self, layer: int, expert: int) -> str:
        """"device" if (layer, expert) is resident on the compute device, else "host"."""
        return DEVICE if expert in self._resident_sets[layer] else HOST

    def component(self, name: str) -> Component:
        for c in self.breakdown:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-tensor placement: that is for the loader, not for people)."""
        return {
            "fits": self.fits,
            "reason": self.reason,
            "device": self.device,
            "dtype": self.dtype,
            "expert_precision": self.expert_precision,
            "context": self.context,
            "max_context": self.max_context,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "resident_experts_per_layer": self.resident_experts_per_layer,
            "cache_slots": self.cache_slots,
            "prefill_chunk": self.prefill_chunk,
            "device_bytes": self.device_bytes,
            "device_budget_bytes": self.device_budget,
            "host_bytes": self.host_bytes,
            "host_budget_bytes": self.host_budget,
            "host_reserve_bytes": self.host_reserve_bytes,
            "kv_bytes": self.kv_bytes,
            "workspace_bytes": self.workspace_bytes,
            "reserve_bytes": self.reserve_bytes,
            "expected_miss_rate": self.expected_miss_rate,
            "estimated_decode_tokens_per_s": self.estimated_decode_tokens_per_s,
            "breakdown": {
                c.name: {"bytes": c.nbytes, "precision": c.precision, "where": c.tier} for c in self.breakdown
            },
        }


def expert_matrix_name(layer: int, expert: int, matrix: str) -> str:
    """Placement key of one expert's matrix: 'layers.3.experts.17.gate_up_proj'."""
    return f"layers.{layer}.experts.{expert}.{matrix}"


# Geometry: bytes of tensors, KV cache and workspace ------------------------------------------

def dtype_info(dtype: str) -> tuple[str, int]:
    """('bf16', 2) for 'bfloat16' (or 'bf16'); ValueError for a dtype plans don't support."""
    key = _DTYPE_ALIASES.get(dtype, dtype)
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    return _DTYPES[key]


def expert_matrix_bytes(shape: tuple[int, ...], experts: QuantSpec | str, elem_size: int) -> int:
    """Bytes of ONE expert's slice of a fused [E, ...] expert tensor, quantized or not."""
    numel = math.prod(shape[1:])
    return experts.nbytes(numel) if isinstance(experts, QuantSpec) else numel * elem_size


def kv_layer_bytes(args: ModelArgs, layer: int, context: int, elem_size: int) -> int:
    """KV cache bytes of one layer at `context` positions (batch 1)."""
    if args.kv_source_layer(layer) != layer:
        return 0  # KV-shared: reads its source layer's cache
    positions = min(context, args.sliding_window) if args.is_sliding(layer) else context
    # K and V both stored, k_eq_v layers included (storing one and deriving the other would halve it)
    return 2 * positions * args.layer_kv_heads(layer) * args.layer_head_dim(layer) * elem_size


def kv_cache_bytes(args: ModelArgs, context: int, elem_size: int) -> list[int]:
    return [kv_layer_bytes(args, i, context, elem_size) for i in range(args.num_hidden_layers)]


def prefill_chunk(args: ModelArgs, context: int) -> int:
    """Tokens per prefill step: PREFILL_CHUNK, halved until its fp32 scores over `context` fit the tile."""
    per_query = args.num_attention_heads * context * FP32
    chunk = PREFILL_CHUNK
    while chunk > 1 and chunk * per_query > SCORES_TILE_BYTES:
        chunk //= 2
    return chunk


def workspace_bytes(args: ModelArgs, elem_size: int, dequant_expert_bytes: int) -> int:
    """Device scratch for one forward pass; independent of context (see module docstring)."""
    H, N, M = args.hidden_size, args.num_attention_heads, 0
    per_token = 0
    for i in range(args.num_hidden_layers):
        D, KV = args.layer_head_dim(i), args.layer_kv_heads(i)
        M = args.mlp_intermediate(i)
        moe = 0
        if args.enable_moe_block and args.num_experts:
            moe = args.top_k_experts * 3 * args.moe_intermediate_size + args.num_experts
        # residual, normed copies, attention/MLP/MoE outputs ~6H; q + attention out; k, v; gate, up, act
        layer = 6 * H + 2 * N * D + 2 * KV * D + 3 * M + moe
        per_token = max(per_token, layer)
    per_token += args.num_hidden_layers * args.hidden_size_per_layer_input  # per-layer inputs (E2B/E4B)
    activations = ACTIVATION_SLACK * PREFILL_CHUNK * per_token * FP32
    logits = args.vocab_size * (FP32 + elem_size)  # last position only: model dtype, then fp32
    return activations + SCORES_TILE_BYTES + dequant_expert_bytes + logits


# Residency ----------------------------------------------------------------------------------

def rank_experts(num_experts: int, counts: list[int] | None) -> list[int]:
    """Expert ids, most-routed first (ties: lower id first); id order without a profile."""
    if counts is None:
        return list(range(num_experts))
    if len(counts) != num_experts:
        raise ValueError(f"routing profile has {len(counts)} counts for a layer of {num_experts} experts")
    return sorted(range(num_experts), key=lambda e: (-counts[e], e))


def _profile_counts(routing_profile: dict | None, layer: int) -> list[int] | None:
    if not routing_profile:
        return None
    counts = routing_profile.get(layer, routing_profile.get(str(layer)))
    return list(counts) if counts is not None else None


def expected_miss_rate(resident: list[list[int]], num_experts: int, expert_layers: list[int],
                       routing_profile: dict | None = None) -> float:
    """Fraction of routed expert uses that find the expert not resident, averaged over layers.

    Uniform routing unless the profile has counts for a layer. The shared cache slots are
    ignored: at decode 8 x layers experts pass through them per token, so a slot rarely still
    holds an expert when the same layer asks again.
    """
    if not expert_layers or not num_experts:
        return 0.0
    rates = []
    for layer in expert_layers:
        counts = _profile_counts(routing_profile, layer)
        ids = resident[layer]
        if counts is None or sum(counts) == 0:
            rates.append(1.0 - len(ids) / num_experts)
        else:
            rates.append(1.0 - sum(counts[e] for e in ids) / sum(counts))
    return sum(rates) / len(rates)


def estimate_decode_tokens_per_s(plan: Plan, gpu_bandwidth: float, pcie_bandwidth: float | None = None,
                                 miss_rate: float | None = None) -> float:
    """Memory-bandwidth ceiling on decode speed (tokens/s, batch 1); real speed is lower.

    Per token the device reads the non-expert weights (lm_head included), the KV cache and
    top_k experts per layer; a missed expert is first copied over PCIe. On a CPU plan the
    host tier is the same memory, so misses cost nothing extra.
    """
    miss = plan.expected_miss_rate if miss_rate is None else miss_rate
    seconds = (plan.decode_weight_bytes + plan.kv_bytes + plan.active_expert_bytes) / gpu_bandwidth
    if plan.device == "cuda" and miss > 0:
        if not pcie_bandwidth:
            raise ValueError("pcie_bandwidth is needed when experts miss")
        seconds += miss * plan.active_expert_bytes / pcie_bandwidth
    return 1.0 / seconds


# The plan -----------------------------------------------------------------------------------

@dataclass
class _Weights:
    """Byte tallies of the checkpoint for one dtype/expert precision."""

    placement: dict[str, Placement]
    group_bytes: dict[str, int]
    expert_bytes: dict[int, dict[str, int]]  # layer -> matrix -> bytes of one expert's slice
    num_experts: int

    @property
    def non_expert_bytes(self) -> int:
        return sum(self.group_bytes.values())

    @property
    def expert_layers(self) -> list[int]:
        return sorted(self.expert_bytes)

    def one_expert_per_layer(self) -> int:
        """Bytes of keeping one more expert resident in every layer."""
        return sum(sum(m.values()) for m in self.expert_bytes.values())

    def largest_expert(self) -> int:
        return max((sum(m.values()) for m in self.expert_bytes.values()), default=0)


def _tally_weights(shapes: dict[str, tuple[int, ...]], tensor_group, dtype_label: str, elem: int,
                   experts: QuantSpec | str, matrix: tuple[str, int] | None = None) -> _Weights:
    """matrix: (label, bytes) of 2-D+ tensors when they are stored narrower than the compute dtype."""
    matrix_label, matrix_elem = matrix or (dtype_label, elem)
    placement: dict[str, Placement] = {}
    group_bytes = {g: 0 for g in _WEIGHT_GROUPS}
    expert_bytes: dict[int, dict[str, int]] = {}
    num_experts = 0
    for name, shape in shapes.items():
        m = _EXPERT_NAME.match(name)
        if m:
            layer = int(m.group(1))
            expert_bytes.setdefault(layer, {})[m.group(2)] = expert_matrix_bytes(shape, experts, matrix_elem)
            num_experts = max(num_experts, shape[0])
            continue
        label, size = (matrix_label, matrix_elem) if len(shape) > 1 else (dtype_label, elem)
        nbytes = math.prod(shape) * size
        placement[name] = Placement(DEVICE, label, nbytes)
        group = tensor_group(name)
        group_bytes[group] = group_bytes.get(group, 0) + nbytes
    return _Weights(placement, group_bytes, expert_bytes, num_experts)


def _decode_weight_bytes(shapes: dict[str, tuple[int, ...]], weights: _Weights) -> int:
    """Non-expert bytes one decoded token reads: embedding tables are lookups, lm_head is a full read."""
    lookups = sum(weights.placement[n].nbytes for n in ("embed_tokens.weight", "embed_tokens_per_layer.weight")
                  if n in weights.placement)
    reads = weights.non_expert_bytes - lookups
    if "lm_head.weight" not in shapes and "embed_tokens.weight" in weights.placement:
        reads += weights.placement["embed_tokens.weight"].nbytes  # tied: the embedding is the lm_head
    return reads


def _choose_resident(per_layer_bytes: int, num_experts: int, slot_bytes_for, budget_left: int) -> int:
    """Most experts per layer that fit `budget_left`, slots included when not all are resident."""
    if num_experts == 0 or per_layer_bytes == 0:
        return num_experts
    if num_experts * per_layer_bytes <= budget_left:
        return num_experts
    room = budget_left - slot_bytes_for(num_experts - 1)
    if room < 0:
        return -1  # not even the cache slots fit
    return min(num_experts - 1, room // per_layer_bytes)


def make_plan(
    args: ModelArgs,
    budget: Budget,
    *,
    experts: QuantSpec | str = QuantSpec(),
    tensor_shapes: dict[str, tuple[int, ...]] | None = None,
    routing_profile: dict | None = None,
    dtype: str = "bfloat16",
    matrix_dtype: str | None = None,
    resident_fraction: float | None = None,
) -> Plan:
    """Place every tensor of `args`' text model for `budget`; see the module docstring for the rules.

    experts: a QuantSpec (4-bit experts, bytes from QuantSpec.nbytes) or "bf16" (experts
    unquantized, in `dtype`). tensor_shapes: names after the weight prefix -> shape (default:
    the config's `checkpoint_shapes`). routing_profile: {layer: [count per expert]} ranks which
    experts stay resident. resident_fraction (0..1) forces the resident share of each layer's
    experts instead of the automatic choice; it works for CPU plans too.
    """
    if budget.context < 1:
        raise UsageError(f"context must be at least 1 token, not {budget.context}")
    if budget.context > args.max_position_embeddings:
        raise UsageError(f"context {budget.context} exceeds the model's maximum of {args.max_position_embeddings}")
    if budget.batch != 1:
        raise UsageError("only batch 1 is planned for")
    if resident_fraction is not None and not 0.0 <= resident_fraction <= 1.0:
        raise UsageError(f"resident fraction must be between 0 and 1, not {resident_fraction}")
    if not isinstance(experts, QuantSpec) and experts != "bf16":
        raise ValueError(f"experts must be a QuantSpec or 'bf16', not {experts!r}")

    label, elem = dtype_info(dtype)
    model = family(args.model_type)
    shapes = model.checkpoint_shapes(args) if tensor_shapes is None else dict(tensor_shapes)
    matrix = dtype_info(matrix_dtype) if matrix_dtype else None
    weights = _tally_weights(shapes, model.tensor_group, label, elem, experts, matrix)
    expert_precision = experts.quant_type if isinstance(experts, QuantSpec) else (matrix or (label,))[0]
    E, L = weights.num_experts, args.num_hidden_layers
    top_k = (args.top_k_experts or 0) if E else 0
    on_gpu = budget.device_bytes is not None

    kv_per_layer = kv_cache_bytes(args, budget.context, elem)
    kv = sum(kv_per_layer)
    # Many-token expert matmuls dequantize one expert at a time into the model dtype.
    dequant = 3 * args.moe_intermediate_size * args.hidden_size * elem if E and isinstance(experts, QuantSpec) else 0
    workspace = workspace_bytes(args, elem, dequant)
    reserve = CUDA_RESERVE_BYTES if on_gpu else 0
    per_layer = weights.one_expert_per_layer()
    slot_bytes = weights.largest_expert()

    def slots_for(resident: int) -> int:
        if resident >= E:
            return 0
        return min(2 * top_k, (E - resident) * len(weights.expert_layers))

    fixed = weights.non_expert_bytes + workspace + reserve  # everything but experts, slots and KV
    if resident_fraction is not None:
        n = round(resident_fraction * E)
    elif on_gpu:
        n = _choose_resident(per_layer, E, lambda r: slots_for(r) * slot_bytes, budget.device_bytes - fixed - kv)
    else:
        n = E  # CPU compute: all experts already sit in the memory it computes from
    weights_fit = n >= 0
    n = max(n, 0)
    slots = slots_for(n)

    resident = [[] for _ in range(L)]
    for layer in weights.expert_layers:
        resident[layer] = sorted(rank_experts(E, _profile_counts(routing_profile, layer))[:n])
    placement = _place_experts(weights, resident, expert_precision)

    resident_bytes = n * per_layer
    host_experts = (E - n) * per_layer
    device_total = fixed + kv + resident_bytes + slots * slot_bytes
    host_total = host_experts

    fits, reason = _verdict(budget, weights, E, n, weights_fit, slots, device_total, host_total,
                            kv, on_gpu, resident_fraction is not None)
    # When nothing fits at the requested context, n is 0 here: the longest context that would.
    max_ctx = _max_context(args, budget, elem, fixed + resident_bytes + slots * slot_bytes, host_total, on_gpu)

    breakdown = _breakdown(weights, label, expert_precision, resident_bytes, host_experts, slots * slot_bytes,
                           kv, workspace, reserve)
    miss = expected_miss_rate(resident, E, weights.expert_layers, routing_profile)
    active = top_k * per_layer
    plan = Plan(
        fits=fits, reason=reason, device="cuda" if on_gpu else "cpu", dtype=label,
        expert_precision=expert_precision, context=budget.context, num_experts=E, top_k=top_k,
        placement=placement, resident_experts=resident, resident_experts_per_layer=n if E else 0,
        cache_slots=slots, cache_slot_bytes=slot_bytes, device_bytes=device_total, host_bytes=host_total,
        kv_bytes=kv, kv_bytes_per_layer=kv_per_layer, workspace_bytes=workspace, reserve_bytes=reserve,
        host_reserve_bytes=HOST_RESERVE_BYTES, prefill_chunk=prefill_chunk(args, budget.context),
        max_context=max_ctx, expected_miss_rate=miss,
        decode_weight_bytes=_decode_weight_bytes(shapes, weights), active_expert_bytes=active,
        breakdown=breakdown, device_budget=budget.device_bytes, host_budget=budget.host_bytes,
        _resident_sets=[frozenset(ids) for ids in resident],
    )
    if budget.gpu_bandwidth and fits:
        plan.estimated_decode_tokens_per_s = estimate_decode_tokens_per_s(
            plan, budget.gpu_bandwidth, budget.pcie_bandwidth)
    return plan


def _place_experts(weights: _Weights, resident: list[list[int]], precision: str) -> dict[str, Placement]:
    placement = dict(weights.placement)
    for layer, matrices in weights.expert_bytes.items():
        on_device = set(resident[layer])
        for e in range(weights.num_experts):
            tier = DEVICE if e in on_device else HOST
            for matrix, nbytes in matrices.items():
                placement[expert_matrix_name(layer, e, matrix)] = Placement(tier, precision, nbytes)
    return placement


def _verdict(budget: Budget, weights: _Weights, E: int, n: int, weights_fit: bool,
             slots: int, device_total: int, host_total: int, kv: int, on_gpu: bool,
             forced: bool) -> tuple[bool, str]:
    """(fits, one-line reason)."""
    ctx = f"{budget.context} tokens"
    if on_gpu and (not weights_fit or device_total > budget.device_bytes):
        need = device_total
        what = (f"{n} of {E} experts per layer resident" if forced and E else
                "the non-expert weights, KV cache, workspace and reserve" + (" plus expert cache slots" if slots else ""))
        return False, (f"does not fit: {what} need {format_size(need)} at {ctx} "
                       f"but the GPU has {format_size(budget.device_bytes)} "
                       f"(non-expert weights alone: {format_size(weights.non_expert_bytes)}, "
                       f"KV cache {format_size(kv)})")
    ram_needed = host_total + HOST_RESERVE_BYTES + (0 if on_gpu else device_total)
    if budget.host_bytes is not None and ram_needed > budget.host_bytes:
        return False, (f"does not fit: host RAM needs {format_size(ram_needed)} "
                       f"({'offloaded experts' if on_gpu else 'the whole model'} plus "
                       f"{format_size(HOST_RESERVE_BYTES)} runtime) but {format_size(budget.host_bytes)} is available")
    if not on_gpu:
        split = f"; {n} of {E} experts per layer on the compute tier, {slots} cache slots" if forced and E else ""
        return True, f"runs on the CPU: {format_size(ram_needed)} of host RAM at {ctx}{split}"
    used = f"{format_size(device_total)} of {format_size(budget.device_bytes)}"
    if n >= E:
        return True, f"fits on the GPU: {'all ' + str(E) + ' experts per layer resident, ' if E else ''}{used} at {ctx}"
    return True, (f"fits with {n} of {E} experts per layer resident on the GPU ({used} at {ctx}); "
                  f"the other {E - n} per layer ({format_size(host_total)}) stay in host RAM "
                  f"and pass through {slots} cache slots")


def _max_context(args: ModelArgs, budget: Budget, elem: int, without_kv: int, host_total: int,
                 on_gpu: bool) -> int:
    """Longest context whose KV cache fits beside this placement (0 if nothing fits)."""
    if on_gpu:
        room = budget.device_bytes - without_kv
    elif budget.host_bytes is not None:
        room = budget.host_bytes - HOST_RESERVE_BYTES - host_total - without_kv
    else:
        return args.max_position_embeddings
    if room < 0:
        return 0
    lo, hi = 0, args.max_position_embeddings  # KV bytes grow monotonically with context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(kv_cache_bytes(args, mid, elem)) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _breakdown(weights: _Weights, label: str, expert_precision: str, resident: int, host: int, slots: int,
               kv: int, workspace: int, reserve: int) -> list[Component]:
    rows = [Component(g, label, weights.group_bytes.get(g, 0), DEVICE) for g in _WEIGHT_GROUPS
            if g != "per_layer" or weights.group_bytes.get(g)]
    rows += [
        Component("experts_resident", expert_precision, resident, DEVICE),
        Component("experts_host", expert_precision, host, HOST),
        Component("expert_cache_slots", expert_precision, slots, DEVICE),
        Component("kv_cache", label, kv, DEVICE),
        Component("workspace", "mixed", workspace, DEVICE),
        Component("reserve", "-", reserve, DEVICE),
    ]
    return rows
