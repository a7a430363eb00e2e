"""`localrun quantize SRC OUT`: what it writes, that loading OUT equals quantize-on-load, and that
an interrupted run (Ctrl-C or kill) never leaves a half-written OUT."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from bitsandbytes import functional as bnbf
from safetensors import safe_open

import localrun
import quant.nf4
from localrun import loader, prequant
from localrun.checkpoint import Checkpoint
from localrun.cli import main
from localrun.errors import LocalrunError, LocalrunWarning, UsageError
from localrun.generate import generate
from localrun.loader import load_model
from localrun.prequant import MANIFEST, TMP_MARK
from localrun.sampling import SamplingParams, make_sampler
from localrun.tiny import tiny_config, write_checkpoint
from quant.spec import QuantSpec

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EXPERT_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")
GEN_TOKENS = 24


def cli(*argv) -> int:
    """Run `localrun ARGV` in-process; its exit code (0 when it returns)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code or 0
    return 0


def quantize(src, out, *flags) -> Path:
    assert cli("quantize", src, out, "--quiet", *flags) == 0
    return Path(out)


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{TMP_MARK}*"))


def prompt_ids(n: int = 16, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(107, 512, (n - 1,), generator=gen).tolist()


def greedy(model) -> tuple[list[int], list[float]]:
    steps = list(generate(model, prompt_ids(), make_sampler(SamplingParams()), max_tokens=GEN_TOKENS))
    return [s.token for s in steps], [s.logprob for s in steps]


@pytest.fixture(scope="module")
def nf4_out(tiny_moe, tmp_path_factory) -> Path:
    return quantize(tiny_moe, tmp_path_factory.mktemp("prequant") / "out")


# -- loading OUT == quantizing on load --------------------------------------------------------


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_loading_out_equals_quantize_on_load_nf4(tiny_checkpoint, tmp_path, layout):
    src = tiny_checkpoint("moe", layout)
    out = quantize(src, tmp_path / "out")
    pre, onload = load_model(out), load_model(src, experts="nf4")
    assert pre.experts == "nf4"
    for a, b in zip(pre.model.layers, onload.model.layers):
        assert all(torch.equal(x.buffer, y.buffer) for x, y in zip(a.experts.experts, b.experts.experts))
    assert greedy(pre.model) == greedy(onload.model)  # tokens and logprobs, exactly


def test_loading_out_equals_quantize_on_load_fp4_double_quant(tiny_moe, tmp_path, monkeypatch):
    out = quantize(tiny_moe, tmp_path / "out", "--experts", "fp4", "--double-quant")
    pre = load_model(out)
    assert pre.experts == "fp4"
    # load_model has no double-quant switch: make its quantize-on-load spec the same as OUT's
    monkeypatch.setattr(loader, "QuantSpec", functools.partial(QuantSpec, double_quant=True))
    onload = load_model(tiny_moe, experts="fp4")
    spec = QuantSpec("fp4", 64, True)
    for a, b in zip(pre.model.layers, onload.model.layers):
        assert all(x.layout.spec == spec and y.layout.spec == spec for x, y in zip(a.experts.experts, b.experts.experts))
        assert all(torch.equal(x.buffer, y.buffer) for x, y in zip(a.experts.experts, b.experts.experts))
    assert greedy(pre.model) == greedy(onload.model)


def test_loading_out_never_requantizes(nf4_out, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("loading a pre-quantized checkpoint quantized something")

    for owner, name in ((quant.nf4, "quantize"), (quant.nf4, "pack_experts"), (quant.nf4, "pack_expert"),
                        (loader, "pack_expert"), (bnbf, "quantize_4bit")):
        monkeypatch.setattr(owner, name, refuse)
    for kw in ({}, {"resident_fraction": 0.5}):
        loaded = load_model(nf4_out, **kw)
        with torch.no_grad():
            assert torch.isfinite(loaded.model(torch.tensor([prompt_ids()])).float()).all()


# -- what OUT holds ---------------------------------------------------------------------------


def test_out_files_and_manifest(tiny_moe, nf4_out):
    for f in SIDE_FILES:
        assert (nf4_out / f).read_bytes() == (tiny_moe / f).read_bytes(), f
    names = {p.name for p in nf4_out.iterdir()}
    weights = {n for n in names if n not in SIDE_FILES and n not in (MANIFEST, "model.safetensors.index.json")}
    assert weights and all(n.endswith(".safetensors") for n in weights), weights
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    for n in weights:
        with safe_open(str(nf4_out / n), framework="pt") as f:  # every weight file is real safetensors
            assert list(f.keys())

    manifest = json.loads((nf4_out / MANIFEST).read_text())
    assert manifest["format"] == "localrun.quantized" and manifest["format_version"] == 1
    assert manifest["localrun_version"] == localrun.__version__
    assert (manifest["quant_type"], manifest["blocksize"], manifest["double_quant"]) == ("nf4", 64, False)
    cfg = tiny_config("moe")
    H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert manifest["original_experts"] == {
        "experts.gate_up_proj": {"shape": [2 * I, H], "dtype": "bfloat16"},
        "experts.down_proj": {"shape": [H, I], "dtype": "bfloat16"},
    }
    files = manifest["expert_files"]
    assert sorted(files) == [str(i) for i in range(cfg["num_hidden_layers"])]
    for layer, name in files.items():
        with safe_open(str(nf4_out / name), framework="pt") as f:
            meta = f.metadata()
            assert (meta["quant_type"], meta["blocksize"], meta["double_quant"]) == ("nf4", "64", "false")
            layout = json.loads(meta[f"model.layers.{layer}.experts.layout"])
            assert layout["gate_up_shape"] == [2 * I, H] and layout["down_shape"] == [H, I]
            assert layout["dtype"] == "bfloat16" and layout["num_experts"] == cfg["num_experts"]
    # the non-expert part: every text tensor of SRC but the experts, in bf16, no vision
    plain = Checkpoint(nf4_out).tensors
    assert not any(n.endswith(EXPERT_SUFFIXES) for n in plain)
    assert all(info.dtype == torch.bfloat16 for info in plain.values() if info.dtype.is_floating_point)


def test_out_size_is_4bit_experts_plus_bf16_rest(tmp_path):
    cfg = tiny_config("moe", hidden_size=256, moe_intermediate_size=128, num_experts=8)
    src = write_checkpoint(tmp_path / "src", cfg, max_shard_bytes=None)
    out = quantize(src, tmp_path / "out")
    expected = 0.0
    for name, info in Checkpoint(src).tensors.items():
        n = info.nbytes // info.dtype.itemsize
        expected += n * (0.5 + 4 / 64) if name.endswith(EXPERT_SUFFIXES) else 2 * n
    actual = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert expected <= actual <= 1.15 * expected, (actual, expected)


# -- the command ------------------------------------------------------------------------------


def test_existing_out_is_refused_without_force_and_replaced_with_it(tiny_moe, tmp_path, capsys):
    out = quantize(tiny_moe, tmp_path / "out")
    before = (out / MANIFEST).read_text()
    capsys.readouterr()
    assert cli("quantize", tiny_moe, out, "--quiet", "--experts", "fp4") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert (out / MANIFEST).read_text() == before

    quantize(tiny_moe, out, "--experts", "fp4", "--force")
    assert json.loads((out / MANIFEST).read_text())["quant_type"] == "fp4"
    assert load_model(out).experts == "fp4"
    assert leftovers(out) == []


def test_experts_bf16_on_out_is_a_usage_error(nf4_out, capsys):
    with pytest.raises(UsageError):
        load_model(nf4_out, experts="bf16")
    capsys.readouterr()
    assert cli("run", nf4_out, "hi", "--raw", "-n", "2", "--experts", "bf16") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pre-quantized" in err and err.count("\n") == 1


def test_bad_quantize_options_are_usage_errors(tiny_moe, tmp_path, capsys):
    for flags in (["--experts", "bf16"], ["--blocksize", "100"]):
        assert cli("quantize", tiny_moe, tmp_path / "out", "--quiet", *flags) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("manifest", ["{not json", '{"format": "something else"}',
                                      '{"format": "localrun.quantized", "format_version": 99}'])
def test_corrupt_manifest_is_a_one_line_error(nf4_out, tmp_path, capsys, manifest):
    out = tmp_path / "out"
    out.mkdir()
    for p in nf4_out.iterdir():
        (out / p.name).symlink_to(p)
    (out / MANIFEST).unlink()
    (out / MANIFEST).write_text(manifest)
    with pytest.raises(LocalrunError) as e:
        load_model(out)
    assert "\n" not in str(e.value) and MANIFEST in str(e.value)
    capsys.readouterr()
    assert cli("run", out, "hi", "--raw", "-n", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# -- interrupted runs -------------------------------------------------------------------------


def test_ctrl_c_in_process_exits_130_and_cleans_up(tiny_moe, tmp_path, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prequant, "save_packed_experts", interrupt)
    out = tmp_path / "out"
    assert cli("quantize", tiny_moe, out, "--quiet") == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert not out.exists() and leftovers(out) == []


@pytest.fixture(scope="module")
def big_src(tmp_path_factory) -> Path:
    """A checkpoint that takes a couple of seconds to quantize on one core."""
    cfg = tiny_config("moe", hidden_size=256, moe_intermediate_size=128, num_experts=32, num_hidden_layers=12,
                      layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2)
    return write_checkpoint(tmp_path_factory.mktemp("big") / "src", cfg, max_shard_bytes=None)


def start_quantize(src: Path, out: Path) -> subprocess.Popen:
    # LOCALRUN_CPU_KERNELS=0: bitsandbytes' own quantizer, ~50x slower than the C one, so that a signal
    # lands while the files are being written, as it would for a real model
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), LOCALRUN_CPU_KERNELS="0")
    # (SIGINT reaches it at its default: conftest takes the handler back in a suite started with it ignored)
    return subprocess.Popen([sys.executable, "-m", "localrun.cli", "quantize", str(src), str(out), "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_temp_dir(proc: subprocess.Popen, out: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not leftovers(out):
        assert proc.poll() is None, f"quantize ended before its temp dir was seen: {proc.communicate()}"
        assert time.monotonic() < deadline, "no temp dir appeared"
        time.sleep(0.02)
    time.sleep(0.3)  # let it get some way into writing


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_quantize_leaves_no_out(big_src, tmp_path, sig):
    out = tmp_path / "out"
    proc = start_quantize(big_src, out)
    try:
        wait_for_temp_dir(proc, out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, "quantize finished before the signal; make big_src bigger"
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err
        assert leftovers(out) == []  # Ctrl-C cleans up after itself
    else:
        assert leftovers(out)  # a kill can't: the next run must
        quantize(big_src, out)
        assert leftovers(out) == []
        assert load_model(out).experts == "nf4"


def test_force_interrupted_between_renames_keeps_the_old_out(tmp_path, tiny_moe, monkeypatch):
    """A Ctrl-C after the old OUT is set aside but before the new one is in place loses nothing: the
    earlier OUT is back whole, the files the user added to it (which --force carries) included."""
    from localrun import prequant
    from quant.spec import QuantSpec

    out = prequant.quantize_checkpoint(tiny_moe, tmp_path / "out", QuantSpec("nf4"))
    add_user_files(out)
    before = snapshot(out)
    real_replace = os.replace

    def interrupt_second_rename(src, dst):
        if str(src).endswith(f"{prequant.TMP_MARK}{os.getpid()}"):  # the finished new OUT moving in
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(prequant.os, "replace", interrupt_second_rename)
    with pytest.raises(KeyboardInterrupt):
        prequant.quantize_checkpoint(tiny_moe, out, QuantSpec("fp4"), force=True)
    monkeypatch.setattr(prequant.os, "replace", real_replace)
    assert snapshot(out) == before
    assert prequant.read_manifest(out)["quant_type"] == "nf4"
    assert not list(tmp_path.glob(".out.localrun-*"))


def test_leftover_old_out_is_restored_not_deleted(tmp_path, tiny_moe):
    from localrun import prequant
    from quant.spec import QuantSpec

    out = prequant.quantize_checkpoint(tiny_moe, tmp_path / "out", QuantSpec("nf4"))
    aside = tmp_path / f".out{prequant.OLD_MARK}999999999"  # a killed run's set-aside OUT (no such pid)
    out.rename(aside)
    prequant.clean_leftovers(out.parent)
    assert prequant.read_manifest(out)["quant_type"] == "nf4" and not aside.exists()


# -- nothing the user made is ever deleted ------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv, capsys, code=None) -> str:
    got = cli(*argv)
    err = capsys.readouterr().err
    assert got != 0 and (code is None or got == code), (got, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def src_copy(tiny_moe, tmp_path) -> Path:
    import shutil

    return shutil.copytree(tiny_moe, tmp_path / "models" / "gemma")


def test_out_that_contains_src_is_refused_even_with_force(src_copy, capsys):
    models = src_copy.parent
    before = snapshot(models)
    err = refused(["quantize", src_copy, models, "--force", "--quiet"], capsys)
    assert "contains SRC" in err and str(models) in err
    assert snapshot(models) == before


def test_out_inside_src_is_refused(src_copy, capsys):
    before = snapshot(src_copy)
    err = refused(["quantize", src_copy, src_copy / "nf4", "--quiet"], capsys)
    assert "inside SRC" in err
    assert snapshot(src_copy) == before and not (src_copy / "nf4").exists()


def test_force_refuses_a_foreign_directory(src_copy, tmp_path, capsys):
    foreign = tmp_path / "photos"
    (foreign / "2024").mkdir(parents=True)
    (foreign / "2024" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (foreign / "notes.txt").write_text("keep me")
    before = snapshot(foreign)
    err = refused(["quantize", src_copy, foreign, "--force", "--quiet"], capsys, code=1)
    assert str(foreign) in err and "not a localrun output" in err
    assert snapshot(foreign) == before


def test_force_replaces_an_empty_directory(src_copy, tmp_path):
    (tmp_path / "empty").mkdir()
    out = quantize(src_copy, tmp_path / "empty", "--force")
    assert prequant.read_manifest(out)["quant_type"] == "nf4"


def test_quantize_takes_demo(tmp_path):
    out = quantize("demo", tmp_path / "demo-nf4")
    assert prequant.read_manifest(out)["quant_type"] == "nf4"


def test_stale_temp_dirs_of_any_out_are_cleaned_once_their_process_is_gone(src_copy, tmp_path):
    dead = tmp_path / f".other{TMP_MARK}999999999"  # a killed run writing another OUT (no such pid)
    live = tmp_path / f".third{TMP_MARK}{os.getppid()}"  # a run still going (a live pid)
    for d in (dead, live):
        (d / "half").mkdir(parents=True)
    quantize(src_copy, tmp_path / "out")
    assert not dead.exists() and live.exists()


def test_existing_empty_directory_needs_no_force(src_copy, tmp_path):
    """`quantize --help` says OUT may be a new or empty directory: an empty one holds nothing to lose."""
    (tmp_path / "empty").mkdir()
    out = quantize(src_copy, tmp_path / "empty")
    assert prequant.read_manifest(out)["quant_type"] == "nf4" and leftovers(out) == []


def add_user_files(out: Path) -> dict[str, bytes]:
    """What a user puts into an earlier OUT: notes, a profile (`localrun profile OUT` writes it there), a folder."""
    (out / "mynotes.txt").write_text("note\n")
    (out / "routing_profile.json").write_text('{"mine": true}')
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("run 1\n")
    return {k: v for k, v in snapshot(out).items() if k in ("mynotes.txt", "routing_profile.json", "runs/log.txt")}


def test_force_keeps_the_files_the_user_added(src_copy, tmp_path, capsys):
    out = quantize(src_copy, tmp_path / "out")
    mine = add_user_files(out)
    (src_copy / "routing_profile.json").write_text('{"from": "src"}')  # the user's own profile still wins
    capsys.readouterr()
    quantize(src_copy, out, "--experts", "fp4", "--force")
    err = capsys.readouterr().err
    assert prequant.read_manifest(out)["quant_type"] == "fp4" and leftovers(out) == []
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
    assert err.count("\n") == 1 and "kept 3 file(s)" in err
    assert all(name in err for name in ("mynotes.txt", "routing_profile.json", "runs"))
    assert not list(tmp_path.glob(".out.localrun-*"))


def test_out_files_get_a_new_files_mode(src_copy, tmp_path):
    """The shards are as readable as the other files (the umask's mode), not private to the writer (0600)."""
    old = os.umask(0o022)
    try:
        out = quantize(src_copy, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("out", ["/proc/qout", "/sys/qout"])
def test_unwritable_out_is_a_one_line_error(src_copy, out, capsys):
    if not Path(out).parent.is_dir():
        pytest.skip(f"no {Path(out).parent}")
    err = refused(["quantize", src_copy, out, "--quiet"], capsys, code=1)
    assert err.startswith(f"error: cannot write {out}: ") and "Error" not in err and TMP_MARK not in err, err


def test_prequantized_src_is_refused_with_the_reason(nf4_out, tmp_path, capsys):
    err = refused(["quantize", nf4_out, tmp_path / "again", "--quiet"], capsys, code=1)
    assert "already pre-quantized by localrun" in err and "localrun run" in err
    assert not (tmp_path / "again").exists()


def test_out_a_symlink_is_written_where_it_points_and_the_link_stays(src_copy, tmp_path):
    """The link is the user's: quantize writes the directory it points to, and leaves nothing beside either
    (it used to replace the link by a directory and keep the link, set aside, forever)."""
    (tmp_path / "disk").mkdir()
    target = tmp_path / "disk" / "empty"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    for flags in ((), ("--force",)):  # into the empty directory, then over that earlier output
        quantize(src_copy, link, *flags)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert prequant.read_manifest(target)["quant_type"] == "nf4"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        assert [p.name for p in target.parent.iterdir()] == ["empty"]


def test_out_dot_inside_an_earlier_output_is_replaced(src_copy, tmp_path, monkeypatch, capsys):
    """`cd OUT && localrun quantize SRC . --force` replaces OUT (`.` itself cannot be renamed: EBUSY), and says
    how to see the new one from a shell whose directory was replaced."""
    out = quantize(src_copy, tmp_path / "out")
    capsys.readouterr()
    monkeypatch.chdir(out)
    with warnings.catch_warnings():
        warnings.simplefilter("always", LocalrunWarning)  # pyproject's filterwarnings ignores UserWarning
        quantize(src_copy, ".", "--force", "--experts", "fp4")
    err = capsys.readouterr().err
    assert prequant.read_manifest(out)["quant_type"] == "fp4" and leftovers(out) == []
    assert not list(tmp_path.glob(".out.localrun-*"))
    assert err.startswith(f"warning: {out} was replaced") and f"`cd {out}`" in err and err.count("\n") == 1, err


def test_out_a_symlink_loop_is_a_one_line_error(src_copy, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    err = refused(["quantize", src_copy, loop, "--quiet"], capsys, code=1)
    assert err.startswith(f"error: cannot write {loop}: ") and loop.is_symlink()
