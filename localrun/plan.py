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
- Experts that are not resident live in host RAM and reach the device through cache slots:
  `cache_slots` slots *per MoE layer* (top_k, the most one decoded token can miss in a layer,
  fewer when fewer experts are offloaded), held in one [slots, expert bytes] device buffer per
  layer allocated at load. The plan counts cache_slots x MoE layers x one expert's bytes, the
  very buffers the expert store allocates; they never grow while decoding.
- KV cache: sliding layers keep a ring buffer of `sliding_window` + KV_ROLLBACK positions (the
  extra positions let the prefix cache roll a conversation back, localrun/session.py); full
  layers keep the whole context; `kv_layer_positions` is the one count the plan and KVCache share; attention_k_eq_v full layers store both K and V (K = rope(k_norm(raw)),
  V = v_norm(raw)); KV-shared layers store nothing (they read their source layer's cache).
- Parallel sequences (`serve --parallel N`): each keeps its own KV cache, N times the bytes above.
- Workspace: activations of one prefill chunk of PREFILL_CHUNK tokens (upper bound, fp32), the
  temporaries of one prefill attention call (`prefill_attention_bytes`: a block of QUERY_BLOCK
  queries over every key it sees, which in a full layer is the whole context, so this part grows
  with the context, unless the layer's head dim takes localrun's flash attention kernel, which holds
  only its output; never less than SCORES_TILE_BYTES), one expert dequantized for many-token
  matmuls, and the last position's logits in fp32. `max_context` counts the attention part too.
- Budget rule (one for `fit` and the loader: `device_budget`): the plan may use the card's total
  memory (or `--vram`) minus CUDA_CONTEXT_BYTES (the CUDA context, cuBLAS/cuDNN handles: memory
  torch never sees) and a display allowance (DISPLAY_ALLOWANCE_BYTES, or the environment variable
  LOCALRUN_DISPLAY_ALLOWANCE, e.g. "0" on a headless card). The loader also checks free memory.
- Reserve: CUDA_RESERVE_BYTES inside that budget for what no tensor accounts for: the cuBLAS
  workspace the caching allocator holds, the partly used last segment of each allocator pool
  (small tensors share 2 MiB segments, 1-10 MiB ones 20 MiB segments) and fragmentation;
  HOST_RESERVE_BYTES of RAM for Python, torch and the CUDA runtime's host allocations.
- Allocator rounding (CUDA plans): PyTorch's caching allocator rounds a request of at most
  1 MiB up to a multiple of 512 bytes and a larger one up to a multiple of 2 MiB
  (`allocation_bytes`). The plan rounds every device allocation it places that way: each
  non-expert tensor (q/k/v and the dense MLP's gate/up fused into one per layer, as the loader
  allocates them), one buffer per MoE layer of its resident experts and cache slots, K, V and the
  int64 slot positions (`kv_positions`) of each layer that keeps a cache. The sum of those
  round-ups is the `allocator_rounding` component.
  `placed_device_bytes` is the exact tensor bytes (weights, resident experts, slots, KV and its
  positions, all allocated at load): what
  `memory_report` sums over real storages; `device_bytes` = placed + rounding + workspace + reserve.
- Load transient: quantizing on load reads a layer's bf16 experts into host RAM in chunks of
  QUANT_CHUNK_EXPERTS experts (fewer where that passes QUANT_CHUNK_BYTES; fused or per-expert
  checkpoints alike) and moves one expert at a time to the device (its bf16 weights,
  11.9 MB for 26B-A4B, plus bitsandbytes' temporaries and one packed expert of scratch). When the
  checkpoint itself lives on the device (`synthetic.RandomCheckpoint` on CUDA) a chunk is there:
  16 x 11.9 MB = 190 MB for 26B-A4B. Either fits in the workspace, which is idle while loading;
  nothing else is allocated twice (fused projections are read into their slices).
- Decode estimate (with the budget's bandwidths): bytes read per token over the GPU's bandwidth,
  a ceiling. A missed expert is either copied over PCIe first (added time) or computed by the CPU
  where it lies in host RAM, overlapped with the GPU's dense MLP and resident experts; the plan
  takes the faster and names it (`cold_experts`). See `cold_expert_ceilings`.
- Device None means the compute device is the CPU: every tier is host RAM. The expert split
  and slot count are still computed when `resident_fraction` forces them (the expert store
  is tested on CPU); otherwise all experts are "resident" on the CPU and no slots are used.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from quant.spec import QuantSpec

from .config import ModelArgs
from .errors import UsageError
from .hardware import GIB, MIB, decode_efficiency, format_size, parse_size
from .models import family

DEVICE, HOST = "device", "host"

# CUDA context + library handles + loaded kernel modules + instantiated graphs of one process (outside
# torch's allocator). Measured on an H200 (docs/gpu/2026-11-27-h200-16gib.md, 26B-A4B under a 16 GiB
# plan, a fresh process): 695 MiB after load, 799 MiB after graph decode with every kernel loaded.
# A consumer card's context is smaller (fewer SMs); the larger one is kept, rounded up.
CUDA_CONTEXT_BYTES = 832 * MIB
DISPLAY_ALLOWANCE_BYTES = 256 * MIB  # a desktop on the same card; LOCALRUN_DISPLAY_ALLOWANCE overrides
DISPLAY_ALLOWANCE_ENV = "LOCALRUN_DISPLAY_ALLOWANCE"
CUDA_RESERVE_BYTES = 256 * MIB  # cuBLAS workspace, partly used allocator segments, fragmentation
SMALL_ALLOC, SMALL_ROUND, LARGE_ROUND = 1 * MIB, 512, 2 * MIB  # PyTorch CUDA caching allocator
QUANT_CHUNK_EXPERTS = 16  # experts per checkpoint read when quantizing on load
QUANT_CHUNK_BYTES = 256 * MIB  # ... fewer where their bf16 weights would pass this (one Mixtral 8x7B expert: 336 MiB)
HOST_RESERVE_BYTES = 1 * GIB
PREFILL_CHUNK = 512  # tokens per prefill forward (generate.prefill): bounds the activations
QUERY_BLOCK = 64  # prefill queries per attention call (kernels/attention.blocked_attention; 64 beat 128 and 32)
FUSED_SDPA_MAX_HEAD_DIM = 256  # the widest head SDPA's flash / memory-efficient / cuDNN CUDA backends take
SCORES_TILE_BYTES = 256 * MIB  # the least the workspace keeps for prefill attention (see prefill_attention_bytes)
ACTIVATION_SLACK = 2  # temporaries the allocator holds alongside the live activations
FP32 = 4

_DTYPES = {"bfloat16": ("bf16", 2), "float16": ("fp16", 2), "float32": ("fp32", 4)}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_EXPERT_NAME = re.compile(r"^layers\.(\d+)\.(?:\w+\.)?experts\.(gate_up_proj|down_proj)$")  # Gemma 4: layers.N.experts, Qwen3: layers.N.mlp.experts
_LAYER = re.compile(r"^layers\.(\d+)\.")
EXPERT_MATRICES = ("gate_up_proj", "down_proj")

# The breakdown's components, in display order; "per_layer" only shows for models that have it.
_WEIGHT_GROUPS = ("embed", "per_layer", "attention", "mlp", "router", "norms")


@dataclass(frozen=True)
class Budget:
    """What the plan may use. device_bytes None: compute on the CPU. host_bytes None: unchecked.

    gpu_bandwidth / pcie_bandwidth / host_bandwidth (bytes/s) are optional; with the first two the
    plan carries a decode speed estimate, and with host_bandwidth too it also weighs computing
    missed experts on the CPU (`cold_expert_ceilings`).
    """

    device_bytes: int | None
    host_bytes: int | None = None
    context: int = 8192
    batch: int = 1
    sequences: int = 1  # KV caches kept side by side (serve --parallel), each for `context` positions
    gpu_bandwidth: float | None = None
    pcie_bandwidth: float | None = None
    host_bandwidth: float | None = None  # host RAM as the CPU reads experts (the CPU route)


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
    cache_slots: int  # per MoE layer
    cache_slot_bytes: int  # one slot (the largest expert of any layer)
    cache_slots_bytes: int  # every slot of every MoE layer
    moe_layers: int
    device_bytes: int  # placed + rounding + workspace + reserve: what the device must hold
    placed_device_bytes: int  # exact tensor bytes: weights, resident experts, slots, KV
    rounding_bytes: int  # allocator round-ups of the placed tensors (CUDA plans)
    host_bytes: int
    kv_bytes: int
    kv_bytes_per_layer: list[int]
    kv_position_bytes: int  # the KV cache's int64 slot positions
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
    estimated_decode_tokens_per_s: float | None = None  # the memory-bandwidth ceiling
    expected_decode_tokens_per_s: float | None = None  # the ceiling through `efficiency` (hardware.MeasuredEfficiency)
    sequences: int = 1  # KV caches side by side (serve --parallel); kv_bytes counts them all
    cold_experts: str | None = None  # how the estimate serves missed experts: "copy" or "cpu" (None: none miss)
    cold_expert_ceilings: dict[str, float] | None = None  # the ceiling each route would give ({"copy", "cpu"})
    _resident_sets: list[frozenset] = field(default_factory=list, repr=False)

    @property
    def layers(self) -> int:
        return len(self.kv_bytes_per_layer)

    @property
    def decode_kv_bytes(self) -> int:
        """The KV bytes one decoded token reads: its own sequence's cache (kv_bytes holds every sequence's)."""
        return self.kv_bytes // self.sequences

    @property
    def efficiency(self):
        """The measured efficiency that applies (hardware.decode_efficiency): the CPU's on the CPU, the
        offloaded one when experts live in host RAM."""
        return decode_efficiency(offloaded=self.host_bytes > 0, device=self.device)

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
            "cache_slots_per": "layer",
            "cache_slots_bytes": self.cache_slots_bytes,
            "moe_layers": self.moe_layers,
            "prefill_chunk": self.prefill_chunk,
            "device_bytes": self.device_bytes,
            "placed_device_bytes": self.placed_device_bytes,
            "rounding_bytes": self.rounding_bytes,
            "device_budget_bytes": self.device_budget,
            "host_bytes": self.host_bytes,
            "host_budget_bytes": self.host_budget,
            "host_reserve_bytes": self.host_reserve_bytes,
            "kv_bytes": self.kv_bytes,
            "layers": self.layers,
            "kv_position_bytes": self.kv_position_bytes,
            "kv_sequences": self.sequences,
            "kv_rollback_positions": KV_ROLLBACK,
            "workspace_bytes": self.workspace_bytes,
            "reserve_bytes": self.reserve_bytes,
            "expected_miss_rate": self.expected_miss_rate,
            "estimated_decode_tokens_per_s": self.estimated_decode_tokens_per_s,
            "expected_decode_tokens_per_s": self.expected_decode_tokens_per_s,
            "cold_experts": self.cold_experts,
            "estimated_decode_tokens_per_s_by_cold_experts": self.cold_expert_ceilings,
            "decode_efficiency": None if self.expected_decode_tokens_per_s is None else {
                "bandwidth_fraction": self.efficiency.bandwidth_fraction,
                "layer_seconds": self.efficiency.layer_seconds,
                "fraction_of_ceiling": self.expected_decode_tokens_per_s / self.estimated_decode_tokens_per_s,
                "measured_on": self.efficiency.device,
                "date": self.efficiency.date, "report": self.efficiency.report, "measured": self.efficiency.measured},
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


KV_ROLLBACK = 512  # positions a sliding layer's ring keeps beyond its window (the prefix cache's reach)


def kv_layer_positions(args: ModelArgs, layer: int, context: int, rollback: int = KV_ROLLBACK) -> int:
    """Positions one layer's KV cache keeps at `context` (batch 1), the count KVCache allocates: the
    whole context in a full layer; in a sliding layer its window plus `rollback`, so a conversation
    can be rolled back that far and still hold the window before it (never more than the context);
    0 in a KV-shared layer, which reads its source layer's cache."""
    if args.kv_source_layer(layer) != layer:
        return 0
    return min(context, args.sliding_window + rollback) if args.is_sliding(layer) else context


def kv_layer_bytes(args: ModelArgs, layer: int, context: int, elem_size: int) -> int:
    """KV cache bytes of one layer at `context` positions (batch 1)."""
    positions = kv_layer_positions(args, layer, context)
    # K and V both stored, k_eq_v layers included (storing one and deriving the other would halve it)
    return 2 * positions * args.layer_kv_heads(layer) * args.layer_head_dim(layer) * elem_size


def kv_cache_bytes(args: ModelArgs, context: int, elem_size: int) -> list[int]:
    return [kv_layer_bytes(args, i, context, elem_size) for i in range(args.num_hidden_layers)]


KV_POSITION_BYTES = 8  # the KV cache keeps each slot's position (int64) beside K and V


def kv_position_bytes(args: ModelArgs, context: int) -> list[int]:
    """Per layer: the int64 positions of its cache's slots (0 for KV-shared layers)."""
    return [kv_layer_positions(args, i, context) * KV_POSITION_BYTES for i in range(args.num_hidden_layers)]


def flash_prefill_on() -> bool:
    """Whether CUDA half-precision prefills of heads wider than FUSED_SDPA_MAX_HEAD_DIM take localrun's
    flash attention kernel (models/gemma4.PREFILL_KERNELS["flash_attention"]: every family's `attend`)."""
    from .models import gemma4  # imported here: the model code imports this module

    return gemma4.PREFILL_KERNELS["flash_attention"]


def prefill_attention_bytes(args: ModelArgs, context: int, elem_size: int, flash: bool | None = None) -> int:
    """Peak bytes of one prefill attention call (`attend` on the last chunk's queries) at `context`,
    the largest over the layers. `flash`: whether a head dim above FUSED_SDPA_MAX_HEAD_DIM takes the
    flash attention kernel in half precision (None: `flash_prefill_on()`).

    Such a layer, with the kernel, is one `localrun::causal_attention` call over the whole chunk:
    its output ([N, PREFILL_CHUNK, D] in the model dtype) is all it allocates; its running softmax
    stays in registers, and its visibility comes from the positions, so it holds nothing a key.

    Every other layer attends in blocks of QUERY_BLOCK queries, counted as SDPA's math backend
    computes them, the one a head dim of 512 (Gemma 4's full layers) gets on CUDA without the kernel:
    flash, memory-efficient and cuDNN attention all refuse it (docs/gpu/2026-11-26-h200-baseline.md,
    "attention": full_prefill). Per key it holds K and V upcast to fp32 (half-precision inputs only:
    torch keeps the math backend's reductions in fp32), K scaled once more, and the block's fp32
    scores once at the matmul, twice at the mask add and softmax; beside them the mask repeated for
    the query groups (bool, then additive in the model dtype) and the bool mask of every block of the
    chunk (`attend` keeps them for the other layers). Fused backends hold far less, so for heads they
    take this is an upper bound. A full layer's block sees the whole context, a sliding one its
    window and the chunk: so without the kernel this grows with the context, 18 KiB a key for
    26B-A4B, 4.5 GiB at 262144 tokens (tests/test_plan.py measures the math backend's peak).
    """
    flash = flash_prefill_on() if flash is None else flash
    upcast = FP32 if elem_size < FP32 else 0  # fp32 inputs are used as they are
    block = min(QUERY_BLOCK, PREFILL_CHUNK)
    N = args.num_attention_heads
    peak = 0
    for i in range(args.num_hidden_layers):
        KV, D = args.layer_kv_heads(i), args.layer_head_dim(i)
        outputs = N * PREFILL_CHUNK * D * elem_size  # the chunk's output (blocks: joined after the last block's peak)
        if flash and elem_size < FP32 and D > FUSED_SDPA_MAX_HEAD_DIM:  # the kernel: half precision only
            peak = max(peak, outputs)
            continue
        G = N // KV
        window = args.sliding_window if args.is_sliding(i) else None
        keys = context if window is None else min(context, window - 1 + PREFILL_CHUNK)
        scores = N * block * FP32
        masks = G * block * (1 + elem_size) + PREFILL_CHUNK
        per_key = masks + max(KV * D * (2 * upcast + FP32) + scores,  # at the scores' matmul
                              KV * D * 2 * upcast + 2 * scores)  # at the mask add and the softmax
        queries = N * block * D * (elem_size + 2 * upcast)  # the block's queries: grouped, upcast, scaled
        peak = max(peak, keys * per_key + queries + outputs)
    return peak


def attention_workspace_bytes(args: ModelArgs, context: int, elem_size: int) -> int:
    """The workspace's prefill attention part at `context`: `prefill_attention_bytes`, at least
    SCORES_TILE_BYTES (what short contexts keep, as before the attention was counted per key)."""
    return max(SCORES_TILE_BYTES, prefill_attention_bytes(args, context, elem_size))


def workspace_bytes(args: ModelArgs, elem_size: int, dequant_expert_bytes: int, context: int) -> int:
    """Device scratch for one forward pass at `context` (see module docstring)."""
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
    return activations + attention_workspace_bytes(args, context, elem_size) + dequant_expert_bytes + logits


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

    Uniform routing unless the profile has counts for a layer. The cache slots are left out:
    each layer's slots do keep recently used experts, and consecutive tokens reuse many of them,
    so real misses are fewer; left out, the estimate stays an upper bound for the routing it
    assumes rather than a guess at how much temporal reuse a workload has.
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
    top_k experts per layer; a missed expert is first copied over PCIe (the copy route;
    `cpu_experts_decode_tokens_per_s` is the other). On a CPU plan the host tier is the same
    memory, so misses cost nothing extra.
    """
    miss = plan.expected_miss_rate if miss_rate is None else miss_rate
    seconds = (plan.decode_weight_bytes + plan.decode_kv_bytes + plan.active_expert_bytes) / gpu_bandwidth
    if plan.device == "cuda" and miss > 0:
        if not pcie_bandwidth:
            raise ValueError("pcie_bandwidth is needed when experts miss")
        seconds += miss * plan.active_expert_bytes / pcie_bandwidth
    return 1.0 / seconds


# The CPU route's fixed cost per MoE layer, beyond the routing sync both routes pay: the layer's hidden state
# to the host and the CPU's sum back, two small transfers on the token's path. The H200 report
# (docs/gpu/2026-11-26-h200-memory-v2-kernels.md) copied one 3.35 MB expert in 82 us where its 55.3 GB/s
# would take 61: ~20 us of fixed cost a transfer. An assumption until the CPU route is measured on a GPU.
CPU_EXPERT_SYNC_S = 40e-6


def cpu_experts_decode_tokens_per_s(plan: Plan, gpu_bandwidth: float, host_bandwidth: float,
                                    miss_rate: float | None = None) -> float:
    """Memory-bandwidth ceiling on decode speed (tokens/s, batch 1) when the CPU computes each missed
    expert where it lies in host RAM instead of copying it to the GPU (a CUDA plan).

    A layer's attention, router and norms run on the GPU first (the ids come out of them), as do the
    lm_head and the KV cache reads. Then the GPU reads the dense MLP and the resident experts while the
    CPU reads the missed ones at host_bandwidth: the layer takes the longer of the two, plus
    CPU_EXPERT_SYNC_S. The layers are alike, so the longer of the sums is the sum of the longer.
    """
    miss = plan.expected_miss_rate if miss_rate is None else miss_rate
    missed = miss * plan.active_expert_bytes
    mlp = plan.component("mlp").nbytes
    before_ids = (plan.decode_weight_bytes - mlp + plan.decode_kv_bytes) / gpu_bandwidth
    gpu = (mlp + plan.active_expert_bytes - missed) / gpu_bandwidth
    cpu = missed / host_bandwidth
    return 1.0 / (before_ids + max(gpu, cpu) + plan.moe_layers * CPU_EXPERT_SYNC_S)


def cold_expert_ceilings(plan: Plan, gpu_bandwidth: float, pcie_bandwidth: float | None,
                         host_bandwidth: float | None) -> dict[str, float]:
    """The decode ceiling of each way to serve the experts a token misses: {"copy": over PCIe, "cpu":
    computed on the CPU} ("cpu" only with a host_bandwidth). {} when none miss: every expert resident,
    or a CPU plan, where host RAM is the memory it computes from."""
    if plan.device != "cuda" or plan.expected_miss_rate <= 0:
        return {}
    ceilings = {"copy": estimate_decode_tokens_per_s(plan, gpu_bandwidth, pcie_bandwidth)}
    if host_bandwidth:
        ceilings["cpu"] = cpu_experts_decode_tokens_per_s(plan, gpu_bandwidth, host_bandwidth)
    return ceilings


def _estimate_decode(plan: Plan, budget: Budget) -> None:
    """Set the plan's decode ceiling, its expected speed and, when experts miss, the faster route for them."""
    ceilings = cold_expert_ceilings(plan, budget.gpu_bandwidth, budget.pcie_bandwidth, budget.host_bandwidth)
    if ceilings:
        plan.cold_experts = max(ceilings, key=ceilings.get)  # "copy" on a tie (the first key)
        plan.cold_expert_ceilings = ceilings
        plan.estimated_decode_tokens_per_s = ceilings[plan.cold_experts]
    else:
        plan.estimated_decode_tokens_per_s = estimate_decode_tokens_per_s(plan, budget.gpu_bandwidth,
                                                                          budget.pcie_bandwidth)
    plan.expected_decode_tokens_per_s = plan.efficiency.expected_tokens_per_s(plan.estimated_decode_tokens_per_s,
                                                                            plan.layers)


# The plan -----------------------------------------------------------------------------------

@dataclass
class _Weights:
    """Byte tallies of the checkpoint for one dtype/expert precision."""

    placement: dict[str, Placement]
    group_bytes: dict[str, int]
    expert_bytes: dict[int, dict[str, int]]  # layer -> matrix -> bytes of one expert's slice
    num_experts: int
    group_precision: dict[str, str] = field(default_factory=dict)  # group -> the precision of most of its bytes

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
    by_label: dict[str, Counter] = {}
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
        by_label.setdefault(group, Counter())[label] += nbytes
    precision = {g: c.most_common(1)[0][0] for g, c in by_label.items()}
    return _Weights(placement, group_bytes, expert_bytes, num_experts, precision)


def _decode_weight_bytes(shapes: dict[str, tuple[int, ...]], weights: _Weights) -> int:
    """Non-expert bytes one decoded token reads: embedding tables are lookups, lm_head is a full read."""
    lookups = sum(weights.placement[n].nbytes for n in ("embed_tokens.weight", "embed_tokens_per_layer.weight")
                  if n in weights.placement)
    reads = weights.non_expert_bytes - lookups
    if "lm_head.weight" not in shapes and "embed_tokens.weight" in weights.placement:
        reads += weights.placement["embed_tokens.weight"].nbytes  # tied: the embedding is the lm_head
    return reads


def display_allowance() -> int:
    """Bytes left to a display on the card: LOCALRUN_DISPLAY_ALLOWANCE ("0", "512MiB", ...) or the default."""
    text = os.environ.get(DISPLAY_ALLOWANCE_ENV, "").strip()
    if not text:
        return DISPLAY_ALLOWANCE_BYTES
    if text in ("0", "0B", "0b"):
        return 0
    try:
        return parse_size(text)
    except UsageError as e:
        raise UsageError(f"{DISPLAY_ALLOWANCE_ENV}: {e}") from None


def device_budget(total_bytes: int, display: int | None = None) -> int:
    """The budget rule `fit` and the loader share: bytes a plan may use on a GPU of `total_bytes`
    (its memory, or --vram): total minus CUDA_CONTEXT_BYTES minus the display allowance."""
    allowance = display_allowance() if display is None else display
    return max(0, total_bytes - CUDA_CONTEXT_BYTES - allowance)


def allocation_bytes(nbytes: int) -> int:
    """What PyTorch's CUDA caching allocator sets aside for one request of `nbytes` (see the module
    docstring): multiples of 512 bytes up to 1 MiB, of 2 MiB above."""
    if nbytes <= 0:
        return 0
    unit = SMALL_ROUND if nbytes <= SMALL_ALLOC else LARGE_ROUND
    return -(-nbytes // unit) * unit


# Projections of one layer that read the same input at decode, in storage order: q/k/v; the dense
# MLP's gate/up and (Gemma 4) the router, whose input differs only by its norm's weights, so a decoded
# token computes both as one two-row GEMM (models/gemma4.py, DecoderLayer.fuse).
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj", "router.proj"))


def fused_groups(names) -> list[tuple[str, ...]]:
    """Tensors the loader allocates as one, in order (FUSED; weights and biases apart); a group of one
    is no group. Names as in the plan's placement."""
    names = set(names)
    layers = sorted({int(m.group(1)) for n in names if (m := _LAYER.match(n))})
    groups = []
    for i in layers:
        for projs in FUSED:
            for kind in ("weight", "bias"):
                group = tuple(n for n in (f"layers.{i}.{p}.{kind}" for p in projs) if n in names)
                if len(group) > 1:
                    groups.append(group)
    return groups


def _kv_allocations(kv_per_layer: list[int]) -> list[int]:
    """K and V of each layer with its own cache: two allocations each."""
    return [half for kv in kv_per_layer if kv for half in (kv // 2, kv - kv // 2)]


def _rounding(allocations) -> int:
    return sum(allocation_bytes(a) - a for a in allocations)


def _kv_rounding(kv_layers: list[int], pos_layers: list[int], sequences: int) -> int:
    """The allocator rounding of `sequences` KV caches, each of one sequence's per-layer bytes and positions."""
    return _rounding(_kv_allocations(kv_layers) + pos_layers) * sequences


def _weight_allocations(weights: _Weights) -> list[int]:
    groups = fused_groups(weights.placement)
    grouped = {n for g in groups for n in g}
    out = [sum(weights.placement[n].nbytes for n in g) for g in groups]
    return out + [p.nbytes for n, p in weights.placement.items() if n not in grouped]


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

    A plan that does not fit has as its max_context the longest shorter context whose plan fits
    (0 when none does): whatever stopped it (GPU memory, host RAM, bf16 experts that must all be
    resident), a shorter context is the only thing that can help, since each position's KV costs
    resident experts.
    """
    options = dict(experts=experts, tensor_shapes=tensor_shapes, routing_profile=routing_profile, dtype=dtype,
                   matrix_dtype=matrix_dtype, resident_fraction=resident_fraction)
    plan = _place(args, budget, **options)
    if not plan.fits:
        plan.max_context = _longest_fitting_context(args, budget, options, 0, budget.context - 1)
    return plan


def longest_context(args: ModelArgs, budget: Budget, start: int, *, experts: QuantSpec | str, tensor_shapes=None,
                    routing_profile=None, dtype: str = "bfloat16", matrix_dtype: str | None = None,
                    resident_fraction: float | None = None) -> int:
    """The longest context any placement fits, from `start` (a context that fits) up to the model's
    positions: a plan's max_context is the edge of its own placement, and past it a longer context can
    still fit with more experts in host RAM (`fit` says so)."""
    options = dict(experts=experts, tensor_shapes=tensor_shapes, routing_profile=routing_profile, dtype=dtype,
                   matrix_dtype=matrix_dtype, resident_fraction=resident_fraction)
    return _longest_fitting_context(args, budget, options, start, args.max_position_embeddings)


def _longest_fitting_context(args: ModelArgs, budget: Budget, options: dict, lo: int, hi: int) -> int:
    """The longest context in (lo, hi] whose plan fits, else lo: fitting only gets harder as the context
    grows (more KV, fewer resident experts, more of them in host RAM)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _place(args, replace(budget, context=mid, gpu_bandwidth=None), **options).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _place(args: ModelArgs, budget: Budget, *, experts: QuantSpec | str, tensor_shapes, routing_profile,
           dtype: str, matrix_dtype: str | None, resident_fraction: float | None) -> Plan:
    """make_plan for exactly budget.context (its max_context: the edge of this placement)."""
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

    if budget.sequences < 1:
        raise UsageError(f"parallel sequences must be at least 1, not {budget.sequences}")
    # one KV cache per sequence: the same allocations again for each, so their sums and rounding multiply
    kv_one = kv_cache_bytes(args, budget.context, elem)
    kv = sum(kv_one) * budget.sequences
    kv_pos_one = kv_position_bytes(args, budget.context)
    kv_pos = sum(kv_pos_one) * budget.sequences
    # Many-token expert matmuls dequantize one expert at a time into the model dtype.
    dequant = 3 * args.moe_intermediate_size * args.hidden_size * elem if E and isinstance(experts, QuantSpec) else 0
    workspace = workspace_bytes(args, elem, dequant, budget.context)
    reserve = CUDA_RESERVE_BYTES if on_gpu else 0
    per_layer = weights.one_expert_per_layer()  # one expert of every MoE layer
    layer_expert = {layer: sum(m.values()) for layer, m in weights.expert_bytes.items()}
    slot_bytes = weights.largest_expert()
    weight_allocs = _weight_allocations(weights)

    def slots_for(resident: int) -> int:
        """Cache slots per MoE layer: top_k, or fewer when fewer experts are offloaded."""
        return 0 if resident >= E else min(top_k, E - resident)

    kv_rounding = _kv_rounding(kv_one, kv_pos_one, budget.sequences) if on_gpu else 0

    def rounding(resident: int, with_kv: bool = True) -> int:
        if not on_gpu:
            return 0  # the CPU allocator sets aside exactly what a tensor holds
        experts_allocs = [(resident + slots_for(resident)) * b for b in layer_expert.values()]  # one tensor a layer
        return _rounding(weight_allocs + experts_allocs) + (kv_rounding if with_kv else 0)

    def placed(resident: int) -> int:
        return weights.non_expert_bytes + (resident + slots_for(resident)) * per_layer + kv + kv_pos

    fixed = workspace + reserve  # beyond the placed tensors and their rounding
    if resident_fraction is not None:
        n = round(resident_fraction * E)
    elif on_gpu:
        n = next((r for r in range(E, -1, -1)
                  if placed(r) + rounding(r) + fixed <= budget.device_bytes), -1)
    else:
        n = E  # CPU compute: all experts already sit in the memory it computes from
    weights_fit = n >= 0
    n = max(n, 0)
    slots = slots_for(n)
    moe_layers = len(weights.expert_layers)

    resident = [[] for _ in range(L)]
    for layer in weights.expert_layers:
        resident[layer] = sorted(rank_experts(E, _profile_counts(routing_profile, layer))[:n])
    placement = _place_experts(weights, resident, expert_precision)

    resident_bytes = n * per_layer
    slot_total = slots * per_layer  # cache_slots x MoE layers x one expert's bytes
    host_experts = (E - n) * per_layer
    placed_total = placed(n)
    round_up = rounding(n)
    device_total = placed_total + round_up + fixed
    host_total = host_experts

    fits, reason = _verdict(budget, weights, E, n, weights_fit, slots, moe_layers, slot_total, device_total,
                            host_total, kv, on_gpu, resident_fraction is not None,
                            quantized=isinstance(experts, QuantSpec) or experts in ("nf4", "fp4"))
    # When nothing fits at the requested context, n is 0 here: the longest context that would.
    # What grows with the context comes off: the KV cache, its positions and the attention workspace.
    without_kv = placed_total - kv - kv_pos + rounding(n, with_kv=False) + fixed - attention_workspace_bytes(
        args, budget.context, elem)
    max_ctx = _max_context(args, budget, elem, without_kv, host_total, on_gpu)

    breakdown = _breakdown(weights, label, expert_precision, resident_bytes, host_experts, slot_total,
                           kv, kv_pos, round_up, workspace, reserve)
    miss = expected_miss_rate(resident, E, weights.expert_layers, routing_profile)
    active = top_k * per_layer
    plan = Plan(
        fits=fits, reason=reason, device="cuda" if on_gpu else "cpu", dtype=label,
        expert_precision=expert_precision, context=budget.context, num_experts=E, top_k=top_k,
        placement=placement, resident_experts=resident, resident_experts_per_layer=n if E else 0,
        cache_slots=slots, cache_slot_bytes=slot_bytes, cache_slots_bytes=slot_total, moe_layers=moe_layers,
        device_bytes=device_total, placed_device_bytes=placed_total, rounding_bytes=round_up,
        host_bytes=host_total,
        kv_bytes=kv, kv_bytes_per_layer=[b * budget.sequences for b in kv_one], kv_position_bytes=kv_pos,
        sequences=budget.sequences,
        workspace_bytes=workspace, reserve_bytes=reserve,
        host_reserve_bytes=HOST_RESERVE_BYTES, prefill_chunk=PREFILL_CHUNK,
        max_context=max_ctx, expected_miss_rate=miss,
        decode_weight_bytes=_decode_weight_bytes(shapes, weights), active_expert_bytes=active,
        breakdown=breakdown, device_budget=budget.device_bytes, host_budget=budget.host_bytes,
        _resident_sets=[frozenset(ids) for ids in resident],
    )
    if budget.gpu_bandwidth and fits:
        _estimate_decode(plan, budget)
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


def _slots_text(slots: int, moe_layers: int, slot_total: int) -> str:
    return f"{slots} cache slots per layer ({moe_layers} layers x {slots}, {format_size(slot_total)})"


def _verdict(budget: Budget, weights: _Weights, E: int, n: int, weights_fit: bool,
             slots: int, moe_layers: int, slot_total: int, device_total: int, host_total: int, kv: int,
             on_gpu: bool, forced: bool, quantized: bool = True) -> tuple[bool, str]:
    """(fits, one-line reason). quantized: 4-bit experts, the only ones the expert store can keep in
    host RAM (bf16 experts must all be resident)."""
    ctx = f"{budget.context} tokens"
    if E and n < E and weights_fit and not quantized:
        return False, (f"does not fit: only {n} of {E} bf16 experts per layer fit on the "
                       f"{'GPU' if on_gpu else 'compute tier'} at {ctx}, and experts in host RAM need 4-bit "
                       "experts (--experts nf4 or fp4)")
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
        split = (f"; {n} of {E} experts per layer on the compute tier, {_slots_text(slots, moe_layers, slot_total)}"
                 if forced and E else "")
        return True, f"runs on the CPU: {format_size(ram_needed)} of host RAM at {ctx}{split}"
    used = f"{format_size(device_total)} of {format_size(budget.device_bytes)}"
    if n >= E:
        return True, f"fits on the GPU: {'all ' + str(E) + ' experts per layer resident, ' if E else ''}{used} at {ctx}"
    return True, (f"fits with {n} of {E} experts per layer resident on the GPU ({used} at {ctx}); "
                  f"the other {E - n} per layer ({format_size(host_total)}) stay in host RAM "
                  f"and pass through {_slots_text(slots, moe_layers, slot_total)}")


def _max_context(args: ModelArgs, budget: Budget, elem: int, without_kv: int, host_total: int,
                 on_gpu: bool) -> int:
    """Longest context whose KV cache and prefill attention workspace fit beside this placement (0 if
    nothing fits). without_kv: the placement's bytes without those two."""
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
        kv_layers, pos_layers = kv_cache_bytes(args, mid, elem), kv_position_bytes(args, mid)
        rounding = _kv_rounding(kv_layers, pos_layers, budget.sequences) if on_gpu else 0
        attention = attention_workspace_bytes(args, mid, elem)
        if (sum(kv_layers) + sum(pos_layers)) * budget.sequences + rounding + attention <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _breakdown(weights: _Weights, label: str, expert_precision: str, resident: int, host: int, slots: int,
               kv: int, kv_pos: int, rounding: int, workspace: int, reserve: int) -> list[Component]:
    rows = [Component(g, weights.group_precision.get(g, label), weights.group_bytes.get(g, 0), DEVICE)
            for g in _WEIGHT_GROUPS
            if g != "per_layer" or weights.group_bytes.get(g)]
    rows += [
        Component("experts_resident", expert_precision, resident, DEVICE),
        Component("experts_host", expert_precision, host, HOST),
        Component("expert_cache_slots", expert_precision, slots, DEVICE),
        Component("kv_cache", label, kv, DEVICE),
        Component("kv_positions", "int64", kv_pos, DEVICE),
        Component("allocator_rounding", "-", rounding, DEVICE),
        Component("workspace", "mixed", workspace, DEVICE),
        Component("reserve", "-", reserve, DEVICE),
    ]
    return rows
