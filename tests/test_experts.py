"""ExpertStore: exact cache bookkeeping on scripted traces, slot bound, copy-vs-CPU, placement-invariant outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from localrun.experts import (
    CostModel,
    Counters,
    ExpertStore,
    LayerCache,
    LFUPolicy,
    LRUPolicy,
    calibrate,
)
from localrun.moe import activation, dispatch, expert_ffn

H, I, E, K = 16, 8, 8, 2
GELU = activation("gelu_pytorch_tanh")


@dataclass
class FP32Expert:
    """The simplest payload: the checkpoint's two matrices of one expert, fp32."""

    gate_up_2IH: torch.Tensor
    down_HI: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up_2IH, self.down_HI))

    def to(self, device, non_blocking=False) -> "FP32Expert":
        return FP32Expert(self.gate_up_2IH.to(device, non_blocking=non_blocking), self.down_HI.to(device, non_blocking=non_blocking))


def compute(p: FP32Expert, x_TH: torch.Tensor) -> torch.Tensor:
    return expert_ffn(x_TH, p.gate_up_2IH, p.down_HI, GELU)


def make_experts(layers: int = 2, seed: int = 0) -> dict[int, list[FP32Expert]]:
    g = torch.Generator().manual_seed(seed)
    return {
        layer: [FP32Expert(torch.randn(2 * I, H, generator=g), torch.randn(H, I, generator=g)) for _ in range(E)]
        for layer in range(layers)
    }


def reference(experts: list[FP32Expert], x_TH, ids_TK, w_TK) -> torch.Tensor:
    """All experts resident: plain dispatch on the original weights."""
    return dispatch(x_TH, ids_TK, w_TK, lambda e, x: compute(experts[e], x))


