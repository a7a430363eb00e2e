"""FP8 checkpoints, read as bf16.

FP8 releases are half the download of bf16, and two formats cover them (`config.read_quantization`
reads which one config.json declares):

- Qwen's and DeepSeek's block-scaled FP8 (Qwen3-30B-A3B-FP8, Qwen3-Coder-30B-A3B-Instruct-FP8):
  `"quant_method": "fp8", "weight_block_size": [128, 128]`; each quantized matrix W is stored as e4m3
  codes `W` and one scale per 128 x 128 block `W_scale_inv` (despite the name, a multiplier).
- compressed-tensors' float-quantized FP8 (llm-compressor's FP8, FP8-dynamic and FP8-block releases,
  which vLLM users have): codes `W` and `W_scale`, one scale per tensor ([1]), per output channel
  ([rows, 1]), per group of columns ([rows, cols / group]) or per block of `block_structure`
  (compressed-tensors 0.20 stores the codes as they are; older writers padded them to whole blocks,
  the true shape in `W_shape_original`).

Each is a grid of scales over the matrix, so one rule reads both:

    W[i, j] = codes[i, j] * scale[i // block_rows, j // block_cols]

localrun computes with bf16 matrices and 4-bit experts, so `Fp8Checkpoint` presents each (codes,
scale) pair as the bf16 tensor it stands for, dequantized as it is read (the product in fp32, rounded
once to bf16: what transformers loads on a machine without FP8 kernels), and everything downstream
(plan, loader, quantize) sees an ordinary bf16 checkpoint. Tensors kept unquantized (embeddings,
norms, routers, lm_head) pass through; activation scales (FP8 inference's, not needed here) are hidden.
"""

from __future__ import annotations

import math

import torch

from .checkpoint import Checkpoint, TensorInfo
from .config import FloatWeights
from .errors import LocalrunError

CODES = (torch.float8_e4m3fn, torch.float8_e5m2)
# What FP8 inference stores beside the weights (static activation and KV-cache scales): not needed here.
ACTIVATION_SCALES = (".input_scale", ".input_zero_point", ".output_scale", ".k_scale", ".v_scale",
                     ".activation_scale")
