"""scripts/gpu_check.py --dry: every step of the GPU check runs on the CPU, so the one command a
session lent a GPU runs first cannot rot between leases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_dry_run_writes_a_complete_report(tmp_path):
    env = dict(os.environ, GPU_CHECK_WINNERS="with_pdl, with_parallel_mlp, with_every_open_switch, no_such_side")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--dry"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["dry"] and set(steps) == {"env", "attention", "exact", "demo", "big", "kernels", "bench", "compiled"}
    assert not [name for name, value in steps.items() if "error" in value]
    assert set(report["triton_compiles"]) == set(steps)  # the interpreter compiles nothing
    assert all(costs["compiled"] == 0 for costs in report["triton_compiles"].values())
    for row in steps["exact"]["tiny"].values():  # CPU stand-in: the same device on both sides
        assert "error" not in row
        assert row.get("tokens_identical", True)
    assert steps["demo"]["correct"]
    for placement in steps["big"].values():
        if not isinstance(placement, dict):
            continue
        memory = placement["memory_after_load"]
        assert memory["device_bytes"] > 0 and memory["planned_device_bytes"] > 0
        assert placement["per_token_eager"]["aten_ops_per_token"] > 0
    for name, placement in steps["big"].items():  # memory against the plan, after the measurements above
        if not isinstance(placement, dict):
            continue
        for when in ("after_load", "after_decode", "at_end"):  # mem_get_info: CUDA only
            assert "skipped" in placement[f"memory_outside_torch_{when}"], placement[f"memory_outside_torch_{when}"]
        graphs = placement["graph_memory"]
        assert "error" not in graphs and set(graphs["buckets"]) == {"256", "512", "1024"}, graphs
        assert all(isinstance(g["reserved_bytes"], int) for g in graphs["buckets"].values())
        assert graphs["captured"] == [] and graphs["graphs_disabled"] is None  # the CPU captures nothing
    profile = steps["big"]["half"]["host_profile_eager"]  # offloaded: where the host's time goes
    assert profile["wall_ms_per_token"] > 0 and len(profile["top"]) > 5
    assert all(len(row) == 4 and row[1] > 0 and row[3] >= row[2] >= 0 for row in profile["top"])
    assert [row[2] for row in profile["top"]] == sorted((row[2] for row in profile["top"]), reverse=True)
    assert "host_profile_eager" not in steps["big"]["resident"]
    half = steps["big"]["half"]  # after the long prompt too (16 GiB read 1.8x slower there): counts, host profile
    assert half["per_token_segments_after_32"]["aten_ops_per_token"] > 0
    assert half["host_profile_segments_after_32"]["wall_ms_per_token"] > 0
    for speed in (half["speed_segments"], steps["big"]["resident"]["speed_static"]):  # each from its own stamps
        assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s_after_16"] > 0
        assert speed["decode_tokens_per_s_after_32"] > 0
    long = steps["big"]["half"]["long_prompt"]  # the dry run's stand-in for 16 GiB
    assert "error" not in long and long["out_of_memory"] is None, long
    assert long["prompt_tokens"] == 1024 and long["prefill_tokens_per_s"] > 0 and long["peak_reserved_bytes"] > 0
    assert list(long["decode"]) == ["2048"] and "reserved_bytes" in long["decode"]["2048"]
    assert "long_prompt" not in steps["big"]["resident"]
    waves, per_expert = steps["big"]["half"]["prefill_grouped_waves"], steps["big"]["half"]["prefill_per_expert"]
    assert waves["first_token"] == per_expert["first_token"] and waves["prefill_tokens_per_s"] > 0, (waves, per_expert)
    assert waves["expert_cache"]["hits"] > 0 and "prefill_grouped_waves" not in steps["big"]["resident"]
    resident = steps["big"]["resident"]  # each default decode kernel (dense_gemv too) switched off
    assert resident["per_token_static_sampled"]["aten_ops_per_token"] > 0  # every sampling filter on
    ab = resident["decode_ab_static"]  # the default and every switch, alternating (one round dry)
    assert {"default", "with_v4_moe", "with_v4_gate_up_moe", "with_pdl", "with_parallel_mlp",
            "with_parallel_mlp_and_norms_route", "without_fused_qkv_attention", "with_in_place_combine",
            "with_every_open_switch", "without_mlp_router_gemm", "without_dense_gemv", "with_fused_moe",
            "with_l2_prefetch", "with_l2_prefetch_of_the_next_qkv", "with_l2_prefetch_and_the_mlp",
            "with_down_prefetch", "with_pdl_and_early_moe"} <= set(ab), ab
    for side in (v for v in ab.values() if isinstance(v, dict)):
        assert set(side) == {"after_16", "after_32"} and all(r["tokens_per_s"] > 0 for r in side.values())
    assert ab["default"]["after_16"]["vs_default"] == 1.0
    both = resident["decode_ab_static_winners"]  # the sides GPU_CHECK_WINNERS names, combined, against the default
    assert both["sides"] == ["with_parallel_mlp", "with_pdl"] and set(both) == {"sides", "rounds", "tokens",
                                                                                "default", "winners"}
    assert both["winners"]["after_16"]["tokens_per_s"] > 0
    assert resident["tokens_static_winners"]["first_divergence_from_default"] is None
    assert "with_every_open_switch" in (tmp_path / "gpu_check.md").read_text()  # the A/B's table
    assert "per_token_static_with_every_open_switch" not in resident  # its parts' rows show it
    assert resident["per_token_static_with_pdl"]["aten_ops_per_token"] > 0  # dry: the winners' launches alone
    assert "per_token_static_with_v4_gate_up_moe" not in resident
    assert resident["tokens_static_without_fused_qkv_attention"]["first_divergence_from_default"] is None
    assert resident["tokens_static_with_parallel_mlp"]["first_divergence_from_default"] is None
    assert resident["tokens_static_with_parallel_mlp_and_norms_route"]["first_divergence_from_default"] is None
    assert resident["tokens_static_with_v4_moe"]["first_divergence_from_default"] is None  # the other MoE kernels
    kernels = steps["kernels"]
    assert all("error" not in v for k, v in kernels.items() if isinstance(v, dict))
    assert kernels["zero_copy"]["host_rows_equal"] and kernels["zero_copy"]["torch_pinned_equal"]  # rows by address
    gemv = {k: v for k, v in kernels.items() if k.startswith("gemv ") and "max_rel_err_triton" in v}
    assert {"gemv qkv sliding", "gemv mlp gate_up + router, 2 rows", "gemv lm_head"} <= set(gemv)  # interpreted ran
    assert all(v["max_rel_err_triton"] < 1e-2 for v in gemv.values())
    assert kernels["gemv per token"]["weight_bytes"] > 0
    assert kernels["gemv mlp down"]["us_triton_l2"] > 0  # the same weight replayed: from the L2 on a GPU
    gated = kernels["gated_gemv_route"]  # one launch against the two-row GEMM and gated_route: the same routing,
    # act(gate) * up within a few bf16 ulps (gate and up each rounded once after sums in another order)
    assert gated["ids_equal"] and gated["max_rel_diff_activated"] < 4 * 2 ** -7 and gated["us_fused"] > 0, gated
    probes = kernels["v4 probes"]  # what bounds the MoE kernels: each probe of each stage, both residencies
    assert all(probes[stage][name]["dram_us"] > 0 for stage in ("gate_up", "down") for name in ("as_is", "loads_only"))
    attention = kernels["decode attention, dry"]
    assert attention["combine_in_place"] == {"default": False, "identical_to_combine_kernel": True}, attention
    assert {"triton split-key", "triton split-key, combine kernel", "grouped_sdpa"} <= set(attention)
    prefill = kernels["prefill attention, dry"]  # the flash kernel (interpreted) vs the blocks, every tile timed
    assert prefill["triton flash"]["max_abs_err_vs_fp32"] < 5e-2 and prefill["sdpa math, blocks"]["us"] > 0
    from localrun.kernels.triton_prefill_attention import TILE_CHOICES
    assert set(prefill["tiles_us"]) == set(TILE_CHOICES)
    assert "error" not in resident["prefill_without_flash_attention"]
    bench = steps["bench"]  # the CLI as a user runs it, its table rendered from its JSON
    assert bench["report"]["measurements"][0]["decode_tokens_per_s"] > 0 and "| 128 | 4 |" in bench["table"]
    assert "gpu_check.md" in {p.name for p in tmp_path.iterdir()}
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "## big" in summary and "Memory against the plan" in summary and "1024-token prompt: prefill" in summary


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _noting(name: str, log: list):
    """An A/B side's switch (a context manager factory) that notes its name in `log` on the way in."""
    import contextlib

    @contextlib.contextmanager
    def within():
        log.append(name)
        yield
    return within


