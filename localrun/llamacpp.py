"""llama.cpp as a peer for `localrun bench --compare llama.cpp`: the checkpoint converted to GGUF with
llama.cpp's own converter, quantized with its own quantizer, run through llama-cpp-python.

Three precisions (`GGUF_PRECISIONS`):
  bf16          convert_hf_to_gguf.py --outtype bf16
  q4_0-experts  localrun NF4's mix: token embedding, output, attention, dense MLP and router bf16,
                routed experts Q4_0 (llama_model_quantize with per-tensor overrides, as
                llama-quantize --tensor-type / --token-embedding-type / --output-tensor-type)
  q4_0          every quantizable matrix Q4_0 (llama-quantize --pure Q4_0)

The GGUFs are cached beside the checkpoint (`gguf_path`). llama.cpp needs two input-side fixes
that the converter does not make (`prepare_checkpoint`): the tokenizer must cover `vocab_size`
(padded with <unusedN>), and added tokens marked special in tokenizer.json must be declared in
tokenizer_config.json, or the converter writes Gemma 4's <|turn> as a plain token that llama.cpp
splits into characters.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import LocalrunError

INSTALL_HINT = ("--compare llama.cpp needs llama-cpp-python: pip install -e '.[llamacpp]' "
                "(or scripts/build_llama_cpp.sh for a native build)")
CONVERTER = "convert_hf_to_gguf.py"
# llama-cpp-python's sdist vendors llama.cpp; scripts/build_llama_cpp.sh keeps it unpacked here
CONVERTER_ENV = "LOCALRUN_LLAMA_CPP"

# ggml_type and llama_ftype values (ggml.h, llama.h)
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 8, 30
GGML_TYPE_NAMES = {GGML_F32: "f32", GGML_F16: "f16", GGML_Q4_0: "q4_0", GGML_Q8_0: "q8_0", GGML_BF16: "bf16"}
FTYPE_MOSTLY_Q4_0 = 2
GGUF_PRECISIONS = ("bf16", "q4_0-experts", "q4_0")
# a routed expert's stacked weights: blk.N.ffn_{gate,up,gate_up,down}_exps.weight (shared experts are _shexp)
ROUTED_EXPERT = re.compile(r"^blk\.\d+\.ffn_[a-z_]+_exps\.weight$")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def system_info() -> str:
    """The instruction sets llama.cpp's CPU backend was built with and uses, from
    llama_print_system_info ("CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |"): the ones set."""
    import llama_cpp

    return features_set(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


def features_set(text: str) -> str:
    return " ".join(m.group(1) for m in re.finditer(r"([A-Za-z0-9_]+) = 1\b", text))


# Where things are ---------------------------------------------------------------------------

def fingerprint(model_dir: Path, llama_version: str) -> str:
    """What a converted GGUF depends on: the llama.cpp version and the checkpoint's files (name,
    size, mtime), so a rewritten checkpoint or another llama.cpp converts afresh."""
    h = hashlib.sha256(llama_version.encode())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".json", ".safetensors", ".jinja") and f.is_file():
            st = f.stat()
            h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localrun"  # as bench.cache_root


def gguf_path(model_dir: Path, precision: str, key: str) -> Path:
    """The cached GGUF of `model_dir` at `precision`: DIR.KEY.PRECISION.gguf beside the checkpoint, or
    in the cache's gguf/ for one inside the installed package (the demo) or beside an unwritable one."""
    if precision not in GGUF_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(GGUF_PRECISIONS)}, not {precision!r}")
    model_dir = Path(model_dir).resolve()
    where = model_dir.parent
    if Path(__file__).resolve().parent in model_dir.parents or not os.access(where, os.W_OK):
        where = cache_root() / "gguf"
    return where / f"{model_dir.name}.{key}.{precision}.gguf"


