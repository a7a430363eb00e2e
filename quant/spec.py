"""How a tensor is quantized, and what that costs in bytes (shared by the quantizer and the fit planner)."""

from __future__ import annotations

import math
from dataclasses import dataclass

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax of 256 blocks at a time with double quant
# Every stored part (codes, absmax, ...) starts on a 16-byte boundary: CUDA 4-bit kernels load
# the codes as 16-byte vectors, and fp32 statistics must be viewable in place.
PART_ALIGN = 16


def align(nbytes: int, to: int = PART_ALIGN) -> int:
    """`nbytes` rounded up to a multiple of `to`."""
    return -(-nbytes // to) * to


@dataclass(frozen=True)
class QuantSpec:
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, not {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 32..4096, not {self.blocksize}")

    def check_kernel_sizes(self, hidden_size: int, intermediate_size: int) -> None:
        """ValueError unless the blocksize divides both matmul input sizes (hidden for gate_up,
        the expert intermediate size for down): bitsandbytes' fused 4-bit kernel needs
        K % blocksize == 0 and otherwise dequantizes the whole matrix on every call."""
        bad = [f"{what} {k}" for what, k in (("hidden size", hidden_size), ("expert intermediate size",
                                                                             intermediate_size)) if k % self.blocksize]
        if bad:
            ok = [b for b in (32, 64, 128, 256, 512, 1024, 2048, 4096)
                  if hidden_size % b == 0 and intermediate_size % b == 0]
            fix = f"use {', '.join(map(str, ok))}" if ok else "no blocksize from 32 to 4096 divides both"
            raise ValueError(f"blocksize {self.blocksize} does not divide the {' and the '.join(bad)} "
                             f"(bitsandbytes' 4-bit kernel needs both divisible); {fix}")

    def nbytes(self, numel: int) -> int:
        """Bytes stored for one quantized matrix of `numel` values, exactly as quant.nf4 packs it.

        4-bit codes plus the absmax statistics, each part padded to PART_ALIGN. The 16-entry
        code tables are constants rebuilt from bitsandbytes, so they cost nothing per matrix.
        """
        blocks = math.ceil(numel / self.blocksize)
        codes = align((numel + 1) // 2)
        if not self.double_quant:
            return codes + align(4 * blocks)
        # absmax as uint8 codes, plus an fp32 absmax per 256 of them and one fp32 offset
        return codes + align(blocks) + align(4 * math.ceil(blocks / NESTED_BLOCKSIZE)) + align(4)