def test_decode_ab_alternates_the_sides_and_reports_medians(monkeypatch):
    """Each round runs every side once, starting one side later than the round before, each side's
    prompts warmed before they are timed; medians, spreads and ratios come from those rounds."""
    import contextlib

    check = _script()
    events, rate = [], {"a": iter([10.0, 30.0, 20.0]), "b": iter([5.0, 5.0, 8.0])}
    current = []  # the sides entered, the last the one on (they never nest)
    side = lambda name: _noting(name, current)  # noqa: E731

    class Cache:  # graphs: a step is captured on its first use (step.make_step), kept in cache.steps
        steps: dict = {}

    cache, captured = Cache(), []

    def warm(model, ids, n, dev, mode, cache):
        if "graphs" not in cache.steps:
            cache.steps["graphs"] = object()
            captured.append(current[-1])
        events.append(("warm", current[-1], ids))

    def timed_rate(model, ids, n, dev, mode, cache):
        events.append(("time", current[-1], ids))
        steps_of.setdefault(current[-1], set()).add(id(cache.steps["graphs"]))
        return next(rate[current[-1]]) if ids == [1] else 1.0

    def side_steps(name):  # as gpu_check's switches do: the steps dropped on the way in and out
        inner = side(name)

        @contextlib.contextmanager
        def within():
            cache.steps.clear()
            with inner():
                yield
            cache.steps.clear()
        return within
    steps_of: dict = {}
    monkeypatch.setattr(check, "greedy", warm)
    monkeypatch.setattr(check, "decode_rate", timed_rate)
    out = check.decode_ab(None, {"16": [1], "512": [2]}, 8, None, "graphs", cache,
                          {"a": side_steps("a"), "b": side_steps("b")}, 3)
    assert captured == ["a", "b"] and all(len(ids) == 1 for ids in steps_of.values())  # one capture a side
    order = [name for kind, name, ids in events if kind == "time" and ids == [1]]
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert events[:4] == [("warm", "a", [1]), ("time", "a", [1]), ("warm", "a", [2]), ("time", "a", [2])]
    assert out["a"]["after_16"] == {"tokens_per_s": 20.0, "rounds": [10.0, 30.0, 20.0], "spread": 1.0,
                                    "vs_default": 1.0}
    assert out["b"]["after_16"]["tokens_per_s"] == 5.0 and out["b"]["after_16"]["vs_default"] == 0.25
    assert out["b"]["after_512"]["vs_default"] == 1.0 and out["rounds"] == 3 and out["tokens"] == 8
    table = "\n".join(check.ab_summary({"resident": {"decode_ab_graphs": out}}))
    assert "| b | 5.0 (0.25x, ±30.0%) | 1.0 (1.0x, ±0.0%) |" in table


