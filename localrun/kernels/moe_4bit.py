"""The 4-bit MoE layer as one torch op, `localrun::moe_4bit`, the same call on every device.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.

    torch.ops.localrun.moe_4bit(x [T, H], ids [T, K] int, weights [T, K], experts [E, nbytes] uint8,
                                code [16] f32, nested_code [256] f32, offsets int[8], hidden, inter,
                                blocksize, double_quant, act) -> y [T, H] in x's dtype

`experts` is a quant.layer.ExpertBuffer's tensor (row e = expert e's PackedExpert bytes) and
`offsets` its `offsets()`: byte offsets of codes / absmax / nested absmax / nested offset of
gate_up then down inside a row (-1 where absent). y = sum_k weights[t,k] * expert_{ids[t,k]}(x[t])
with expert(x) = (act(gate) * up) @ down.T and gate, up = (x @ gate_up.T).chunk(2), all in fp32.

CUDA runs the Triton kernels (kernels/triton_moe.py: no host sync, graph-capturable); the CPU the C
kernel (kernels.moe_q4, fp32 x) where it applies; everything else `reference`, which dequantizes the
hit experts exactly as bitsandbytes does and uses fp32 matmuls. A fake implementation lets
`torch.compile(fullgraph=True)` trace callers.
"""

from __future__ import annotations

import torch

from localrun.moe import activation

NESTED_BLOCKSIZE = 256


def dequantize_matrix(row: torch.Tensor, offsets: list[int], shape: tuple[int, int], blocksize: int,
                      double_quant: bool, code: torch.Tensor, nested_code: torch.Tensor) -> torch.Tensor:
    """One 4-bit matrix of one expert row (1-D uint8) in fp32, bitsandbytes' dequantize_4bit math."""
    codes_off, absmax_off, nested_off, offset_off = offsets
    numel = shape[0] * shape[1]
    blocks = -(-numel // blocksize)
    packed = row[codes_off : codes_off + (numel + 1) // 2]
    nibbles = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:numel].long()
    if double_quant:
        n_nested = -(-blocks // NESTED_BLOCKSIZE)
        q = row[absmax_off : absmax_off + blocks].long()
        scale = row[nested_off : nested_off + 4 * n_nested].view(torch.float32)
        offset = row[offset_off : offset_off + 4].view(torch.float32)
        absmax = nested_code[q] * scale.repeat_interleave(NESTED_BLOCKSIZE)[:blocks]
        absmax = absmax + offset
    else:
        absmax = row[absmax_off : absmax_off + 4 * blocks].view(torch.float32)
    values = code[nibbles]
    full = numel - numel % blocksize
    out = torch.empty(numel, dtype=torch.float32, device=row.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    if full < numel:
        out[full:] = values[full:] * absmax[-1]
    return out.view(shape)


@torch.library.custom_op("localrun::moe_4bit", mutates_args=())
def moe_4bit_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                code: torch.Tensor, nested_code: torch.Tensor, offsets: list[int], hidden: int, inter: int,
                blocksize: int, double_quant: bool, act: str) -> torch.Tensor:
    return reference(x, ids, weights, experts, code, nested_code, offsets, hidden, inter, blocksize,
                     double_quant, act)


def _moe_4bit_cuda(x, ids, weights, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant, act):
    from localrun.kernels.triton_moe import moe_4bit_triton

    return moe_4bit_triton(x, ids, weights, experts, code, nested_code, list(offsets), hidden, inter,
                           blocksize, double_quant, act)


def _moe_4bit_cpu(x, ids, weights, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant, act):
    from localrun import kernels

    rows = experts.data_ptr() + torch.arange(experts.shape[0], dtype=torch.int64) * experts.stride(0)
    y = kernels.moe_q4(x, rows, torch.tensor(offsets, dtype=torch.int64), code, nested_code, ids, weights, hidden,
                       inter, blocksize, double_quant, act)
    return y if y is not None else reference(x, ids, weights, experts, code, nested_code, offsets, hidden, inter,
                                             blocksize, double_quant, act)


KERNELS = {"cuda": _moe_4bit_cuda, "cpu": _moe_4bit_cpu}  # the op's kernel per device type (else `reference`)
for _device, _kernel in KERNELS.items():
    moe_4bit_op.register_kernel(_device, _kernel)


@moe_4bit_op.register_fake
def _(x, ids, weights, experts, code, nested_code, offsets, hidden, inter, blocksize, double_quant, act):
    return torch.empty_like(x)


def reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
              code: torch.Tensor, nested_code: torch.Tensor, offsets: list[int], hidden: int, inter: int,
              blocksize: int, double_quant: bool, act: str) -> torch.Tensor:
    """The op in plain torch: each hit expert dequantized once, fp32 matmuls, fp32 weighted sum."""
    act_fn = activation(act)
    x32 = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        tok, k = (ids == e).nonzero(as_tuple=True)
        row = experts[e]
        gate_up = dequantize_matrix(row, offsets[:4], (2 * inter, hidden), blocksize, double_quant, code, nested_code)
        down = dequantize_matrix(row, offsets[4:], (hidden, inter), blocksize, double_quant, code, nested_code)
        gate, up = (x32[tok] @ gate_up.T).chunk(2, dim=-1)
        y = (act_fn(gate) * up) @ down.T
        out.index_add_(0, tok, y * weights[tok, k, None].float())
    return out.to(x.dtype)


def moe_4bit(x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, buffer, act: str,
             untraced: bool = False) -> torch.Tensor:
    """The op over a quant.layer.ExpertBuffer: sum_k w[t,k] * expert_{ids[t,k]}(x[t]), x's dtype.

    untraced: call the op's kernel for x's device directly, the same kernel and result without the op's
    dispatch, whose Python wrapper costs ~30 us of host time a call on one EPYC core; for a caller that
    runs eagerly call after call (ExpertStore's decoded token between two graph segments: 30 calls a
    26B-A4B token), never one that torch.compile traces."""
    code, nested_code = buffer.code_tables()
    spec = buffer.layout.spec
    hidden, inter = buffer.layout.down.shape
    args = (x_TH, ids_TK, w_TK, buffer.data, code, nested_code, buffer.offsets(), hidden, inter, spec.blocksize,
            spec.double_quant, act)
    if untraced and not torch.compiler.is_compiling():
        return KERNELS.get(x_TH.device.type, reference)(*args)
    return torch.ops.localrun.moe_4bit(*args)
