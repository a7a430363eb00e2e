"""The flash attention kernel of CUDA prefills (kernels/triton_prefill_attention.py), run under
TRITON_INTERPRET=1 on CPU tensors, against `grouped_sdpa` with `kvcache.attention_mask` over every
key (what `attend`'s blocks compute); the torch op that wraps it (`localrun::causal_attention`), and
`attend` / the decoder routing a prefill through it (models/gemma4.PREFILL_KERNELS)."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads

import random

import pytest
import torch

import localrun.models.gemma4 as gemma4
from localrun.kernels import attention as attention_ops
from localrun.kernels.attention import grouped_sdpa
from localrun.kvcache import KVCache, attention_mask
from localrun.loader import load_model

flash = triton_module("triton_prefill_attention")

needs_triton = pytest.mark.skipif(flash is None, reason="triton is not installed (pip install triton)")

# The interpreter's cost is per tile operation: tests of the arithmetic take one tile over the whole
# head dim; the tiles the GPU launches (HALF_TILES, FP32_TILES) have tests of their own, on small shapes.
WIDE = None if flash is None else flash.Tiles(BLOCK_M=128, BLOCK_N=128, BLOCK_DK=512, BLOCK_DV=512, num_warps=4,
                                              num_stages=1)


def layout(old: int, T: int, window: int | None, rotate: int = 0, start: int | None = None):
    """pos_T, pos_S as a cache returns them for T new tokens after `old` earlier keys: a full cache
    its positions from 0; a sliding ring the window - 1 positions before the chunk (at most),
    rotated by `rotate` slots as a ring may hold them (attend reads them whole while they can be
    visible); `start`: the chunk's first position (default: old, a full cache's)."""
    start = old if start is None else start
    earlier = torch.arange(start - old, start)
    if rotate:
        earlier = earlier.roll(rotate)
    pos_T = torch.arange(start, start + T)
    return pos_T, torch.cat([earlier, pos_T])


def case(B, KV, G, T, pos_S, D, dtype=torch.float32, seed=0):
    """q [B, N, T, D] as attend gets it (a view of [B, T, N, D]); k, v [B, KV, S, D] views of a larger cache."""
    g = torch.Generator().manual_seed(seed)
    S = pos_S.shape[0]
    q = torch.randn(B, T, KV * G, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, KV, S + 7, D, generator=g).to(dtype)[:, :, :S]
    v = torch.randn(B, KV, S + 7, D, generator=g).to(dtype)[:, :, :S]
    return q, k, v


def reference(q, k, v, pos_T, pos_S, window, scale):
    """grouped_sdpa in fp32 over every key, masked by position: what attend's blocks compute."""
    return grouped_sdpa(q.float(), k.float(), v.float(), attention_mask(pos_T, pos_S, window), scale)


