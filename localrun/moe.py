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


def _pack_routing(ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """[T, 2K] int32: the ids beside the bits of the fp32 weights, so one copy moves both exactly."""
    return torch.cat([ids_TK.to(torch.int32), w_TK.float().view(torch.int32)], dim=1)


def _unpack_routing(packed_T2K: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    # whole rows, then Python slices: two torch calls fewer than slicing the tensor, per layer and token
    K = packed_T2K.shape[1] // 2
    ids, weights = packed_T2K.tolist(), packed_T2K.view(torch.float32).tolist()
    return [row[:K] for row in ids], [row[K:] for row in weights]


def _read_routing(ids_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """(ids, fp32 weights) of tensors in host memory, read as they are now: what _unpack_routing gives for
    their pack, without the pack (which buys one copy where a copy is a host sync, and nothing on the CPU)."""
    return ids_TK.tolist(), (w_TK if w_TK.dtype == torch.float32 else w_TK.float()).tolist()


def routing_lists(ids_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """(ids, fp32 weights) as Python lists, in one device-to-host copy (one host sync)."""
    if ids_TK.device.type == "cpu" and w_TK.device.type == "cpu":
        return _read_routing(ids_TK, w_TK)
    return _unpack_routing(_pack_routing(ids_TK, w_TK).cpu())


class RoutingToHost:
    """Moves one call's ids and weights to the host in one copy: `start` right after the router
    (on CUDA a non-blocking copy into pinned memory, reused call after call), `wait` when the host
    needs them: the only host sync of an offloaded MoE layer at decode."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._staging: torch.Tensor | None = None  # pinned, grown to the largest call seen

    def start(self, ids_TK: torch.Tensor, w_TK: torch.Tensor):
        if self.device.type != "cuda":  # already in host memory: read now, as a copy would snapshot them
            return _read_routing(ids_TK, w_TK)
        packed = _pack_routing(ids_TK, w_TK)
        n = packed.numel()
        if self._staging is None or self._staging.numel() < n:
            self._staging = torch.empty(n, dtype=torch.int32, pin_memory=True)
        host = self._staging[:n].view(packed.shape)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return host, done

    def wait(self, started) -> tuple[list[list[int]], list[list[float]]]:
        if self.device.type != "cuda":
            return started
        host, done = started
        done.synchronize()
        return _unpack_routing(host)


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
    host: tuple[list[int], list[float]] | None = None,
) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]), calling `expert_fn(e, x_tokens)` once per hit expert.

    The weighted sum over the K experts accumulates in fp32 and rounds once, as transformers does.
    host: one token's (ids, fp32 weights) already on the host (else fetched in one copy).
    """
    out = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
    if x_TH.shape[0] == 1:  # decode: plain adds in expert order; index_add_ costs far more at one token
        if host is None:
            ids, weights = routing_lists(ids_TK, w_TK)
            host = ids[0], weights[0]
        for e, w in sorted(zip(*host)):
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

    def c_experts(self) -> "kernels.ExpertsDesc | None":
        """These experts for the C layer call (kernels.DecodeLayer.with_experts), or None."""
        return kernels.ExpertsDesc.bf16(self.gate_up_proj, self.down_proj)

    def forward(self, x_TH, ids_TK, w_TK):
        args = (x_TH, ids_TK, w_TK, self.gate_up_proj, self.down_proj, self.act_name)
        if torch.is_grad_enabled():  # autograd: torch ops only
            return dispatch(x_TH, ids_TK, w_TK,
                            lambda e, x: expert_ffn(x, self.gate_up_proj[e], self.down_proj[e], self.act))
        if torch.compiler.is_compiling():  # traced: the layer as one opaque op
            return torch.ops.localrun.moe_dense(*args)
        return dense_layer(*args)


def dense_layer(x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, gate_up_E2IH: torch.Tensor,
                down_EHI: torch.Tensor, act: str) -> torch.Tensor:
    """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) on plain weights: in one C call where it applies (bf16
    experts under fp32 on the CPU), else expert by expert (moe.dispatch)."""
    y = kernels.moe(x_TH, gate_up_E2IH, down_EHI, ids_TK, w_TK, act)
    if y is not None:
        return y
    fn = activation(act)
    return dispatch(x_TH, ids_TK, w_TK, lambda e, x: expert_ffn(x, gate_up_E2IH[e], down_EHI[e], fn))


@torch.library.custom_op("localrun::moe_dense", mutates_args=())
def moe_dense_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, act: str) -> torch.Tensor:
    """DenseExperts' layer as one op, so a traced step holds no host sync (dispatch reads the ids):
    dense_layer, the eager path's arithmetic."""
    return dense_layer(x, ids, weights, gate_up, down, act)


@moe_dense_op.register_fake
def _(x, ids, weights, gate_up, down, act):
    return torch.empty_like(x)