SHAPE_SUFFIX = "_shape_original"  # compressed-tensors: the true shape of block-padded codes
DEQUANTIZED = torch.bfloat16
DEQUANTIZE_CHUNK = 1 << 20  # weights dequantized at a time (fp32 temporaries: 8 bytes each)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], first_row: int = 0) -> torch.Tensor:
    """bf16 weights of FP8 `codes` [..., rows, cols] and their block `scale` [..., ceil(rows/b0), ceil(cols/b1)].

    first_row: the row of the full matrix that codes' first row is (a slice of rows); `scale` then
    holds the block rows from `first_row // b0` on.
    """
    rows, cols = codes.shape[-2:]
    row_block = (torch.arange(first_row, first_row + rows) // block[0]) - first_row // block[0]
    col_block = torch.arange(cols) // block[1]
    scale = scale.float()
    out = torch.empty(codes.shape, dtype=DEQUANTIZED)
    step = max(1, DEQUANTIZE_CHUNK // max(1, cols * math.prod(codes.shape[:-2])))
    for r in range(0, rows, step):  # fp32 temporaries of a few MiB, not 12 bytes a weight of the whole tensor
        w = codes[..., r : r + step, :].float()
        w *= scale.index_select(-2, row_block[r : r + step]).index_select(-1, col_block)
        out[..., r : r + step, :] = w
    return out


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cropped(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """w without the padding of whole blocks (compressed-tensors' block strategy), contiguous like every
    tensor a checkpoint reads (a strided view would take other kernels, other sums)."""
    return w if w.shape[-2:] == (rows, cols) else w[..., :rows, :cols].contiguous()


class Fp8Checkpoint:
    """A Checkpoint whose FP8 matrices read as bf16 (see the module's docstring); the same interface."""

    def __init__(self, inner: Checkpoint, layout: FloatWeights):
        self.inner, self.layout = inner, layout
        self.dir, self.metadata = inner.dir, inner.metadata
        self.tensors: dict[str, TensorInfo] = {}
        self._pairs: dict[str, tuple[str, tuple[int, int]]] = {}  # FP8 tensor -> (its scale, the scale's block)
        fp8 = [n for n, t in inner.tensors.items() if t.dtype in CODES]
        hidden = {n + layout.scale_suffix for n in fp8} | {n + SHAPE_SUFFIX for n in fp8}
        for name, info in inner.tensors.items():
            if name in hidden or name.endswith(ACTIVATION_SCALES):
                continue
            if info.dtype in CODES:
                shape = self._true_shape(name, info)
                self._pairs[name] = self._scale_of(name, info, shape)
                info = TensorInfo(info.file, DEQUANTIZED, shape, info.offset)
            self.tensors[name] = info

    def _true_shape(self, name: str, info: TensorInfo) -> tuple[int, ...]:
        """The matrix's shape: as stored, or as `W_shape_original` says when the codes were padded to whole blocks."""
        if len(info.shape) < 2:
            raise LocalrunError(f"FP8 tensor {name} has shape {list(info.shape)}; localrun reads FP8 matrices only")
        if name + "_zero_point" in self.inner.tensors:
            raise LocalrunError(f"FP8 tensor {name} has a zero point; localrun reads symmetric FP8 only")
        if name + SHAPE_SUFFIX not in self.inner.tensors:
            return info.shape
        stored = self.inner.tensors[name + SHAPE_SUFFIX]
        if stored.dtype.is_floating_point or stored.dtype == torch.bool or len(stored.shape) != 1:
            raise LocalrunError(f"{name}{SHAPE_SUFFIX} is {_dtype(stored.dtype)} {list(stored.shape)}, not a shape "
                                "(a list of integers)")
        shape = tuple(self.inner.read(name + SHAPE_SUFFIX).tolist())
        if len(shape) != len(info.shape) or any(not 0 < n <= s for n, s in zip(shape, info.shape)) \
                or shape[:-2] != info.shape[:-2]:
            raise LocalrunError(f"{name}{SHAPE_SUFFIX} is {list(shape)}, not a shape within the stored {list(info.shape)}")
        return shape

    def _scale_of(self, name: str, info: TensorInfo, shape: tuple[int, ...]) -> tuple[str, tuple[int, int]]:
        """FP8 tensor `name`'s scale and the (rows, columns) block each of its values covers, after checking
        that the scale is a grid of floats over the (stored) matrix."""
        scale = name + self.layout.scale_suffix
        if scale not in self.inner.tensors:
            raise LocalrunError(f"FP8 tensor {name} has no {scale}")
        got = self.inner.tensors[scale]
        stored = info.shape[-2:]
        grid = got.shape[-2:] if len(got.shape) >= 2 else (1, 1)  # per tensor: [1] or []
        if self.layout.block is not None:  # the config's blocks over the true matrix, a partial last one its own
            block = self.layout.block
            want = tuple(math.ceil(n / b) for n, b in zip(shape[-2:], block))
        else:  # the grid divides the stored (block-padded) matrix evenly
            block = tuple(s // g if g and s % g == 0 else 0 for s, g in zip(stored, grid))
            want = grid if all(block) else None
        if len(got.shape) >= 2:  # a grid over each matrix: [g0, g1], or [E, g0, g1] for [E, rows, cols]
            per_matrix = len(got.shape) == len(shape) and got.shape[:-2] == shape[:-2]
        else:  # one scale for the whole matrix
            per_matrix = len(shape) == 2 and math.prod(got.shape) == 1
        if want is None or tuple(grid) != want or not per_matrix or not got.dtype.is_floating_point:
            explain = (f"blocks of {block[0]} x {block[1]} need {list(shape[:-2]) + list(want)}" if self.layout.block
                       else "its grid must divide the matrix into equal blocks")
            raise LocalrunError(f"{scale} is {_dtype(got.dtype)} {list(got.shape)}, no scale "
                                f"grid for {name} {list(info.shape)}: {explain}, in floating point")
        return scale, block

    def matrix_dtype(self) -> torch.dtype | None:
        return Checkpoint.matrix_dtype(self)

    def read(self, name: str) -> torch.Tensor:
        shape = self.tensors[name].shape
        return self.read_rows(name, 0, shape[0] if shape else None)

    def read_rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) of one tensor, dequantized when it is FP8 (only the blocks those rows need)."""
        if name not in self._pairs:
            return self.inner.read_rows(name, start, stop)
        scale, block = self._pairs[name]
        cols = self.tensors[name].shape[-1]
        codes = self.inner.read_rows(name, start, stop)
        if codes.dim() > 2:  # [E, rows, cols]: each leading index has its own grid of scales
            rows = self.tensors[name].shape[-2]
            return _cropped(dequantize(codes, self._finite(scale, self.inner.read_rows(scale, start, stop)), block),
                            rows, cols)
        grid = self.inner.tensors[scale].shape
        if len(grid) < 2:  # one scale for the whole matrix
            values = self.inner.read(scale).reshape(1, 1)
        else:
            values = self.inner.read_rows(scale, start // block[0], -(-stop // block[0]))
        return _cropped(dequantize(codes, self._finite(scale, values), block, first_row=start), codes.shape[0], cols)

    @staticmethod
    def _finite(scale: str, values: torch.Tensor) -> torch.Tensor:
        """values, checked: a NaN or infinite scale would turn its whole block into NaN weights."""
        if not torch.isfinite(values.float()).all():
            raise LocalrunError(f"{scale} holds a NaN or infinite scale: the checkpoint is damaged")
        return values

    def __contains__(self, name: str) -> bool:
        return name in self.tensors
