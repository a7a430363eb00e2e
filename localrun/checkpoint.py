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


def read_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, metadata) of one safetensors file, validated against the file size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise LocalrunError(f"corrupt safetensors file {path.name}: {e}") from None
    metadata = header.pop("__metadata__", None) or {}
    for entry in header.values():
        entry["offset"] = 8 + n + entry["data_offsets"][0]
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise LocalrunError(f"truncated safetensors file {path.name}: {size} bytes, needs {8 + n + end}")
    return header, metadata


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
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise LocalrunError(f"invalid {INDEX} in {self.dir}: {e}") from None
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