def test_decode_ab_near_the_deadline_keeps_the_rounds_so_far(monkeypatch):
    """No side starts that would end past the check's deadline (the slowest side of the round so far says
    how long one takes): the A/B stops with the rates it has, rather than the lease ending mid-A/B with
    none of them written; a side never measured says so, and the baseline always runs first."""
    import time

    check = _script()
    clock = {"now": 1000.0}
    monkeypatch.setattr(time, "time", lambda: clock["now"])
    monkeypatch.setattr(check.PROGRESS, "deadline", 1000.0 + 25)
    ran = []
    side = lambda name: _noting(name, ran)  # noqa: E731

    def rate(model, ids, n, dev, mode, cache):
        clock["now"] += 5.0  # each side's prompt takes 5 s: a side 10 s
        return 10.0

    monkeypatch.setattr(check, "greedy", lambda *a: None)
    monkeypatch.setattr(check, "decode_rate", rate)

    class Cache:
        steps: dict = {}

    out = check.decode_ab(None, {"16": [1], "512": [2]}, 8, None, "graphs", Cache(),
                          {"default": side("default"), "a": side("a"), "b": side("b")}, 3)
    assert ran == ["default", "a"]  # at 1020 b would end at 1030, past 1025
    assert out["stopped"] == "out of time (--deadline) in round 1"
    assert out["a"]["after_16"]["rounds"] == [10.0] and out["b"] == {"error": "not measured before the A/B stopped"}
    table = "\n".join(check.ab_summary({"resident": {"decode_ab_graphs": out}}))
    assert "Stopped: out of time (--deadline) in round 1" in table and "| b | not measured | not measured |" in table
    # a later round's first side is held to the round before's longest: round 1 ends at 1030; round 2's first
    # side (a, the rotation's) would end at 1040, past 1035
    clock["now"], ran[:] = 1000.0, []
    monkeypatch.setattr(check.PROGRESS, "deadline", 1000.0 + 35)
    out = check.decode_ab(None, {"16": [1], "512": [2]}, 8, None, "graphs", Cache(),
                          {"default": side("default"), "a": side("a"), "b": side("b")}, 3)
    assert ran == ["default", "a", "b"] and out["stopped"] == "out of time (--deadline) in round 2"
    monkeypatch.setattr(check.PROGRESS, "deadline", None)


def test_event_waits_are_counted_and_the_method_restored(monkeypatch):
    """per_token_counts counts the id's read (an event's synchronize, which torch's sync debug mode does
    not report) by wrapping the method for the measured generation only."""
    import torch

    check = _script()
    calls = []
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: calls.append(self))
    with check.event_waits_counted() as waits:
        torch.cuda.Event.synchronize("a")
        torch.cuda.Event.synchronize("b")
    torch.cuda.Event.synchronize("c")
    assert waits == [1, 1] and calls == ["a", "b", "c"]


def ab_row(*prompts: tuple[float, float]) -> dict:
    """An A/B side's row: (ratio to the default, spread) after each prompt."""
    return {f"after_{p}": {"tokens_per_s": 100 * r, "rounds": [], "spread": s, "vs_default": r}
            for p, (r, s) in zip((16, 512), prompts)}


