"""The fused norm kernels of the CUDA decode step (kernels/triton_norm.py), run under
TRITON_INTERPRET=1 on CPU tensors, against the torch formula the decoder uses elsewhere; and the
torch ops that wrap them (`localrun::rms_norm`, `localrun::rms_norm_rope`)."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads

import pytest
import torch

from localrun.kernels import norm as norm_ops
from localrun.models.gemma4 import RMSNorm, apply_rope

triton_norm = triton_module("triton_norm")

needs_triton = pytest.mark.skipif(triton_norm is None, reason="triton is not installed (pip install triton)")


def rope_tables(T: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(T, 1, D // 2, generator=g) * 6.28
    emb = torch.cat([angle, angle], dim=-1)
    sin = emb.sin()
    sin[..., : D // 2] *= -1
    return emb.cos(), sin


@needs_triton
@pytest.mark.parametrize("D", [64, 256, 48])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_kernel_matches_the_formula(D, with_weight):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(3, 5, D, generator=g) * 3
    w = torch.rand(D, generator=g) + 0.5 if with_weight else None
    expected = norm_ops.rms_norm_reference(x, w, 1e-6)
    torch.testing.assert_close(triton_norm.rms_norm_triton(x, w, 1e-6), expected, rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()  # bf16 in, fp32 inside, one rounding out
    got = triton_norm.rms_norm_triton(xb, w, 1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), norm_ops.rms_norm_reference(xb, w, 1e-6).float(), rtol=1e-2, atol=1e-2)


@needs_triton
@pytest.mark.parametrize("D", [32, 256])
def test_rms_norm_rope_kernel_on_strided_heads(D):
    """Heads as views of a fused projection ([B, T, width] split, then viewed [B, T, N, D])."""
    g = torch.Generator().manual_seed(D)
    B, T, N = 1, 4, 3
    fused = torch.randn(B, T, N * D + 2 * D, generator=g)
    x = fused[..., : N * D].view(B, T, N, D)
    assert not x.is_contiguous()
    w = torch.rand(D, generator=g) + 0.5
    cos, sin = rope_tables(T, D)
    norm = RMSNorm(D, 1e-6)
    norm.weight.data = w
    with torch.no_grad():
        expected = apply_rope(norm(x.contiguous()), cos, sin)
    got = triton_norm.rms_norm_rope_triton(x, w, cos, sin, 1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm_ops.rms_norm_rope_reference(x, w, cos, sin, 1e-6), expected, rtol=1e-5, atol=1e-5)


def test_ops_trace_under_compile():
    x = torch.randn(2, 3, 4, 16)
    w = torch.rand(16) + 0.5
    cos, sin = rope_tables(3, 16)

    def f(x):
        return torch.ops.localrun.rms_norm_rope(torch.ops.localrun.rms_norm(x, w, 1e-6), w, cos, sin, 1e-6)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
