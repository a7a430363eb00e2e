"""Placement invariants on tiny models: same tokens whatever the placement, the plan's bytes are
the loader's bytes on each tier, and the expert cache never outgrows its slots."""

from __future__ import annotations

import json

import pytest
import torch

from localrun.config import load_config
from localrun.engine import Engine
from localrun.loader import load_model
from localrun.plan import DEVICE, HOST
from localrun.prequant import quantize_checkpoint
from localrun.sampling import SamplingParams
from quant.spec import QuantSpec

torch.set_num_threads(1)


def run_json(cli, model_dir, *extra) -> dict:
    code, out, err = cli("run", model_dir, "What is 17 + 25?", "--json", "--logprobs", "--dtype", "float32",
                         "--ignore-eos", "-n", "24", "--device", "cpu", *extra)
    assert code == 0, err
    return json.loads(out)


def test_same_tokens_and_logprobs_whatever_the_placement(cli, tiny_moe):
    args = load_config(tiny_moe)
    runs = {f: run_json(cli, tiny_moe, *(["--resident-experts", f] if f else [])) for f in (None, "1.0", "0.25", "0")}
    base = runs[None]
    assert len(base["tokens"]) == 24
    for f, res in runs.items():
        assert res["tokens"] == base["tokens"], f
        assert res["logprobs"] == base["logprobs"], f  # exact: fp32, same kernels, same summation order
    assert runs["1.0"]["expert_cache"]["misses"] == 0
    cold = runs["0"]["expert_cache"]
    one_expert = sum(QuantSpec("nf4").nbytes(n) for n in (
        2 * args.moe_intermediate_size * args.hidden_size, args.hidden_size * args.moe_intermediate_size))
    assert cold["misses"] > 0 and cold["resident_hits"] == 0 and cold["cpu_experts"] == 0
    assert cold["bytes_copied"] == cold["misses"] * one_expert
    part = runs["0.25"]["expert_cache"]
    assert part["resident_hits"] > 0 and part["misses"] > 0


def _storage_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage shared by two tensors counts once)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def expert_payloads(loaded) -> dict[str, list]:
    """Every routed expert's 4-bit payload, by tier."""
    out = {DEVICE: [], HOST: []}
    for i, layer in enumerate(loaded.model.layers):
        if loaded.store is not None:
            out[DEVICE] += loaded.store.resident_payloads(i).values()
            out[HOST] += loaded.store.host_payloads(i).values()
        elif layer.moe and not isinstance(layer.experts, torch.nn.Module):  # QuantizedExperts
            out[DEVICE] += layer.experts.experts
    return out


def loaded_bytes(loaded) -> tuple[dict[str, int], int]:
    """What the loader actually holds: (bytes per tier, bytes of all distinct storages).

    device: the model's parameters and buffers except the RoPE inv_freq buffers (computed at load, not
    weights), bf16 experts included, plus the resident 4-bit experts. A tied embedding is one tensor
    (no lm_head exists), so it counts once, as in the plan, which has no lm_head entry when tied.
    host: the store's host-RAM experts. Each expert payload counts its own buffer; the distinct-storage
    total then checks that nothing else is held: on device=cpu a pre-quantized layer's experts are row
    views of one [E, bytes] tensor shared by both tiers (the same memory: on CPU both tiers are RAM).
    """
    seen: set = set()
    plain = [t for name, t in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]
             if not name.startswith("inv_freq_")]
    tiers = {DEVICE: _storage_bytes(plain, seen), HOST: 0}
    payloads = expert_payloads(loaded)
    distinct = tiers[DEVICE] + _storage_bytes([p.buffer for ps in payloads.values() for p in ps], seen)
    for tier, ps in payloads.items():
        tiers[tier] += sum(p.buffer.numel() * p.buffer.element_size() for p in ps)
    return tiers, distinct


def plan_bytes(plan) -> dict[str, int]:
    totals = {DEVICE: 0, HOST: 0}
    for placement in plan.placement.values():
        totals[placement.tier] += placement.nbytes
    return totals


@pytest.fixture(scope="session")
def prequantized(tiny_checkpoint, tmp_path_factory):
    """Pre-quantized copies of the tiny MoE: default NF4, and double-quant FP4 with 32-value blocks."""
    root = tmp_path_factory.mktemp("prequantized")
    return {
        "pq-nf4": quantize_checkpoint(tiny_checkpoint("moe"), root / "nf4", QuantSpec("nf4")),
        "pq-fp4-dq": quantize_checkpoint(tiny_checkpoint("moe"), root / "fp4dq", QuantSpec("fp4", 32, True)),
    }


@pytest.mark.parametrize("kind", ["moe", "moe_v", "pq-nf4", "pq-fp4-dq"])
@pytest.mark.parametrize("experts, fraction", [("nf4", 1.0), ("nf4", 0.5), ("nf4", 0.0), ("bf16", 1.0), ("fp4", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_bytes_are_the_loaded_bytes(tiny_checkpoint, prequantized, kind, experts, fraction, dtype):
    if kind.startswith("pq-"):
        if experts != "nf4":
            pytest.skip("a pre-quantized model holds its own expert format")
        model_dir, experts = prequantized[kind], None
    else:
        model_dir = tiny_checkpoint(kind)
    loaded = load_model(model_dir, dtype=dtype, experts=experts, resident_fraction=fraction)
    want = plan_bytes(loaded.plan)
    tiers, distinct = loaded_bytes(loaded)
    assert tiers == want
    store = loaded.store  # its cache slots are rows of the resident experts' tensor: the storage counts them
    slot_rows = 0 if store is None else sum(store.layer(i).slots * store.layer(i).nbytes_E[0] for i in store._layers
                                            if store.resident_payloads(i))
    assert distinct == want[DEVICE] + want[HOST] + slot_rows  # nothing held beyond the planned tensors
    assert (want[HOST] > 0) == (fraction < 1.0)
    if loaded.store is not None:  # the plan's host total is the experts' payload too
        assert loaded.plan.host_bytes == want[HOST]


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_cache_never_holds_more_experts_than_its_slots(tiny_moe, fraction):
    engine = Engine.load(tiny_moe, dtype=torch.float32, resident_fraction=fraction)
    store, args = engine.loaded.store, engine.loaded.args
    layers = [i for i, layer in enumerate(engine.model.layers) if layer.moe]
    assert engine.loaded.plan.cache_slots > 0
    most = {i: 0 for i in layers}

    def check(i):
        held = store.device_experts(i)
        assert len(held) <= store.layer(i).slots
        assert not held & store.layer(i).resident
        most[i] = max(most[i], len(held))

    hooks = [engine.model.layers[i].register_forward_hook(lambda m, a, o, i=i: check(i)) for i in layers]
    try:
        for _ in engine.stream(engine.encode_prompt("Count: 0, 1, 2, 3"), SamplingParams(), max_tokens=24,
                               ignore_eos=True):
            for i in layers:
                check(i)
    finally:
        for h in hooks:
            h.remove()
    # Not vacuous: the slots filled up, so evictions happened under the bound.
    assert all(most[i] == store.layer(i).slots for i in layers)
    assert store.stats()["copies"] > len(layers) * store.layer(layers[0]).slots
    assert args.num_experts - len(store.layer(layers[0]).resident) > store.layer(layers[0]).slots