def find_converter() -> Path:
    """convert_hf_to_gguf.py: $LOCALRUN_LLAMA_CPP (a llama.cpp tree, or llama-cpp-python's sdist
    unpacked), else the sdist scripts/build_llama_cpp.sh unpacked for the installed version."""
    roots = [Path(os.environ[CONVERTER_ENV])] if os.environ.get(CONVERTER_ENV) else \
        [cache_root() / "llama.cpp" / f"llama_cpp_python-{version()}"]
    for root in roots:
        for path in (root / CONVERTER, root / "vendor" / "llama.cpp" / CONVERTER):
            if path.is_file():
                return path
    raise LocalrunError(f"llama.cpp's {CONVERTER} not found in {roots[0]}: set {CONVERTER_ENV} to a llama.cpp "
                        "source tree (llama-cpp-python's sdist has one in vendor/llama.cpp; "
                        "scripts/build_llama_cpp.sh keeps it)")


# The input-side fixes -----------------------------------------------------------------------

def pad_tokenizer(tokenizer: dict, vocab_size: int) -> dict:
    """tokenizer.json (parsed) with every id below `vocab_size` given a token: the missing ones
    become <unusedN>, numbered past the highest <unusedN> already there. Unchanged if complete."""
    vocab = dict(tokenizer["model"]["vocab"])
    used = set(vocab.values()) | {t["id"] for t in tokenizer.get("added_tokens", [])}
    missing = [i for i in range(vocab_size) if i not in used]
    if not missing:
        return tokenizer
    names = set(vocab) | {t["content"] for t in tokenizer.get("added_tokens", [])}
    n = 1 + max((int(m.group(1)) for t in names if (m := re.fullmatch(r"<unused(\d+)>", t))), default=-1)
    vocab.update({f"<unused{n + k}>": i for k, i in enumerate(missing)})
    return {**tokenizer, "model": {**tokenizer["model"], "vocab": vocab}}


NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def declare_special_tokens(tokenizer: dict, tokenizer_config: dict) -> dict:
    """tokenizer_config.json (parsed) declaring every added token tokenizer.json marks special, so the
    converter types it CONTROL: the ones not named (bos, eos, ...) nor listed yet are appended to
    `extra_special_tokens` (and the older `additional_special_tokens`, which transformers < 5 reads)."""
    named = {tokenizer_config.get(k) for k in NAMED_SPECIALS}
    listed = list(tokenizer_config.get("extra_special_tokens") or tokenizer_config.get("additional_special_tokens")
                  or [])
    listed = [t if isinstance(t, str) else t.get("content") for t in listed]
    extra = [t["content"] for t in sorted(tokenizer.get("added_tokens", []), key=lambda t: t["id"])
             if t.get("special") and t["content"] not in named and t["content"] not in listed]
    if not extra:
        return tokenizer_config
    return {**tokenizer_config, "extra_special_tokens": listed + extra, "additional_special_tokens": listed + extra}


