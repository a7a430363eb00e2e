"""A checkpoint of random tensors made in memory: a real config's shapes without its 50 GB of weights.

`RandomCheckpoint(args)` answers the loader's questions (names, shapes, dtypes, `read`) exactly as
`checkpoint.Checkpoint` does for a directory, but each tensor is drawn when it is read, on a device
of the caller's choice (the GPU draws a 1 GiB expert tensor in milliseconds), and nothing is ever
written. `scripts/gpu_check.py` loads Gemma 4 26B-A4B's real config through it to measure memory
and speed at full size.

Values: matrices ~ N(0, 0.02) (hidden states stay finite through 30 layers), 1-D weights near 1,
scalars 1: a model that computes something, not one that computes the right thing. A fused
[E, ...] expert tensor is drawn expert by expert, so the loader's chunked reads (`read_rows`) stay
a chunk on the device rather than a whole layer (1.5 GiB in bf16 for 26B-A4B).
"""

from __future__ import annotations

import zlib

import torch

from .checkpoint import TensorInfo
from .config import ModelArgs
from .models import family

MATRIX_STD = 0.02


class RandomCheckpoint:
    """Duck-typed `Checkpoint`: the text tensors of `args` under their full checkpoint names."""

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 seed: int = 0):
        self.dtype, self.device, self.seed = dtype, torch.device(device), seed
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape in family(args.model_type).checkpoint_shapes(args).items():
            full = name if name == "lm_head.weight" else args.weight_prefix + name
            self.tensors[full] = TensorInfo(file=None, dtype=dtype, shape=tuple(shape))
        self.metadata: dict = {}

    def matrix_dtype(self) -> torch.dtype:
        return self.dtype

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, drawn from a generator seeded by its name (the same bits on every read)."""
        info = self.tensors[name]
        if len(info.shape) > 2:  # fused experts: expert by expert, so `read_rows` draws a chunk alone
            return self.read_rows(name, 0, info.shape[0])
        gen = torch.Generator(self.device).manual_seed(self._seed(name))
        if len(info.shape) > 1:
            out = torch.randn(info.shape, generator=gen, device=self.device, dtype=torch.float32)
            return out.mul_(MATRIX_STD).to(self.dtype)
        if name.endswith("layer_scalar") or info.shape == (1,):
            return torch.ones(info.shape, device=self.device, dtype=self.dtype)
        out = torch.rand(info.shape, generator=gen, device=self.device, dtype=torch.float32)
        return out.mul_(0.2).add_(0.9).to(self.dtype)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `name` (the same bits as in `read`); a 3-D tensor draws only those."""
        info = self.tensors[name]
        if len(info.shape) <= 2:
            return self.read(name)[start:stop]
        out = torch.empty((stop - start, *info.shape[1:]), dtype=self.dtype, device=self.device)
        for i in range(start, stop):
            gen = torch.Generator(self.device).manual_seed(self._seed(f"{name}[{i}]"))
            row = torch.randn(info.shape[1:], generator=gen, device=self.device, dtype=torch.float32)
            out[i - start] = row.mul_(MATRIX_STD)
        return out

    def _seed(self, name: str) -> int:
        return self.seed * 1_000_003 + zlib.crc32(name.encode())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors
