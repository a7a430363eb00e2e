"""Pre-quantized localrun checkpoints: `localrun quantize SRC OUT` writes one, the loader reads it.

Layout of OUT (safetensors only):
    config.json, generation_config.json, tokenizer files, chat_template.jinja   copied from SRC
    model-0000i-of-0000n.safetensors + model.safetensors.index.json            non-expert tensors, bf16,
                                                                               named as in SRC (vision dropped)
    experts-LLL.safetensors                                                    one MoE layer's packed 4-bit experts
    localrun_quant.json                                                        the manifest, written last

The whole directory is written under a temporary name beside OUT and renamed at the end, so an
interrupted run (Ctrl-C, kill) leaves no OUT; the next run writing beside it removes its leftovers.
Nothing the user made is ever deleted: see `check_out`, and `user_files` for what `--force` carries over.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from . import __version__
from .atomic import new_file_mode
from .checkpoint import INDEX, Checkpoint, open_checkpoint
from .config import load_config
from .errors import LocalrunError, LocalrunWarning, UsageError
from .models import family, is_expert_tensor
from .resolve import QUANT_MARKER, ROUTING_PROFILE
from quant.io import save_packed_experts
from quant.nf4 import pack_experts
from quant.spec import QuantSpec

MANIFEST = QUANT_MARKER
FORMAT = "localrun.quantized"
FORMAT_VERSION = 1
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", ROUTING_PROFILE)
EXPERT_MATRICES = ("experts.gate_up_proj", "experts.down_proj")  # the fused layout the packed experts come from
SHARD_BYTES = 1 << 30  # non-expert shards: bounds what is held in memory before a write
# What quantize itself writes into OUT; anything else in an earlier OUT is the user's (see `user_files`).
# routing_profile.json is not among them: `localrun profile OUT` writes it there, and it stays valid.
OWN_FILES = frozenset({MANIFEST, INDEX, *SIDE_FILES} - {ROUTING_PROFILE})
_OWN_WEIGHTS = re.compile(r"^(model-\d{5}-of-\d{5}|experts-\d{3,})\.safetensors$")
TMP_MARK = ".localrun-tmp-"
OLD_MARK = ".localrun-old-"


def is_prequantized(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MANIFEST).is_file()


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LocalrunError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LocalrunError(f"{path} is not a localrun quantization manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LocalrunError(f"{path}: format version {manifest.get('format_version')!r} is not supported "
                            f"(this localrun reads version {FORMAT_VERSION}); re-run localrun quantize")
    problem = _manifest_problem(manifest)
    if problem:
        raise LocalrunError(f"{path}: {problem}; re-run localrun quantize")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a version-1 manifest's fields, or None."""
    try:
        manifest_spec(manifest)
    except (KeyError, TypeError, ValueError) as e:
        return f"bad quantization settings ({type(e).__name__}: {e})"
    files = manifest.get("expert_files")
    if not isinstance(files, dict):
        return "expert_files must be an object of layer -> file name"
    for layer, name in files.items():
        if not (layer.isdigit() and isinstance(name, str) and name.endswith(".safetensors")
                and "/" not in name and "\\" not in name and not name.startswith(".")):
            return f"expert_files entry {layer!r}: {name!r} is not a .safetensors file name in the model directory"
    if not isinstance(manifest.get("original_experts", {}), dict):
        return "original_experts must be an object"
    return None


def manifest_spec(manifest: dict) -> QuantSpec:
    """The quantization settings a manifest records; ValueError, KeyError or TypeError when malformed."""
    kind, blocksize, double = manifest["quant_type"], manifest["blocksize"], manifest["double_quant"]
    if not (isinstance(kind, str) and isinstance(blocksize, int) and not isinstance(blocksize, bool)
            and isinstance(double, bool)):
        raise TypeError("quant_type must be a string, blocksize an integer, double_quant true or false")
    return QuantSpec(kind, blocksize, double)


def _tmp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"


def _old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{OLD_MARK}{os.getpid()}"


# `.NAME.localrun-tmp-PID` (being written) and `.NAME.localrun-old-PID` (an OUT set aside by --force)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.localrun-(?P<kind>tmp|old)-(?P<pid>\d+)$")


