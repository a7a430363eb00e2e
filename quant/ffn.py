"""The routed-expert FFN on 4-bit weights, and an expert backend built on it.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.
Same math as `localrun.moe.expert_ffn`: gate, up = (x @ gate_up.T).chunk(2);
y = (act(gate) * up) @ down.T, computed in the dtype of x.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import bitsandbytes as bnb
import torch

from localrun import kernels
from localrun.moe import ACTIVATIONS, activation, dispatch, expert_ffn
from quant.layer import ExpertBuffer, layout_offsets
from quant.nf4 import ExpertLayout, PackedExpert, _code_table

# On the CPU (where it was measured): up to this many tokens per expert, bitsandbytes' 4-bit matmul
# reads the codes directly; beyond it, dequantizing once and running a dense matmul is faster
# because the dequantized matrix is reused by every token. On CUDA bitsandbytes picks its own
# kernel at every token count (a fused gemv for one token, dequantize + matmul for many).
MATMUL_4BIT_MAX_TOKENS = 8


def ffn_matmul_4bit(x_TH: torch.Tensor, expert: PackedExpert, act) -> torch.Tensor:
    """Expert FFN with bitsandbytes matmul_4bit on the packed codes (the decode path)."""
    gate_up = bnb.matmul_4bit(x_TH, expert.codes("gate_up").t(), expert.quant_state("gate_up", x_TH.dtype))
    gate, up = gate_up.chunk(2, dim=-1)
    return bnb.matmul_4bit(act(gate) * up, expert.codes("down").t(), expert.quant_state("down", x_TH.dtype))


def ffn_dequantized(x_TH: torch.Tensor, expert: PackedExpert, act) -> torch.Tensor:
    """Expert FFN by dequantizing both matrices to x's dtype, then dense matmuls (the prefill path)."""
    gate_up_2IH, down_HI = expert.dequantize(x_TH.dtype)
    return expert_ffn(x_TH, gate_up_2IH, down_HI, act)


# -- the C kernel (localrun/kernels/cpu_bf16.c, lr_moe_4bit) ---------------------------------


@functools.lru_cache(maxsize=None)
def _kernel_args(layout: ExpertLayout) -> tuple:
    """(offsets int64 [8], 16-value table, 256-value nested table, hidden, inter, blocksize, double_quant)."""
    hidden, inter = layout.down.shape
    spec = layout.spec
    cpu = torch.device("cpu")
    return (torch.tensor(layout_offsets(layout), dtype=torch.int64), _code_table(spec.quant_type, cpu),
            _code_table("dynamic", cpu), hidden, inter, spec.blocksize, spec.double_quant)


def kernel_applies(layout: ExpertLayout, x_TH: torch.Tensor, act: str) -> bool:
    """Whether the C 4-bit kernel computes experts of `layout` for this x (fp32 on the CPU, ...)."""
    hidden, inter = layout.down.shape
    return kernels.moe_q4_applies(x_TH, hidden, inter, layout.spec.blocksize, act)


def rows_table(payloads: Mapping[int, PackedExpert] | Sequence[PackedExpert], num_experts: int) -> torch.Tensor:
    """int64 [E]: the address of each expert's packed bytes (0 where absent), for kernels.moe_q4."""
    rows = [0] * num_experts
    for e, p in (payloads.items() if isinstance(payloads, Mapping) else enumerate(payloads)):
        if p.buffer.device.type != "cpu":
            raise ValueError("the CPU 4-bit kernel reads experts in host memory")
        rows[e] = p.buffer.data_ptr()
    return torch.tensor(rows, dtype=torch.int64)


