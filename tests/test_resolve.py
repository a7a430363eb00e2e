"""Model names -> directories (path, demo, Hugging Face cache, download) and `localrun list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from localrun import resolve
from localrun.errors import LocalrunError
from localrun.resolve import is_repo_id, list_local_models, resolve_model

REPO = "google/gemma-4-26B-A4B-it"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def fake_snapshot(cache: Path, repo_id: str, files: dict[str, str], rev: str = "abc123", ref: bool = True) -> Path:
    """The huggingface_hub layout: blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>, refs/main."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for i, (name, content) in enumerate(files.items()):
        blob = folder / "blobs" / f"{rev}-{i}"
        blob.write_text(content)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(rev)
    return snap


FULL = {"config.json": '{"dtype": "bfloat16"}', "model.safetensors.index.json":
        '{"weight_map": {"a": "model-00001-of-00001.safetensors"}}', "model-00001-of-00001.safetensors": "x" * 100}


@pytest.fixture
def no_download(monkeypatch):
    """huggingface_hub present but offline: every fetch fails."""
    calls = []

    def fail(repo_id, *args, **kwargs):
        calls.append(repo_id)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    fake = types.SimpleNamespace(snapshot_download=fail, hf_hub_download=fail)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    return calls


def test_existing_directory_as_is(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_missing_path_and_file(tmp_path):
    with pytest.raises(LocalrunError, match="model path not found: ./no/such/dir"):
        resolve_model("./no/such/dir")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(LocalrunError, match="not a model directory"):
        resolve_model(tmp_path / "f.txt")


def test_demo_missing_then_present(tmp_path, monkeypatch):
    monkeypatch.setattr(resolve, "DEMO_DIR", tmp_path / "demo")
    with pytest.raises(LocalrunError, match="the demo model is not built: run scripts/train_demo_model.py"):
        resolve_model("demo")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "demo")  # no ./demo here, so the name means the built-in model
    assert resolve_model("demo") == tmp_path / "demo"


def test_repo_id_shape():
    assert is_repo_id(REPO) and is_repo_id("org/name.v2_x")
    assert not any(is_repo_id(s) for s in ["demo", "a/b/c", "/abs", "./x", "../x", "a/..", "org/"])


def test_repo_id_found_in_cache(hf_cache, no_download):
    snap = fake_snapshot(hf_cache, REPO, FULL)
    fake_snapshot(hf_cache, REPO, {"config.json": "{}"}, rev="newer", ref=False)  # refs/main says abc123
    assert resolve_model(REPO) == snap
    assert resolve_model(REPO, config_only=True) == snap
    assert no_download == []


def test_hf_home_layout(tmp_path, monkeypatch, no_download):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    snap = fake_snapshot(tmp_path / "hub", REPO, FULL, ref=False)
    assert resolve_model(REPO) == snap


def test_config_only_snapshot_is_not_a_model(hf_cache, no_download):
    snap = fake_snapshot(hf_cache, REPO, {"config.json": "{}"})
    assert resolve_model(REPO, config_only=True) == snap
    with pytest.raises(LocalrunError):  # the weights are missing: a download is tried, and fails
        resolve_model(REPO)
    assert no_download == [REPO]


def test_repo_id_missing_download_fails_in_one_line(hf_cache, no_download):
    with pytest.raises(LocalrunError) as e:
        resolve_model(REPO)
    message = str(e.value)
    assert "\n" not in message and REPO in message and "could not be downloaded" in message
    assert "couldn't connect" in message