def prepare_checkpoint(model_dir: Path, out: Path, vocab_size: int) -> Path:
    """`out`: links to `model_dir`'s files, with tokenizer.json padded and tokenizer_config.json's
    special tokens declared (the converter's input)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            (out / f.name).symlink_to(f.resolve())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config_file = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    (out / "tokenizer.json").write_text(json.dumps(pad_tokenizer(tokenizer, vocab_size), ensure_ascii=False),
                                        encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(declare_special_tokens(tokenizer, tok_config), indent=2),
                                               encoding="utf-8")
    return out


def text_vocab_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return (config.get("text_config") or config)["vocab_size"]


# The quantization mix -----------------------------------------------------------------------

def tensor_type_overrides(tensors: dict[str, tuple[tuple[int, ...], int]], precision: str) -> list[tuple[str, int]]:
    """llama_model_quantize's per-tensor overrides (llama-quantize --tensor-type NAME=TYPE) for
    `tensors` (GGUF name -> (shape, ggml type)) at `precision`: one anchored pattern per matrix,
    routed experts Q4_0 and every other matrix bf16 for "q4_0-experts"; none for "q4_0" (pure) and
    "bf16" (not quantized). Vectors (norms, scales) are never quantized and get no entry."""
    if precision not in GGUF_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(GGUF_PRECISIONS)}, not {precision!r}")
    if precision != "q4_0-experts":
        return []
    return [(f"^{re.escape(name)}$", GGML_Q4_0 if ROUTED_EXPERT.match(name) else GGML_BF16)
            for name, (shape, _) in tensors.items() if len(shape) >= 2]


def check_mix(tensors: dict[str, tuple[tuple[int, ...], int]], precision: str, path: Path) -> None:
    """Raise unless a quantized GGUF (`tensors` from its header) holds `precision`: every routed
    expert Q4_0, and for q4_0-experts nothing else quantized. llama.cpp silently falls back to
    another type where a row does not fit its blocks, which would compare other precisions."""
    unquantized = (GGML_F32, GGML_F16, GGML_BF16)
    wrong = [f"{name} is {GGML_TYPE_NAMES.get(kind, kind)}" for name, (_, kind) in tensors.items()
             if (kind != GGML_Q4_0 if ROUTED_EXPERT.match(name) else
                 precision == "q4_0-experts" and kind not in unquantized)]
    if precision == "q4_0-experts" and not any(ROUTED_EXPERT.match(name) for name in tensors):
        wrong.insert(0, "it has no routed experts (blk.N.ffn_*_exps.weight)")
    if wrong:
        raise LocalrunError(f"{path.name} is not {precision}: {wrong[0]}" + (f" (and {len(wrong) - 1} more)"
                                                                             if len(wrong) > 1 else ""))


# GGUF header --------------------------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """A GGUF file's tensors (name -> (shape, ggml type)), from its header (format v2/v3)."""
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise LocalrunError(f"{path}: truncated GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def skip_value(kind: int) -> None:
            if kind == 8:
                f.seek(read("Q"), 1)
            elif kind == 9:
                item, count = read("I"), read("Q")
                if item in _SCALARS:
                    f.seek(struct.calcsize("<" + _SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            elif kind in _SCALARS:
                read(_SCALARS[kind])
            else:
                raise LocalrunError(f"{path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise LocalrunError(f"{path} is not a GGUF file")
        if read("I") not in (2, 3):
            raise LocalrunError(f"{path}: unsupported GGUF version")
        n_tensors, n_kv = read("Q"), read("Q")
        for _ in range(n_kv):
            string()
            skip_value(read("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            shape = tuple(read("Q") for _ in range(read("I")))
            tensors[name] = (shape, read("I"))
            read("Q")  # offset
        return tensors


# Making the GGUFs ---------------------------------------------------------------------------

def convert(model_dir: Path, out: Path, converter: Path | None = None) -> Path:
    """`model_dir` as a bf16 GGUF at `out` (written atomically), with llama.cpp's converter."""
    converter = converter or find_converter()
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as tmp:
        src = prepare_checkpoint(model_dir, Path(tmp) / "checkpoint", text_vocab_size(model_dir))
        part = Path(tmp) / out.name
        run = subprocess.run([sys.executable, str(converter), str(src), "--outtype", "bf16", "--outfile", str(part)],
                             capture_output=True, text=True)
        if run.returncode != 0 or not part.is_file():
            lines = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
            raise LocalrunError(f"{converter.name} failed on {model_dir}: {lines[-1] if lines else run.returncode}")
        os.replace(part, out)
    return out


GGML_LOG_ERROR = 4  # enum ggml_log_level
_log_errors: list[str] = []
_log_callback = None  # kept referenced: llama.cpp holds the pointer


def _capture_log() -> None:
    """Keep llama.cpp's log off stderr, its error lines for our messages. (llama-cpp-python's own
    callback maps levels by an older ggml enum, so it prints warnings as errors.)"""
    global _log_callback
    import llama_cpp

    if _log_callback is None:
        def keep(level: int, text: bytes | None, _user) -> None:
            if level == GGML_LOG_ERROR and text:
                _log_errors.append(text.decode("utf-8", "replace").strip())

        _log_callback = llama_cpp.llama_log_callback(keep)
    _log_errors.clear()
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _why() -> str:
    return f": {_log_errors[0]}" if _log_errors else ""


def quantize(src: Path, out: Path, precision: str, threads: int) -> Path:
    """`src` (a bf16 GGUF) quantized to `precision` at `out` (atomically), through llama_model_quantize."""
    import llama_cpp

    _capture_log()
    tensors = read_gguf_tensors(src)
    overrides = tensor_type_overrides(tensors, precision)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = FTYPE_MOSTLY_Q4_0
    if precision == "q4_0":
        params.pure = True
    else:
        params.token_embedding_type = GGML_BF16
        params.output_tensor_type = GGML_BF16
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()  # ends with a null pattern
        keep = [p.encode() for p, _ in overrides]
        for i, (pattern, kind) in enumerate(zip(keep, (t for _, t in overrides))):
            table[i].pattern, table[i].type = pattern, kind
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    fd, part = tempfile.mkstemp(prefix=".gguf-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    try:
        if llama_cpp.llama_model_quantize(str(src).encode(), part.encode(), ctypes.byref(params)) != 0:
            raise LocalrunError(f"llama_model_quantize failed on {src} ({precision}){_why()}")
        check_mix(read_gguf_tensors(Path(part)), precision, out)
        os.replace(part, out)
    finally:
        Path(part).unlink(missing_ok=True)
    return out


def ensure_gguf(model_dir: Path, precision: str, threads: int) -> Path:
    """The GGUF of `model_dir` at `precision`, converted (and quantized) on first use, cached beside it."""
    if not available():
        raise LocalrunError(INSTALL_HINT)
    model_dir = Path(model_dir).resolve()
    key = fingerprint(model_dir, version())
    out = gguf_path(model_dir, precision, key)
    if out.is_file():
        return out
    bf16 = gguf_path(model_dir, "bf16", key)
    bf16.parent.mkdir(parents=True, exist_ok=True)
    if not bf16.is_file():
        convert(model_dir, bf16)
    return out if out.is_file() else quantize(bf16, out, precision, threads)


# Running ------------------------------------------------------------------------------------

class Runner:
    """One GGUF loaded through llama.cpp's C API, set up as llama.cpp's own tools set it (flash
    attention auto, n_ubatch 512, sliding layers' KV cache the window, not the context), generating
    greedily from given prompt ids on a cleared KV cache."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp

        _capture_log()
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LocalrunError(f"llama.cpp could not load {path}{_why()}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.swa_full = False  # the library defaults to a full-context cache for sliding layers too
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise LocalrunError(f"llama.cpp could not make a context of {n_ctx} tokens for {path}{_why()}")
        self.sampler = llama_cpp.llama_sampler_init_greedy()

    def generate(self, ids: list[int], n: int, tick: Callable[[], None] = lambda: None) -> list[int]:
        """Prefill `ids` (one batch), then sample and decode until `n` tokens came out (tick() at
        each); eos is ignored."""
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        lib.llama_sampler_reset(self.sampler)
        batch_ids = (lib.llama_token * len(ids))(*ids)
        self._decode(lib.llama_batch_get_one(batch_ids, len(ids)))
        out = []
        token = (lib.llama_token * 1)()
        for i in range(n):
            out.append(lib.llama_sampler_sample(self.sampler, self.ctx, -1))
            tick()
            if i + 1 < n:
                token[0] = out[-1]
                self._decode(lib.llama_batch_get_one(token, 1))
        return out

    def _decode(self, batch) -> None:
        if (code := self.lib.llama_decode(self.ctx, batch)) != 0:
            raise LocalrunError(f"llama_decode failed ({code}){_why()}")

    def close(self) -> None:
        self.lib.llama_sampler_free(self.sampler)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)