def check_out(src: Path, out: Path, force: bool) -> None:
    """Refuse an OUT whose writing could delete anything but an earlier localrun output.

    OUT may not be SRC, contain it or lie inside it (replacing OUT would remove SRC, or writing
    it would change SRC). An existing empty directory holds nothing to lose, so it is used as is;
    any other existing OUT is replaced only with `force`, and only when it is a localrun output
    (its manifest); the user's files in it are carried into the new one (`user_files`).
    """
    s, o = src.resolve(), real_out(out)
    if o == s:
        raise UsageError(f"OUT must differ from SRC ({src})")
    if o in s.parents:
        raise UsageError(f"OUT {out} contains SRC {src}: writing it would delete the source; pick a new directory")
    if s in o.parents:
        raise UsageError(f"OUT {out} is inside SRC {src}: pick a directory outside the source checkpoint")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise LocalrunError(f"{out} exists and is not a directory; pick a new directory")
    if not any(out.iterdir()):
        return
    if not force:
        raise LocalrunError(f"{out} already exists (--force replaces an earlier localrun output)")
    if not _is_localrun_output(out):
        raise LocalrunError(f"{out} is not a localrun output (no {MANIFEST}); --force replaces only those, "
                            "so remove it yourself or pick another OUT")


def real_out(out: Path) -> Path:
    """OUT as the directory it names: absolute, with `.`, `..` and symlinks resolved.

    The new OUT is renamed into place, which needs the real entry: `.` has no name in its parent (the
    rename fails with EBUSY), and renaming a symlink aside would replace the user's link by a directory
    and leave the link behind under a temporary name. Writing where the link points keeps the link.
    """
    try:
        return out.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise LocalrunError(f"cannot write {out}: {getattr(e, 'strerror', None) or e}") from None


def _holds_cwd(path: Path) -> bool:
    """Whether the current directory is `path` or inside it (replacing it leaves the shell in a removed directory)."""
    try:
        cwd = Path.cwd()
    except OSError:
        return False
    return cwd == path or path in cwd.parents


def _is_localrun_output(path: Path) -> bool:
    try:
        read_manifest(path)
    except LocalrunError:
        return False
    return True