def test_winners_beat_the_default_after_every_prompt_by_more_than_the_spreads():
    """A winner gains after both prompts by more than its spread and the default's; of alternatives (one
    family: v4 or v4's gate_up alone, the L2 prefetch's targets, PDL with or without the MoE kernels' early
    loads) the one whose lower ratio is higher; a side
    that combines others, a failed side, and a side with one prompt's gain only never win."""
    check = _script()
    ab = {"rounds": 3, "tokens": 96, "default": ab_row((1.0, 0.02), (1.0, 0.04)),
          "with_pdl": ab_row((1.05, 0.01), (1.05, 0.01)),  # +5% > the default's 4% spread: wins
          "with_parallel_mlp": ab_row((1.05, 0.01), (1.03, 0.01)),  # +3% after 512, within the default's 4%
          "with_v4_moe": ab_row((1.20, 0.05), (1.08, 0.05)),
          "with_v4_gate_up_moe": ab_row((1.10, 0.05), (1.10, 0.05)),  # v4's family: its lower ratio is higher
          "with_l2_prefetch": ab_row((1.30, 0.25), (1.30, 0.35)),  # its own spread is larger than the gain
          "with_every_open_switch": ab_row((1.5, 0.0), (1.5, 0.0)),
          "with_in_place_combine": {"error": "RuntimeError"},
          "without_dense_gemv": ab_row((0.8, 0.01), (0.8, 0.01))}
    assert check.winners(ab) == ["with_pdl", "with_v4_gate_up_moe"]
    ab["with_pdl_and_early_moe"] = ab_row((1.09, 0.01), (1.06, 0.01))  # PDL's family: the better of the two
    assert check.winners(ab) == ["with_pdl_and_early_moe", "with_v4_gate_up_moe"]
    ab["with_gated_gemv"] = ab_row((1.07, 0.01), (1.07, 0.01))  # inert with parallel_mlp: one dense-MLP path
    ab["with_parallel_mlp_and_norms_route"] = ab_row((1.08, 0.01), (1.06, 0.01))
    assert check.winners(ab) == ["with_gated_gemv", "with_pdl_and_early_moe", "with_v4_gate_up_moe"]
    assert check.winners({"default": {"error": "x"}, "with_pdl": ab["with_pdl"]}) == []
    assert check.winners({}) == []


def test_every_side_names_the_edit_that_makes_it_the_default():
    """Each open switch's A/B side (the combined one aside) and each decided one names the edit a session
    makes once it wins (SIDE_EDITS: a new side without one fails here), and the winners' table lists them."""
    check = _script()
    sides = check.open_switches(None)
    assert set(sides) - check.COMBINED_SIDES == set(check.SIDE_EDITS)
    decided = check.decided_switches(None)
    assert all(check.side_edit(tag) for tag in decided)
    assert check.side_edit("without_dense_gemv") == 'localrun/models/gemma4.py: DECODE_KERNELS["dense_gemv"] = False'
    import re

    for tag, edit in check.SIDE_EDITS.items():  # each names module settings that exist (a dict's keys too)
        for part in edit.split("; "):
            path, _, settings = part.partition(": ")
            text = (SCRIPT.parents[1] / path).read_text()
            for name, key in re.findall(r'\b([A-Z][A-Z0-9_]*)(?:\["(\w+)"\])? = ', settings):
                assert re.search(rf"^{name} = ", text, re.M), (tag, name)
                assert not key or f'"{key}": ' in text, (tag, key)
    winners = {"rounds": 3, "tokens": 96, "sides": ["with_gated_gemv", "with_pdl"],
               "default": ab_row((1.0, 0.01), (1.0, 0.01)), "winners": ab_row((1.1, 0.01), (1.1, 0.01))}
    table = "\n".join(check.ab_summary({"resident": {"decode_ab_graphs_winners": winners, "tokens_graphs_winners": {
        "first_divergence_from_default": None}}}))
    assert "first divergence from the default: None" in table
    assert '- `localrun/models/gemma4.py: DECODE_KERNELS["gated_gemv"] = True`' in table
    assert "- `localrun/kernels/triton_pdl.py: ENABLED = True`" in table


def test_a_side_that_raises_is_reported_and_the_others_still_measured(monkeypatch):
    """A switch whose kernel fails on the GPU (none ran there before) costs its own row only; a failing
    baseline fails the A/B (nothing to compare with)."""
    import contextlib

    check = _script()
    monkeypatch.setattr(check, "greedy", lambda *a, **k: None)
    monkeypatch.setattr(check, "decode_rate", lambda *a, **k: 10.0)
    calls = []

    @contextlib.contextmanager
    def broken():
        calls.append("broken")
        raise RuntimeError("PTX: unknown instruction")
        yield

    sides = {"default": contextlib.nullcontext, "broken": broken, "fine": contextlib.nullcontext}
    out = check.decode_ab(None, {"16": [1]}, 8, None, "static", None, sides, 3)
    assert out["broken"] == {"error": "RuntimeError: PTX: unknown instruction"} and calls == ["broken"]
    assert out["fine"]["after_16"]["rounds"] == [10.0] * 3 and out["default"]["after_16"]["vs_default"] == 1.0
    assert "| broken | error |" in "\n".join(check.ab_summary({"resident": {"decode_ab_static": out}}))
    with pytest.raises(RuntimeError):
        check.decode_ab(None, {"16": [1]}, 8, None, "static", None, {"default": broken, "fine": contextlib.nullcontext}, 1)
    turns = iter([contextlib.nullcontext(), contextlib.nullcontext(), broken()])  # the baseline fails in round 2

    out = check.decode_ab(None, {"16": [1]}, 8, None, "static", None,
                          {"default": lambda: next(turns), "fine": contextlib.nullcontext}, 3)
    assert out["stopped"] == "RuntimeError: PTX: unknown instruction"
    assert out["default"]["after_16"]["rounds"] == [10.0, 10.0] and len(out["fine"]["after_16"]["rounds"]) == 2


