"""Memory that is the plan, by construction: what the loader places equals what the plan counts,
it never grows while decoding, fit/plan/run agree on the cache slots, and the 26B-A4B plan for a
16 GiB card counts every byte (issue 11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from localrun import hardware, loader, moe
from localrun.config import load_config
from localrun.engine import Engine
from localrun.experts import ExpertStore, host_rows
from localrun.hardware import GIB
from localrun.plan import DEVICE, allocation_bytes, fused_groups
from localrun.sampling import SamplingParams
from quant.nf4 import pack_expert
from quant.spec import QuantSpec

torch.set_num_threads(1)
REFERENCE = Path(__file__).parent / "data" / "gemma-4-26B-A4B-it.config.json"


def placed_matches_plan(m: dict) -> bool:
    """device_bytes == planned_device_bytes, the KV cache (allocated at load) included."""
    return m["device_bytes"] == m["planned_device_bytes"] and m["kv_bytes"] == m["planned_kv_bytes"]


def run_json(cli, model_dir, *extra) -> dict:
    code, out, err = cli("run", model_dir, "What is 17 + 25?", "--json", "--dtype", "float32", "--ignore-eos",
                         "-n", "8", "--device", "cpu", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("fraction", ["1.0", "0.5", "0"])
def test_run_json_reports_the_planned_bytes_and_slots(cli, tiny_moe, fraction):
    mem = run_json(cli, tiny_moe, "--resident-experts", fraction)["memory"]
    assert placed_matches_plan(mem), mem
    args = load_config(tiny_moe)
    slots = 0 if fraction == "1.0" else args.top_k_experts  # per layer: the most one token misses
    assert mem["cache_slots"] == slots
    assert (mem["host_bytes"] > 0) == (fraction != "1.0") and mem["host_bytes"] == mem["planned_host_bytes"]
    assert mem["planned_rounding_bytes"] == 0  # the CPU allocator rounds nothing
    fit = json.loads(cli("fit", tiny_moe, "--vram", "2GiB", "--ram", "8GiB", "--resident-experts", fraction,
                         "--json")[1])
    assert fit["cache_slots"] == mem["cache_slots"] and fit["cache_slots_per"] == "layer"


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_memory_never_grows_during_a_long_decode(tiny_moe, fraction):
    engine = Engine.load(tiny_moe, dtype=torch.float32, resident_fraction=fraction, context=512)
    loaded = engine.loaded
    before = loader.memory_report(loaded)
    assert placed_matches_plan(before)
    assert before["cache_slots"] == loaded.plan.cache_slots == loaded.store.layer(0).slots
    ids = engine.encode_prompt("Count: 0, 1, 2, 3")
    n = sum(1 for _ in engine.stream(ids, SamplingParams(), max_tokens=200, ignore_eos=True))
    assert n == 200
    assert loaded.store.stats()["copies"] > 0  # the slots were exercised
    assert loader.memory_report(loaded) == before


def test_layer_buffers_hold_every_expert_as_row_views(tiny_moe):
    loaded = loader.load_model(tiny_moe, dtype=torch.float32, resident_fraction=0.5)
    store, plan = loaded.store, loaded.plan
    layers = [i for i, layer in enumerate(loaded.model.layers) if layer.moe]
    dev, host = store.device_tensors(), store.host_tensors()
    assert len(dev) == len(layers) and len(host) == len(layers)  # resident rows, then slot rows; host rows
    n, slots = plan.resident_experts_per_layer, plan.cache_slots
    assert {t.shape[0] for t in dev} == {n + slots} and slots > 0
    for i, rows in zip(layers, dev):
        storages = {p.buffer.untyped_storage().data_ptr() for p in store.resident_payloads(i).values()}
        assert storages == {rows.untyped_storage().data_ptr()}  # one device buffer per layer, slots included
        assert [p.buffer.data_ptr() for p in store.resident_payloads(i).values()] == [r.data_ptr() for r in rows[:n]]
        assert len({p.buffer.untyped_storage().data_ptr() for p in store.host_payloads(i).values()}) == 1
    # a forward pass fills slots in place: the same tensors, no new storage
    ptrs = [t.data_ptr() for t in dev]
    engine = Engine(loaded, None, None, ())
    for _ in engine.stream([2, 10, 11, 12], SamplingParams(), max_tokens=4, ignore_eos=True):
        pass
    assert [t.data_ptr() for t in store.device_tensors()] == ptrs


def test_fused_projections_are_one_allocation_each(tiny_moe):
    loaded = loader.load_model(tiny_moe, dtype=torch.float32, experts="nf4")
    model = loaded.model
    groups = fused_groups(name for name, _ in model.named_parameters())
    assert groups
    params = dict(model.named_parameters())
    for group in groups:
        storage = {params[n].untyped_storage().data_ptr() for n in group}
        assert len(storage) == 1
        assert params[group[0]].untyped_storage().nbytes() == sum(params[n].nbytes for n in group)
    attn = model.layers[0].self_attn
    assert attn.qkv[0].untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()


def test_a_group_member_stored_in_another_dtype_keeps_it(tmp_path):
    """Fused groups are one allocation in one dtype: a checkpoint whose router is fp32 beside a bf16
    dense MLP keeps the router fp32 (an fp32 CPU run stores bf16 matrices as bf16, others as they
    are), and that layer then computes its router on its own (no two-row GEMM)."""
    from safetensors.torch import load_file, save_file

    from localrun.tiny import tiny_config, write_checkpoint

    model_dir = write_checkpoint(tmp_path / "m", tiny_config("moe"), max_shard_bytes=None)
    shard = next(model_dir.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("layers.0.router.proj.weight"))
    tensors[name] = tensors[name].float() + 1e-3 * torch.randn(tensors[name].shape)  # values bf16 cannot hold
    save_file(tensors, str(shard), metadata={"format": "pt"})
    model = loader.load_model(model_dir, device="cpu", dtype=torch.float32, experts="bf16").model
    first, second = model.layers[0], model.layers[1]
    assert first.router.proj.weight.dtype == torch.float32 and torch.equal(first.router.proj.weight, tensors[name])
    assert first.stacked is None and first.mlp.gate_up[0].dtype == torch.bfloat16
    assert second.stacked is not None and second.router.proj.weight.dtype == torch.bfloat16


def test_fit_json_on_the_reference_config_counts_every_byte(cli, tmp_path, monkeypatch):
    shutil.copy(REFERENCE, tmp_path / "config.json")
    fit = json.loads(cli("fit", tmp_path, "--vram", "16GiB", "--ram", "64GiB", "--json")[1])
    device = [c["bytes"] for c in fit["breakdown"].values() if c["where"] == DEVICE]
    assert sum(device) == fit["device_bytes"] <= fit["device_budget_bytes"]
    assert fit["device_budget_bytes"] == 16 * GIB - fit["cuda_context_bytes"] - fit["display_allowance_bytes"]
    assert fit["placed_device_bytes"] + fit["rounding_bytes"] + fit["workspace_bytes"] + fit["reserve_bytes"] \
        == fit["device_bytes"]
    b = fit["breakdown"]
    assert b["expert_cache_slots"]["bytes"] == fit["cache_slots_bytes"] > 0
    assert fit["cache_slots"] == 8 and fit["moe_layers"] == 30
    assert 0 < fit["rounding_bytes"] < 200 * 2**20  # one allocation per layer buffer: small
    # the loader's plan under the same budget: the same function, the same numbers
    monkeypatch.setattr(loader, "detect_host_ram", lambda: 64 * GIB)
    args = load_config(tmp_path)
    plan = loader.load_plan(args, tmp_path, torch.device("cuda"), loader.expert_spec(tmp_path, None, args),
                            torch.bfloat16, vram=16 * GIB, context=None, resident_fraction=None,
                            stored_dtype=torch.bfloat16)
    theirs = plan.to_dict()
    ours = {k: v for k, v in fit.items() if k in theirs}
    assert ours == json.loads(json.dumps(theirs))


def test_allocation_rounding_follows_the_caching_allocator():
    assert allocation_bytes(1) == 512 and allocation_bytes(513) == 1024 and allocation_bytes(2**20) == 2**20
    assert allocation_bytes(2**20 + 1) == 2 * 2**20 and allocation_bytes(5 * 2**20) == 6 * 2**20
    assert allocation_bytes(0) == 0


def test_blocksize_must_divide_hidden_and_expert_sizes(cli, tiny_moe, tmp_path):
    with pytest.raises(ValueError, match="704"):
        QuantSpec("nf4", 128).check_kernel_sizes(2816, 704)
    QuantSpec("nf4", 64).check_kernel_sizes(2816, 704)
    code, out, err = cli("quantize", tiny_moe, tmp_path / "out", "--blocksize", "128", "--device", "cpu", "-q")
    assert code == 2 and "blocksize 128" in err and "64" in err and err.count("\n") == 1


def test_experts_no_blocksize_fits_are_refused_with_the_way_out(cli, tmp_path):
    """An expert size no 4-bit blocksize divides (40 here): run refuses the default nf4 in one line that
    names bf16 experts (run has no --blocksize), and runs with them."""
    from localrun.tiny import tiny_config, write_checkpoint

    model = write_checkpoint(tmp_path / "m", tiny_config("moe", moe_intermediate_size=40))
    code, out, err = cli("run", model, "hi", "-n", "1", "--raw")
    assert code == 2 and err.count("\n") == 1, err
    assert "no blocksize from 32 to 4096 divides both" in err and "--experts bf16" in err
    assert cli("run", model, "hi", "-n", "1", "--raw", "--experts", "bf16")[0] == 0


def test_pack_expert_into_a_row_is_the_same_bits():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(128, 64, generator=g), torch.randn(64, 64, generator=g)
    spec = QuantSpec("nf4")
    alone = pack_expert(gate_up, down, spec)
    rows = host_rows(3, alone.nbytes, pin=False)
    rows.fill_(7)  # padding must not keep what was there
    into = pack_expert(gate_up, down, spec, out=rows[1])
    assert torch.equal(into.buffer, alone.buffer) and into.buffer.data_ptr() == rows[1].data_ptr()
    assert torch.equal(rows[0], torch.full_like(rows[0], 7))


def test_one_routing_transfer_per_moe_layer_per_decoded_token(tiny_moe, monkeypatch):
    """The store's decode path asks the host for ids and weights once per layer (one copy, started
    right after the router; on the CPU, where they already are, one read of them) and calls no other
    tolist/item."""
    engine = Engine.load(tiny_moe, dtype=torch.float32, resident_fraction=0.25)
    layers = sum(layer.moe for layer in engine.model.layers)
    counts = {"routing": 0, "other": 0}
    state = {"in_store": False, "in_unpack": False}
    real_run, real_prefetch = ExpertStore.run, ExpertStore.prefetch
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def routing(real):  # the copy's unpacking (CUDA), or the read in place (CPU)
        def read(*a):
            counts["routing"] += 1
            state["in_unpack"] = True
            try:
                return real(*a)
            finally:
                state["in_unpack"] = False
        return read

    def in_store(real):
        def call(self, *a):
            state["in_store"] = True
            try:
                return real(self, *a)
            finally:
                state["in_store"] = False
        return call

    def watch(real):
        def call(self, *a):
            if state["in_store"] and not state["in_unpack"]:
                counts["other"] += 1
            return real(self, *a)
        return call

    ids = engine.encode_prompt("Hello")
    stream = engine.stream(ids, SamplingParams(), max_tokens=3, ignore_eos=True)
    next(stream)  # prefill + first token: syncs there are allowed
    for name in ("_unpack_routing", "_read_routing"):
        monkeypatch.setattr(moe, name, routing(getattr(moe, name)))
    monkeypatch.setattr(ExpertStore, "run", in_store(real_run))
    monkeypatch.setattr(ExpertStore, "prefetch", in_store(real_prefetch))
    monkeypatch.setattr(torch.Tensor, "tolist", watch(real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", watch(real_item))
    next(stream)  # one decoded token
    assert counts == {"routing": layers, "other": 0}