def test_repo_id_missing_without_huggingface_hub(hf_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(LocalrunError, match=f"{REPO} .*could not be downloaded: huggingface_hub is not installed"):
        resolve_model(REPO, config_only=True)


def test_download_result_is_returned(hf_cache, monkeypatch):
    got = {}

    def snapshot_download(repo_id, allow_patterns, cache_dir):
        got.update(repo=repo_id, patterns=allow_patterns, cache=cache_dir)
        return str(hf_cache / "somewhere")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert resolve_model(REPO) == hf_cache / "somewhere"
    assert got["repo"] == REPO and got["cache"] == hf_cache and "*.safetensors" in got["patterns"]


def test_list_local_models(hf_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(resolve, "DEMO_DIR", tmp_path / "no-demo")
    fake_snapshot(hf_cache, REPO, FULL)
    fake_snapshot(hf_cache, "me/quantized", {**FULL, "localrun_quant.json": "{}"})
    fake_snapshot(hf_cache, "org/config-only", {"config.json": "{}"})
    fake_snapshot(hf_cache, "Qwen/Qwen3-30B-A3B", {**FULL, "config.json": '{"model_type": "qwen3_moe"}'})
    fake_snapshot(hf_cache, "x/llama", {**FULL, "config.json": '{"model_type": "llama"}'})
    fake_snapshot(hf_cache, "x/int4", {**FULL, "config.json": json.dumps({"model_type": "qwen3_moe", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}})})
    fake_snapshot(hf_cache, "Qwen/Qwen3-30B-A3B-FP8", {**FULL, "config.json": json.dumps(
        {"model_type": "qwen3_moe", "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}})})
    models = {m.name: m for m in list_local_models()}
    assert set(models) == {REPO, "me/quantized", "org/config-only", "Qwen/Qwen3-30B-A3B", "x/llama",
                           "Qwen/Qwen3-30B-A3B-FP8", "x/int4"}
    assert models["Qwen/Qwen3-30B-A3B-FP8"].format == "hf fp8"  # the weights' format, not the compute dtype
    assert models["x/int4"].format == "hf compressed-tensors (unsupported)"
    assert models["Qwen/Qwen3-30B-A3B"].family == "qwen3_moe"
    assert models["x/llama"].family == "llama (unsupported)" and models[REPO].family == "?"
    assert models[REPO].format == "hf bf16"
    assert models[REPO].size_bytes == sum(len(v) for v in FULL.values())
    assert models["me/quantized"].format == "localrun 4-bit"
    assert models["org/config-only"].format == "config only"


def test_list_command_json(hf_cache, tmp_path):
    fake_snapshot(hf_cache, REPO, FULL)
    env = dict(os.environ, HF_HUB_CACHE=str(hf_cache), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "localrun.cli", "list", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = {m["name"]: m for m in json.loads(proc.stdout)}
    assert listed[REPO]["format"] == "hf bf16" and listed[REPO]["path"].endswith("snapshots/abc123")
    assert set(listed[REPO]) == {"name", "path", "size_bytes", "format", "family"}


def test_list_shows_a_config_that_is_not_an_object_as_unknown(hf_cache, tmp_path, monkeypatch, cli):
    """A config.json that is valid JSON but a list shows as `?`, like other bad configs, not a crash."""
    monkeypatch.setattr(resolve, "DEMO_DIR", tmp_path / "no-demo")
    fake_snapshot(hf_cache, "bad/list", {**FULL, "config.json": "[]"})
    fake_snapshot(hf_cache, "Qwen/Qwen3-30B-A3B", {**FULL, "config.json": '{"model_type": "qwen3_moe"}'})
    models = {m.name: m for m in list_local_models()}
    assert models["bad/list"].format == "hf ?" and models["bad/list"].family == "?"
    code, out, err = cli("list")
    assert code == 0, err
    assert "bad/list" in out and "Qwen/Qwen3-30B-A3B" in out


def test_list_into_a_pipe_prints_whole_paths_without_padding(hf_cache, tmp_path, monkeypatch, cli):
    """Not a terminal: one tab-separated line per model, the full path, no trailing spaces (for grep, cut)."""
    monkeypatch.setattr(resolve, "DEMO_DIR", tmp_path / "no-demo")
    repo = "some-organisation/a-model-with-a-rather-long-name-" + "x" * 40
    snap = fake_snapshot(hf_cache, repo, FULL)
    code, out, err = cli("list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split("\t") == ["NAME", "SIZE", "FORMAT", "FAMILY", "PATH"]
    assert lines[1].split("\t") == [repo, f"{sum(map(len, FULL.values()))} B", "hf bf16", "?", str(snap)]
    assert all(line == line.rstrip() for line in lines)


def test_one_corrupt_cache_entry_does_not_stop_list(hf_cache, tmp_path, monkeypatch, cli):
    """A refs/main that is not UTF-8 counts as no refs/main (the newest snapshot); an index mapping a tensor to
    a non-string, or a config nested past the JSON parser's depth, lists as incomplete or `?`, not a crash."""
    monkeypatch.setattr(resolve, "DEMO_DIR", tmp_path / "no-demo")
    snap = fake_snapshot(hf_cache, "bad/ref", FULL)
    (snap.parents[1] / "refs" / "main").write_bytes(b"\xff\xfe")
    fake_snapshot(hf_cache, "bad/index", {**FULL, "model.safetensors.index.json": '{"weight_map": {"a": 5}}'})
    fake_snapshot(hf_cache, "bad/deep", {**FULL, "config.json": "[" * 100_000 + "]" * 100_000})
    fake_snapshot(hf_cache, "up/ref", FULL, rev="../../bad--ref")  # a ref naming a path outside snapshots/
    fake_snapshot(hf_cache, REPO, FULL)
    models = {m.name: m for m in list_local_models()}
    assert models["bad/ref"].path == str(snap) and models["bad/ref"].format == "hf bf16"
    assert models["bad/index"].format == "config only"
    assert models["bad/deep"].format == "hf ?" and models["bad/deep"].family == "?"
    assert "up/ref" not in models and models[REPO].format == "hf bf16"
    code, out, err = cli("list")
    assert code == 0 and err == "" and "bad/index" in out and REPO in out, err


def test_run_of_a_cached_repo_with_a_corrupt_index_is_one_line(hf_cache, no_download, cli):
    fake_snapshot(hf_cache, "org/x", {**FULL, "model.safetensors.index.json": '{"weight_map": {"a": 5}}'})
    code, out, err = cli("run", "org/x", "hi")
    assert code == 1 and err.startswith("error: org/x") and len(err.strip().splitlines()) == 1, err
    assert "TypeError" not in err


def test_a_tilde_user_that_does_not_exist_is_one_line(cli, monkeypatch):
    code, out, err = cli("run", "~no-such-user-localrun/x", "hi")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: model path ~no-such-user-localrun/x:") and "RuntimeError" not in err
    monkeypatch.setenv("HF_HUB_CACHE", "~no-such-user-localrun/hub")
    code, out, err = cli("list")
    assert code == 1 and err.startswith("error: $HF_HUB_CACHE ~no-such-user-localrun/hub:"), err


def test_list_names_every_checkpoint_dtype_the_same_short_way(tmp_path):
    from localrun.resolve import model_format

    for dtype, label in (("bfloat16", "hf bf16"), ("float16", "hf fp16"), ("float32", "hf fp32")):
        model = tmp_path / dtype
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "mixtral", "torch_dtype": dtype}))
        (model / "model.safetensors").write_bytes(b"")
        assert model_format(model) == label