def test_idle_between_counts_only_time_no_interval_covers():
    check = _script()
    assert check.idle_between([]) == 0.0
    assert check.idle_between([(0.0, 2.0), (3.0, 4.0), (4.5, 5.0)]) == 1.5
    assert check.idle_between([(3.0, 4.0), (0.0, 2.0)]) == 1.0  # in any order
    assert check.idle_between([(0.0, 10.0), (2.0, 3.0), (11.0, 12.0)]) == 1.0  # a second stream's kernel inside


def test_past_the_deadline_nothing_more_is_measured_and_the_report_says_so(tmp_path):
    import time

    check = _script()
    ran = []

    def step(dry):
        out: dict = {}
        check.timed("first", lambda: ran.append("first") or 1, out)
        check.PROGRESS.deadline = time.time() - 1  # the lease runs out here
        check.timed("second", lambda: ran.append("second") or 2, out)
        return out

    check.STEP_FUNCTIONS = {"one": step, "two": lambda dry: ran.append("two") or {}}
    check.STEPS = {"one": 10, "two": 10}
    report = check.run_steps(["one", "two"], True, tmp_path, inline=True, deadline=time.time() + 60)
    assert ran == ["first"]
    assert report["steps"]["one"]["first"] == 1 and report["steps"]["one"]["second"] == check.SKIPPED
    assert report["steps"]["two"] == check.SKIPPED
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["two"]["skipped"].startswith("out of time")


def test_a_step_stopped_midway_keeps_what_it_measured(tmp_path):
    """Inline, the report on disk holds each measurement as it ends (a lease that ends mid-step
    keeps them); a step that dies reports its error with them."""
    check = _script()
    seen_on_disk = []

    def step(dry):
        out: dict = {}
        check.timed("outer", lambda: check.timed("inner", lambda: 7, out) and 8, out)
        on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
        seen_on_disk.append(on_disk["steps"]["one"])
        assert on_disk["triton_compiles"]["one"] == {"compiled": 0, "compile_s": 0.0, "cache_hits": 0}
        raise KeyboardInterrupt("killed")

    check.STEP_FUNCTIONS = {"one": step}
    report = check.run_steps(["one"], True, tmp_path, inline=True)
    assert seen_on_disk[0]["error"] == check.UNFINISHED and "triton_compiles" not in seen_on_disk[0]
    assert seen_on_disk[0]["partial"] == {"outer / inner": 7, "outer": 8}
    value = report["steps"]["one"]
    assert value["error"].startswith("KeyboardInterrupt") and value["partial"] == {"outer / inner": 7, "outer": 8}
    assert "Measured before it stopped" in (tmp_path / "gpu_check.md").read_text()


def test_a_child_over_its_time_limit_reports_its_partial_result(tmp_path, monkeypatch):
    check = _script()

    def run(cmd, timeout):  # the child measured one thing, then hung
        result = Path(cmd[cmd.index("--result") + 1])
        result.write_text(json.dumps({"error": check.UNFINISHED, "partial": {"speed": 1.5},
                                      "triton_compiles": {"compiled": 7, "compile_s": 5.2, "cache_hits": 0}}))
        raise check.subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(check.subprocess, "run", run)
    report = check.run_steps(["env"], False, tmp_path)
    assert report["steps"]["env"]["error"] == f"timed out after {check.STEPS['env']} s"
    assert report["steps"]["env"]["partial"] == {"speed": 1.5}
    assert report["triton_compiles"]["env"]["compiled"] == 7  # what compiling cost before the limit