def user_files(out: str | Path) -> list[str]:
    """Names in an existing OUT that quantize did not write there (notes, the routing_profile.json
    `localrun profile OUT` writes by default): `--force` carries them into the new OUT, never deletes them."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES and not _OWN_WEIGHTS.match(p.name))


def _carry(old_out: Path, new: Path, names: list[str]) -> None:
    """Put the user's files of the earlier OUT into the new one before the swap: as hard links (a copy where
    the filesystem has none), so the earlier OUT keeps them until the swap and nothing is lost if it never
    happens. A user's file wins over the copy of the same name from SRC (only routing_profile.json can clash)."""
    for name in names:
        src, dst = old_out / name, new / name
        try:
            if dst.is_file() and not dst.is_symlink():
                dst.unlink()
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
        except OSError as e:  # shutil.Error too (it names no single file): say which entry, keep the old OUT
            reason = e.strerror or "it could not be copied"
            raise LocalrunError(f"cannot keep {src} in the new {old_out}: {reason}; {old_out} is unchanged") from None


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _cannot_write(out: Path, e: OSError) -> LocalrunError:
    """A one-line reason an OSError stopped writing OUT (no exception class, no temporary name)."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOENT and e.filename == str(_tmp_dir(out)):  # e.g. /proc: it exists but takes no new entries
        reason = f"{out.parent} does not accept new directories"
    return LocalrunError(f"cannot write {out}: {reason}")


def _is_about(e: OSError, *paths: Path) -> bool:
    """Whether the OSError names one of `paths` or something under them (not, say, a source file)."""
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return any(n == str(p) or n.startswith(str(p) + os.sep) for n in names for p in paths)


def clean_leftovers(parent: Path) -> list[Path]:
    """Tidy what killed or interrupted quantize runs left in `parent` (beside any OUT), once the
    process that wrote each is gone (its pid is in the name): half-written temporary directories
    are removed; an OUT set aside by `--force` is put back if nothing replaced it."""
    removed = []
    for p in sorted(parent.glob(".*.localrun-*-*")):
        m = _LEFTOVER.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _alive(pid):
            continue  # a quantize is writing it right now
        out = parent / m["name"]
        if m["kind"] == "old" and not (out.exists() or out.is_symlink()):
            os.replace(p, out)  # the old OUT is all there is: never lose it
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, names: list[str], index: dict) -> None:
    """Flush `tensors` as the next shard; its file name is fixed up once the count is known."""
    if not tensors:
        return
    name = f"model-{len(names) + 1:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    names.append(name)
    index.update({k: name for k in tensors})
    tensors.clear()


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    spec: QuantSpec,
    *,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Write a pre-quantized copy of checkpoint `src` at `out` (atomically). Returns `out`.

    progress(stage, done, total) is called as tensors are written (bytes of the source read).
    With `force`, the user's files in an earlier OUT (`user_files`) are carried into the new one.
    """
    src, given = Path(src), Path(out)
    if is_prequantized(src):  # its experts are packed already: there is nothing left to quantize
        raise LocalrunError(f"{src} is already pre-quantized by localrun ({MANIFEST}); "
                            f"run it directly: localrun run {src}")
    args = load_config(src)
    check_out(src, given, force)
    out = real_out(given)
    if not args.enable_moe_block:
        raise LocalrunError(f"{src} has no routed experts to quantize")
    try:
        spec.check_kernel_sizes(args.hidden_size, args.moe_intermediate_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = open_checkpoint(src)
    if not out.parent.is_dir():
        raise LocalrunError(f"cannot write {out}: {out.parent} is not a directory")
    clean_leftovers(out.parent)
    tmp = _tmp_dir(out)
    old = _old_dir(out)
    in_cwd = _holds_cwd(out)
    try:
        tmp.mkdir(parents=True)  # inside the try: a Ctrl-C right after it still cleans up
        _write(ckpt, args, src, tmp, spec, progress, torch.device(device))
        _carry(out, tmp, user_files(out))
        if out.exists():
            os.replace(out, old)  # a directory can't be replaced in one step: set the old one aside
        os.replace(tmp, out)
    except OSError as e:
        if not _is_about(e, out, tmp, old):
            raise
        raise _cannot_write(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, out)  # interrupted between the two renames: keep the old OUT
    if in_cwd:
        warnings.warn(f"{out} was replaced while it was the current directory: `cd {out}` to see the new one",
                      LocalrunWarning, stacklevel=2)
    return given


def moe_layers(args) -> list[int]:
    """The layers that have routed experts (every layer in Gemma 4 and Mixtral)."""
    return [i for i in range(args.num_hidden_layers) if args.has_experts(i)]


def _drop_quantization_config(config: Path) -> None:
    """OUT's weights are bf16 and 4-bit experts whatever SRC stored (an FP8 source is dequantized as it is
    read): the source's quantization_config no longer describes them."""
    raw = json.loads(config.read_text())
    if raw.pop("quantization_config", None) is not None:
        config.write_text(json.dumps(raw, indent=2) + "\n")


def _write(ckpt: Checkpoint, args, src: Path, tmp: Path, spec: QuantSpec, progress, device) -> None:
    sanitize = family(args.model_type).sanitize
    text = {name: sanitize(args, name) for name in ckpt.tensors}
    plain = [n for n, key in text.items() if key is not None and not is_expert_tensor(key)]
    total = sum(ckpt.tensors[n].nbytes for n, key in text.items() if key is not None)
    done = 0
    pending, shards, index, held = {}, [], {}, 0
    for name in plain:
        t = ckpt.read(name)
        pending[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
        held += t.numel() * t.element_size()
        done += ckpt.tensors[name].nbytes
        if held >= SHARD_BYTES:
            _write_shards(pending, tmp, shards, index)
            held = 0
        if progress:
            progress("weights", done, total)
    _write_shards(pending, tmp, shards, index)
    final = {}
    for i, old in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / old, tmp / new)
        final[old] = new
    weight_map = {k: final[v] for k, v in index.items()}
    (tmp / INDEX).write_text(json.dumps({"metadata": {"format": FORMAT}, "weight_map": weight_map}, indent=2))

    expert_files, original = {}, {}
    expert_names = [n for n, key in text.items() if key is not None and is_expert_tensor(key)]
    layer_bytes = sum(ckpt.tensors[n].nbytes for n in expert_names) // max(1, len(moe_layers(args)))
    for i in moe_layers(args):
        gate_up, down = family(args.model_type).read_experts(ckpt, args, i)  # fused, however stored
        for n, t in zip(EXPERT_MATRICES, (gate_up, down)):
            original[n] = {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
        packed = pack_experts(gate_up.to(device), down.to(device), spec)
        expert_files[i] = f"experts-{i:03d}.safetensors"
        save_packed_experts(tmp / expert_files[i], {i: packed})
        done += layer_bytes
        del gate_up, down, packed
        if progress:
            progress("experts", done, total)

    for f in SIDE_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, tmp / f)
    _drop_quantization_config(tmp / "config.json")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "localrun_version": __version__,
        "quant_type": spec.quant_type, "blocksize": spec.blocksize, "double_quant": spec.double_quant,
        "expert_files": {str(i): f for i, f in expert_files.items()}, "original_experts": original,
        "source": str(src),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    mode = new_file_mode()
    for f in tmp.glob("*.safetensors"):
        os.chmod(f, mode)
