"""`localrun profile`: routing counts from router hooks, routing_profile.json, and the plan ranking residency by it."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from localrun.config import load_config
from localrun.engine import Engine
from localrun.errors import LocalrunError
from localrun.loader import load_model, read_routing_profile
from localrun.plan import Budget, make_plan
from localrun.profile import FORMAT, RoutingProfile, profile_prompts, write_routing_profile
from localrun.sampling import SamplingParams

torch.set_num_threads(1)

PROMPTS = ["What is 17 + 25?", "Hello! How are you today?"]


@pytest.fixture
def model_dir(tiny_moe, tmp_path):
    """A writable copy of the tiny checkpoint (profile writes into the model directory)."""
    return shutil.copytree(tiny_moe, tmp_path / "m")


def hot_profile(args, hottest=(5, 2)) -> RoutingProfile:
    """Every layer routes mostly to `hottest` (first hottest), a little to the rest."""
    counts = [1] * args.num_experts
    for rank, e in enumerate(hottest):
        counts[e] = 100 - rank
    return RoutingProfile(args.num_experts, {i: list(counts) for i in range(args.num_hidden_layers)}, tokens=50)


def test_profile_command_writes_counts_and_trace(cli, model_dir, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    trace_path = tmp_path / "trace.json"
    code, out, err = cli("profile", str(model_dir), "--prompts", str(prompts), "--max-tokens", "6",
                         "--trace", str(trace_path), "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    assert "routing_profile.json" in out
    data = json.loads((model_dir / "routing_profile.json").read_text())
    args = load_config(model_dir)
    assert data["format"] == FORMAT and data["version"] == 1
    assert sorted(data["layers"], key=int) == [str(i) for i in range(args.num_hidden_layers)]
    for counts in data["layers"].values():
        assert len(counts) == args.num_experts
        assert sum(counts) == data["tokens"] * args.top_k_experts  # every token counted top_k times
    # The trace holds the same routing, token by token.
    trace = json.loads(trace_path.read_text())
    assert len(trace) == data["tokens"]
    for layer in range(args.num_hidden_layers):
        hist = Counter(e for token in trace for e in token[layer])
        assert [hist[e] for e in range(args.num_experts)] == data["layers"][str(layer)]
    assert all(len(set(token[0])) == args.top_k_experts for token in trace)
    # What the loader reads back; no temporary file left behind.
    assert read_routing_profile(model_dir) == {int(k): v for k, v in data["layers"].items()}
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]


def test_profile_counts_every_token_the_model_sees(tiny_moe):
    engine = Engine.load(tiny_moe, dtype=torch.float32)
    n = 5
    result = profile_prompts(engine, PROMPTS, max_tokens=n)
    greedy = SamplingParams()
    expected = 0
    for p in PROMPTS:
        ids = engine.encode_prompt(p)
        generated = len(list(engine.stream(ids, greedy, max_tokens=n)))
        expected += len(ids) + generated - 1  # the last sampled token is never fed back
    assert result.tokens == expected and result.trace is None
    # Hooks are gone afterwards: running again changes nothing.
    list(engine.stream(engine.encode_prompt(PROMPTS[0]), greedy, max_tokens=2))
    assert all(not layer.router._forward_hooks for layer in engine.model.layers)


def test_a_prompt_longer_than_the_context_is_named_before_any_prompt_runs(tiny_moe, monkeypatch):
    """One prompt past the context failed after the prompts before it had run, without saying which one."""
    engine = Engine.load(tiny_moe, dtype=torch.float32, context=64)
    ran = []
    stream = engine.stream
    monkeypatch.setattr(engine, "stream", lambda ids, *a, **k: ran.append(ids) or stream(ids, *a, **k))
    with pytest.raises(LocalrunError, match=r"^prompt 2 of 3 has \d+ tokens but the context holds 64"):
        profile_prompts(engine, ["What is 1 + 1?", "hello " * 100, "What is 2 + 2?"], max_tokens=2)
    assert ran == []


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "has no prompts"),
    ("\n  \n", "has no prompts"),
    ("[]", "has no prompts"),
    ('["ok", 3]', "list of strings"),
    ("[not json", "does not parse"),
])
def test_bad_prompts_file_is_a_one_line_error(cli, tiny_moe, tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    code, out, err = cli("profile", str(tiny_moe), "--prompts", str(path), "--device", "cpu")
    assert code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (tiny_moe / "routing_profile.json").exists()


def test_plan_keeps_the_hottest_experts_resident(tiny_moe):
    args = load_config(tiny_moe)
    profile = hot_profile(args)
    plan = make_plan(args, Budget(device_bytes=None, context=512), routing_profile=profile.counts, resident_fraction=0.25)
    assert plan.resident_experts_per_layer == 2
    assert all(ids == [2, 5] for ids in plan.resident_experts)
    # The JSON round trip is what the loader sees.
    plan_json = make_plan(args, Budget(device_bytes=None, context=512), resident_fraction=0.25,
                          routing_profile={int(k): v for k, v in profile.to_json()["layers"].items()})
    assert plan_json.resident_experts == plan.resident_experts
    # Without a profile: the lowest ids.
    assert make_plan(args, Budget(device_bytes=None, context=512), resident_fraction=0.25).resident_experts[0] == [0, 1]


def test_loader_keeps_the_profiled_experts_resident(model_dir):
    args = load_config(model_dir)
    write_routing_profile(model_dir, hot_profile(args))
    loaded = load_model(model_dir, dtype=torch.float32, resident_fraction=0.25)
    assert loaded.store is not None
    for i in range(args.num_hidden_layers):
        assert loaded.store.layer(i).resident == {2, 5}
        assert set(loaded.store.resident_payloads(i)) == {2, 5}
        assert set(loaded.store.host_payloads(i)) == set(range(args.num_experts)) - {2, 5}


def test_profile_never_writes_into_the_installed_package(cli, tmp_path):
    from localrun.resolve import demo_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 3?\n")
    code, _, err = cli("profile", "demo", "--prompts", prompts, "-n", "2", "--device", "cpu")
    assert code == 2 and "--out" in err and not (demo_model() / "routing_profile.json").exists()
    out = tmp_path / "demo_profile.json"
    code, _, err = cli("profile", "demo", "--prompts", prompts, "-n", "2", "--device", "cpu", "--out", out)
    assert code == 0, err
    assert json.loads(out.read_text())["format"] == "localrun.routing_profile"


@pytest.mark.parametrize("flag, path, message", [
    ("--trace", "missing/t.json", "does not exist"),
    ("--trace", ".", "is a directory"),
    ("--out", "missing/p.json", "does not exist"),
])
def test_bad_output_paths_fail_before_profiling(cli, model_dir, tmp_path, monkeypatch, flag, path, message):
    """A bad --out or --trace is refused before the model is loaded, and nothing is written."""
    from localrun.engine import Engine

    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before checking the output paths")

    monkeypatch.setattr(Engine, "load", no_load)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 3?\n")
    good = tmp_path / "prof.json"
    other = "--out" if flag == "--trace" else "--trace"
    code, _, err = cli("profile", model_dir, "--prompts", prompts, "-n", "2", "--device", "cpu",
                       flag, tmp_path / path, other, good)
    assert code == 2 and err.startswith(f"error: {flag} ") and message in err and err.count("\n") == 1, err
    assert not good.exists() and not (model_dir / "routing_profile.json").exists()


def test_a_read_only_model_folder_is_refused_before_profiling(cli, model_dir, tmp_path, monkeypatch):
    """Without --out the profile goes into MODEL: a folder that cannot take it is said before loading
    (the folder's write permission as os.access reports it; root may write anywhere, so it is faked)."""
    from localrun.commands import profile as command
    from localrun.engine import Engine

    monkeypatch.setattr(Engine, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setattr(command.os, "access", lambda path, mode: Path(path) != model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 3?\n")
    code, _, err = cli("profile", model_dir, "--prompts", prompts, "-n", "2", "--device", "cpu")
    assert code == 2 and "read-only" in err and "--out" in err and err.count("\n") == 1


@pytest.mark.parametrize("names", [
    ("--out", "same.json", "--trace", "same.json"),
    ("--out", "same.json", "--trace", "./sub/../same.json"),  # the same file, spelled another way
    ("--out", ".", "--trace", "routing_profile.json"),  # --out a directory: the profile is its routing_profile.json
    ("--out", "prompts.txt", "--trace", "t.json"),  # the user's prompts would be overwritten
    ("--trace", "MODEL/routing_profile.json"),  # the default place of the profile
])
def test_outputs_that_are_one_file_are_a_usage_error(cli, model_dir, tmp_path, monkeypatch, names):
    """--out, --trace and --prompts are three files: the trace written over the profile lost it silently.
    Refused in one line before the model loads, and nothing is written."""
    monkeypatch.setattr(Engine, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 3?\n")
    before = {p.name for p in tmp_path.iterdir()} | {p.name for p in model_dir.iterdir()}
    args = [str(a).replace("MODEL", str(model_dir)) for a in names]
    code, _, err = cli("profile", model_dir, "--prompts", prompts, "-n", "2", "--device", "cpu", *args)
    assert code == 2 and "name the same file" in err and err.count("\n") == 1, err
    assert {p.name for p in tmp_path.iterdir()} | {p.name for p in model_dir.iterdir()} == before
    assert prompts.read_text() == "What is 2 + 3?\n"


def test_profile_decodes_eagerly_whatever_auto_would_take(tiny_moe, monkeypatch):
    """The counts come from router hooks, so every token must run eagerly: on CUDA "auto" now takes the
    segmented graphs step for offloaded Gemma 4 (graphs for resident experts), whose capture warms up
    by running the step twice more (two extra tokens counted, two duplicate trace rows) and whose
    replays call no hook. LOCALRUN_DECODE_STEP stands in for what auto picks on a GPU."""
    monkeypatch.setenv("LOCALRUN_DECODE_STEP", "segments")
    engine = Engine.load(tiny_moe, dtype=torch.float32)
    steps = []
    stream = engine.stream
    monkeypatch.setattr(engine, "stream", lambda ids, *a, **k: steps.append(k.get("step", "auto")) or stream(ids, *a, **k))
    result = profile_prompts(engine, PROMPTS[:1], max_tokens=3, trace=True)
    assert steps == ["eager"]
    assert len(result.trace) == result.tokens