def test_deadline_must_be_positive(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        _script().main([str(tmp_path), "--dry", "--deadline", "0"])
    assert e.value.code == 2 and "--deadline must be a positive" in capsys.readouterr().err


def test_fit_efficiency_reproduces_the_h200_figures_localrun_ships(monkeypatch):
    """From the H200 report's numbers (docs/gpu/2026-11-27-h200-resident.md, the Triton GEMVs on: 293.49
    tok/s; weight kernels 2,385.9 us of a token; 6.08 GB a token; 30 layers) the check derives
    hardware.DECODE_EFFICIENCY's two figures, so a later run's can be copied there."""
    import torch

    from localrun import hardware

    check = _script()
    names = ["_gate_up_v2_kernel", "nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT", "_down_v4_kernel",
             "void cublasLt::splitKreduce_kernel<32, 16, int, float", "_gemv_kernel", "_gate_up_grouped_kernel"]
    others = ["_decode_partial_kernel", "_route_kernel", "_rms_norm_kernel", "_ffn_residual_kernel",
              "void at::native::index_elementwise_kernel<128, 4>", "_qkv_write_kernel"]
    assert all(map(check.is_weight_kernel, names)) and not any(map(check.is_weight_kernel, others))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H200")
    got = check.fit_efficiency(293.49, {"weight_kernels_us_per_token": 2385.9}, 6_075_555_900, 30, "cuda")
    want = hardware.DECODE_EFFICIENCY
    assert got["preset"] == "H200"
    assert abs(got["bandwidth_fraction"] - want.bandwidth_fraction) < 0.002
    assert abs(got["layer_seconds"] - want.layer_seconds) < 1e-6
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Some Future GPU")
    assert "skipped" in check.fit_efficiency(223.8, {"weight_kernels_us_per_token": 2611.0}, 6_075_555_900, 30,
                                              "cuda")


def test_a_measurement_that_would_end_past_the_deadline_is_skipped(tmp_path):
    import time

    check = _script()
    out: dict = {}
    check.PROGRESS.deadline = time.time() + 60
    try:
        assert check.timed("quick", lambda: 1, out, needs=10) == 1
        assert "needs about 120 s" in check.timed("slow", lambda: 2, out, needs=120)["skipped"]
    finally:
        check.PROGRESS.deadline = None


def test_memory_outside_torch_is_what_the_allocator_does_not_hold(monkeypatch):
    import types

    import torch

    from localrun.plan import CUDA_CONTEXT_BYTES

    check = _script()
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (60 * gib, 80 * gib))  # (free, total)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 19 * gib)
    step, cache = types.SimpleNamespace(_graphs={1024: 0, 256: 0}), types.SimpleNamespace(steps={})
    cache.steps["graphs"] = step
    got = check.memory_outside_torch(torch.device("cuda"), cache)
    assert got["outside_torch_bytes"] == gib and got["planned_bytes"] == CUDA_CONTEXT_BYTES
    assert got["graph_spans"] == {"graphs": [256, 1024]}  # the graphs alive as it was taken
    assert got["over_plan_bytes"] == gib - CUDA_CONTEXT_BYTES
    assert "skipped" in check.memory_outside_torch(torch.device("cpu"))


def _tiny_loaded(tmp_path):
    import torch

    from localrun.loader import load_model
    from localrun.tiny import tiny_config, write_checkpoint

    return load_model(write_checkpoint(tmp_path / "m", tiny_config("moe")), device="cpu", dtype=torch.float32,
                      context=1024)


def test_long_prompt_out_of_memory_is_reported_and_the_check_goes_on(tmp_path, monkeypatch):
    """An out-of-memory in the long prompt is its answer: reported with the counters at that moment,
    freed, the step's `_load` its class's again, and the run (the next measurement) goes on."""
    import torch

    check = _script()
    loaded = _tiny_loaded(tmp_path)
    dev = torch.device("cpu")

    def greedy(model, ids, n, dev, step="eager", cache=None, params=None):
        assert len(ids) == 1022  # the context (1024) less the two decoded tokens
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(check, "greedy", greedy)
    got = check.long_prompt_run(loaded.model, loaded, dev, "static", loaded.model.args.vocab_size, 8192, None)
    assert got["out_of_memory"].startswith("CUDA out of memory") and got["at_out_of_memory"]["peak_reserved"] > 0
    assert "prefill_s" not in got and got["decode"] == {} and got["prefill_transient_bytes"] >= 0
    assert "_load" not in vars(loaded.kv.steps["static"])
    monkeypatch.undo()
    again = check.long_prompt_run(loaded.model, loaded, dev, "static", loaded.model.args.vocab_size, 300, None)
    assert again["out_of_memory"] is None and again["prompt_tokens"] == 300 and list(again["decode"]) == ["512"]


def test_graph_memory_notes_each_bucket_at_its_first_token(tmp_path):
    import torch

    check = _script()
    loaded = _tiny_loaded(tmp_path)
    got = check.graph_memory(loaded.model, loaded, torch.device("cpu"), "static", loaded.model.args.vocab_size)
    assert {span: g["position"] for span, g in got["buckets"].items()} == {"256": 128, "512": 256, "1024": 512}
    assert all(g["seconds"] >= 0 and "allocated_bytes" in g for g in got["buckets"].values())
    assert got["reserved_bytes"] == sum(g["reserved_bytes"] for g in got["buckets"].values())
    assert "_load" not in vars(loaded.kv.steps["static"])


