"""ExpertStore's prompt path through the grouped 4-bit GEMMs (quant.ffn.DeviceRowsPrefill): the waves
over the layer's device rows, run under TRITON_INTERPRET=1 on CPU tensors, against the per-expert path
and a bitsandbytes dequantize + fp32 matmul oracle, with the cache's counters and copy order checked.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads

import pytest
import torch

from localrun.experts import CostModel, ExpertStore, LFUPolicy, LRUPolicy, Step, waves
from localrun.moe import activation
from quant import ffn
from quant.ffn import DeviceRowsPrefill, ffn_4bit
from quant.nf4 import PackedExpert, pack_experts
from quant.spec import QuantSpec
from test_triton_moe import bnb_dequantize  # the oracle for one matrix

triton_moe = triton_module("triton_moe")
needs_triton = pytest.mark.skipif(triton_moe is None, reason="triton is not installed (pip install triton)")

E, H, I, K = 8, 64, 64, 2  # the blocksize (64) divides H and I: the per-expert path runs the C kernel
T = 20  # > quant.ffn.BUFFERED_MAX_TOKENS: a prompt
ACT = "gelu_pytorch_tanh"
RTOL = 1e-5


@pytest.fixture(autouse=True)
def waves_on(monkeypatch):
    """The waves are opt-in until a GPU measures them (quant.ffn.GROUPED_PREFILL_OFFLOADED): on here."""
    monkeypatch.setattr(ffn, "GROUPED_PREFILL_OFFLOADED", True)


def oracle(packed: list[PackedExpert], x_TH, ids_TK, w_TK) -> torch.Tensor:
    fn = activation(ACT)
    y = torch.zeros(x_TH.shape)
    for e in ids_TK.unique().tolist():
        tok, k = (ids_TK == e).nonzero(as_tuple=True)
        gate, up = (x_TH[tok] @ bnb_dequantize(packed[e], "gate_up").T).chunk(2, dim=-1)
        y.index_add_(0, tok, ((fn(gate) * up) @ bnb_dequantize(packed[e], "down").T) * w_TK[tok, k, None])
    return y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def stores(spec: QuantSpec, slots: int, policy, cost_model: CostModel | None = None, seed: int = 0):
    """(waves, per_expert, experts): the same placement twice, with and without the grouped prefill."""
    g = torch.Generator().manual_seed(seed)
    packed = pack_experts(torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1,
                          spec)
    act = activation(ACT)
    common = dict(resident={0: [5, 2]}, slots=slots, policy=policy, cost_model=cost_model)  # rows != ids
    grouped = ExpertStore({0: packed}, lambda p, x: ffn_4bit(x, p, act), **common,
                          device_prefill=DeviceRowsPrefill(packed[0].layout, ACT))
    per_expert = ExpertStore({0: packed}, lambda p, x: ffn_4bit(x, p, act), **common)
    return grouped, per_expert, packed


def prompt(seed: int, t: int = T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every expert hit, most of them by several tokens (ids repeat across tokens)."""
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    return torch.randn(t, H, generator=g), ids, torch.softmax(torch.randn(t, K, generator=g), dim=-1)


def watch(store: ExpertStore) -> list[tuple]:
    """Log ("copy", expert, victim) and ("wave", experts) in the order the store queues them."""
    log = []
    copy, begin = store._copy, store.device_prefill.begin

    def logged_copy(layer, step):
        log.append(("copy", step.expert, step.victim))
        copy(layer, step)

    def logged_begin(x_TH, top_k):
        call = begin(x_TH, top_k)
        run = call.wave

        def logged_wave(rows_RB, rows_TK, pairs, experts):
            ids = ids_of_rows(store, rows_TK, rows_RB.shape[0])
            assert len(ids) == experts and int((rows_TK < rows_RB.shape[0]).sum()) == pairs
            log.append(("wave", ids))
            run(rows_RB, rows_TK, pairs, experts)

        call.wave = logged_wave
        return call

    store._copy, store.device_prefill.begin = logged_copy, logged_begin
    return log


def ids_of_rows(store: ExpertStore, rows_TK: torch.Tensor, n_rows: int) -> set[int]:
    row_map = store._row_map[0]
    rows = set(rows_TK[rows_TK < n_rows].tolist())
    return {e for e in range(E) if row_map[e] in rows and (e in store.layer(0).resident or e in store._slots[0])}


class MRUPolicy(LRUPolicy):
    """Evicts the member inserted or touched last: once the slots are full every copy of a prompt
    replaces the one before it, which must then be computed in a wave of its own."""

    def evict(self):
        if not self._order:
            raise LookupError("no member to evict")
        return self._order.popitem(last=True)[0]


SPECS = [QuantSpec(q, 64, dq) for q in ("nf4", "fp4") for dq in (False, True)]
CASES = [(spec, 1, LRUPolicy) for spec in SPECS] + [(spec, 4, LFUPolicy) for spec in SPECS] + [
    (SPECS[1], 4, MRUPolicy), (SPECS[2], 4, MRUPolicy)]


@needs_triton
@pytest.mark.parametrize("spec, slots, policy", CASES, ids=[
    f"{s.quant_type}{'-dq' if s.double_quant else ''}-{n}slots-{p.__name__}" for s, n, p in CASES])
