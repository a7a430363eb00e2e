"""One layer's routed experts in one device buffer: the input of the grouped 4-bit MoE kernel.

Shape letters: E experts, H hidden, I expert intermediate, T tokens, K top-k.
An ExpertBuffer is a [E, nbytes] uint8 tensor whose row e is byte for byte the buffer of a
PackedExpert (quant.nf4): codes, absmax and nested statistics of gate_up [2I, H] and down [H, I]
at the offsets of the layer's shared ExpertLayout. So the experts are views (`buffer.expert(e)`),
moving one in is one row copy (`buffer.store(e, packed)`), and the kernel finds every field of
expert e at `e * nbytes + offset`. Each field across experts is a strided view (`buffer.part`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from quant.nf4 import _PART_DTYPES, MATRICES, ExpertLayout, Part, PackedExpert, _code_table

# the order of the byte offsets handed to the kernel: per matrix, codes / absmax / nested parts
OFFSET_FIELDS = ("codes", "absmax", "nested_absmax", "nested_offset")


def layout_offsets(layout: ExpertLayout) -> list[int]:
    """Byte offsets inside an expert's row of `layout`, gate_up then down, in OFFSET_FIELDS order
    (-1: absent): what the 4-bit kernels (Triton and C) take to find each part."""
    out = []
    for name in MATRICES:
        parts = layout.matrix(name).parts()
        out += [parts[f].offset if f in parts else -1 for f in OFFSET_FIELDS]
    return out


class ExpertBuffer:
    """E packed experts of one layer in one contiguous [E, layout.nbytes] uint8 tensor."""

    __slots__ = ("data", "layout", "code", "nested_code", "_offsets")

    def __init__(self, data: torch.Tensor, layout: ExpertLayout):
        if data.dtype != torch.uint8 or data.dim() != 2 or not data.is_contiguous():
            raise ValueError("an ExpertBuffer holds a contiguous [E, nbytes] uint8 tensor")
        if data.shape[1] != layout.nbytes:
            raise ValueError(f"rows of {data.shape[1]} bytes, layout needs {layout.nbytes}")
        if layout.nbytes % 4:  # fp32 statistics are read through a float32 view of the rows
            raise ValueError(f"expert size {layout.nbytes} is not a multiple of 4 bytes")
        hidden, inter = layout.down.shape
        if hidden % 2 or inter % 2:
            raise ValueError(f"the 4-bit MoE kernel needs an even hidden and intermediate size, got {hidden}, {inter}")
        self.data = data
        self.layout = layout
        # the 16-value NF4/FP4 table and the 256-value nested-absmax table, fp32 on data's device;
        # held here (not looked up per call) so that torch.compile sees plain tensors
        self.code = _code_table(layout.spec.quant_type, data.device)
        self.nested_code = _code_table("dynamic", data.device)
        self._offsets = layout_offsets(layout)  # read by every call of the op (an offloaded layer's: each token)

    @classmethod
    def empty(cls, layout: ExpertLayout, num_experts: int, device: torch.device | str = "cpu") -> ExpertBuffer:
        """Room for `num_experts` experts (zeros: padding stays deterministic), filled with `store`."""
        return cls(torch.zeros(num_experts, layout.nbytes, dtype=torch.uint8, device=device), layout)

    @classmethod
    def from_experts(cls, experts: Sequence[PackedExpert], device: torch.device | str | None = None) -> ExpertBuffer:
        """Stack a layer's PackedExperts (one copy each) on `device` (default: the first expert's)."""
        experts = list(experts)
        if not experts:
            raise ValueError("an ExpertBuffer needs at least one expert")
        layout = experts[0].layout
        if any(e.layout != layout for e in experts):
            raise ValueError("all experts of a layer must share one layout")
        buf = cls.empty(layout, len(experts), device if device is not None else experts[0].device)
        for e, packed in enumerate(experts):
            buf.store(e, packed)
        return buf

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def expert(self, e: int) -> PackedExpert:
        """Expert `e` as a PackedExpert whose buffer is a view of row e (no copy)."""
        return PackedExpert(self.data[e], self.layout)

    def experts(self) -> list[PackedExpert]:
        return [self.expert(e) for e in range(self.num_experts)]

    def store(self, e: int, packed: PackedExpert, non_blocking: bool = False) -> None:
        """Copy a PackedExpert into slot `e` (one copy, host->device where the devices differ)."""
        if packed.layout != self.layout:
            raise ValueError("the expert's layout differs from the buffer's")
        self.data[e].copy_(packed.buffer, non_blocking=non_blocking)

    def part(self, matrix: str, field: str) -> torch.Tensor:
        """One field of every expert, [E, *part shape], a strided view (e.g. part('down', 'absmax'))."""
        p = self.layout.matrix(matrix).parts()[field]
        return _strided(self.data, p)

    def offsets(self) -> list[int]:
        """Byte offsets inside an expert's row, gate_up then down, in OFFSET_FIELDS order (-1: absent).
        The buffer's own list: read it, do not change it."""
        return self._offsets

    def code_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the 16-value NF4/FP4 table, the 256-value nested-absmax table), fp32 on the buffer's device."""
        return self.code, self.nested_code

    def moe(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, act: str,
            untraced: bool = False) -> torch.Tensor:
        """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) through the localrun::moe_4bit op (no host sync on CUDA);
        untraced: its kernel without the op's dispatch (kernels.moe_4bit.moe_4bit)."""
        from localrun.kernels.moe_4bit import moe_4bit

        return moe_4bit(x_TH, ids_TK, w_TK, self, act, untraced)

    def __repr__(self) -> str:
        spec = self.layout.spec
        return (f"ExpertBuffer({self.num_experts} x {spec.quant_type} bs{spec.blocksize}"
                f"{' dq' if spec.double_quant else ''}, gate_up={self.layout.gate_up.shape}, "
                f"down={self.layout.down.shape}, {self.nbytes} B, {self.device})")


def _strided(data: torch.Tensor, part: Part) -> torch.Tensor:
    dtype = _PART_DTYPES[part.dtype]
    rows = data[:, part.offset : part.offset + part.nbytes]
    if dtype == torch.uint8:
        return rows.view(data.shape[0], *part.shape)
    # a float32 view of the whole rows (nbytes % 4 == 0, offsets 16-aligned), then the columns
    f32 = data.view(torch.float32)
    start = part.offset // 4
    return f32[:, start : start + part.nbytes // 4].view(data.shape[0], *part.shape)