def moe_4bit_cpu(layout: ExpertLayout, rows_E: torch.Tensor, x_TH: torch.Tensor, ids_TK: torch.Tensor,
                 w_TK: torch.Tensor, act: str) -> torch.Tensor | None:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) in one C call over the experts at rows_E, or None."""
    return kernels.moe_q4(x_TH, rows_E, *_kernel_args(layout)[:3], ids_TK, w_TK, *_kernel_args(layout)[3:], act)


def ffn_4bit_cpu(x_TH: torch.Tensor, expert: PackedExpert, act_name: str) -> torch.Tensor | None:
    """One expert through the C kernel (K = 1, weight 1: exactly the expert's output), or None."""
    if expert.buffer.device.type != "cpu" or not kernel_applies(expert.layout, x_TH, act_name):
        return None
    T = x_TH.shape[0]
    ids = torch.zeros(T, 1, dtype=torch.int64)
    return moe_4bit_cpu(expert.layout, rows_table([expert], 1), x_TH, ids, torch.ones(T, 1), act_name)


_ACT_NAMES = {fn: name for name, fn in ACTIVATIONS.items()}  # for ffn_4bit's callers that pass the function


def ffn_4bit(x_TH: torch.Tensor, expert: PackedExpert, act) -> torch.Tensor:
    """One expert on 4-bit weights: the C kernel on the CPU where it applies (fp32); else bitsandbytes'
    choice on CUDA, MATMUL_4BIT_MAX_TOKENS on the CPU. `act`: an activation name or function."""
    name = act if isinstance(act, str) else _ACT_NAMES.get(act)
    if name is not None and x_TH.device.type == "cpu":
        y = ffn_4bit_cpu(x_TH, expert, name)
        if y is not None:
            return y
    if isinstance(act, str):
        act = activation(act)
    if x_TH.device.type == "cuda" or x_TH.shape[0] <= MATMUL_4BIT_MAX_TOKENS:
        return ffn_matmul_4bit(x_TH, expert, act)
    return ffn_dequantized(x_TH, expert, act)


class QuantizedExperts:
    """Expert backend over one layer's PackedExperts: `experts(x_TH, ids_TK, w_TK) -> y_TH`.

    A drop-in for `localrun.moe.DenseExperts`; every expert must already be on x's device.
    """

    def __init__(self, experts: Sequence[PackedExpert], act: str, buffer: ExpertBuffer | None = None):
        experts = list(experts)
        if not experts:
            raise ValueError("QuantizedExperts needs at least one expert")
        if any(e.layout != experts[0].layout for e in experts):
            raise ValueError("all experts of a layer must share one layout")
        self.experts = experts
        self.act_name = act
        self.act = activation(act)
        self.buffer = buffer  # the experts' rows as one ExpertBuffer (the loader's layer buffer), if they are
        self._rows: torch.Tensor | None = None  # expert addresses for the C kernel, built on first use

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts)

    def __call__(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        layout = self.experts[0].layout
        if self.experts[0].device.type == "cpu" and kernel_applies(layout, x_TH, self.act_name):
            if self._rows is None:  # the buffers never change: one table for the layer's lifetime
                self._rows = rows_table(self.experts, len(self.experts))
            return moe_4bit_cpu(layout, self._rows, x_TH, ids_TK, w_TK, self.act_name)
        if self.buffer is not None and torch.compiler.is_compiling():  # traced: the layer as one op, whose CPU
            return self.buffer.moe(x_TH, ids_TK, w_TK, self.act_name)  # kernel is the C one (no host sync)
        return dispatch(x_TH, ids_TK, w_TK, lambda e, x: ffn_4bit(x, self.experts[e], self.act))

    def c_experts(self) -> "kernels.ExpertsDesc | None":
        """These experts for the C layer call (kernels.DecodeLayer.with_experts), or None where the C
        4-bit kernel does not read them (on another device, or a blocksize it does not take)."""
        layout = self.experts[0].layout
        if self.experts[0].device.type != "cpu" or not kernel_applies(layout, torch.empty(1, 0), self.act_name):
            return None
        if self._rows is None:
            self._rows = rows_table(self.experts, len(self.experts))
        offsets, code, nested, _, inter, blocksize, dq = _kernel_args(layout)
        return kernels.ExpertsDesc.q4(self._rows, offsets, code, nested, inter, blocksize, dq)

    def __repr__(self) -> str:
        return f"QuantizedExperts({len(self.experts)} x {self.experts[0]!r}, act={self.act_name})"


class CpuLayerCompute:
    """ExpertStore's one-call layer compute on the CPU: every expert of a layer read where it lies
    (resident or host rows, all RAM on the CPU) by the C kernel, in one call per layer. The same
    kernel and summation order as QuantizedExperts, so tokens are identical whatever the placement."""

    def __init__(self, layout: ExpertLayout, act: str):
        self.layout = layout
        self.act_name = act
        self._rows: dict[int, tuple[Mapping, torch.Tensor]] = {}  # id(payloads) -> (payloads, addresses)

    def applies(self, x_TH: torch.Tensor) -> bool:
        return kernel_applies(self.layout, x_TH, self.act_name)

    def __call__(self, payloads: Mapping[int, PackedExpert], num_experts: int, x_TH: torch.Tensor,
                 ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        cached = self._rows.get(id(payloads))
        if cached is None or cached[0] is not payloads:
            cached = self._rows[id(payloads)] = (payloads, rows_table(payloads, num_experts))
        layout = next(iter(payloads.values())).layout  # this layer's (the same shapes in every layer so far)
        y = moe_4bit_cpu(layout, cached[1], x_TH, ids_TK, w_TK, self.act_name)
        if y is None:
            raise RuntimeError("CpuLayerCompute called where the kernel does not apply")
        return y


class DeviceRowsCompute:
    """ExpertStore's one-call decode on the device: the routed experts read in place from the layer's
    device rows (resident experts, then cache slots: localrun/experts.py) through the same
    `localrun::moe_4bit` op as BufferedExperts, given each expert's row instead of its id. So a layer
    with experts in host RAM runs, once its misses are copied, the very kernel and summation order of
    a layer whose experts are all resident (two Triton launches on CUDA, not a GEMV per expert)."""

    # ExpertStore calls it eagerly between graph segments, never traced: the op's kernel without the op's
    # dispatch (ExpertBuffer.moe's untraced); scripts/gpu_check.py turns it off to time what that saves
    untraced = True

    def __init__(self, layout: ExpertLayout, act: str):
        self.layout = layout
        self.act_name = act
        self._buffers: dict[int, ExpertBuffer] = {}  # data_ptr of a layer's rows -> ExpertBuffer over them

    def __call__(self, rows_RB: torch.Tensor, x_TH: torch.Tensor, rows_TK: torch.Tensor,
                 w_TK: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(rows_RB.data_ptr())
        if buffer is None or buffer.data is not rows_RB:
            buffer = self._buffers[rows_RB.data_ptr()] = ExpertBuffer(rows_RB, self.layout)
        return buffer.moe(x_TH, rows_TK, w_TK, self.act_name, untraced=self.untraced)


# Above this many tokens a layer call is a prefill: the per-token 4-bit GEMV kernel would read each hit
# expert once per token. On CUDA the op then runs grouped GEMMs (kernels/triton_moe.moe_4bit_grouped: one
# dequantized tile per block of an expert's tokens, no host sync); elsewhere, or with GROUPED_PREFILL off
# (scripts/gpu_check.py times both), each hit expert is dequantized once for dense matmuls.
# GROUPED_PREFILL_OFFLOADED: the same for a layer with experts in host RAM (DeviceRowsPrefill, in waves
# of the experts missing from the device); off, ExpertStore computes each expert on its own. On an H200
# under a 16 GiB budget a 512-token prompt prefills at 985 tok/s in waves against 469 an expert at a time,
# the same first token and the same 3,600 copies (docs/gpu/2026-11-27-h200-kernels-offload.md).
BUFFERED_MAX_TOKENS = 16
GROUPED_PREFILL = True
GROUPED_PREFILL_OFFLOADED = True


class DeviceRowsPrefill:
    """ExpertStore's many-token call on the device through the grouped 4-bit GEMMs, in waves: each
    wave reads the experts on the device at the time in place from the layer's rows (resident, then
    cache slots), and writes its (token, k) pairs' outputs into one [T * K, H] buffer that `finish`
    sums over k, so the result does not depend on how the experts were split into waves."""

    def __init__(self, layout: ExpertLayout, act: str):
        self.layout = layout
        self.act_name = act
        self._offsets = layout_offsets(layout)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # the code tables, per device

    def code_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables.get(device)
        if tables is None:
            tables = self._tables[device] = (_code_table(self.layout.spec.quant_type, device),
                                             _code_table("dynamic", device))
        return tables

    def applies(self, x_TH: torch.Tensor) -> bool:
        return GROUPED_PREFILL_OFFLOADED and x_TH.shape[0] > BUFFERED_MAX_TOKENS

    def begin(self, x_TH: torch.Tensor, top_k: int) -> "RowsPrefillCall":
        return RowsPrefillCall(self, x_TH, top_k)


class RowsPrefillCall:
    """One layer call of DeviceRowsPrefill: `wave` for the pairs on the device, `put` for pairs computed
    elsewhere (on the CPU), then `finish`."""

    def __init__(self, prefill: DeviceRowsPrefill, x_TH: torch.Tensor, top_k: int):
        hidden, inter = prefill.layout.down.shape
        P = x_TH.shape[0] * top_k
        self.prefill, self.x_TH, self.top_k = prefill, x_TH, top_k
        self.out_PH = torch.empty(P, hidden, dtype=x_TH.dtype, device=x_TH.device)
        self.h_PI = torch.empty(P, inter, dtype=x_TH.dtype, device=x_TH.device)

    def wave(self, rows_RB: torch.Tensor, rows_TK: torch.Tensor, pairs: int, experts: int) -> None:
        """The pairs whose row (rows_TK, a device tensor) is below rows_RB.shape[0]: `pairs` of them,
        over `experts` rows; rows_TK holds rows_RB.shape[0] for every other pair."""
        from localrun.kernels.triton_moe import grouped_pairs

        p = self.prefill
        spec = p.layout.spec
        grouped_pairs(self.x_TH, rows_TK, rows_RB, *p.code_tables(rows_RB.device), p._offsets, *p.layout.down.shape,
                      spec.blocksize, spec.double_quant, p.act_name, self.out_PH, self.h_PI, wave=(pairs, experts))

    def put(self, tok: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> None:
        """Outputs of one expert computed elsewhere, for its pairs (tok[i], k[i])."""
        self.out_PH[tok * self.top_k + k] = y.to(self.out_PH.dtype)

    def finish(self, w_TK: torch.Tensor) -> torch.Tensor:
        from localrun.kernels.triton_moe import weighted_sum

        return weighted_sum(self.out_PH, w_TK)


class BufferedExperts:
    """Expert backend over one layer's ExpertBuffer through the `localrun::moe_4bit` op: the whole
    layer in one call that reads the expert ids and weights where they are (on CUDA, two Triton
    launches and no host sync), so a decode step that uses it can be captured as a CUDA graph."""

    graph_safe = True

    def __init__(self, buffer: ExpertBuffer, act: str):
        self.buffer = buffer
        self.act_name = act

    @property
    def experts(self) -> list[PackedExpert]:
        """Every expert as a PackedExpert view of its row (what memory accounting walks)."""
        return self.buffer.experts()

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def __call__(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        if x_TH.shape[0] > BUFFERED_MAX_TOKENS and not (GROUPED_PREFILL and x_TH.is_cuda):
            act = activation(self.act_name)
            return dispatch(x_TH, ids_TK, w_TK, lambda e, x: ffn_dequantized(x, self.buffer.expert(e), act))
        return self.buffer.moe(x_TH, ids_TK, w_TK, self.act_name)

    def __repr__(self) -> str:
        return f"BufferedExperts({self.buffer!r}, act={self.act_name})"
