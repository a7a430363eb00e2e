"""Model names -> directories: a path, the built-in `demo`, or a Hugging Face repo id.

A repo id is looked up in the local Hugging Face cache first (the layout `huggingface-cli
download` writes: models--org--name/refs/main + snapshots/<rev>/), and downloaded with
huggingface_hub only when missing. huggingface_hub is optional and imported lazily.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LocalrunError
from .models import SUPPORTED_MODEL_TYPES

DEMO_NAME = "demo"
# The demo checkpoint ships inside the package; a module attribute so tests can point it elsewhere.
DEMO_DIR = Path(__file__).parent / "data" / "demo"
# Written by `localrun quantize` beside the weights (for now the only marker we check).
QUANT_MARKER = "localrun_quant.json"
# Written by `localrun profile` beside the weights; the plan reads it to pick each layer's resident experts.
ROUTING_PROFILE = "routing_profile.json"
# What a model download needs; skips .gguf, original/*.pth and other formats a repo may hold.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_repo_id(name: str) -> bool:
    """True for `org/name` shaped strings (one slash, Hub-legal characters)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment as huggingface_hub does."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return expand_user(os.environ[var], f"${var}")
    if os.environ.get("HF_HOME"):
        return expand_user(os.environ["HF_HOME"], "$HF_HOME") / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = expand_user(xdg, "$XDG_CACHE_HOME") if xdg else expand_user("~/.cache", "the Hugging Face cache")
    return base / "huggingface" / "hub"


def expand_user(text: str, what: str = "") -> Path:
    """Path(text) with a leading ~ or ~user expanded; a one-line error where that home is unknown (pathlib
    raises RuntimeError for `~nouser/x`, or for `~` without $HOME and without a passwd entry)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        head = text.split("/", 1)[0]
        raise LocalrunError(f"{what or 'path'} {text}: no home directory is known for {head}") from None


def _repo_folder(repo_id: str, cache: Path) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _snapshot(folder: Path) -> Path | None:
    """The snapshot refs/main points at; without a readable refs/main, the most recently written one."""
    rev = _main_revision(folder)
    if rev is not None:
        snap = folder / "snapshots" / rev
        return snap if snap.is_dir() else None
    try:
        snaps = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
        return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None
    except OSError:  # a snapshot removed while we look, or an unreadable folder: nothing usable
        return None


def _main_revision(folder: Path) -> str | None:
    """The revision name in refs/main, or None when there is none or it is corrupt (not UTF-8, not one
    plain name): one damaged cache entry must not stop `list`, nor point a path outside snapshots/."""
    try:
        rev = (folder / "refs" / "main").read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    plain = rev and rev not in (".", "..") and not any(c in rev for c in "/\\\0")
    return rev if plain else None


def has_weights(model_dir: Path) -> bool:
    """config.json plus every safetensors shard the index names (or at least one shard without an index)."""
    if not (model_dir / "config.json").is_file():
        return False
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = _index_shards(index)
        return shards is not None and all((model_dir / s).is_file() for s in shards)
    return any(model_dir.glob("*.safetensors"))


def _index_shards(index: Path) -> set[str] | None:
    """The shard file names a safetensors index maps tensors to; None when the index is unreadable or malformed
    (not JSON, no weight_map object, a value that is not a file name): such a snapshot counts as incomplete."""
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return shards if all(isinstance(s, str) and s and "\0" not in s for s in shards) else None


def cached_model(repo_id: str, *, config_only: bool = False, cache: Path | None = None) -> Path | None:
    """The cached snapshot of `repo_id` if it holds what is asked for (all weights, or just config.json)."""
    snap = _snapshot(_repo_folder(repo_id, cache or hf_cache_dir()))
    if snap is None:
        return None
    complete = (snap / "config.json").is_file() if config_only else has_weights(snap)
    return snap if complete else None


def download_model(repo_id: str, *, config_only: bool = False) -> Path:
    """Fetch `repo_id` (or only its config.json) into the Hugging Face cache with huggingface_hub."""
    try:
        import huggingface_hub
    except ImportError:
        raise LocalrunError(f"{repo_id} is not in the Hugging Face cache and could not be downloaded: "
                            "huggingface_hub is not installed (pip install huggingface_hub)") from None
    try:
        if config_only:
            return Path(huggingface_hub.hf_hub_download(repo_id, "config.json", cache_dir=hf_cache_dir())).parent
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS,
                                                      cache_dir=hf_cache_dir()))
    except Exception as e:  # offline, gated, no such repo, disk full: all one line to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LocalrunError(f"{repo_id} is not in the Hugging Face cache and could not be downloaded: "
                            f"{reason}") from None


def demo_model() -> Path:
    """The demo checkpoint shipped in the package."""
    if not (DEMO_DIR / "config.json").is_file():
        raise LocalrunError("the demo model is not built: run scripts/train_demo_model.py")
    return DEMO_DIR


def resolve_model(name: str | Path, *, config_only: bool = False) -> Path:
    """A model name as the user typed it -> a local directory holding it.

    An existing directory wins (so `./demo` is a path), then `demo`, then a Hugging Face repo id
    (cache first, then a download). `config_only` (for `fit`) needs and fetches only config.json.
    """
    text = str(name)
    path = expand_user(text, "model path")
    if path.is_dir():
        return path
    if path.exists():
        raise LocalrunError(f"not a model directory: {path}")
    if text == DEMO_NAME:
        return demo_model()
    if is_repo_id(text):
        return cached_model(text, config_only=config_only) or download_model(text, config_only=config_only)
    raise LocalrunError(f"model path not found: {text}")


# Listing ---------------------------------------------------------------------------------------

@dataclass
class LocalModel:
    name: str
    path: str
    size_bytes: int
    format: str
    family: str  # config.json's model_type, "(unsupported)" after one localrun does not run

    def to_dict(self) -> dict:
        return asdict(self)


def disk_size(folder: Path) -> int:
    """Bytes of the files under `folder`, following the cache's symlinks, each blob counted once."""
    seen, total = set(), 0
    for p in folder.rglob("*"):
        try:
            real = p.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                total += real.stat().st_size
        except (OSError, RuntimeError):  # a dangling link from an interrupted download; a link loop (RuntimeError)
            continue
    return total


