"""How a tensor is quantized, and what that costs in bytes (shared by the quantizer and the fit planner)."""

from __future__ import annotations

import math
from dataclasses import dataclass

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax of 256 blocks at a time with double quant


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

    def nbytes(self, numel: int) -> int:
        """Bytes of one quantized tensor of `numel` values: 4-bit codes plus the absmax statistics."""
        blocks = math.ceil(numel / self.blocksize)
        codes = (numel + 1) // 2
        if not self.double_quant:
            return codes + 4 * blocks
        # absmax as uint8 codes, plus an fp32 absmax per 256 of them and one fp32 offset
        return codes + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4