def one_call(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoded token routed to `ids`."""
    x_TH = torch.randn(1, H)
    return x_TH, torch.tensor([ids]), torch.full((1, len(ids)), 1.0 / len(ids))


def check_slots(store: ExpertStore, layer: int) -> None:
    cache = store.layer(layer)
    assert len(cache.cached) <= cache.slots
    assert store.device_experts(layer) == cache.cached
    assert not cache.cached & cache.resident


# ------------------------------------------------------------------------------- scripted traces, exact counts

# Single-expert accesses, 2 slots, nothing resident: expert 1 is popular, the rest are one-offs.
POPULAR_TRACE = [1, 2, 1, 3, 4, 1, 5, 1]


@pytest.mark.parametrize(
    "policy, hits, misses",
    [
        # LRU: 1M [1] 2M [1,2] 1H [2,1] 3M(-2) [1,3] 4M(-1) [3,4] 1M(-3) [4,1] 5M(-4) [1,5] 1H
        (LRUPolicy, 2, 6),
        # LFU: 1M 2M 1H(s1=2) 3M(-2, s=1) 4M(-3, s=1) 1H 5M(-4) 1H: the popular expert is never evicted
        (LFUPolicy, 3, 5),
    ],
)
def test_policy_on_scripted_trace(policy, hits, misses):
    cache = LayerCache([100] * E, resident=(), slots=2, policy=policy())
    for e in POPULAR_TRACE:
        cache.plan([(e, 1)])
        assert len(cache.cached) <= 2
    assert cache.counters == Counters(hits=hits, misses=misses, copies=misses, bytes_copied=100 * misses)


def test_store_counts_on_scripted_trace_with_resident():
    # 1 resident expert (0), 2 slots, LRU, top-2; hand-traced cache contents in comments (LRU first).
    trace = [
        ([0, 1], dict(hits=1, resident_hits=1, misses=1)),  # [1]
        ([1, 2], dict(hits=1, misses=1)),  # [1,2]
        ([3, 0], dict(hits=1, resident_hits=1, misses=1)),  # 3 evicts 1: [2,3]
        ([1, 2], dict(hits=1, misses=1)),  # 2 hit: [3,2]; 1 evicts 3: [2,1]
        ([3, 4], dict(misses=2)),  # 3 evicts 2, 4 evicts 1: [3,4]
        ([2, 3], dict(hits=1, misses=1)),  # 3 hit; 2 evicts 4: [3,2]
    ]
    experts = make_experts(layers=1)
    store = ExpertStore(experts, compute, resident={0: [0]}, slots=2, policy=LRUPolicy)
    nbytes = experts[0][0].nbytes
    for ids, want in trace:
        before = store.snapshot()
        x_TH, ids_TK, w_TK = one_call(ids)
        torch.testing.assert_close(store(0)(x_TH, ids_TK, w_TK), reference(experts[0], x_TH, ids_TK, w_TK), rtol=0, atol=0)
        misses = want.get("misses", 0)
        assert store.snapshot() - before == Counters(copies=misses, bytes_copied=misses * nbytes, **want)
        check_slots(store, 0)
    assert store.layer(0).cached == {3, 2}
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["bytes_copied"], stats["cpu_experts"]) == (5, 7, 7 * nbytes, 0)
    assert stats["hit_rate"] == pytest.approx(5 / 12)


def test_resident_experts_are_never_misses():
    store = ExpertStore(make_experts(layers=1), compute, resident={0: range(4)}, slots=1)
    for _ in range(3):
        store(0)(*one_call([0, 1]))
        store(0)(*one_call([2, 3]))
    assert store.stats()["misses"] == 0
    assert store.stats()["resident_hits"] == store.stats()["hits"] == 12
    assert store.layer(0).cached == set()


def test_lfu_aging_lets_recent_experts_win():
    def victim(half_life: float) -> int:
        p = LFUPolicy(half_life=half_life)
        for key in ["a", "a", "a", "b", "b"]:
            p.touch(key)
        p.insert("a")
        p.insert("b")
        return p.evict()

    assert victim(half_life=1e9) == "b"  # plain counts: a=3 > b=2
    assert victim(half_life=1.0) == "a"  # halving per access: a = 2+4+8 < b = 16+32


def test_lfu_rescaling_keeps_order_and_finite_scores():
    p = LFUPolicy(half_life=1.0)
    for i in range(3000):  # 2**3000 overflows a float without rescaling
        p.touch("hot" if i % 3 else "cold")
    p.insert("hot")
    p.insert("cold")
    assert p.evict() == "cold"
    assert all(math.isfinite(s) for s in p._score.values())


def test_policies_evict_members_only():
    for policy in (LRUPolicy(), LFUPolicy()):
        policy.touch(9)  # history of a non-member is not membership
        policy.insert(1)
        policy.insert(2)
        assert 9 not in policy and len(policy) == 2
        assert {policy.evict(), policy.evict()} == {1, 2}
        with pytest.raises(LookupError):
            policy.evict()


def test_copy_replacing_an_expert_of_the_same_call_waits_for_it():
    # 1 slot holding 7; a call hits 7 and misses 3, so 3 must replace 7: the copy is deferred until
    # 7 has been computed, and the output still matches.
    experts = make_experts(layers=1)
    store = ExpertStore(experts, compute, slots=1, policy=LFUPolicy)
    for ids in ([7], [7], [7, 3]):
        x_TH, ids_TK, w_TK = one_call(ids)
        torch.testing.assert_close(store(0)(x_TH, ids_TK, w_TK), reference(experts[0], x_TH, ids_TK, w_TK), rtol=0, atol=0)
        check_slots(store, 0)
    assert store.stats()["hits"] == 2 and store.layer(0).cached == {3}


# ------------------------------------------------------------------------- placement never changes the output


@pytest.mark.parametrize("policy", [LRUPolicy, LFUPolicy])
@pytest.mark.parametrize("resident_fraction", [1.0, 0.25, 0.0])
def test_outputs_equal_all_resident_dispatch(resident_fraction, policy):
    experts = make_experts(layers=2)
    n_resident = int(E * resident_fraction)
    resident = {layer: range(E - n_resident, E) for layer in experts}
    store = ExpertStore(experts, compute, resident=resident, slots=2, policy=policy)
    g = torch.Generator().manual_seed(1)
    # Prefill (more missing experts than slots: slots are streamed and reused) then decode steps.
    for T in [12, 1, 1, 3, 1, 1, 12, 1]:
        x_TH = torch.randn(T, H, generator=g)
        for layer in experts:
            ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
            w_TK = torch.rand(T, K, generator=g)
            got = store(layer)(x_TH, ids_TK, w_TK)
            want = reference(experts[layer], x_TH, ids_TK, w_TK)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            check_slots(store, layer)
    stats = store.stats()
    if resident_fraction == 1.0:
        assert stats["misses"] == 0
    else:
        assert stats["misses"] > 0 and stats["bytes_copied"] == stats["copies"] * experts[0][0].nbytes


# ------------------------------------------------------------------------------------------ copy or compute?


def test_expensive_copies_compute_on_cpu():
    experts = make_experts(layers=1)
    slow_bus = CostModel(h2d_bytes_per_s=1.0, cpu_s_per_token=1e-6)
    store = ExpertStore(experts, compute, resident={0: [0]}, slots=4, cost_model=slow_bus)
    for ids in ([0, 1], [2, 3], [1, 2]):
        x_TH, ids_TK, w_TK = one_call(ids)
        torch.testing.assert_close(store(0)(x_TH, ids_TK, w_TK), reference(experts[0], x_TH, ids_TK, w_TK), rtol=0, atol=0)
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["cpu_experts"], stats["copies"], stats["bytes_copied"]) == (1, 5, 5, 0, 0)
    assert store.layer(0).cached == set()


def test_cpu_computes_half_precision_calls_in_fp32():
    """A call in bf16 (a CUDA model) whose missing experts run on the CPU: the CPU side gets fp32
    (what its C kernels compute in), the caller gets its own dtype back."""
    experts = make_experts(layers=1)
    seen = []

    def recording(payload, x_TH):
        seen.append(x_TH.dtype)
        return compute(payload, x_TH.float()).to(x_TH.dtype)  # these test experts hold fp32 weights

    store = ExpertStore(experts, recording, resident={0: [0]}, slots=4,
                        cost_model=CostModel(h2d_bytes_per_s=1.0, cpu_s_per_token=1e-6))
    x_TH, ids_TK, w_TK = one_call([0, 3])
    y = store(0)(x_TH.bfloat16(), ids_TK, w_TK)
    assert y.dtype == torch.bfloat16 and store.stats()["cpu_experts"] == 1
    assert seen == [torch.bfloat16, torch.float32]  # the resident expert on the call's device and dtype, then the CPU's


def test_cheap_copies_fill_slots():
    experts = make_experts(layers=1)
    fast_bus = CostModel(h2d_bytes_per_s=1e12, cpu_s_per_token=1.0)
    store = ExpertStore(experts, compute, slots=4, cost_model=fast_bus)
    for ids in ([0, 1], [2, 3], [1, 2]):
        store(0)(*one_call(ids))
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["cpu_experts"], stats["copies"]) == (2, 4, 0, 4)
    assert store.layer(0).cached == {0, 1, 2, 3}


def test_token_count_flips_the_choice():
    # A copy costs 1 ms; CPU costs 0.1 ms per token: decode computes on CPU, a 50-token prefill copies.
    cost = CostModel(h2d_bytes_per_s=1e6, cpu_s_per_token=1e-4)
    assert cost.prefer_cpu(1000, 1) and not cost.prefer_cpu(1000, 50)
    cache = LayerCache([1000] * E, slots=2, cost_model=cost)
    assert [s.source for s in cache.plan([(0, 1), (1, 50)])] == ["cpu", "copy"]


def test_zero_slots_compute_everything_missing_on_cpu():
    store = ExpertStore(make_experts(layers=1), compute, resident={0: [0]}, slots=0)
    store(0)(*one_call([0, 5]))
    assert store.stats()["cpu_experts"] == 1 and store.stats()["copies"] == 0


def test_calibrate_on_cpu_measures_compute_and_frees_copies():
    cost = calibrate(make_experts(layers=1)[0][0], compute, "cpu", hidden_size=H, repeats=1)
    assert cost.h2d_bytes_per_s == math.inf and cost.copy_seconds(10**9) == 0.0
    assert 0 < cost.cpu_s_per_token < 1.0
    assert not cost.prefer_cpu(10**9, 1)


def test_bad_resident_ids_are_rejected():
    with pytest.raises(ValueError, match="resident"):
        ExpertStore(make_experts(layers=1), compute, resident={0: [E]})


# ------------------------------------------------------------------------------- prefetch (overlap copies)


def test_prefetch_starts_copies_early_and_changes_nothing_else():
    """prefetch(ids) fills the slots before run(); outputs and counters equal a plain run's."""
    experts = make_experts(layers=1)
    early = ExpertStore(experts, compute, resident={0: [0]}, slots=2)
    plain = ExpertStore(experts, compute, resident={0: [0]}, slots=2)
    for ids in ([0, 1], [2, 3], [1, 4], [5, 2]):
        x_TH, ids_TK, w_TK = one_call(ids)
        early(0).prefetch(ids_TK)
        missing = {e for e in ids if e != 0}
        assert missing <= early.device_experts(0)  # copies already started, before run
        got = early(0)(x_TH, ids_TK, w_TK)
        torch.testing.assert_close(got, plain(0)(x_TH, ids_TK, w_TK), rtol=0, atol=0)
        check_slots(early, 0)
    assert early.stats() == plain.stats()


def test_run_with_other_ids_than_prefetched_replans():
    experts = make_experts(layers=1)
    store = ExpertStore(experts, compute, slots=2)
    _, stale_TK, _ = one_call([1, 2])
    store(0).prefetch(stale_TK)
    x_TH, ids_TK, w_TK = one_call([3, 4])
    torch.testing.assert_close(store(0)(x_TH, ids_TK, w_TK), reference(experts[0], x_TH, ids_TK, w_TK),
                               rtol=0, atol=0)
    assert store.device_experts(0) == {3, 4}


@pytest.mark.parametrize("resident_n, slots, on_device", [(0, 2, "none"), (3, 1, "some"), (2, 4, "all"), (8, 0, "all")])
def test_device_rows_decode_reads_each_expert_where_it_lies(resident_n, slots, on_device):
    """A decoded token's layer as one MoE call over the layer's device rows (resident, then slots):
    the expert -> row map follows every copy and eviction, so each token equals the same op over a
    buffer of every expert (a wrong row would be another expert's weights), and the counters equal
    the per-expert path's."""
    from quant.ffn import BufferedExperts, DeviceRowsCompute, ffn_4bit
    from quant.layer import ExpertBuffer
    from quant.nf4 import pack_experts
    from quant.spec import QuantSpec
    from localrun.moe import activation

    E, H, I, K = 8, 64, 64, 3  # the blocksize (64) divides H and I, as QuantSpec.check_kernel_sizes asks
    g = torch.Generator().manual_seed(resident_n * 10 + slots)
    packed = pack_experts(torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1,
                          QuantSpec("nf4"))
    everything = BufferedExperts(ExpertBuffer.from_experts(packed), "gelu_pytorch_tanh")
    act = activation("gelu_pytorch_tanh")
    resident = {0: list(range(E - resident_n, E))}  # not the first ids: rows and ids differ
    rows = ExpertStore({0: packed}, lambda p, x: ffn_4bit(x, p, act), resident=resident, slots=slots,
                       device_compute=DeviceRowsCompute(packed[0].layout, "gelu_pytorch_tanh"))
    per_expert = ExpertStore({0: packed}, lambda p, x: ffn_4bit(x, p, act), resident=resident, slots=slots)
    calls = {"rows": 0}
    real = rows._run_on_device

    def counting(*a):
        calls["rows"] += 1
        return real(*a)

    rows._run_on_device = counting
    for t in range(40):
        ids = torch.randperm(E, generator=g)[:K][None, :]
        w = torch.softmax(torch.randn(1, K, generator=g), dim=-1)
        x = torch.randn(1, H, generator=g)
        want = everything(x, ids, w)
        got = rows(0)(x, ids, w)
        per_expert(0)(x, ids, w)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), t
    assert rows.stats() == per_expert.stats()
    # on the device whenever the call's experts fit there together (2 slots never hold 3 misses;
    # 4 slots always do, and then evict experts of earlier calls, whose rows the map hands on)
    assert calls["rows"] == {"none": 0, "all": 40}.get(on_device, calls["rows"]) and (on_device == "none") == (
        calls["rows"] == 0)
    check_slots(rows, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_read_in_place_equals_the_packed_copy(dtype):
    """On the CPU a decoded token's ids and weights are read where they are, not packed first: the
    same Python ints and floats as the pack's copy (what CUDA reads), each weight its fp32 value."""
    from localrun import moe

    g = torch.Generator().manual_seed(0)
    for T in (1, 3):
        ids = torch.randint(0, 128, (T, 8), generator=g)
        w = torch.softmax(torch.randn(T, 8, generator=g), dim=-1).to(dtype)
        routing = moe.RoutingToHost("cpu")
        got = routing.wait(routing.start(ids, w))
        want = moe._unpack_routing(moe._pack_routing(ids, w))
        assert got == want == (ids.tolist(), w.float().tolist())
        assert moe.routing_lists(ids, w) == want
        assert all(type(v) is int for row in got[0] for v in row)
        assert all(type(v) is float for row in got[1] for v in row)
