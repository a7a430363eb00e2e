"""bitsandbytes NF4/FP4 quantization, and one routed expert packed into one contiguous buffer.

Shape letters: E experts, H hidden, I expert intermediate; `2I` is the fused gate+up rows.
A PackedExpert holds `gate_up` [2I, H] and `down` [H, I] (checkpoint layout of
`experts.gate_up_proj[e]` / `experts.down_proj[e]`): their 4-bit codes and every
quantization statistic live in one 1-D uint8 tensor, so moving an expert between host and
device is a single copy. Where each part sits is an ExpertLayout, shared by all experts of a
layer. The 16-value NF4/FP4 table and the 256-value nested table are bitsandbytes constants,
rebuilt on demand rather than stored per expert.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState

from quant.spec import NESTED_BLOCKSIZE, QuantSpec, align

# dtypes a weight may come in (and a layout may name), by the name metadata uses
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_PART_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, "float32": torch.float32}
MATRICES = ("gate_up", "down")


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (only the dtypes in DTYPES)."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported weight dtype {dtype}; expected one of {', '.join(DTYPES)}")


# -- one matrix -----------------------------------------------------------------------------


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantState]:
    """(packed 4-bit codes [numel/2, 1] uint8, QuantState) of a 2-D matrix, on w's device: what
    bitsandbytes' quantize_4bit returns; on the CPU its codes and absmax come from the C kernel
    (`kernels.quantize_4bit`: the same values, 7-50x faster than bitsandbytes' torch ops there)."""
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {tuple(w.shape)}")
    w = w.contiguous()
    fast = _quantize_on_cpu(w, spec)
    if fast is not None:
        return fast
    return bnbf.quantize_4bit(w, blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                              quant_type=spec.quant_type)


@functools.lru_cache(maxsize=None)
def _buckets(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 15 midpoints between the sorted 4-bit code values, the code of each of the 16 buckets):
    what bitsandbytes' CPU quantize_4bit bucketizes a scaled weight by."""
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


def _quantize_on_cpu(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantState] | None:
    """bitsandbytes' quantize_4bit for a CPU matrix, its codes and absmax from the C kernel, and the
    QuantState built as bitsandbytes builds it (double quantization: the absmax less their mean,
    8-bit blockwise by bitsandbytes itself); None where the kernel does not apply."""
    from localrun import kernels

    if w.device.type != "cpu" or w.dtype not in DTYPES.values():
        return None
    bounds, order = _buckets(spec.quant_type)
    out = kernels.quantize_4bit(w, spec.blocksize, bounds, order)
    if out is None:
        return None
    packed, absmax = out
    code = bnbf.get_4bit_type(spec.quant_type, device="cpu")
    common = dict(shape=w.shape, dtype=w.dtype, blocksize=spec.blocksize, code=code, quant_type=spec.quant_type)
    if not spec.double_quant:
        return packed, QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    nested, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, QuantState(absmax=nested, offset=offset, state2=state2, **common)


def dequantize(codes: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The matrix back in `dtype` (default: the dtype it was quantized from)."""
    if dtype is not None and dtype != state.dtype:
        state = _with_dtype(state, dtype)
    return bnbf.dequantize_4bit(codes, state)


def _with_dtype(state: QuantState, dtype: torch.dtype) -> QuantState:
    # a shallow copy: the caller's state (maybe shared) keeps its own output dtype
    return QuantState(
        absmax=state.absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=dtype,
        offset=state.offset,
        state2=state.state2,
    )


@functools.lru_cache(maxsize=None)
def _code_table(kind: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' value tables: 'nf4'/'fp4' (16 values) or 'dynamic' (256, for nested absmax)."""
    if kind == "dynamic":
        return bnbf.create_dynamic_map().to(device)
    return bnbf.get_4bit_type(kind, device=device)


# -- layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One tensor inside the buffer: bytes [offset, offset + nbytes) viewed as `dtype` of `shape`."""

    offset: int
    shape: tuple[int, ...]
    dtype: str  # "uint8" | "float32"

    @property
    def nbytes(self) -> int:
        n = _PART_DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        """A view (no copy) of this part in a 1-D uint8 buffer."""
        return buffer[self.offset : self.offset + self.nbytes].view(_PART_DTYPES[self.dtype]).view(self.shape)


@dataclass(frozen=True)
class MatrixLayout:
    """Where one quantized matrix's codes and statistics sit; nested parts only with double quant."""

    shape: tuple[int, int]
    codes: Part
    absmax: Part
    nested_absmax: Part | None = None
    nested_offset: Part | None = None

    def parts(self) -> dict[str, Part]:
        named = {"codes": self.codes, "absmax": self.absmax}
        if self.nested_absmax is not None:
            named.update(nested_absmax=self.nested_absmax, nested_offset=self.nested_offset)
        return named


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one packed expert; the same object for every expert of a layer."""

    spec: QuantSpec
    dtype: torch.dtype  # of the original weights, and the default dequantize dtype
    gate_up: MatrixLayout
    down: MatrixLayout
    nbytes: int

    def matrix(self, name: str) -> MatrixLayout:
        return {"gate_up": self.gate_up, "down": self.down}[name]


def _matrix_layout(shape: tuple[int, int], spec: QuantSpec, start: int) -> tuple[MatrixLayout, int]:
    """The parts of one matrix placed from byte `start`, in the order bitsandbytes produces them."""
    numel = shape[0] * shape[1]
    blocks = -(-numel // spec.blocksize)
    sizes: list[tuple[str, tuple[int, ...], str]] = [("codes", ((numel + 1) // 2, 1), "uint8")]
    if spec.double_quant:
        sizes += [
            ("absmax", (blocks,), "uint8"),
            ("nested_absmax", (-(-blocks // NESTED_BLOCKSIZE),), "float32"),
            ("nested_offset", (), "float32"),
        ]
    else:
        sizes.append(("absmax", (blocks,), "float32"))
    parts, offset = {}, start
    for name, part_shape, dtype in sizes:
        parts[name] = Part(offset, part_shape, dtype)
        offset += align(parts[name].nbytes)
    return MatrixLayout(shape=shape, **parts), offset


@functools.lru_cache(maxsize=None)
def expert_layout(
    gate_up_shape: tuple[int, int], down_shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype
) -> ExpertLayout:
    """The layout for these shapes; cached, so all experts of a layer share one object."""
    gate_up_shape, down_shape = tuple(gate_up_shape), tuple(down_shape)
    if len(gate_up_shape) != 2 or len(down_shape) != 2:
        raise ValueError(f"expert matrices must be 2-D, got {gate_up_shape} and {down_shape}")
    if gate_up_shape[1] != down_shape[0] or gate_up_shape[0] != 2 * down_shape[1]:
        raise ValueError(f"gate_up {gate_up_shape} and down {down_shape} are not [2I, H] and [H, I]")
    dtype_name(dtype)  # validates
    gate_up, end = _matrix_layout(gate_up_shape, spec, 0)
    down, end = _matrix_layout(down_shape, spec, end)
    return ExpertLayout(spec=spec, dtype=dtype, gate_up=gate_up, down=down, nbytes=end)


# -- packed expert --------------------------------------------------------------------------


class PackedExpert:
    """One routed expert's 4-bit weights in one contiguous 1-D uint8 buffer (see module docstring)."""

    __slots__ = ("buffer", "layout", "_states")

    def __init__(self, buffer: torch.Tensor, layout: ExpertLayout):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("a PackedExpert buffer must be a contiguous 1-D uint8 tensor")
        if buffer.numel() != layout.nbytes:
            raise ValueError(f"buffer holds {buffer.numel()} bytes, layout needs {layout.nbytes}")
        self.buffer = buffer
        self.layout = layout
        self._states: dict[tuple[str, torch.dtype], QuantState] = {}

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedExpert:
        """This expert on `device`: one copy of the buffer (none if already there)."""
        return PackedExpert(self.buffer.to(device, non_blocking=non_blocking), self.layout)

    def with_buffer(self, buffer: torch.Tensor) -> PackedExpert:
        """This layout over another buffer (a row of a layer's buffer, a cache slot)."""
        return PackedExpert(buffer, self.layout)

    def pin_memory(self) -> PackedExpert:
        """A page-locked host copy, so `.to('cuda', non_blocking=True)` can overlap compute."""
        return PackedExpert(self.buffer.pin_memory(), self.layout)

    def codes(self, name: str) -> torch.Tensor:
        """The packed 4-bit codes of 'gate_up' or 'down', [numel/2, 1] uint8, a view."""
        return self.layout.matrix(name).codes.view(self.buffer)

    def quant_state(self, name: str, dtype: torch.dtype | None = None) -> QuantState:
        """A bitsandbytes QuantState for 'gate_up' or 'down' whose tensors are views into the buffer.

        `dtype` is the output dtype of dequantize (default: the original weights' dtype).
        Built once per (matrix, dtype) and cached: the buffer never changes.
        """
        dtype = dtype or self.layout.dtype
        key = (name, dtype)
        if key not in self._states:
            self._states[key] = self._build_state(self.layout.matrix(name), dtype)
        return self._states[key]

    def _build_state(self, m: MatrixLayout, dtype: torch.dtype) -> QuantState:
        spec, buf = self.layout.spec, self.buffer
        offset = state2 = None
        if spec.double_quant:
            offset = m.nested_offset.view(buf)
            state2 = QuantState(
                absmax=m.nested_absmax.view(buf),
                code=_code_table("dynamic", buf.device),
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        return QuantState(
            absmax=m.absmax.view(buf),
            shape=torch.Size(m.shape),
            code=_code_table(spec.quant_type, buf.device),
            blocksize=spec.blocksize,
            quant_type=spec.quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) in `dtype` (default: the original weights' dtype)."""
        return tuple(bnbf.dequantize_4bit(self.codes(n), self.quant_state(n, dtype)) for n in MATRICES)

    def __repr__(self) -> str:
        gu, d = self.layout.gate_up.shape, self.layout.down.shape
        return f"PackedExpert({self.layout.spec.quant_type}, gate_up={gu}, down={d}, {self.nbytes} B, {self.device})"


def _write_state(buf: torch.Tensor, m: MatrixLayout, codes: torch.Tensor, state: QuantState) -> None:
    tensors = {"codes": codes, "absmax": state.absmax}
    if state.nested:
        if state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested blocksize {state.state2.blocksize}, expected {NESTED_BLOCKSIZE}")
        tensors.update(nested_absmax=state.state2.absmax, nested_offset=state.offset)
    for name, part in m.parts().items():
        part.view(buf).copy_(tensors[name].reshape(part.shape))


def pack_expert(gate_up_2IH: torch.Tensor, down_HI: torch.Tensor, spec: QuantSpec,
                out: torch.Tensor | None = None) -> PackedExpert:
    """Quantize one expert (on its device) and pack codes + statistics into one buffer.

    out: the buffer to pack into (a contiguous 1-D uint8 row of `layout.nbytes`, on any device, e.g.
    a row of a layer's device or host buffer); default a new one on the weights' device.
    """
    layout = expert_layout(tuple(gate_up_2IH.shape), tuple(down_HI.shape), spec, gate_up_2IH.dtype)
    down_HI = down_HI.to(gate_up_2IH.dtype)  # a checkpoint storing the two differently packs in gate_up's
    # zeros, not empty: alignment padding is then deterministic, so saved files are reproducible
    if out is None:
        buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=gate_up_2IH.device)
    else:
        if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous() or out.numel() != layout.nbytes:
            raise ValueError(f"out must be a contiguous 1-D uint8 tensor of {layout.nbytes} bytes")
        buf = out.zero_()
    for name, w in zip(MATRICES, (gate_up_2IH, down_HI)):
        _write_state(buf, layout.matrix(name), *quantize(w, spec))
    return PackedExpert(buf, layout)


def pack_experts(gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, spec: QuantSpec) -> list[PackedExpert]:
    """Every expert of a layer from the checkpoint's fused 3-D tensors, one PackedExpert each."""
    if gate_up_E2IH.shape[0] != down_EHI.shape[0]:
        raise ValueError(f"{gate_up_E2IH.shape[0]} gate_up experts but {down_EHI.shape[0]} down experts")
    return [pack_expert(gate_up_E2IH[e], down_EHI[e], spec) for e in range(gate_up_E2IH.shape[0])]
