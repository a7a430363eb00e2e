"""Safetensors checkpoints: an inventory from headers only, lazy per-tensor reads.

Only safetensors is ever read (no pickle). Headers are parsed by hand so a missing shard, a
truncated file or a corrupt header is reported in one line before any tensor is touched.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LocalrunError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,  # FP8 checkpoints' codes (see localrun.fp8)
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # of the tensor's first byte in the file

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


# Bytes per element of every safetensors dtype, readable or not (so any file's layout can be checked).
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
            "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def read_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, metadata) of one safetensors file, validated against the file size.

    Every entry is checked before any tensor is read: a known dtype, a shape of non-negative
    integers, data_offsets that hold exactly shape x itemsize bytes, inside the file, and no two
    tensors sharing bytes. Each entry gets "offset", its first byte in the file.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER):
                raise ValueError("header longer than the file" if n > size - 8 else f"header of {n} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LocalrunError(f"corrupt safetensors file {path.name}: {e}") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LocalrunError(f"corrupt safetensors file {path.name}: __metadata__ is not an object")
    ranges = sorted((_entry_range(path, name, entry), name) for name, entry in header.items())
    for ((_, end), a), ((begin, _), b) in zip(ranges, ranges[1:]):
        if begin < end:
            raise LocalrunError(f"corrupt safetensors file {path.name}: tensors {a!r} and {b!r} overlap")
    end = ranges[-1][0][1] if ranges else 0
    if 8 + n + end > size:
        raise LocalrunError(f"truncated safetensors file {path.name}: {size} bytes, needs {8 + n + end}")
    for entry in header.values():
        entry["offset"] = 8 + n + entry["data_offsets"][0]
    return header, metadata


def _entry_range(path: Path, name: str, entry) -> tuple[int, int]:
    """An entry's (begin, end) in the data section; LocalrunError if its fields don't add up."""
    def corrupt(problem: str):
        return LocalrunError(f"corrupt safetensors file {path.name}: tensor {name!r} {problem}")

    if not isinstance(entry, dict):
        raise corrupt("is not an object")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise corrupt(f"has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    if entry.get("dtype") not in ITEMSIZE:
        raise LocalrunError(f"unsupported dtype {entry.get('dtype')!r} for {name!r} in {path.name}")
    count = 1
    for d in shape:
        count *= d
    if count * ITEMSIZE[entry["dtype"]] != offsets[1] - offsets[0]:
        raise corrupt(f"of shape {shape} {entry['dtype']} needs {count * ITEMSIZE[entry['dtype']]} bytes, "
                      f"its data_offsets hold {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _plain_name(name) -> bool:
    """A file name in the model directory itself: no path, nothing hidden, so reads stay inside it."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


class Checkpoint:
    """The tensors of a model directory: names, dtypes and shapes from the headers; data read on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict] = {}
        for file in self._shard_files():
            header, metadata = read_header(file)
            self.metadata[file] = metadata
            for name, entry in header.items():
                if entry.get("dtype") not in DTYPES:
                    raise LocalrunError(f"unsupported dtype {entry.get('dtype')} for {name} in {file.name}")
                self.tensors[name] = TensorInfo(file, DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["offset"])

    def matrix_dtype(self) -> torch.dtype | None:
        """The floating dtype most 2-D+ tensors are stored in (what decides their in-memory dtype)."""
        counts = Counter(t.dtype for t in self.tensors.values() if len(t.shape) > 1 and t.dtype.is_floating_point)
        return counts.most_common(1)[0][0] if counts else None

    def _shard_files(self) -> list[Path]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
                raise LocalrunError(f"invalid {INDEX} in {self.dir}: {e}") from None
            if not (isinstance(weight_map, dict) and all(_plain_name(f) for f in weight_map.values())):
                raise LocalrunError(f"invalid {INDEX} in {self.dir}: weight_map must map names to shard "
                                    "file names in the same directory")
            files = [self.dir / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise LocalrunError(f"missing shard {f.name} (listed in {INDEX}) in {self.dir}")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.dir.glob("*.bin")] + [p.name for p in self.dir.glob("*.pt*")]
            hint = f" ({pickled[0]} is a pickle file: localrun never loads those)" if pickled else ""
            raise LocalrunError(f"no safetensors weights in {self.dir}{hint}")
        return files

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard into memory of its own.

        Plain reads, not a memory map: a mapped shard keeps every page it was read through in
        this process's RSS for as long as it stays mapped, so streaming a 5 GB shard of experts
        would hold all of it; a read copy is freed as soon as the caller drops it.
        """
        return self.read_rows(name, 0, self.tensors[name].shape[0] if self.tensors[name].shape else None)

    def read_rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) along the first dimension of one tensor, reading only their bytes
        (stop None: a 0-d tensor, read whole)."""
        info = self.tensors[name]
        shape = info.shape if stop is None else (stop - start, *info.shape[1:])
        row_bytes = 0 if stop is None else math.prod(info.shape[1:]) * info.dtype.itemsize
        out = torch.empty(shape, dtype=info.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset + start * row_bytes)
            done = 0
            while done < len(view):  # one read() returns at most ~2 GiB
                n = f.readinto(view[done:])
                if not n:
                    raise LocalrunError(f"{info.file.name} ends inside tensor {name}")
                done += n
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


def check_shape(ckpt, name: str, shape: tuple[int, ...]) -> None:
    """LocalrunError when tensor `name` of any checkpoint reader is not of `shape`, the one config.json implies."""
    stored = tuple(ckpt.tensors[name].shape)
    if stored != tuple(shape):
        raise LocalrunError(f"tensor {name} has shape {list(stored)}, config says {list(shape)}")


def read_rows(ckpt, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of tensor `name` of any checkpoint reader: only those bytes where it can
    (Checkpoint, Fp8Checkpoint, synthetic.RandomCheckpoint), else sliced from the whole tensor."""
    rows = getattr(ckpt, "read_rows", None)
    return rows(name, start, stop) if rows is not None else ckpt.read(name)[start:stop]


def open_checkpoint(model_dir: str | Path):
    """The checkpoint of a model directory, FP8 pairs dequantized when config.json says they are FP8."""
    from .config import read_quantization
    from .fp8 import CODES, Fp8Checkpoint  # fp8 builds on this module

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    layout = read_quantization(raw)
    ckpt = Checkpoint(model_dir)
    if layout is not None:
        return Fp8Checkpoint(ckpt, layout)
    stray = next((n for n, t in ckpt.tensors.items() if t.dtype in CODES), None)
    if stray is not None:
        raise LocalrunError(f"tensor {stray} is stored in FP8 but config.json has no quantization_config "
                            "to say how to scale it")
    return ckpt
