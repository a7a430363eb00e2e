"""Routed-expert dispatch shared by every expert backend.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.
An expert backend is any callable `experts(x_TH, ids_TK, w_TK) -> y_TH`; the decoder
never knows where expert weights live or in which precision.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import kernels

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[name]


def group_by_expert(ids_TK: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """[(expert, token_idx, k_idx)] for every expert hit, tokens sorted by expert (one host sync)."""
    T, K = ids_TK.shape
    if T == 1:  # decode: sorting kernels and per-group slicing would cost more than the experts
        tok, k_K = torch.zeros(1, dtype=torch.long, device=ids_TK.device), torch.arange(K, device=ids_TK.device)
        ids = ids_TK[0].tolist()
        return [(ids[k], tok, k_K[k : k + 1]) for k in sorted(range(K), key=ids.__getitem__)]
    flat = ids_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    groups, start = [], 0
    for e, n in zip(experts.tolist(), counts.tolist()):
        sel = order[start : start + n]
        groups.append((e, sel // K, sel % K))
        start += n
    return groups


def dispatch(
    x_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    w_TK: torch.Tensor,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    groups: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]), calling `expert_fn(e, x_tokens)` once per hit expert.

    The weighted sum over the K experts accumulates in fp32 and rounds once, as transformers does.
    """
    out = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
    if x_TH.shape[0] == 1:  # decode: plain adds in expert order; index_add_ costs far more at one token
        for e, w in sorted(zip(ids_TK[0].tolist(), w_TK[0].float().tolist())):
            out.add_(expert_fn(e, x_TH).float(), alpha=w)
        return out.to(x_TH.dtype)
    for e, tok, k in groups if groups is not None else group_by_expert(ids_TK):
        y = expert_fn(e, x_TH[tok])
        out.index_add_(0, tok, y.float() * w_TK[tok, k, None].float())
    return out.to(x_TH.dtype)


def expert_ffn(x_TH: torch.Tensor, gate_up_2IH: torch.Tensor, down_HI: torch.Tensor, act) -> torch.Tensor:
    """One expert on plain weights, laid out as the checkpoint stores them (bf16 under fp32 x too)."""
    gate, up = kernels.linear(x_TH, gate_up_2IH).chunk(2, dim=-1)
    return kernels.linear(act(gate) * up, down_HI)


class DenseExperts(torch.nn.Module):
    """Experts held as the checkpoint's fused 3-D tensors, unquantized (`--experts bf16`): in the
    compute dtype, or bf16 under an fp32 CPU run (kernels.storage_dtype)."""

    def __init__(self, gate_up_E2IH: torch.Tensor, down_EHI: torch.Tensor, act: str):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up_E2IH, requires_grad=gate_up_E2IH.requires_grad)
        self.down_proj = torch.nn.Parameter(down_EHI, requires_grad=down_EHI.requires_grad)
        self.act_name = act
        self.act = activation(act)

    def forward(self, x_TH, ids_TK, w_TK):
        if not torch.is_grad_enabled():  # bf16 experts under fp32 on CPU: the whole layer in one kernel call
            y = kernels.moe(x_TH, self.gate_up_proj, self.down_proj, ids_TK, w_TK, self.act_name)
            if y is not None:
                return y
        return dispatch(
            x_TH, ids_TK, w_TK, lambda e, x: expert_ffn(x, self.gate_up_proj[e], self.down_proj[e], self.act)
        )
