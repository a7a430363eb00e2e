"""Counters that stay on the device for good, for Triton kernels whose last program to finish does a
last step itself (decode attention's in-place combine, norms_route's routing): int32 zeros at a fixed
address (a CUDA graph keeps it), each reset to 0 by the program that used it last, so no launch zeroes
them per call. One block per kernel that counts, so two of them never share a counter; the same for the
fp32 accumulator of the one-launch MoE kernel (triton_moe v5), which its last programs leave zero."""

from __future__ import annotations

import torch

_HELD: dict[tuple[str, torch.device], torch.Tensor] = {}


def held(owner: str, device: torch.device, n: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The `n` counters of kernel `owner` on `device`, allocated on the first call (zeros of `dtype`: int32
    counters, or a float accumulator its kernel leaves zero)."""
    have = _HELD.get((owner, device))
    if have is None:
        have = _HELD[owner, device] = torch.zeros(n, dtype=dtype, device=device)
    assert have.numel() == n and have.dtype == dtype, (owner, have.numel(), n, have.dtype, dtype)
    return have