def model_format(model_dir: Path) -> str:
    """"localrun 4-bit" for a pre-quantized dir, "hf <dtype>" for a checkpoint, "config only" without weights."""
    if (model_dir / QUANT_MARKER).is_file():
        return "localrun 4-bit"
    if not has_weights(model_dir):
        return "config only" if (model_dir / "config.json").is_file() else "incomplete"
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (ValueError, OSError, RecursionError):  # RecursionError: JSON nested past the parser's depth
        cfg = {}
    if not isinstance(cfg, dict):  # valid JSON but not a config (a list, a number): "hf ?" like a missing dtype
        cfg = {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("quant_method"), str):  # its weights' own format, not the
        return f"hf {quant['quant_method']}" + _unless_readable(cfg)  # dtype it computes in (FP8 says bfloat16)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "?"
    return f"hf {dtype}".replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")


def _unless_readable(cfg: dict) -> str:
    """" (unsupported)" for a quantization localrun refuses (compressed-tensors' int4 beside its FP8)."""
    from .config import read_quantization

    try:
        read_quantization(cfg)
    except LocalrunError:
        return " (unsupported)"
    return ""


def model_family(model_dir: Path) -> str:
    """config.json's model_type ("qwen3_moe", "gemma4", ...), marked when localrun has no family for it."""
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (ValueError, OSError, AttributeError, RecursionError):
        return "?"
    if not isinstance(model_type, str):
        return "?"
    return model_type if model_type in SUPPORTED_MODEL_TYPES else f"{model_type} (unsupported)"


def list_local_models(cache: Path | None = None) -> list[LocalModel]:
    """Models on this machine: the demo (when built) and every model snapshot in the Hugging Face cache."""
    found = []
    if (DEMO_DIR / "config.json").is_file():
        found.append(LocalModel(DEMO_NAME, str(DEMO_DIR), disk_size(DEMO_DIR), model_format(DEMO_DIR),
                                model_family(DEMO_DIR)))
    cache = cache or hf_cache_dir()
    for folder in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        snap = _snapshot(folder)
        if snap is None:
            continue
        repo_id = folder.name.removeprefix("models--").replace("--", "/", 1)
        found.append(LocalModel(repo_id, str(snap), disk_size(snap), model_format(snap), model_family(snap)))
    return found
