"""`localrun fit`, run in-process (the `cli` fixture)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from localrun import hardware
from localrun.hardware import GIB
from localrun.plan import CUDA_CONTEXT_BYTES, device_budget, display_allowance

from test_families import REFERENCE
from test_plan import REFERENCE_CONFIG


def run_cli(cli, *argv) -> tuple[int, str, str]:
    return cli("fit", *argv)


def run_json(cli, *argv) -> dict:
    code, out, err = run_cli(cli, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # stdout holds JSON and nothing else


@pytest.fixture
def ref_dir(tmp_path):
    """A model directory holding only the 26B-A4B config.json, no weights."""
    (tmp_path / "config.json").write_text(json.dumps(REFERENCE_CONFIG))
    return tmp_path


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "detect_gpu", lambda: None)


def test_json_24gib_keeps_every_expert_on_the_gpu(cli, ref_dir):
    d = run_json(cli, ref_dir, "--vram", "24GiB", "--ram", "64GiB", "--context", 8192)
    assert d["fits"] is True
    assert d["resident_experts_per_layer"] == 128
    assert d["host_bytes"] == 0
    assert d["device_bytes"] <= 24 * GIB
    assert d["max_context"] >= 8192
    assert d["estimated_decode_tokens_per_s"] is None  # --vram alone says nothing about bandwidth
    assert d["breakdown"]["experts_resident"]["where"] == "device"
    assert d["breakdown"]["embed"]["precision"] == "bf16"


def test_json_16gb_card_offloads_part_of_the_experts(cli, ref_dir):
    d = run_json(cli, ref_dir, "--vram", "16GB", "--ram", "64GiB")
    assert d["fits"] is True
    assert 0 < d["resident_experts_per_layer"] < 128
    assert d["device_bytes"] <= 16 * GIB
    assert d["host_bytes"] > 0 and d["cache_slots"] > 0


def test_json_with_a_gpu_preset_estimates_speed(cli, ref_dir):
    d = run_json(cli, ref_dir, "--gpu", "rtx 4090", "--ram", "64GiB")
    assert d["target"] == "RTX 4090"
    assert d["gpu_bytes"] == 24 * GIB
    assert d["device_budget_bytes"] == device_budget(24 * GIB) == 24 * GIB - CUDA_CONTEXT_BYTES - display_allowance()
    assert 100 < d["estimated_decode_tokens_per_s"] < 200


def test_fp4_and_bf16_experts(cli, ref_dir):
    assert run_json(cli, ref_dir, "--gpu", "4090", "--ram", "64GiB", "--experts", "fp4")["fits"]
    code, out, err = run_cli(cli, ref_dir, "--gpu", "4090", "--ram", "64GiB", "--experts", "bf16", "--json")
    d = json.loads(out)
    assert d["expert_precision"] == "bf16"
    assert d["resident_experts_per_layer"] < 64  # 42.5 GiB of bf16 experts cannot sit on 24 GiB
    # ... and bf16 experts cannot stay in host RAM (the loader refuses that plan): does not fit, exit 1
    assert code == 1 and not d["fits"] and "need 4-bit experts (--experts nf4 or fp4)" in d["reason"]


def test_bf16_experts_that_all_fit_fit(cli, tiny_moe):
    d = run_json(cli, tiny_moe, "--vram", "8GiB", "--experts", "bf16")
    assert d["fits"] and d["resident_experts_per_layer"] == d["num_experts"]
    code, out, err = run_cli(cli, tiny_moe, "--vram", "8GiB", "--experts", "bf16", "--resident-experts", "0.5")
    assert code == 1 and "need 4-bit experts" in out + err


def test_forced_resident_fraction(cli, ref_dir):
    d = run_json(cli, ref_dir, "--vram", "24GiB", "--ram", "64GiB", "--resident-experts", "0.25")
    assert d["resident_experts_per_layer"] == 32


def test_table_report(cli, ref_dir):
    code, out, err = run_cli(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB")
    assert code == 0, err
    for text in ("component", "precision", "experts_resident", "experts_host", "kv_cache", "nf4", "RAM",
                 "fits with", "of 128 experts per layer", "longest context at this placement", "ceiling", "expected"):
        assert text in out, text


def test_fit_names_the_longest_context_any_placement_fits(cli, ref_dir):
    """A plan's max_context is the edge of its placement; more experts in host RAM reach further."""
    d = run_json(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB")
    assert d["max_context"] < d["longest_context"] <= REFERENCE_CONFIG["text_config"]["max_position_embeddings"]
    edge = run_json(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB", "--context", d["longest_context"])
    assert edge["fits"] and edge["resident_experts_per_layer"] < d["resident_experts_per_layer"]
    code, out, err = run_cli(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB", "--context", d["longest_context"] + 1)
    assert code in (1, 2)  # past it nothing fits (or past the model's positions)
    code, out, err = run_cli(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB")
    assert f"up to {d['longest_context']} with more experts in host RAM" in " ".join(out.split())


def test_table_says_why_it_does_not_fit(cli, ref_dir):
    code, out, err = run_cli(cli, ref_dir, "--vram", "4GiB", "--ram", "64GiB")
    assert code == 1 and err == ""  # the report, then exit 1 as the README says: scripts can test it
    assert "does not fit" in out


def test_detected_gpu_is_used_without_vram_or_gpu(cli, ref_dir, monkeypatch):
    found = hardware.DetectedGpu("NVIDIA GeForce RTX 4090", 20 * GIB, 24 * GIB)
    monkeypatch.setattr(hardware, "detect_gpu", lambda: found)
    d = run_json(cli, ref_dir, "--ram", "64GiB")
    assert d["gpu_bytes"] == 24 * GIB  # the card's total, as the loader plans: not what is free now
    assert d["device_budget_bytes"] == device_budget(24 * GIB)
    assert "RTX 4090" in d["target"] and d["estimated_decode_tokens_per_s"] > 0


def test_tiny_checkpoint_shapes_from_headers(cli, tiny_moe):
    d = run_json(cli, tiny_moe, "--vram", "2GiB", "--ram", "8GiB", "--context", 64)
    assert d["fits"] and d["num_experts"] == 8 and d["resident_experts_per_layer"] == 8


def test_config_that_disagrees_with_the_weights(cli, tiny_moe, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_moe, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["moe_intermediate_size"] = 192
    (model / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(cli, model, "--vram", "1GiB")
    assert code == 1 and "disagree" in err and "experts" in err


@pytest.mark.parametrize("argv, code, message", [
    (["--vram", "sixteen"], 2, "invalid size"),
    (["--vram", "16"], 2, "add a unit"),
    (["--vram", "0"], 2, "must be positive"),  # not "add a unit, e.g. 0GiB"
    (["--gpu", "7090"], 2, "unknown GPU"),
    (["--vram", "16GiB", "--gpu", "4090"], 2, "not both"),
    (["--vram", "16GiB", "--ram", "lots"], 2, "invalid size"),
    (["--vram", "16GiB", "--experts", "int8"], 2, "--experts"),
    (["--vram", "16GiB", "--context", "999999999"], 2, "exceeds"),
    (["--vram", "16GiB", "--resident-experts", "1.5"], 2, "--resident-experts"),
    (["--vram", "16GiB", "--host-bandwidth", "fast"], 2, "--host-bandwidth: invalid rate"),
    (["--vram", "16GiB", "--host-bandwidth", "60"], 2, "add a unit"),
    (["--vram", "16GiB", "--host-bandwidth", "0"], 2, "must be positive"),  # not "add a unit, e.g. 0GB/s"
    (["--vram", "16GiB", "--host-bandwidth", "0GB/s"], 2, "must be positive"),
    (["--vram", "16GiB", "--host-bandwidth=-60GB/s"], 2, "--host-bandwidth"),
    (["--cpu", "--vram", "16GiB"], 2, "--cpu plans for the CPU"),
    (["--cpu", "--gpu", "4090"], 2, "--cpu plans for the CPU"),
])
def test_usage_errors(cli, ref_dir, no_gpu, argv, code, message):
    got, out, err = run_cli(cli, ref_dir, *argv)
    assert got == code
    assert message in err and err.count("\n") == 1  # one line
    assert out == ""


def test_missing_model_dir(cli, tmp_path):
    code, out, err = run_cli(cli, tmp_path / "nope", "--vram", "16GiB")
    assert code == 1 and "not found" in err


def test_dir_without_config(cli, tmp_path):
    code, out, err = run_cli(cli, tmp_path, "--vram", "16GiB")
    assert code == 1 and "no config.json" in err


def test_expected_speed_is_the_ceiling_at_the_measured_efficiency(cli, ref_dir):
    """fit prints the bandwidth ceiling and the speed expected at the efficiency gpu_check measured,
    naming the GPU and the report it came from."""
    d = run_json(cli, ref_dir, "--gpu", "4090", "--ram", "64GiB")
    eff = hardware.DECODE_EFFICIENCY
    assert 0 < eff.bandwidth_fraction < 1 and eff.layer_seconds > 0
    layers = json.loads((ref_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    seconds = 1 / (d["estimated_decode_tokens_per_s"] * eff.bandwidth_fraction) + layers * eff.layer_seconds
    assert d["expected_decode_tokens_per_s"] == pytest.approx(1 / seconds)
    assert d["decode_efficiency"]["fraction_of_ceiling"] == pytest.approx(
        d["expected_decode_tokens_per_s"] / d["estimated_decode_tokens_per_s"])
    assert d["decode_efficiency"]["measured_on"] == eff.device and d["decode_efficiency"]["report"] == eff.report
    code, out, _ = run_cli(cli, ref_dir, "--gpu", "4090", "--ram", "64GiB")
    assert code == 0 and eff.device in " ".join(out.split()) and "ceiling" in out


def test_offloaded_experts_expect_the_offload_efficiency(cli, ref_dir, tmp_path):
    """With experts in host RAM every family decodes as graphs between the experts, a routing sync a
    layer: fit scales the ceiling by the efficiency measured in that placement, not the all-resident
    one, and says which (Qwen3-MoE too: 48 layers)."""
    eff = hardware.OFFLOAD_DECODE_EFFICIENCY
    assert eff.layer_seconds > hardware.DECODE_EFFICIENCY.layer_seconds
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text((REFERENCE / "qwen3-30b-a3b.config.json").read_text())
    for model, layers in ((ref_dir, 30), (qwen, 48)):
        d = run_json(cli, model, "--gpu", "4060ti", "--ram", "64GiB")
        assert d["host_bytes"] > 0
        assert d["expected_decode_tokens_per_s"] == pytest.approx(eff.expected_tokens_per_s(
            d["estimated_decode_tokens_per_s"], layers))
        assert d["decode_efficiency"]["measured"] == eff.measured


def flat(text: str) -> str:
    return " ".join(text.split())  # the terminal report wraps at the console's width


def test_cold_experts_computed_on_the_cpu_when_pcie_is_slow(cli, ref_dir):
    """A 4060 Ti copies over PCIe 4.0 x8 (13 GB/s): beside 60 GB/s host RAM the CPU computes the missed
    experts where they lie, and fit says so, with both rates and both ceilings."""
    d = run_json(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB", "--host-bandwidth", "60GB/s")
    assert d["host_bytes"] > 0
    assert d["host_bandwidth_bytes_per_s"] == 60e9 and d["host_bandwidth_assumed"] is False
    assert d["pcie_bandwidth_bytes_per_s"] == hardware.PCIE_GEN4_X8
    by_route = d["estimated_decode_tokens_per_s_by_cold_experts"]
    assert d["cold_experts"] == "cpu" and by_route["cpu"] > by_route["copy"]
    assert d["estimated_decode_tokens_per_s"] == by_route["cpu"]
    offloaded = hardware.OFFLOAD_DECODE_EFFICIENCY
    assert d["expected_decode_tokens_per_s"] == pytest.approx(offloaded.expected_tokens_per_s(by_route["cpu"], 30))
    code, out, _ = run_cli(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB", "--host-bandwidth", "60GB/s")
    out = flat(out)
    assert code == 0
    assert ("cold experts: computed on the CPU where they lie in host RAM at 60 GB/s, "
            "faster than copying them over PCIe at 13 GB/s") in out
    assert f"ceiling ~{by_route['cpu']:.0f} tokens/s vs ~{by_route['copy']:.0f} copied" in out
    assert "(assumed" not in out
    assert "copied: computing them on the CPU is not measured yet" in out  # the efficiency's label stays true


def test_cold_experts_copied_when_host_ram_is_slow(cli, ref_dir):
    """A 5080 copies over PCIe 5.0 x16 (50 GB/s): beside 10 GB/s host RAM copying wins."""
    d = run_json(cli, ref_dir, "--gpu", "5080", "--ram", "64GiB", "--host-bandwidth", "10e9")
    by_route = d["estimated_decode_tokens_per_s_by_cold_experts"]
    assert d["cold_experts"] == "copy" and by_route["copy"] > by_route["cpu"]
    assert d["estimated_decode_tokens_per_s"] == by_route["copy"]
    code, out, _ = run_cli(cli, ref_dir, "--gpu", "5080", "--ram", "64GiB", "--host-bandwidth", "10e9")
    out = flat(out)
    assert code == 0
    assert ("cold experts: copied over PCIe at 50 GB/s, faster than computing them on the CPU from host RAM "
            "at 10 GB/s") in out
    assert "not measured yet" not in out


def test_default_host_bandwidth_is_named_as_assumed(cli, ref_dir):
    d = run_json(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB")
    assert d["host_bandwidth_bytes_per_s"] == hardware.DEFAULT_HOST_BANDWIDTH and d["host_bandwidth_assumed"] is True
    assert d["cold_experts"] in ("copy", "cpu")
    code, out, _ = run_cli(cli, ref_dir, "--gpu", "4060ti", "--ram", "64GiB")
    assert code == 0 and "(assumed; --host-bandwidth sets it)" in flat(out)


def test_no_cold_experts_line_when_every_expert_is_resident(cli, ref_dir):
    d = run_json(cli, ref_dir, "--gpu", "4090", "--ram", "64GiB", "--host-bandwidth", "60GB/s")
    assert d["host_bytes"] == 0 and d["cold_experts"] is None
    assert d["estimated_decode_tokens_per_s_by_cold_experts"] is None
    code, out, _ = run_cli(cli, ref_dir, "--gpu", "4090", "--ram", "64GiB", "--host-bandwidth", "60GB/s")
    assert code == 0 and "cold experts" not in out


def test_a_tiny_model_is_bound_by_its_layers_not_its_bytes(cli):
    """The demo reads ~4 MB a token: its bandwidth ceiling is hundreds of thousands of tokens/s, but the
    measured time per layer bounds what fit expects far below that."""
    d = run_json(cli, "demo", "--gpu", "4090")
    layers = d["layers"]
    assert d["estimated_decode_tokens_per_s"] > 100_000
    assert d["expected_decode_tokens_per_s"] < 1 / (layers * hardware.DECODE_EFFICIENCY.layer_seconds)


def test_parallel_sequences_do_not_slow_one_token(cli, ref_dir):
    """serve --parallel N holds N KV caches, but a decoded token reads its own sequence's only."""
    one = run_json(cli, ref_dir, "--gpu", "5090", "--ram", "64GiB")
    eight = run_json(cli, ref_dir, "--gpu", "5090", "--ram", "64GiB", "--parallel", "8")
    assert eight["kv_bytes"] == pytest.approx(8 * one["kv_bytes"], rel=0.01)
    assert eight["host_bytes"] == one["host_bytes"] == 0  # 32 GB holds it all either way: same bytes a token
    assert eight["estimated_decode_tokens_per_s"] == pytest.approx(one["estimated_decode_tokens_per_s"])


def test_speeds_below_ten_keep_two_digits():
    from localrun.commands.fit import rate

    assert (rate(0.34), rate(7.25), rate(46.6), rate(0.0)) == ("0.34", "7.2", "47", "0")


def test_a_bad_display_allowance_names_its_variable(cli, ref_dir, monkeypatch):
    monkeypatch.setenv("LOCALRUN_DISPLAY_ALLOWANCE", "abc")
    code, out, err = run_cli(cli, ref_dir, "--vram", "16GiB")
    assert code == 2 and err.startswith("error: LOCALRUN_DISPLAY_ALLOWANCE: invalid size 'abc'") and err.count("\n") == 1


def test_a_bad_routing_profile_says_what_it_should_hold(cli, tiny_moe, tmp_path):
    import shutil

    model = shutil.copytree(tiny_moe, tmp_path / "m")
    for text in ('{"layer": {}}', '{"layers": [1, 2]}', '{"layers": {"x": [1]}}', "not json"):
        (model / "routing_profile.json").write_text(text)
        code, out, err = cli("run", str(model), "hi", "--device", "cpu", "-n", "1")
        assert code == 1 and err.count("\n") == 1 and "routing_profile.json" in err and "localrun profile" in err, err


def test_cpu_plan_is_what_the_cpu_loader_places(cli, tiny_moe):
    """fit --cpu plans what `run` on the CPU places: fp32 compute (KV cache and workspace) with the
    checkpoint's bf16 matrices kept bf16, every weight in host RAM, and a decode estimate from the
    host RAM's bandwidth and the CPU's measured efficiency."""
    import torch

    from localrun.loader import load_model

    d = run_json(cli, tiny_moe, "--cpu", "--ram", "64GiB", "--context", "600", "--host-bandwidth", "40GB/s")
    loaded = load_model(tiny_moe, dtype=None, context=600)  # run's default on the CPU: --dtype auto, fp32
    assert loaded.plan.dtype == "fp32" and loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert (d["device"], d["dtype"], d["fits"]) == ("cpu", "fp32", True)
    for key in ("device_bytes", "placed_device_bytes", "kv_bytes", "workspace_bytes", "host_bytes"):
        assert d[key] == getattr(loaded.plan, key), key
    assert d["reason"].startswith("runs on the CPU") and d["gpu_bytes"] is None
    assert d["host_bandwidth_bytes_per_s"] == 40e9  # what decode reads at on the CPU; no GPU rates
    assert d["gpu_bandwidth_bytes_per_s"] is None and d["pcie_bandwidth_bytes_per_s"] is None
    ceiling = 40e9 / (loaded.plan.decode_weight_bytes + loaded.plan.decode_kv_bytes + loaded.plan.active_expert_bytes)
    assert d["estimated_decode_tokens_per_s"] == pytest.approx(ceiling)
    eff = d["decode_efficiency"]
    assert eff["measured_on"] == hardware.CPU_DECODE_EFFICIENCY.device and eff["report"].startswith("docs/cpu/")
    assert d["cold_experts"] is None  # every expert is where the CPU computes it


def test_without_a_gpu_fit_plans_for_the_cpu_and_says_so(cli, ref_dir, no_gpu):
    code, out, err = run_cli(cli, ref_dir, "--ram", "64GiB")
    assert code == 0, err
    assert out.startswith("no GPU found: planned for the CPU") and "runs on the CPU" in out
    assert "CPU RAM" in out and "host RAM read at 50 GB/s (assumed" in out and "tokens/s" in out
    assert run_json(cli, ref_dir, "--ram", "64GiB")["device"] == "cpu"
    code, out, err = run_cli(cli, ref_dir, "--ram", "8GiB")
    assert code == 1 and "does not fit: host RAM needs" in out


def test_cpu_plan_keeps_the_weights_dtype_where_config_json_names_another(cli, tiny_moe, tmp_path):
    """The loader keeps the matrices in the dtype the safetensors hold, whatever config.json says: so
    does fit --cpu (a config without a dtype, or naming another, still plans the weights' bytes)."""
    from localrun.loader import load_model
    from localrun.tiny import tiny_config, write_checkpoint

    fp32 = write_checkpoint(tmp_path / "fp32", tiny_config("moe"), dtype=torch.float32)
    for name, value in (("no-dtype", None), ("says-bf16", "bfloat16")):
        model = tmp_path / name
        shutil.copytree(fp32, model)
        cfg = json.loads((model / "config.json").read_text())
        cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
        if value:
            cfg["dtype"] = value
        (model / "config.json").write_text(json.dumps(cfg))
        d = run_json(cli, model, "--cpu", "--ram", "64GiB", "--context", "600")
        loaded = load_model(model, dtype=None, context=600)
        assert loaded.model.embed_tokens.weight.dtype == torch.float32
        for key in ("device_bytes", "placed_device_bytes", "kv_bytes", "workspace_bytes", "host_bytes"):
            assert d[key] == getattr(loaded.plan, key), (name, key)
        assert d["breakdown"]["embed"]["precision"] == "fp32"


def test_cpu_plan_of_a_download_under_way_is_the_plan_of_its_config(cli, tiny_moe, tmp_path):
    """config.json and the shard index are there, not every shard yet: fit --cpu plans from config.json
    (as fit for a GPU does, and as for a directory holding config.json alone) instead of stopping at the
    missing shard."""
    partial, config_only = tmp_path / "partial", tmp_path / "config-only"
    partial.mkdir(), config_only.mkdir()
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copy(tiny_moe / name, partial / name)
    shard = sorted(tiny_moe.glob("model-*.safetensors"))[0]
    shutil.copy(shard, partial / shard.name)
    shutil.copy(tiny_moe / "config.json", config_only / "config.json")
    argv = ("--cpu", "--ram", "64GiB", "--context", "600")
    plans = [run_json(cli, model, *argv) for model in (partial, config_only)]
    assert plans[0].pop("model") != plans[1].pop("model") and plans[0] == plans[1]


def test_cpu_plan_names_the_precision_the_matrices_are_kept_in(cli, tiny_moe):
    """fp32 compute with bf16 matrices: the weight rows say bf16 (their bytes are), the norms fp32."""
    d = run_json(cli, tiny_moe, "--cpu", "--ram", "64GiB", "--context", "600")
    rows = d["breakdown"]
    assert (d["dtype"], rows["embed"]["precision"], rows["attention"]["precision"]) == ("fp32", "bf16", "bf16")
    assert rows["norms"]["precision"] == "fp32" and rows["kv_cache"]["precision"] == "fp32"


def test_cpu_plan_without_the_c_kernels_is_what_the_cpu_loader_places(cli, tiny_moe, monkeypatch, fresh_kernels):
    """Without the C kernels (LOCALRUN_CPU_KERNELS=0, or no compiler) a CPU run computes in bf16
    (loader.default_dtype): fit --cpu plans that, not fp32."""
    from localrun.loader import load_model

    monkeypatch.setenv("LOCALRUN_CPU_KERNELS", "0")
    d = run_json(cli, tiny_moe, "--cpu", "--ram", "64GiB", "--context", "600")
    loaded = load_model(tiny_moe, dtype=None, context=600)
    assert loaded.plan.dtype == d["dtype"] == "bf16"
    for key in ("device_bytes", "placed_device_bytes", "kv_bytes", "workspace_bytes", "host_bytes"):
        assert d[key] == getattr(loaded.plan, key), key