def test_memory_summary_reads_the_cuda_figures():
    check = _script()
    mib = 1 << 20
    outside = {"outside_torch_bytes": 700 * mib, "planned_bytes": 500 * mib, "over_plan_bytes": 200 * mib}
    rows = {"memory_after_load": {}, "memory_outside_torch_after_load": outside,
            "memory_outside_torch_after_decode": outside, "memory_outside_torch_at_end": {"error": "x"},
            "graph_memory": {"mode": "segments", "counters": "torch allocator", "captured": [256, 512],
                             "buckets": {"256": {"reserved_bytes": 40 * mib}, "512": {"reserved_bytes": 2 * mib}},
                             "reserved_bytes": 42 * mib, "allocated_bytes": 30 * mib, "graphs_disabled": None},
            "long_prompt": {"prompt_tokens": 8190, "prefill_s": 20.0, "prefill_tokens_per_s": 409.5,
                            "peak_reserved_bytes": 16000 * mib, "prefill_transient_bytes": 600 * mib,
                            "workspace_bytes": 498 * mib, "headroom_bytes": -10 * mib,
                            "device_budget_bytes": 15990 * mib, "margin_bytes": -210 * mib,
                            "out_of_memory": "CUDA out of memory", "counters": "torch allocator"}}
    text = "\n".join(check.memory_summary({"seconds": 1, "16GiB": rows}))
    assert "outside torch 700.0 MiB after load, 700.0 MiB after decode (plan.CUDA_CONTEXT_BYTES 500.0 MiB)" in text
    assert "graphs for spans [256, 512]: reserved +42.0 MiB" in text and "256: +40.0 MiB" in text
    assert "8190-token prompt: prefill 409.5 tok/s" in text and "headroom -10.0 MiB" in text and "OUT OF MEMORY" in text


def test_forced_logprobs_are_greedy_logprobs_of_the_same_tokens(tmp_path):
    """Teacher forcing (the exact step's same-token comparison): fed a run's own greedy tokens, the
    logprobs are that run's; fed other tokens, their own log_softmax."""
    import torch

    check = _script()
    loaded = _tiny_loaded(tmp_path)
    ids = [2, 300, 301, 302, 7]
    tokens, lp = check.greedy(loaded.model, ids, 6, torch.device("cpu"), "static", loaded.kv)
    assert check.forced_logprobs(loaded.model, ids, tokens, "static", loaded.kv) == lp
    other = [t + 1 for t in tokens]
    forced = check.forced_logprobs(loaded.model, ids, other, "eager", loaded.kv)
    assert all(x < y for x, y in zip(forced[:1], lp[:1]))  # not the argmax
    logits = loaded.model(torch.tensor([ids + other[:-1]]))[0, len(ids) - 1:].float()
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(other)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(forced), want, atol=1e-4)


def test_logprob_diff_before_stops_at_the_first_divergence():
    check = _script()
    got = check.logprob_diff_before(([1, 2, 3, 4], [-1.0, -2.0, -3.0, -9.0]), ([1, 2, 5, 4], [-1.5, -2.1, -1.0, -9.0]))
    assert got == {"first_divergence": 2, "max_logprob_diff_before_it": 0.5}
    assert check.logprob_diff_before(([7], [-1.0]), ([8], [-1.25]))["max_logprob_diff_before_it"] == 0.25
    assert check.logprob_diff_before(([1, 2], [-1.0, -2.0]), ([1, 2], [-1.0, -2.5]))["first_divergence"] is None


