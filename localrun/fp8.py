"""FP8 checkpoints, read as bf16.

Block-scaled FP8 is how Qwen (Qwen3-30B-A3B-FP8, Qwen3-Coder-30B-A3B-Instruct-FP8) and DeepSeek ship
their weights, at half the download of bf16: config.json says `"quantization_config": {"quant_method":
"fp8", "weight_block_size": [128, 128]}`, each quantized matrix `W` is stored as e4m3 codes `W` and
one scale per 128 x 128 block `W_scale_inv` (despite the name, a multiplier):

    W[i, j] = codes[i, j] * scale[i // 128, j // 128]

(a partial last block keeps its own scale). localrun computes with bf16 matrices and 4-bit experts,
so `Fp8Checkpoint` presents each such pair as the bf16 tensor it stands for, dequantized as it is
read (the product in fp32, rounded once to bf16: what transformers loads on a machine without FP8
kernels), and everything downstream (plan, loader, quantize) sees an ordinary bf16 checkpoint.
Tensors the checkpoint keeps unquantized (embeddings, norms, routers, lm_head) pass through.
Any other `quant_method` (GPTQ, AWQ, bitsandbytes, compressed-tensors, ...) is refused by name
(`config.read_quantization`, so `fit` refuses it too).
"""

from __future__ import annotations

import math

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import LocalrunError

SCALE_SUFFIX = "_scale_inv"
CODES = (torch.float8_e4m3fn, torch.float8_e5m2)
# What a dynamic or static activation scheme stores beside the weights; weight-only dequantization needs none.
ACTIVATION_SUFFIXES = ("input_scale", "activation_scale")
DEQUANTIZED = torch.bfloat16


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], first_row: int = 0) -> torch.Tensor:
    """bf16 weights of FP8 `codes` [..., rows, cols] and their block `scale` [..., ceil(rows/b0), ceil(cols/b1)].

    first_row: the row of the full matrix that codes' first row is (a slice of rows); `scale` then
    holds the block rows from `first_row // b0` on.
    """
    rows, cols = codes.shape[-2:]
    row_block = (torch.arange(first_row, first_row + rows) // block[0]) - first_row // block[0]
    col_block = torch.arange(cols) // block[1]
    expanded = scale.float().index_select(-2, row_block).index_select(-1, col_block)
    return (codes.float() * expanded).to(DEQUANTIZED)


class Fp8Checkpoint:
    """A Checkpoint whose FP8 matrices read as bf16 (see the module's docstring); the same interface."""

    def __init__(self, inner: Checkpoint, block: tuple[int, int]):
        self.inner, self.block = inner, block
        self.dir, self.metadata = inner.dir, inner.metadata
        self.tensors: dict[str, TensorInfo] = {}
        self._scales: dict[str, str] = {}
        for name, info in inner.tensors.items():
            if name.endswith(SCALE_SUFFIX) or name.endswith(ACTIVATION_SUFFIXES):
                continue
            if info.dtype in CODES:
                self._scales[name] = self._check_scale(name, info)
                info = TensorInfo(info.file, DEQUANTIZED, info.shape, info.offset)
            self.tensors[name] = info

    def _check_scale(self, name: str, info: TensorInfo) -> str:
        """The name of FP8 tensor `name`'s scale, after checking it has one of the shape its block needs."""
        scale = name + SCALE_SUFFIX
        if scale not in self.inner.tensors:
            raise LocalrunError(f"FP8 tensor {name} has no {scale}")
        if len(info.shape) < 2:
            raise LocalrunError(f"FP8 tensor {name} has shape {list(info.shape)}; localrun reads FP8 matrices only")
        want = (*info.shape[:-2], *(math.ceil(n / b) for n, b in zip(info.shape[-2:], self.block)))
        got = self.inner.tensors[scale]
        if got.shape != want or not got.dtype.is_floating_point:
            raise LocalrunError(f"{scale} is {str(got.dtype).removeprefix('torch.')} {list(got.shape)}; blocks of "
                                f"{self.block[0]} x {self.block[1]} over {name} {list(info.shape)} need "
                                f"floating point {list(want)}")
        return scale

    def matrix_dtype(self) -> torch.dtype | None:
        return Checkpoint.matrix_dtype(self)

    def read(self, name: str) -> torch.Tensor:
        shape = self.tensors[name].shape
        return self.read_rows(name, 0, shape[0] if shape else None)

    def read_rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) of one tensor, dequantized when it is FP8 (only the blocks those rows need)."""
        scale = self._scales.get(name)
        if scale is None:
            return self.inner.read_rows(name, start, stop)
        codes = self.inner.read_rows(name, start, stop)
        if codes.dim() > 2:  # [E, rows, cols]: each leading index has its own grid of scales
            return dequantize(codes, self.inner.read_rows(scale, start, stop), self.block)
        b = self.block[0]
        return dequantize(codes, self.inner.read_rows(scale, start // b, -(-stop // b)), self.block, first_row=start)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors
