"""The routed-expert FFN on 4-bit weights, and an expert backend built on it.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.
Same math as `localrun.moe.expert_ffn`: gate, up = (x @ gate_up.T).chunk(2);
y = (act(gate) * up) @ down.T, computed in the dtype of x.
"""

from __future__ import annotations

from typing import Sequence

import bitsandbytes as bnb
import torch

from localrun.moe import activation, dispatch, expert_ffn
from quant.layer import ExpertBuffer
from quant.nf4 import PackedExpert

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


def ffn_4bit(x_TH: torch.Tensor, expert: PackedExpert, act) -> torch.Tensor:
    """One expert on 4-bit weights: bitsandbytes' choice on CUDA, MATMUL_4BIT_MAX_TOKENS on the CPU."""
    if x_TH.device.type == "cuda" or x_TH.shape[0] <= MATMUL_4BIT_MAX_TOKENS:
        return ffn_matmul_4bit(x_TH, expert, act)
    return ffn_dequantized(x_TH, expert, act)


class QuantizedExperts:
    """Expert backend over one layer's PackedExperts: `experts(x_TH, ids_TK, w_TK) -> y_TH`.

    A drop-in for `localrun.moe.DenseExperts`; every expert must already be on x's device.
    """

    def __init__(self, experts: Sequence[PackedExpert], act: str):
        experts = list(experts)
        if not experts:
            raise ValueError("QuantizedExperts needs at least one expert")
        if any(e.layout != experts[0].layout for e in experts):
            raise ValueError("all experts of a layer must share one layout")
        self.experts = experts
        self.act_name = act
        self.act = activation(act)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts)

    def __call__(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        return dispatch(x_TH, ids_TK, w_TK, lambda e, x: ffn_4bit(x, self.experts[e], self.act))

    def __repr__(self) -> str:
        return f"QuantizedExperts({len(self.experts)} x {self.experts[0]!r}, act={self.act_name})"


# Above this many tokens a layer call is a prefill: the per-token 4-bit GEMV kernel would read each hit
# expert once per token, so the experts are dequantized once each instead (host syncs are fine there).
BUFFERED_MAX_TOKENS = 16


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
        if x_TH.shape[0] > BUFFERED_MAX_TOKENS:  # prefill: dequantize each hit expert once, dense matmuls
            act = activation(self.act_name)
            return dispatch(x_TH, ids_TK, w_TK, lambda e, x: ffn_dequantized(x, self.buffer.expert(e), act))
        return self.buffer.moe(x_TH, ids_TK, w_TK, self.act_name)

    def __repr__(self) -> str:
        return f"BufferedExperts({self.buffer!r}, act={self.act_name})"