def random_cases(n: int, seed: int):
    """(B, KV, G, T, old, D, window, rotate): head dims 512 and 256, G in {1, 2, 8}, T = 1..130 new
    queries after 0..300 earlier keys, windows below and above the span, lengths off the tiles."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        D = (512, 256)[i % 2]
        G = (1, 2, 8)[i % 3]
        T = rng.choice([1, 2, rng.randint(3, 63), rng.randint(65, 130), 130])
        window = (None, rng.randint(2, 40), rng.randint(500, 1000))[i % 3 if i % 4 else 0]
        old = rng.randint(0, 300)
        if window is not None:
            old = min(old, window - 1)  # a ring returns at most the window - 1 positions before the chunk
        out.append((1 + (i == 5), rng.choice([1, 2]), G, T, old, D, window, rng.randint(0, 3) if window else 0))
    return out


@needs_triton
@pytest.mark.parametrize("B,KV,G,T,old,D,window,rotate", random_cases(12, seed=0))
def test_matches_grouped_sdpa_fp32(B, KV, G, T, old, D, window, rotate):
    pos_T, pos_S = layout(old, T, window, rotate, start=old + (7 if window else 0))
    q, k, v = case(B, KV, G, T, pos_S, D, seed=T + old)
    out = flash.causal_attention_triton(q, k, v, pos_T, pos_S, window, D ** -0.5, WIDE)
    assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, reference(q, k, v, pos_T, pos_S, window, D ** -0.5), rtol=0, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,KV,G,T,old,D,window,rotate", random_cases(4, seed=1))
def test_half_precision_is_close_to_fp32(dtype, B, KV, G, T, old, D, window, rotate):
    """Half precision: the probabilities rounded to the input dtype for the product with v (as
    FlashAttention rounds them), fp32 everywhere else; the output in the input dtype."""
    pos_T, pos_S = layout(old, T, window, rotate)
    q, k, v = case(B, KV, G, T, pos_S, D, dtype, seed=3)
    out = flash.causal_attention_triton(q, k, v, pos_T, pos_S, window, D ** -0.5, WIDE)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(q, k, v, pos_T, pos_S, window, D ** -0.5), rtol=0, atol=3e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D,G,T,old,window", [(512, 8, 21, 40, None), (256, 2, 33, 15, 16), (512, 4, 9, 0, 4)])
@pytest.mark.parametrize("capability", [(8, 9), (9, 0)])
def test_the_tiles_the_gpu_launches(dtype, D, G, T, old, window, capability):
    """tiles_for's tiles (HALF_TILES below sm_90, HOPPER_HALF_TILES from it, FP32_TILES): the scores in
    a loop of BLOCK_DK-wide chunks of the head dim, the output in D / BLOCK_DV slices (one at sm_90 in
    half precision), rows and keys in blocks shorter than T * G and S."""
    pos_T, pos_S = layout(old, T, window, rotate=1)
    q, k, v = case(1, 2, G, T, pos_S, D, dtype, seed=D + T)
    tiles = flash.tiles_for(D, dtype, capability)
    assert tiles.BLOCK_DK < D
    assert (tiles.BLOCK_DV >= D) == (dtype != torch.float32 and (D == 256 or capability == (9, 0)))
    out = flash.causal_attention_triton(q, k, v, pos_T, pos_S, window, 0.07, tiles)
    ref = reference(q, k, v, pos_T, pos_S, window, 0.07)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 3e-2)
    if capability == (8, 9):
        assert flash.tiles_for(D, dtype) == tiles  # not a CUDA device: the tiles below sm_90


@needs_triton
def test_empty_slots_and_a_prefix_cache_offset():
    """Earlier keys at -1 (empty ring slots) weigh 0, and a chunk may start anywhere (a prefix cache)."""
    pos_T, pos_S = layout(20, 50, None, start=400)
    pos_S[3:9] = -1
    q, k, v = case(1, 2, 2, 50, pos_S, 64, seed=5)
    out = flash.causal_attention_triton(q, k, v, pos_T, pos_S, None, 0.125, WIDE)
    torch.testing.assert_close(out, reference(q, k, v, pos_T, pos_S, None, 0.125), rtol=0, atol=1e-5)


def test_the_op_elsewhere_is_the_blocked_path():
    """On the CPU localrun::causal_attention computes what attend computes without it (the blocks)."""
    pos_T, pos_S = layout(3, 70, 5, rotate=2)
    q, k, v = case(1, 2, 2, 70, pos_S, 32, seed=6)
    got = attention_ops.causal_attention(q, k, v, pos_T, pos_S, 5, 0.3)
    torch.testing.assert_close(got, attention_ops.blocked_attention(q, k, v, pos_T, pos_S, 5, None, 0.3),
                               rtol=0, atol=0)
    torch.library.opcheck(attention_ops.causal_attention, (q, k, v, pos_T, pos_S, 5, 0.3))


def test_flash_prefill_routes_only_cuda_half_precision_wide_heads(monkeypatch):
    """The switch's domain: what SDPA would send to its math backend, on the device the kernel runs on."""
    assert not gemma4.flash_prefill(torch.empty(1, 4, 8, 512, dtype=torch.bfloat16))  # a CPU tensor: never
    for dtype, D, on, want in ((torch.bfloat16, 512, True, True), (torch.float16, 512, True, True),
                               (torch.float32, 512, True, False), (torch.bfloat16, 256, True, False),
                               (torch.bfloat16, 512, False, False)):
        monkeypatch.setitem(gemma4.PREFILL_KERNELS, "flash_attention", on)
        with torch.inference_mode():
            assert gemma4.flash_prefill(_OnCuda((1, 4, 8, D), dtype)) == want, (dtype, D, on)
    with torch.enable_grad():  # the op has no backward
        assert not gemma4.flash_prefill(_OnCuda((1, 4, 8, 512), torch.bfloat16))


class _OnCuda:
    """A shape and dtype on a device that reads as "cuda" (all flash_prefill looks at)."""

    def __init__(self, shape: tuple, dtype: torch.dtype):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda")


def _route_to_the_kernel(monkeypatch):
    """attend's CUDA route on the CPU: every prefill through the interpreted kernel (at the GPU's tiles)."""
    monkeypatch.setattr(gemma4, "flash_prefill", lambda q: True)
    monkeypatch.setattr(gemma4, "causal_attention", flash.causal_attention_triton)


@needs_triton
def test_attend_passes_the_chunk_to_the_kernel(monkeypatch):
    pos_T, pos_S = layout(4, 45, 5, rotate=1)
    q, k, v = case(1, 2, 2, 45, pos_S, 32, seed=8)
    want = gemma4.attend(q, k, v, pos_T, pos_S, 5, masks={}, scale=0.5)
    _route_to_the_kernel(monkeypatch)
    torch.testing.assert_close(gemma4.attend(q, k, v, pos_T, pos_S, 5, masks={}, scale=0.5), want, rtol=0, atol=1e-5)


@needs_triton
def test_decoder_prefill_through_the_kernel_matches_the_blocks(monkeypatch, tiny_checkpoint):
    """The tiny Gemma 4 (sliding and full layers, KV sharing) prefilled in chunks over its cache: the
    rings' earlier keys, the full layers' prefix, every layer's attention through the kernel; fp32
    logits those of the blocked path."""
    model = load_model(tiny_checkpoint("moe"), dtype=torch.float32, experts="bf16").model
    ids = torch.tensor([[2] + list(range(107, 136))])  # 30 tokens: several windows of the tiny model

    def logits():
        cache = KVCache(model.args)
        with torch.inference_mode():
            return torch.cat([model(ids[:, i : i + 11], cache) for i in range(0, 30, 11)], dim=1)

    want = logits()
    _route_to_the_kernel(monkeypatch)
    torch.testing.assert_close(logits(), want, atol=1e-5, rtol=1e-5)