def test_dry_exact_step_reports_the_bf16_noise_floor_beside_the_glue_row(tmp_path):
    """The bf16 vs fp32 row carries the unfused bf16 run's logprob difference (bf16's own rounding
    noise), which the fused-glue row's difference is read against (docs/gpu/README.md)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--dry", "--only", "exact"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["exact"]["tiny"]
    floor = rows["tiny bf16 vs fp32 on cpu"]
    assert floor["max_logprob_diff_before_it"] >= 0
    assert set(floor["unfused, static step"]) == {"first_divergence", "max_logprob_diff_before_it"}
    glue = rows["tiny bf16 fused glue vs unfused, static step"]
    same = glue["max_logprob_diff_vs_fp32_on_its_tokens"]
    assert same["fused"] == same["unfused"] > 0  # the CPU takes no half-precision glue: the same run twice
    assert glue["first_divergence"] is None and glue["max_logprob_diff_before_it"] == 0


def test_probes_mode_runs_only_the_probes_and_the_gemv_rows(monkeypatch):
    """GPU_CHECK_KERNELS=probes (a lease's first call, before `big`): what bounds the MoE kernels and the
    GEMVs, the one-launch MoE kernel against the two-launch ones, and none of the kernels step's slower rows
    (the full MoE sweeps, attention, zero-copy)."""
    check = _script()
    ran = []
    monkeypatch.setenv("GPU_CHECK_KERNELS", "probes")
    monkeypatch.setattr(check, "v4_probes", lambda dev, dry: ran.append("probes") or {"as_is": 1})
    monkeypatch.setattr(check, "dense_gemv_cases", lambda dev, dry, out: ran.append("gemv") or out.update(g=1))
    monkeypatch.setattr(check, "zero_copy_probe", lambda dry: ran.append("zero_copy"))
    out = check.step_kernels(dry=True)
    assert ran == ["probes", "gemv"]
    assert set(out) == {"v4 probes", "decode nf4 bs64 one launch", "g"}  # v5 against v4 and v2, exact
    assert set(out["decode nf4 bs64 one launch"]["configs"]) == {"v5 autotuned", "v4 autotuned", "v2 autotuned"}
    one = out["decode nf4 bs64 one launch"]
    assert one["max_rel_err"] < 1e-5 and one["configs"]["v5 autotuned"]["fused_left_zero"] is True
    assert all(row["max_rel_err_dtype"] < 1e-2 for row in one["configs"].values())  # the timed bf16 calls' output


COMPILE_TWICE = """
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
import triton, triton.language as tl
from triton import knobs
import gpu_check, sass_stats

@triton.jit
def _scaled(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2.0, mask=i < n)

before = object()
knobs.compilation.listener = before
knobs.cache.dir = tempfile.mkdtemp()
counted = gpu_check.TritonCompiles()
with counted.listening():
    for _ in range(2):  # the second is a cache hit
        sass_stats.compile_kernel(_scaled, {"BLOCK": 64}, 1, 90, {"x_ptr": "*fp32", "y_ptr": "*fp32"})
print(json.dumps({**counted.value(), "restored": knobs.compilation.listener is before}))
"""


def test_triton_compiles_are_counted_with_their_seconds_and_the_listener_restored(tmp_path):
    pytest.importorskip("triton")
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton without its NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    script = tmp_path / "compile_twice.py"  # @triton.jit reads its source from a file
    script.write_text(COMPILE_TWICE)
    run = subprocess.run([sys.executable, str(script), str(SCRIPT.parent)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    counted = json.loads(run.stdout.splitlines()[-1])
    assert counted["compiled"] == 1 and counted["cache_hits"] == 1 and counted["restored"]
    assert counted["compile_s"] > 0


def test_the_report_names_what_triton_compiled_in_each_step():
    check = _script()
    report = {"dry": False, "started": "now", "steps": {}}
    for step, compiled in (("env", 0), ("kernels", 42)):  # as run_child hands each step's value over
        value = {"seconds": 1.0 + compiled, "triton_compiles": {"compiled": compiled, "compile_s": 0.75 * compiled,
                                                                "cache_hits": 3}, "row": 1}
        report["steps"][step] = check.compile_costs(report, step, value)
    assert report["steps"]["kernels"] == {"seconds": 43.0, "row": 1}
    assert report["triton_compiles"]["kernels"] == {"compiled": 42, "compile_s": 31.5, "cache_hits": 3}
    text = check.markdown(report)
    assert "## env (1.0 s)" in text and "## kernels (43.0 s; Triton compiled 42 kernels in 31.5 s)" in text


def test_the_report_opens_with_issue_12s_bar():
    """The floor from env's copy bandwidth and big's bytes a token; the default's decode speed and the fastest
    other figure (here an A/B side; errors and the default's own A/B row left out) as fractions of it, and
    whether they reach 60%; eager and offloaded placements are not the bar's."""
    check = _script()
    ab = {"rounds": 3, "tokens": 96,
          "default": {"after_16": {"tokens_per_s": 300.0, "vs_default": 1.0, "spread": 0.01}},
          "with_fused_moe": {"after_16": {"tokens_per_s": 430.0, "vs_default": 1.433, "spread": 0.02}},
          "with_pdl": {"error": "boom"}}
    report = {"dry": False, "started": "now", "steps": {
        "env": {"seconds": 1, "bandwidth": {"device_copy_bytes_per_s": 4.2e12}},
        "big": {"seconds": 9, "resident": {"bytes_read_per_decoded_token": 6.0e9, "decode_ab_graphs": ab,
                                           "speed_eager": {"decode_tokens_per_s_after_16": 20.0},
                                           "speed_graphs": {"decode_tokens_per_s_after_16": 297.6,
                                                            "prefill_tokens_per_s": 3500.0}},
                "16GiB": {"bytes_read_per_decoded_token": 6.0e9, "plan": {"host_bytes": 5 << 30},
                          "speed_segments": {"decode_tokens_per_s_after_16": 103.5}}}}}
    lines = check.bar_summary(report)
    assert lines[0] == ("Issue 12's bar, `resident`: the floor is 700 tok/s (4200 GB/s copy bandwidth, 6.00 GB a "
                        "token), the bar 60% of it, 420 tok/s:")
    assert lines[2:] == ["- the default, `speed_graphs` after 16: 297.6 tok/s, 42.5% of the floor",
                         "- the fastest other, `decode_ab_graphs.with_fused_moe` (1.433x its A/B's default) after 16: "
                         "430.0 tok/s, 61.4% of the floor (the bar reached)", ""]
    assert not any("eager" in line or "16GiB" in line for line in lines)  # eager and offloaded: not the bar's
    assert check.markdown(report).split("\n## ")[0].endswith("\n".join(lines).rstrip() + "\n")
    assert check.bar_summary({"dry": True, "steps": {}}) == []
