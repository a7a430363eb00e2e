"""The split-key decode attention kernel of the CUDA decode step (kernels/triton_attention.py), run
under TRITON_INTERPRET=1 on CPU tensors, against `grouped_sdpa`, the attention every device
computes otherwise; and the torch op that wraps it (`localrun::decode_attention`)."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads

import pytest
import torch

from localrun.kernels import attention as attention_ops
from localrun.kernels.attention import grouped_sdpa

triton_attention = triton_module("triton_attention")

needs_triton = pytest.mark.skipif(triton_attention is None, reason="triton is not installed (pip install triton)")


def case(B, N, KV, S, D, capacity=None, dtype=torch.float32, seed=0):
    """q [B, N, 1, D]; k, v [B, KV, S, D] as views of a larger cache (the static step's full layers)."""
    g = torch.Generator().manual_seed(seed)
    cap = capacity or S
    q = torch.randn(B, 1, N, D, generator=g).to(dtype).transpose(1, 2)  # strided, as attend gets it
    k = torch.randn(B, KV, cap, D, generator=g).to(dtype)[:, :, :S]
    v = torch.randn(B, KV, cap, D, generator=g).to(dtype)[:, :, :S]
    return q, k, v


def close(a, b, tol):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < tol


@needs_triton
@pytest.mark.parametrize("B,N,KV,S,D", [
    (1, 16, 8, 300, 256),   # 26B-A4B sliding layer (G = 2), a key count that is no block multiple
    (1, 16, 2, 256, 512),   # 26B-A4B full layer (G = 8, head dim 512)
    (2, 4, 4, 37, 32),      # no grouping (G = 1), batch of 2
    (1, 6, 2, 70, 48),      # G = 3 and a head dim that is not a power of two
])
def test_matches_grouped_sdpa_fp32(B, N, KV, S, D):
    q, k, v = case(B, N, KV, S, D, capacity=S + 5)
    out = triton_attention.decode_attention_triton(q, k, v, None, D ** -0.5)
    ref = grouped_sdpa(q, k, v, None, D ** -0.5)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert close(out, ref, 1e-5)


@needs_triton
@pytest.mark.parametrize("B,N,KV,S,D,splits", [(1, 16, 8, 300, 256, 1), (1, 16, 2, 256, 512, 2), (1, 4, 1, 300, 64, 3),
                                                (2, 6, 2, 70, 48, 1)])
def test_combine_in_place_is_the_combine_kernel_bit_for_bit(B, N, KV, S, D, splits):
    """The last partial program of each (batch, KV head) combines its heads (one launch): the same
    result as the combine kernel, call after call (each counter is back at 0 after its call)."""
    q, k, v = case(B, N, KV, S, D, seed=3)
    visible = torch.arange(S)[None, :] % 7 != 3
    apart = triton_attention.decode_attention_triton(q, k, v, visible, 0.1, in_place=False)
    for _ in range(3):
        assert torch.equal(triton_attention.decode_attention_triton(q, k, v, visible, 0.1, in_place=True), apart)
    assert not triton_attention._counters(q.device).any()
    # (on the CPU the interpreter runs 4 programs a call: `splits` of them counted themselves done)
    assert triton_attention.launch_shape(S, D, B * KV, q.device)[3] == splits


@needs_triton
@pytest.mark.parametrize("tile", [1, 2, 4, 16])
def test_combine_in_tiles_of_any_size(monkeypatch, tile):
    """The combine reads a few heads' partial rows as one tile (COMBINE_TILE elements at most): tiles
    of one split of one head, of a few splits, of a few heads, take every split of every head once,
    and in place or as a launch of its own the same bits."""
    monkeypatch.setattr(triton_attention, "_programs_wanted", lambda device: 64)  # 8 to 32 splits a KV head
    monkeypatch.setattr(triton_attention, "COMBINE_TILE", tile * 32)
    for N, KV, S, D in ((16, 2, 256, 32), (6, 2, 70, 24)):
        q, k, v = case(1, N, KV, S, D, seed=tile)
        visible = torch.arange(S)[None, :] % 5 != 1
        BLOCK_D, _, _, splits = triton_attention.launch_shape(S, D, KV, q.device)
        tiles = triton_attention.combine_tiles(N // KV, splits, BLOCK_D)
        assert tiles["BLOCK_H"] * tiles["CHUNK"] * BLOCK_D <= max(tile * 32, BLOCK_D) and splits > 1
        apart = triton_attention.decode_attention_triton(q, k, v, visible, 0.2, in_place=False)
        assert torch.equal(triton_attention.decode_attention_triton(q, k, v, visible, 0.2, in_place=True), apart)
        assert close(apart, grouped_sdpa(q, k, v, visible, 0.2), 1e-5)


@needs_triton
@pytest.mark.parametrize("D", [256, 512])
def test_every_tile_choice_computes_the_attention(monkeypatch, D):
    """Each (keys a block, warps) gpu_check times (TILE_CHOICES; PARTIAL_TILES makes one the default)
    cuts the keys in its own blocks and splits, with the same result, and the q/k/v write takes the
    attention's warps with it (the two sum a head's squares alike)."""
    from localrun.kernels import triton_qkv_write

    q, k, v = case(1, 16, 2 if D == 512 else 8, 300, D, seed=7)
    visible = torch.arange(300)[None, :] % 9 != 4
    ref = grouped_sdpa(q, k, v, visible, D ** -0.5)
    for block_s, warps in triton_attention.TILE_CHOICES[D]:
        monkeypatch.setitem(triton_attention.PARTIAL_TILES, D, (block_s, warps))
        assert triton_attention.launch_shape(300, D, 2, q.device)[1] == block_s
        assert triton_attention.warps_for(D) == triton_qkv_write.num_warps(D) == warps
        assert close(triton_attention.decode_attention_triton(q, k, v, visible, D ** -0.5), ref, 1e-5)


@needs_triton
def test_gemma_scale_as_exact_as_the_reference():
    """Scale 1.0 over normed heads (Gemma 4) gives logits of ~sqrt(D): softmax is ill-conditioned
    there (exp of logits near 60 keeps ~1e-5 of them in fp32), so both sides are held to float64:
    the kernel's error stays of the reference's own order (seeds 0-5: 0.7x to 3.1x of it)."""
    q, k, v = case(1, 16, 2, 256, 512, seed=5)
    exact = grouped_sdpa(q.double(), k.double(), v.double(), None, 1.0)
    err_ref = (grouped_sdpa(q, k, v, None, 1.0).double() - exact).abs().max().item()
    err_ours = (triton_attention.decode_attention_triton(q, k, v, None, 1.0).double() - exact).abs().max().item()
    assert err_ours < 5e-5 and err_ours <= 4 * err_ref, (err_ours, err_ref)


@needs_triton
def test_mask_and_scale():
    """Only visible keys count: a ring's empty and out-of-window slots, a full layer's future ones.
    Whole splits masked (S split four ways here) must weigh 0, not NaN."""
    q, k, v = case(1, 8, 2, 200, 64, seed=1)
    visible = torch.zeros(1, 200, dtype=torch.bool)
    visible[0, 130:170] = True
    visible[0, 3] = True
    out = triton_attention.decode_attention_triton(q, k, v, visible, 0.125)
    ref = grouped_sdpa(q, k, v, visible, 0.125)
    assert torch.isfinite(out).all()
    assert close(out, ref, 1e-5)
    # and the mask is really applied: changing an invisible key's value changes nothing
    v2 = v.clone()
    v2[:, :, 50] += 100.0
    assert torch.equal(triton_attention.decode_attention_triton(q, k, v2, visible, 0.125), out)


@needs_triton
def test_splits_cover_every_key():
    """However the keys are split, each key lies in exactly one split of whole blocks."""
    dev = torch.device("cpu")
    for S in (1, 15, 16, 17, 255, 1536, 8192, 131072):
        for groups in (1, 2, 8, 64):
            per, splits = triton_attention.split_keys(S, groups, dev, 32)
            assert per % 32 == 0 and splits <= triton_attention.MAX_SPLITS
            assert (splits - 1) * per < S <= splits * per


@needs_triton
def test_bf16_close_to_fp32():
    q, k, v = case(1, 16, 8, 128, 256, dtype=torch.bfloat16, seed=2)
    out = triton_attention.decode_attention_triton(q, k, v, None, 1.0)
    ref = grouped_sdpa(q.float(), k.float(), v.float(), None, 1.0)
    assert out.dtype == torch.bfloat16
    assert close(out, ref, 2e-2)


def test_op_is_grouped_sdpa_off_cuda():
    """On the CPU the op is the reference itself (the same logic on every device)."""
    q, k, v = case(1, 8, 2, 40, 32, seed=3)
    visible = torch.rand(1, 40, generator=torch.Generator().manual_seed(0)) > 0.3
    assert torch.equal(attention_ops.decode_attention(q, k, v, visible, 1.0), grouped_sdpa(q, k, v, visible, 1.0))


def test_op_traces_under_compile():
    """The op has a fake implementation: torch.compile(fullgraph=True) traces a caller."""
    q, k, v = case(1, 8, 2, 40, 32, seed=4)
    fn = torch.compile(lambda q, k, v: attention_ops.decode_attention(q, k, v, None, 1.0) * 2, fullgraph=True)
    assert torch.allclose(fn(q, k, v), grouped_sdpa(q, k, v, None, 1.0) * 2)



@pytest.mark.parametrize("B,N,KV,S,D", [(1, 8, 4, 130, 64), (1, 8, 1, 300, 128), (2, 4, 4, 7, 16), (1, 6, 2, 1, 48),
                                         (1, 16, 1, 70, 512), (1, 4, 2, 33, 40)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_decode_attention_matches_grouped_sdpa(B, N, KV, S, D, masked, n_threads, lib, threads):
    """The CPU's fp32 decode attention (one C call, kernels.decode_attention) over cache views: 16-key
    blocks and single keys, head dims above 128 and not a multiple of 16, a KV head's query heads
    split between threads."""
    from localrun import kernels

    threads(n_threads)
    q, k, v = case(B, N, KV, S, D, capacity=S + 3, seed=S)
    visible = None
    if masked:
        visible = torch.rand(1, S, generator=torch.Generator().manual_seed(1)) > 0.3
        visible[0, 0] = True
    out = kernels.decode_attention(q, k, v, visible, 0.125)
    assert close(out, grouped_sdpa(q, k, v, visible, 0.125), 1e-5)
    assert kernels.decode_attention(q.double(), k.double(), v.double(), visible, 0.125) is None  # not fp32: torch
