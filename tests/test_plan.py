"""The placement plan (localrun.plan) and the hardware helpers it is fed with (localrun.hardware)."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from localrun.config import FULL, SLIDING, ModelArgs
from localrun.errors import UsageError
from localrun.hardware import (GIB, MIB, GPU_PRESETS, detect_gpu, detect_host_ram, format_rate, gpu_preset,
                               parse_rate, parse_size, preset_for_device_name)
import localrun.models.gemma4 as gemma4
from localrun.models.gemma4 import attend, checkpoint_shapes
from localrun.plan import (CPU_EXPERT_SYNC_S, DEVICE, HOST, KV_ROLLBACK, PREFILL_CHUNK, SCORES_TILE_BYTES, Budget,
                           expert_matrix_name, kv_layer_bytes, make_plan, estimate_decode_tokens_per_s,
                           prefill_attention_bytes)
from localrun.tiny import tiny_config
from quant.spec import QuantSpec

# Text part of google/gemma-4-26B-A4B-it config.json (see the reference notes), as Google ships it.
REFERENCE_CONFIG = {
    "model_type": "gemma4",
    "architectures": ["Gemma4ForConditionalGeneration"],
    "eos_token_id": [1, 106],
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma4_text", "attention_k_eq_v": True, "enable_moe_block": True,
        "final_logit_softcapping": 30.0, "global_head_dim": 512, "head_dim": 256,
        "hidden_size": 2816, "hidden_size_per_layer_input": 0, "intermediate_size": 2112,
        "layer_types": ([SLIDING] * 5 + [FULL]) * 5, "max_position_embeddings": 262144,
        "moe_intermediate_size": 704, "num_attention_heads": 16, "num_experts": 128,
        "num_global_key_value_heads": 2, "num_hidden_layers": 30, "num_key_value_heads": 8,
        "num_kv_shared_layers": 0, "sliding_window": 1024, "top_k_experts": 8,
        "use_double_wide_mlp": False, "vocab_size": 262144, "tie_word_embeddings": True,
    },
}
NF4 = QuantSpec("nf4")
HOST_RAM = 64 * GIB


@pytest.fixture(scope="module")
def ref() -> ModelArgs:
    return ModelArgs.from_dict(REFERENCE_CONFIG)


def plan_for(args, vram_gib, context=8192, host=HOST_RAM, **kw):
    device = None if vram_gib is None else int(vram_gib * GIB)
    return make_plan(args, Budget(device, host, context), experts=kw.pop("experts", NF4), **kw)


def expert_bytes_per_layer(args, spec=NF4):
    I, H = args.moe_intermediate_size, args.hidden_size
    return spec.nbytes(2 * I * H) + spec.nbytes(H * I)


# Weight totals agree with the reference doc's arithmetic ---------------------------------------

def test_weight_totals_match_reference_doc(ref):
    plan = plan_for(ref, 24)
    gib = {c.name: c.nbytes / GIB for c in plan.breakdown}
    for name, doc in (("embed", 1.38), ("attention", 2.07), ("mlp", 1.00)):
        assert gib[name] == pytest.approx(doc, rel=0.01), name
    rest = sum(gib[g] for g in ("embed", "attention", "mlp", "router", "norms"))
    assert rest == pytest.approx(4.47, rel=0.01)  # "bf16 rest ~4.5 GiB"
    experts = gib["experts_resident"] + gib["experts_host"]
    assert experts == pytest.approx(11.96, rel=0.01)  # NF4, fp32 absmax per 64
    assert rest + experts == pytest.approx(16.4, rel=0.01)


def test_bf16_experts_match_reference_doc(ref):
    plan = plan_for(ref, 80, experts="bf16")
    assert plan.expert_precision == "bf16"
    assert plan.component("experts_resident").nbytes / GIB == pytest.approx(42.5, rel=0.01)
    assert plan.placement[expert_matrix_name(0, 0, "down_proj")].nbytes == 2816 * 704 * 2


def test_expert_bytes_come_from_quant_spec(ref):
    spec = QuantSpec("fp4", blocksize=128)
    plan = plan_for(ref, 24, experts=spec)
    assert plan.expert_precision == "fp4"
    assert plan.placement[expert_matrix_name(3, 17, "gate_up_proj")] == (DEVICE, "fp4", spec.nbytes(1408 * 2816))
    assert plan.placement[expert_matrix_name(3, 17, "down_proj")].nbytes == spec.nbytes(2816 * 704)


def test_placement_covers_every_tensor(ref):
    plan = plan_for(ref, 16)
    shapes = checkpoint_shapes(ref)
    for name in shapes:
        if ".experts." in name:
            continue
        tier, precision, nbytes = plan.placement[name]
        assert (tier, precision) == (DEVICE, "bf16")  # router included: never quantized
    n_expert_entries = sum(".experts." in n for n in plan.placement)
    assert n_expert_entries == 30 * 128 * 2
    on_device = sum(p.nbytes for p in plan.placement.values() if p.tier == DEVICE)
    in_host = sum(p.nbytes for p in plan.placement.values() if p.tier == HOST)
    assert in_host == plan.host_bytes
    assert plan.cache_slots_bytes == plan.cache_slots * 30 * expert_bytes_per_layer(ref)  # slots per layer
    assert on_device + plan.kv_bytes + plan.kv_position_bytes + plan.cache_slots_bytes == plan.placed_device_bytes
    fixed = plan.rounding_bytes + plan.workspace_bytes + plan.reserve_bytes
    assert plan.placed_device_bytes + fixed == plan.device_bytes
    assert sum(c.nbytes for c in plan.breakdown if c.tier == DEVICE) == plan.device_bytes  # every byte counted


# Budgets ----------------------------------------------------------------------------------------

def test_24gib_at_8k_keeps_every_expert_resident(ref):
    plan = plan_for(ref, 24)
    assert plan.fits, plan.reason
    assert plan.resident_experts_per_layer == 128
    assert all(ids == list(range(128)) for ids in plan.resident_experts)
    assert plan.cache_slots == 0 and plan.host_bytes == 0
    assert plan.device_bytes <= 24 * GIB
    assert plan.max_context >= 8192
    assert "fits on the GPU" in plan.reason


def test_16gib_keeps_part_of_the_experts_in_host_ram(ref):
    plan = plan_for(ref, 16)
    assert plan.fits, plan.reason
    n = plan.resident_experts_per_layer
    assert 0 < n < 128
    assert 0.75 <= n / 128 <= 0.90  # reference doc: a 16 GB card keeps ~15-25% in host RAM
    assert plan.device_bytes <= 16 * GIB
    assert plan.host_bytes == (128 - n) * 30 * expert_bytes_per_layer(ref)
    assert plan.cache_slots == 8  # per layer: top_k, the most one token can miss in a layer
    assert f"{n} of 128" in plan.reason and "8 cache slots per layer" in plan.reason
    # One more resident expert per layer would not have fitted.
    assert plan_for(ref, 16, resident_fraction=(n + 1) / 128).device_bytes > 16 * GIB


def test_8gib_fits_with_most_experts_in_ram(ref):
    plan = plan_for(ref, 8)
    assert plan.fits, plan.reason
    assert 0 < plan.resident_experts_per_layer < 64
    assert plan.device_bytes <= 8 * GIB


def test_8gib_without_enough_host_ram_says_why(ref):
    plan = plan_for(ref, 8, host=4 * GIB)
    assert not plan.fits
    assert "host RAM" in plan.reason


def test_too_small_gpu_does_not_fit(ref):
    plan = plan_for(ref, 4)
    assert not plan.fits
    assert plan.reason.startswith("does not fit")
    assert plan.max_context == 0  # the non-expert weights alone exceed 4 GiB


def test_longer_context_costs_resident_experts(ref):
    short, long = plan_for(ref, 16, context=4096), plan_for(ref, 16, context=131072)
    assert long.fits
    assert long.resident_experts_per_layer < short.resident_experts_per_layer
    assert long.kv_bytes > short.kv_bytes


def test_max_context_is_the_edge_of_the_placement(ref):
    plan = plan_for(ref, 16)
    frac = plan.resident_experts_per_layer / 128
    assert plan.max_context >= 8192
    assert plan_for(ref, 16, context=plan.max_context, resident_fraction=frac).fits
    assert not plan_for(ref, 16, context=plan.max_context + 1, resident_fraction=frac).fits


class PeakBytes(TorchDispatchMode):
    """The peak bytes of the storages the ops run under it allocate and keep alive (their inputs'
    storages excluded). On the meta device: the allocations of a 262144-key attention, without the memory."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage -> [live tensors over it, bytes]
        self._inputs: set[int] = set()

    def _allocated(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._inputs:
            return
        if key not in self._refs:
            self._refs[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key][0] += 1
        weakref.finalize(t, self._freed, key)

    def _freed(self, key: int) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and a.untyped_storage()._cdata not in self._refs:
                self._inputs.add(a.untyped_storage()._cdata)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._allocated(t)
        return out


def full_layer_prefill_peak(args: ModelArgs, keys: int) -> int:
    """Peak bytes `attend` allocates for the last prefill chunk of a full layer (head dim 512) over
    `keys` positions in bf16, through SDPA's math backend, the only one CUDA has for that head dim
    when the flash attention kernel is off (or, where flash_prefill is made to say so, through
    localrun::causal_attention: its fake, whose allocations the CUDA kernel's are)."""
    layer = args.layer_types.index(FULL)
    N, KV, D = args.num_attention_heads, args.layer_kv_heads(layer), args.layer_head_dim(layer)
    q = torch.empty(1, PREFILL_CHUNK, N, D, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    k = torch.empty(1, KV, keys, D, dtype=torch.bfloat16, device="meta")
    v = torch.empty_like(k)
    pos = torch.arange(keys, device="meta")
    peak = PeakBytes()
    with sdpa_kernel([SDPBackend.MATH]), peak:
        attend(q, k, v, pos[-PREFILL_CHUNK:], pos, None, {})
    return peak.peak


@pytest.fixture
def math_prefill(monkeypatch):
    """The flash attention kernel switched off: every prefill attends in blocks (SDPA), and the plan says so."""
    monkeypatch.setitem(gemma4.PREFILL_KERNELS, "flash_attention", False)


@pytest.mark.parametrize("keys", [4096, 32768, 262144])
def test_prefill_attention_bytes_cover_what_the_math_backend_holds(ref, keys, math_prefill):
    measured = full_layer_prefill_peak(ref, keys)
    counted = prefill_attention_bytes(ref, keys, 2)
    assert counted == prefill_attention_bytes(ref, keys, 2, flash=False)
    assert measured <= counted <= 1.1 * measured  # an upper bound, and a close one
    if keys == 262144:
        assert counted > 4 * GIB  # a full layer's query block over the whole context


@pytest.mark.parametrize("keys", [4096, 262144])
def test_with_the_flash_kernel_a_full_layer_holds_its_output_only(ref, keys, monkeypatch):
    """The kernel's route allocates the chunk's output and nothing a key: the plan's count stops
    growing with the context once the sliding layers' blocks (window + chunk keys) are the largest."""
    monkeypatch.setattr(gemma4, "flash_prefill", lambda q: True)  # the CUDA route, on meta tensors
    measured = full_layer_prefill_peak(ref, keys)
    N, D = ref.num_attention_heads, ref.global_head_dim
    assert measured == N * PREFILL_CHUNK * D * 2  # [1, N, PREFILL_CHUNK, D] bf16
    counted = prefill_attention_bytes(ref, keys, 2, flash=True)
    assert measured <= counted == prefill_attention_bytes(ref, 1 << 20, 2, flash=True) < 64 * MIB
    assert prefill_attention_bytes(ref, keys, 4, flash=True) == prefill_attention_bytes(ref, keys, 4, flash=False)


@pytest.mark.parametrize("context", [32768, 131072, 262144])
def test_the_workspace_grows_with_the_prefill_attention(ref, context, math_prefill):
    """Without the flash kernel, past ~14K tokens one full layer's query block holds more than
    SCORES_TILE_BYTES: the workspace grows by it (it was fixed at 498 MiB, so 24 GiB planned 262144
    tokens with every expert resident and the prefill of a long prompt ran out of memory)."""
    short, long = plan_for(ref, 24), plan_for(ref, 24, context=context)
    assert long.fits, long.reason
    measured = full_layer_prefill_peak(ref, context)
    assert measured > SCORES_TILE_BYTES
    assert long.workspace_bytes >= short.workspace_bytes - SCORES_TILE_BYTES + measured
    assert long.device_bytes <= long.device_budget


def test_24gib_max_context_leaves_room_for_the_prefill_attention(ref, math_prefill):
    plan = plan_for(ref, 24)
    assert plan.resident_experts_per_layer == 128
    assert 131072 <= plan.max_context < ref.max_position_embeddings  # 262144 needs experts in host RAM
    assert plan_for(ref, 24, context=plan.max_context, resident_fraction=1.0).fits
    assert not plan_for(ref, 24, context=plan.max_context + 1, resident_fraction=1.0).fits
    assert plan_for(ref, 24, context=ref.max_position_embeddings).resident_experts_per_layer < 128


def test_with_the_flash_kernel_24gib_holds_the_whole_context_resident(ref):
    """The default: the full layers' prefill holds no scores, so every expert stays on a 24 GiB card
    at 26B-A4B's whole 262144-token context (without the kernel, ~184K: the test above)."""
    assert gemma4.PREFILL_KERNELS["flash_attention"]
    plan = plan_for(ref, 24, context=ref.max_position_embeddings)
    assert plan.fits and plan.resident_experts_per_layer == 128, plan.reason
    assert plan.workspace_bytes == plan_for(ref, 24).workspace_bytes  # nothing in it grows with the context


@pytest.mark.parametrize("vram, host, kw", [
    (24, HOST_RAM, {"experts": "bf16"}),  # bf16 experts must all be resident: no context fits 24 GiB
    (16, int(3.4 * GIB), {}),  # host RAM: a shorter context keeps more experts resident, fewer in RAM
    (6, 12 * GIB, {}),  # room on the GPU for a shorter context, but not in host RAM for its experts
])
def test_a_plan_that_does_not_fit_names_the_longest_context_that_does(ref, vram, host, kw):
    plan = plan_for(ref, vram, host=host, **kw)
    assert not plan.fits
    edge = plan.max_context
    assert edge < 8192
    assert edge == 0 or plan_for(ref, vram, context=edge, host=host, **kw).fits
    assert not plan_for(ref, vram, context=edge + 1, host=host, **kw).fits


def test_context_beyond_the_model_is_a_usage_error(ref):
    with pytest.raises(UsageError, match="exceeds"):
        plan_for(ref, 24, context=ref.max_position_embeddings + 1)


# KV cache -------------------------------------------------------------------------------------

def test_sliding_kv_stops_growing_at_the_window(ref):
    sliding, full = 0, 5
    per_pos = 2 * 8 * 256 * 2  # K and V, 8 heads x 256, bf16
    assert kv_layer_bytes(ref, sliding, 512, 2) == 512 * per_pos
    assert kv_layer_bytes(ref, sliding, 1024, 2) == 1024 * per_pos
    # the ring keeps the window plus KV_ROLLBACK positions (the prefix cache's rollback reach)
    assert kv_layer_bytes(ref, sliding, 100_000, 2) == (1024 + KV_ROLLBACK) * per_pos
    # k_eq_v full layer: 2 global KV heads x 512, K and V both stored
    assert kv_layer_bytes(ref, full, 100_000, 2) == 100_000 * 2 * 2 * 512 * 2
    # reference doc: 200 MiB sliding cap + 20 KiB per token on full layers; rollback 512: +100 MiB
    assert KV_ROLLBACK == 512
    plan = plan_for(ref, 24, context=131072)
    assert plan.kv_bytes == 300 * MIB + 131072 * 20 * 1024


def test_parallel_sequences_multiply_the_kv_cache(ref):
    one = make_plan(ref, Budget(24 * GIB, None, 8192), experts=NF4)
    two = make_plan(ref, Budget(24 * GIB, None, 8192, sequences=2), experts=NF4)
    assert two.kv_bytes == 2 * one.kv_bytes and two.kv_position_bytes == 2 * one.kv_position_bytes
    assert two.component("kv_cache").nbytes == 2 * one.component("kv_cache").nbytes
    assert two.resident_experts_per_layer <= one.resident_experts_per_layer
    assert two.max_context < one.max_context


def test_planning_many_sequences_does_no_more_work_a_placement(ref, monkeypatch):
    """`fit --parallel 100000` took most of an hour: each placement tried rounded every sequence's KV
    allocations one by one. N caches of one size round as N times one cache, so no list grows with N."""
    import localrun.plan as plan

    longest = []

    def counting(allocations):
        allocations = list(allocations)
        longest[-1] = max(longest[-1], len(allocations))
        return real(allocations)

    real = plan._rounding
    monkeypatch.setattr(plan, "_rounding", counting)
    sizes = {}
    for sequences in (1, 64):
        longest.append(0)
        sizes[sequences] = make_plan(ref, Budget(24 * GIB, None, 8192, sequences=sequences), experts=NF4)
    assert longest[1] == longest[0]
    assert sizes[64].kv_bytes == 64 * sizes[1].kv_bytes


def test_k_eq_v_layers_use_global_kv_heads():
    k_eq_v = ModelArgs.from_dict(tiny_config("moe"))
    with_v = ModelArgs.from_dict(tiny_config("moe_v"))
    full = 2
    assert k_eq_v.layer_types[full] == FULL
    assert kv_layer_bytes(k_eq_v, full, 100, 2) == 2 * 100 * 1 * 32 * 2  # 1 global KV head, K and V
    assert kv_layer_bytes(with_v, full, 100, 2) == 2 * 100 * 2 * 32 * 2  # num_key_value_heads


def test_kv_shared_layers_store_nothing():
    args = ModelArgs.from_dict(tiny_config("dense_e2b"))  # last 2 of 6 layers share KV
    plan = make_plan(args, Budget(1 * GIB, None, 100), experts=NF4)
    assert plan.kv_bytes_per_layer[4:] == [0, 0]
    assert all(b > 0 for b in plan.kv_bytes_per_layer[:4])
    assert plan.num_experts == 0 and plan.resident_experts_per_layer == 0 and plan.fits


# Forced split, CPU, routing profile -------------------------------------------------------------

def test_resident_fraction_forces_the_split_on_cpu():
    args = ModelArgs.from_dict(tiny_config("moe"))  # 8 experts, top-2, 6 layers
    plan = make_plan(args, Budget(None, None, 64), experts=NF4, resident_fraction=0.25)
    assert plan.device == "cpu" and plan.reserve_bytes == 0
    assert plan.resident_experts_per_layer == 2
    assert plan.resident_experts == [[0, 1]] * 6
    assert plan.cache_slots == 2  # per layer: top_k
    assert plan.cache_slots_bytes == 2 * 6 * expert_bytes_per_layer(args)
    assert plan.expert_tier(0, 1) == DEVICE and plan.expert_tier(0, 2) == HOST
    assert plan.placement[expert_matrix_name(5, 7, "down_proj")].tier == HOST
    assert plan.host_bytes == 6 * 6 * expert_bytes_per_layer(args)
    assert plan.fits


def test_cpu_without_forcing_keeps_every_expert_on_the_compute_tier():
    args = ModelArgs.from_dict(tiny_config("moe"))
    plan = make_plan(args, Budget(None, None, 64), experts=NF4)
    assert plan.resident_experts_per_layer == 8 and plan.cache_slots == 0 and plan.host_bytes == 0
    assert plan.max_context == args.max_position_embeddings


def test_resident_fraction_overrides_the_gpu_choice(ref):
    plan = plan_for(ref, 24, resident_fraction=0.5)
    assert plan.resident_experts_per_layer == 64 and plan.cache_slots == 8 and plan.fits
    forced_too_many = plan_for(ref, 8, resident_fraction=1.0)
    assert not forced_too_many.fits and "128 of 128" in forced_too_many.reason


def test_routing_profile_ranks_residency(ref):
    counts = [1] * 128
    counts[100], counts[7], counts[64] = 50, 40, 40
    plan = plan_for(ref, 24, resident_fraction=3 / 128, routing_profile={"2": counts})
    assert plan.resident_experts[2] == [7, 64, 100]
    assert plan.resident_experts[3] == [0, 1, 2]  # no profile for this layer: lowest ids
    uniform = plan_for(ref, 24, resident_fraction=3 / 128)
    assert plan.expected_miss_rate < uniform.expected_miss_rate
    assert uniform.expected_miss_rate == pytest.approx(1 - 3 / 128)


# Speed estimate ---------------------------------------------------------------------------------

def test_decode_estimate_matches_the_bandwidth_arithmetic(ref):
    plan = make_plan(ref, Budget(24 * GIB, HOST_RAM, 8192, gpu_bandwidth=1008e9, pcie_bandwidth=25e9))
    # reference doc: ~5.2 GiB read per token -> ~180 tok/s on a 4090; the KV read lowers it a little
    assert (plan.decode_weight_bytes + plan.active_expert_bytes) / GIB == pytest.approx(5.2, rel=0.02)
    assert 150 < plan.estimated_decode_tokens_per_s < 185
    slower = estimate_decode_tokens_per_s(plan, 1008e9, 25e9, miss_rate=0.2)
    assert slower < plan.estimated_decode_tokens_per_s


def speed_plan(ref, vram_gib=16, gpu=288e9, pcie=13e9, host=None, **kw):
    budget = Budget(int(vram_gib * GIB) if vram_gib else None, HOST_RAM, 8192, gpu_bandwidth=gpu, pcie_bandwidth=pcie,
                    host_bandwidth=host)
    return make_plan(ref, budget, experts=NF4, **kw)


def ceilings_by_hand(plan, gpu, pcie, host) -> dict[str, float]:
    """The two routes' tokens/s from the plan's byte counts. copy: every byte over the GPU, the misses
    over PCIe first. cpu: what comes before the ids (all but the dense MLP and the experts), then the
    longer of the GPU's dense MLP + resident experts and the CPU's missed experts, plus a sync a layer."""
    miss, active = plan.expected_miss_rate, plan.active_expert_bytes
    weights, kv, mlp = plan.decode_weight_bytes, plan.kv_bytes, plan.component("mlp").nbytes
    copy = (weights + kv + active) / gpu + miss * active / pcie
    gpu_side = (mlp + (1 - miss) * active) / gpu
    cpu_side = miss * active / host
    cpu = (weights - mlp + kv) / gpu + max(gpu_side, cpu_side) + plan.moe_layers * CPU_EXPERT_SYNC_S
    return {"copy": 1 / copy, "cpu": 1 / cpu}


@pytest.mark.parametrize("gpu, pcie, host, route", [
    (288e9, 13e9, 60e9, "cpu"),  # 4060 Ti on PCIe 4.0 x8 and DDR5: copies are the slow part
    (288e9, 13e9, 5e9, "copy"),  # the same card beside slow host RAM
    (960e9, 50e9, 10e9, "copy"),  # 5080 on PCIe 5.0 x16, host RAM slower than the link
    (960e9, 50e9, 200e9, "cpu"),  # the same card in a workstation's many memory channels
])
def test_cold_experts_take_the_faster_route(ref, gpu, pcie, host, route):
    plan = speed_plan(ref, gpu=gpu, pcie=pcie, host=host)
    assert plan.host_bytes > 0 and plan.expected_miss_rate > 0
    want = ceilings_by_hand(plan, gpu, pcie, host)
    assert plan.cold_expert_ceilings == pytest.approx(want, rel=1e-12)
    assert plan.cold_experts == route == max(want, key=want.get)
    assert plan.estimated_decode_tokens_per_s == pytest.approx(want[route], rel=1e-12)
    assert plan.expected_decode_tokens_per_s == pytest.approx(
        plan.efficiency.expected_tokens_per_s(want[route], plan.layers), rel=1e-12)


def test_cpu_route_flips_where_the_routes_cross(ref):
    """Raising host bandwidth only helps the CPU route, raising PCIe bandwidth only the copy route: each
    flips the choice once, where the two ceilings cross."""
    def one_flip(routes, first, then):
        n = routes.count(first)
        return 0 < n < len(routes) and routes == [first] * n + [then] * (len(routes) - n)

    assert one_flip([speed_plan(ref, host=h * 1e9).cold_experts for h in (1, 2, 4, 8, 16, 32, 64, 128)], "copy", "cpu")
    assert one_flip([speed_plan(ref, pcie=p * 1e9, host=20e9).cold_experts for p in (4, 8, 16, 32, 64, 128)],
                    "cpu", "copy")


def test_cpu_route_overlaps_the_missed_experts_with_the_gpu(ref):
    """With host RAM fast enough the CPU's share hides behind the GPU's: the token costs the copy route's
    GPU reads less the missed experts (the GPU never reads them), plus the syncs; slower host RAM only
    starts to cost once its share outlasts the GPU's."""
    fast = speed_plan(ref, host=1e15)
    miss, active = fast.expected_miss_rate, fast.active_expert_bytes
    gpu_only = (fast.decode_weight_bytes + fast.kv_bytes + (1 - miss) * active) / 288e9
    assert fast.cold_expert_ceilings["cpu"] == pytest.approx(1 / (gpu_only + fast.moe_layers * CPU_EXPERT_SYNC_S))
    hidden = miss * active / ((fast.component("mlp").nbytes + (1 - miss) * active) / 288e9)  # host rate that just hides
    assert speed_plan(ref, host=hidden * 1.01).cold_expert_ceilings["cpu"] == pytest.approx(
        fast.cold_expert_ceilings["cpu"])
    assert speed_plan(ref, host=hidden / 2).cold_expert_ceilings["cpu"] < fast.cold_expert_ceilings["cpu"]


def test_without_host_bandwidth_misses_are_copied(ref):
    """No host bandwidth (the loader's plans): the estimate is the copy route's, as it always was."""
    plan = speed_plan(ref)
    assert plan.cold_experts == "copy" and set(plan.cold_expert_ceilings) == {"copy"}
    assert plan.estimated_decode_tokens_per_s == estimate_decode_tokens_per_s(plan, 288e9, 13e9)


def test_no_cold_experts_when_nothing_misses(ref):
    """Every expert resident, or a CPU plan (host RAM is what it computes from): no route to choose and
    the estimate is what it was without a host bandwidth."""
    for kw in ({"vram_gib": 24}, {"vram_gib": None, "resident_fraction": 0.5}):
        plan = speed_plan(ref, host=60e9, **kw)
        without = speed_plan(ref, **kw)
        assert plan.cold_experts is None and plan.cold_expert_ceilings is None
        assert plan.estimated_decode_tokens_per_s == without.estimated_decode_tokens_per_s
        assert plan.to_dict()["cold_experts"] is None
    assert speed_plan(ref, vram_gib=None, resident_fraction=0.5).device == "cpu"


def test_to_dict_is_json(ref):
    d = json.loads(json.dumps(plan_for(ref, 16).to_dict()))
    for key in ("fits", "resident_experts_per_layer", "device_bytes", "host_bytes", "max_context",
                "estimated_decode_tokens_per_s", "cold_experts", "estimated_decode_tokens_per_s_by_cold_experts",
                "breakdown"):
        assert key in d
    assert set(d["breakdown"]) >= {"embed", "attention", "mlp", "router", "norms", "experts_resident",
                                   "experts_host", "expert_cache_slots", "kv_cache", "kv_positions", "allocator_rounding", "workspace",
                                   "reserve"}


# Hardware -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * GIB), ("16GB", 16 * GIB), ("16G", 16 * GIB), ("16g", 16 * GIB), ("24 GiB", 24 * GIB),
    ("512MiB", 512 * MIB), ("1.5G", 3 * GIB // 2), (str(8 * GIB), 8 * GIB), (8 * GIB, 8 * GIB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "16XB", "-1G", "16", "G", "0GiB", "1e3G"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("60GB/s", 60e9), ("60 GB/s", 60e9), ("60gb/s", 60e9), ("60GB", 60e9), ("60G", 60e9), ("25.6e9", 25.6e9),
    ("4.8TB/s", 4.8e12), ("500MB/s", 5e8), ("1GiB/s", float(GIB)), (" 13 GB / s ", 13e9),
])
def test_parse_rate(text, expected):
    """Rates are decimal as vendors quote them (GB/s = 1e9 bytes/s), binary only when spelled GiB/s."""
    assert parse_rate(text) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("text", ["", "fast", "60", "-1GB/s", "0GB/s", "60XB/s", "GB/s", "60GB/h", "inf", "nan",
                                  "1e400", "0.5MB/s"])
def test_parse_rate_rejects(text):
    with pytest.raises(UsageError):
        parse_rate(text)


def test_format_rate():
    assert [format_rate(r) for r in (13e9, 54.6e9, 4.8e12, 5e8)] == ["13 GB/s", "54.6 GB/s", "4.8 TB/s", "500 MB/s"]


@pytest.mark.parametrize("name", ["4090", "rtx-4090", "RTX 4090", "rtx4090", "  Rtx_4090 "])
def test_gpu_preset_lookup(name):
    preset = gpu_preset(name)
    assert preset.name == "RTX 4090" and preset.memory_bytes == 24 * GIB and preset.bandwidth == 1008e9


def test_gpu_presets_cover_the_common_cards():
    assert gpu_preset("4060 ti").memory_bytes == 16 * GIB
    assert gpu_preset("3060").memory_bytes == 12 * GIB
    assert gpu_preset("a4000").name == "RTX A4000"
    assert gpu_preset("l4").name == "L4"
    assert gpu_preset("h100").bandwidth == 3350e9 and gpu_preset("H200").memory_bytes == 140 * GIB
    assert len({p.name for p in GPU_PRESETS}) == 16
    with pytest.raises(UsageError, match="RTX 5090"):
        gpu_preset("7090")


def test_preset_for_device_name():
    assert preset_for_device_name("NVIDIA GeForce RTX 4060 Ti").name == "RTX 4060 Ti 16GB"
    assert preset_for_device_name("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert preset_for_device_name("Tesla T4") is None


def test_detect_host_ram(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65000000 kB\nMemAvailable:   32000000 kB\n")
    assert detect_host_ram(meminfo) == 32000000 * 1024
    assert detect_host_ram() is None or detect_host_ram() > 0


def test_detect_gpu_never_raises():
    found = detect_gpu()
    assert found is None or found.free_bytes > 0