def test_waves_equal_the_per_expert_path(spec, slots, policy):
    """Three prompts, each hitting more experts than the slots hold: the grouped waves give the
    per-expert path's outputs (and the oracle's) within fp32 rounding, the same counters, no copy
    overwrites a row before the wave reading it is queued, and no wave of copies outgrows the slots."""
    grouped, per_expert, packed = stores(spec, slots, policy)
    log = watch(grouped)
    for call in range(3):
        x, ids, w = prompt(call)
        before = grouped.snapshot()
        if call == 1:  # the decoder's order: the plan (and its copies) starts right after the router
            grouped.prefetch(0, ids)
        y = grouped(0)(x, ids, w)
        want = per_expert(0)(x, ids, w)
        assert rel_err(y, want) < RTOL and rel_err(y, oracle(packed, x, ids, w)) < RTOL, call
        assert grouped.stats() == per_expert.stats(), call
        if call == 0:  # a cold cache: more misses than slots, so slots are refilled within the call
            assert grouped.stats(since=before)["copies"] > slots
    sizes = check_copy_order(log)
    assert max(sizes) <= max(1, slots // 2) and sizes.count(0) == 3  # one wave of on-device experts a call
    assert len(grouped.layer(0).cached) <= slots


def check_copy_order(log: list[tuple]) -> list[int]:
    """A copy replacing `victim` comes after the wave that read the victim (it is queued behind it on
    the device), the copied expert's wave after the copy, and a wave is either experts already on the
    device or copied ones. Returns each wave's copies."""
    pending = set()  # experts copied whose wave has not been queued yet
    sizes = []
    for event in log:
        if event[0] == "copy":
            _, expert, victim = event
            assert victim not in pending, f"copy of {expert} overwrites {victim} before its wave"
            pending.add(expert)
        else:
            copied = event[1] & pending
            assert copied in (set(), event[1])
            sizes.append(len(copied))
            pending -= copied
    assert not pending
    return sizes


@needs_triton
def test_experts_left_on_the_cpu_join_the_sum():
    """A cost model that leaves the experts of few tokens in host RAM: those are computed there and
    put into the same per-pair buffer; the rest still run in waves."""
    cost = CostModel(copy_latency_s=0.05, cpu_s_per_token=0.01)  # CPU below 5 tokens
    grouped, per_expert, packed = stores(QuantSpec("nf4", 64, True), 2, LRUPolicy, cost, seed=1)
    for call in range(2):
        x, ids, w = prompt(10 + call)
        ids[:12] = ids[0]  # two experts of many tokens: copied; the others few: on the CPU
        y = grouped(0)(x, ids, w)
        assert rel_err(y, per_expert(0)(x, ids, w)) < RTOL and rel_err(y, oracle(packed, x, ids, w)) < RTOL
    stats = grouped.stats()
    assert stats == per_expert.stats() and stats["cpu_experts"] > 0 and stats["copies"] > 0


@needs_triton
def test_switch_and_short_calls_take_the_per_expert_path(monkeypatch):
    """GROUPED_PREFILL_OFFLOADED off, or a call of at most BUFFERED_MAX_TOKENS tokens: no wave."""
    grouped, _, _ = stores(QuantSpec("nf4", 64, False), 2, LRUPolicy)
    log = watch(grouped)
    x, ids, w = prompt(0, ffn.BUFFERED_MAX_TOKENS)
    grouped(0)(x, ids, w)
    monkeypatch.setattr(ffn, "GROUPED_PREFILL_OFFLOADED", False)
    x, ids, w = prompt(1)
    grouped(0)(x, ids, w)
    assert not [ev for ev in log if ev[0] == "wave"]
    monkeypatch.setattr(ffn, "GROUPED_PREFILL_OFFLOADED", True)
    grouped(0)(x, ids, w)
    assert [ev for ev in log if ev[0] == "wave"]


def test_cpu_layer_call_is_unchanged():
    """On the CPU the whole layer is one C call (compute_layer) whatever device_prefill says."""
    from quant.ffn import CpuLayerCompute

    grouped, per_expert, packed = stores(QuantSpec("nf4", 64, True), 2, LRUPolicy)
    grouped.compute_layer = CpuLayerCompute(packed[0].layout, ACT)
    grouped.device_prefill.begin = None  # would fail if called
    x, ids, w = prompt(0)
    assert rel_err(grouped(0)(x, ids, w), per_expert(0)(x, ids, w)) < RTOL


def plan_steps(*steps: tuple) -> list[Step]:
    return [Step(e, source, 3, victim) for e, source, victim in steps]


def test_waves_split_where_a_copy_replaces_an_expert_of_the_wave():
    steps = plan_steps((0, "resident", None), (5, "hit", None), (1, "copy", None), (2, "copy", 7), (3, "copy", 5),
                       (4, "copy", 1), (6, "cpu", None), (7, "copy", 4))
    assert [[s.expert for s in w] for w in waves(steps, 4)] == [[0, 5], [1, 2, 3], [4], [7]]
    assert [[s.expert for s in w] for w in waves(steps, 2)] == [[0, 5], [1, 2], [3, 4], [7]]
    assert [[s.expert for s in w] for w in waves(steps[2:4], 1)] == [[1], [2]]
    assert waves(plan_steps((6, "cpu", None)), 1) == []
