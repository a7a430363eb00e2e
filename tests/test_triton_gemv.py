"""The dense GEMV of the CUDA decode step (kernels/triton_gemv.py), run under TRITON_INTERPRET=1 on
CPU tensors against the fp32 product; the torch op that wraps it (`localrun::gemv`); and the
decoder's routing of its projections through that op (DECODE_KERNELS["dense_gemv"])."""

from __future__ import annotations

from interpreted import BF16_ROUNDS_TO_NEAREST, triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 first

import pytest
import torch
import torch.nn.functional as F

from localrun.kernels import gemv as gemv_ops
from localrun.loader import load_model
from localrun.models import gemma4

triton_gemv = triton_module("triton_gemv")

needs_triton = pytest.mark.skipif(triton_gemv is None, reason="triton is not installed (pip install triton)")

RTOL = 1e-5  # fp32: max |y - ref| / max |ref|
BF16_ULP = 2.0 ** -7  # one bf16 rounding is within this fraction of the value (the interpreter truncates)


def case(M: int, N: int, K: int, bias: bool, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def fp32_reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def assert_fp32_close(y, ref):
    assert y.shape == ref.shape
    assert (y.float() - ref).abs().max() <= RTOL * ref.abs().max()


def assert_one_rounding(y, ref):
    """y is ref rounded once to y's half dtype (to nearest on a GPU, toward zero in the interpreter)."""
    assert y.shape == ref.shape
    assert ((y.float() - ref).abs() <= BF16_ULP * ref.abs() + 1e-6).all()


# N not a multiple of BLOCK_N; K: whole steps plus a partial one, only a partial one, whole steps only
TILED = [(200, 600, (64, 256)), (37, 100, (16, 256)), (64, 512, (16, 128))]


@needs_triton
@pytest.mark.parametrize("N,K,tiles", TILED)
@pytest.mark.parametrize("M,bias", [(1, False), (2, True), (3, False), (4, True)])
def test_kernel_matches_fp32_reference(N, K, tiles, M, bias):
    x, w, b = case(M, N, K, bias, seed=N + M)
    y = triton_gemv.gemv_triton(x, w, b, triton_gemv.Tiles(*tiles))
    assert y.dtype == torch.float32
    assert_fp32_close(y, fp32_reference(x, w, b))


def small_integers(*shape, seed: int, dtype=torch.float32):
    """Integers in [-4, 4]: every product and partial sum of these GEMVs is exact in fp32, so any order
    of accumulation gives the same bits (and one rounding of them, the same bf16)."""
    return torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# (N, K) at 32-column steps: one whole step (the loop runs 0 times), one and a partial one, only a
# partial one (the first tile is the last), several whole steps, several and a partial; N never a
# multiple of BLOCK_N = 8
PROLOGUE_SHAPES = [(13, 32), (13, 45), (21, 20), (11, 96), (19, 150)]


@needs_triton
@pytest.mark.parametrize("N,K", PROLOGUE_SHAPES)
@pytest.mark.parametrize("M,bias", [(1, True), (3, False)])
def test_first_tile_read_before_the_wait_is_each_programs_own(N, K, M, bias):
    """The first step's tile, the partial last one (TAIL) and the bias are loaded at the top (before PDL's
    wait) and the loop takes over from there: exact products of small integers against torch's, bit for
    bit, in fp32 and bf16, at every way the first tile can be the whole, a whole step or the partial one."""
    x, w = small_integers(M, K, seed=K), small_integers(N, K, seed=N)
    b = small_integers(N, seed=N + K) if bias else None
    for dtype in (torch.float32, torch.bfloat16) if BF16_ROUNDS_TO_NEAREST else (torch.float32,):
        xd, wd, bd = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        y = triton_gemv.gemv_triton(xd, wd, bd, triton_gemv.Tiles(8, 32))
        assert torch.equal(y, F.linear(x, w, b).to(dtype)), (dtype, (y.float() - F.linear(x, w, b)).abs().max())


@needs_triton
def test_the_partial_last_step_is_requested_early_only_where_there_is_one():
    """TAIL (the partial step's tile held from the top through the loop) where K is whole steps and a
    partial one: 26B-A4B's dense MLP down at 512 a step; not where K is whole steps (its registers for
    nothing) nor where the first tile is the only one."""
    tail = triton_gemv._tail
    assert tail({"K": 2112, "BLOCK_K": 512}) and tail({"K": 45, "BLOCK_K": 32})
    assert not tail({"K": 2816, "BLOCK_K": 256}) and not tail({"K": 20, "BLOCK_K": 32})
    assert not tail({"K": 32, "BLOCK_K": 32})
    x, w = small_integers(1, 150, seed=1), small_integers(19, 150, seed=2)  # 4 steps of 32 and 22 columns
    for flag in (True, False):  # a launch that says no tail where there is one still reads it (after the loop)
        y = torch.empty(1, 19)
        triton_gemv._gemv_kernel[(3,)](x, w, w, y, 1, 19, 150, 150, 19, BM=1, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=32,
                                       TAIL=flag)
        assert torch.equal(y, x @ w.T), flag


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3])
def test_half_precision_is_fp32_products_rounded_once(dtype, M):
    x, w, b = case(M, 200, 600, bias=True, dtype=dtype, seed=M)
    y = triton_gemv.gemv_triton(x, w, b, triton_gemv.Tiles(64, 256))
    assert y.dtype == dtype
    assert_one_rounding(y, fp32_reference(x, w, b))


@needs_triton
def test_strided_rows_and_leading_dims():
    """x rows evenly strided (a view into a wider buffer), x with leading dims, x with a strided last dim."""
    g = torch.Generator().manual_seed(1)
    K, N = 300, 70
    w = torch.randn(N, K, generator=g) * K ** -0.5
    wide = torch.randn(3, K + 40, generator=g)
    x = wide[:, 20 : 20 + K]
    assert x.stride(0) == K + 40 and not x.is_contiguous()
    tiles = triton_gemv.Tiles(32, 128)
    assert_fp32_close(triton_gemv.gemv_triton(x, w, None, tiles), fp32_reference(x, w, None))
    x3 = wide[None, :2, :K]  # [1, 2, K]
    y3 = triton_gemv.gemv_triton(x3, w, None, tiles)
    assert y3.shape == (1, 2, N)
    assert_fp32_close(y3, fp32_reference(x3, w, None))
    xt = torch.randn(K, 2, generator=g).T  # last dim strided: copied
    assert_fp32_close(triton_gemv.gemv_triton(xt, w, None, tiles), fp32_reference(xt, w, None))


@needs_triton
@pytest.mark.parametrize("N,K", [(128, 2816), (2816, 2112)])  # 26B-A4B's router and dense MLP down
def test_real_shapes_with_the_default_tiles(N, K):
    x, w, _ = case(1, N, K, bias=False, dtype=torch.bfloat16, seed=K)
    y = triton_gemv.gemv_triton(x, w)
    assert y.dtype == torch.bfloat16
    assert_one_rounding(y, fp32_reference(x, w, None))


@needs_triton
def test_rejects_what_it_cannot_compute():
    x, w, _ = case(5, 16, 32, bias=False)
    with pytest.raises(ValueError, match="rows"):
        triton_gemv.gemv_triton(x, w)
    with pytest.raises(ValueError, match="weight"):
        triton_gemv.gemv_triton(x[:1], w.bfloat16())
    assert triton_gemv.MAX_ROWS == gemv_ops.MAX_ROWS


def test_config_pruning_keeps_the_accumulators_in_registers():
    if triton_gemv is None:
        pytest.skip("triton is not installed")
    for bm in (1, 2, 4):
        kept = triton_gemv._prune(triton_gemv.CONFIGS, {}, BM=bm)
        assert kept and all(bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)
                            <= triton_gemv.MAX_ACC_PER_THREAD for c in kept)
    assert len(triton_gemv._prune(triton_gemv.CONFIGS, {}, BM=1)) == len(triton_gemv.CONFIGS)


# -- the op ------------------------------------------------------------------------------------

def test_op_is_f_linear_off_cuda_and_has_a_fake():
    x, w, b = case(2, 24, 40, bias=True, dtype=torch.bfloat16)
    x = x.view(1, 2, 40)
    assert torch.equal(torch.ops.localrun.gemv(x, w, b), F.linear(x, w, b))
    torch.library.opcheck(torch.ops.localrun.gemv.default, (x, w, b),
                          test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda x: torch.ops.localrun.gemv(x, w, None), fullgraph=True, backend="eager")
    assert torch.equal(f(x), F.linear(x, w))


def test_fits_only_half_precision_few_rows_contiguous_weights():
    x, w, b = case(4, 24, 40, bias=True, dtype=torch.bfloat16)
    assert gemv_ops.fits(x, w, b) and gemv_ops.fits(x[:1], w, None) and gemv_ops.fits(x.half(), w.half(), None)
    assert not gemv_ops.fits(torch.cat([x, x[:1]]), w, b)  # 5 rows
    assert not gemv_ops.fits(x.float(), w.float(), None)  # fp32 stays cuBLAS (the reference CUDA is checked against)
    assert not gemv_ops.fits(x, w.half(), None)
    assert not gemv_ops.fits(x[:, :20], w.T.contiguous().T[:, :20], None)  # weight not contiguous
    assert not gemv_ops.fits(x, w, b[:10])
    big = torch.empty(gemv_ops.MAX_N + 1, 40, dtype=torch.bfloat16)
    assert not gemv_ops.fits(x, big, None)  # lm_head-sized: cuBLAS
    assert not gemv_ops.applies(x, w, b)  # CPU tensors


# -- the decoder's routing ---------------------------------------------------------------------

def route_to(monkeypatch, fn) -> list:
    """The decoder's projections with the device condition widened to the CPU and the op replaced
    by fn (x, w, b); returns the list of (rows, N, K) it will compute."""
    calls = []

    def op(x, w, b):
        calls.append((x.numel() // x.shape[-1], *w.shape))
        return fn(x, w, b)

    monkeypatch.setattr(gemv_ops, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(gemv_ops, "gemv", op)
    return calls


@needs_triton
@pytest.mark.parametrize("on", [False, True])
def test_linear_routes_only_when_switched_on(monkeypatch, on):
    routed = route_to(monkeypatch, triton_gemv.gemv_triton)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "dense_gemv", on)
    x, w, b = case(3, 70, 300, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        y = gemma4.linear(x[:1], w, b)
        assert len(routed) == (1 if on else 0)
        assert_one_rounding(y, fp32_reference(x[:1], w, b))
        gemma4.linear(x.float()[:1], w.float(), b.float())  # fp32
        gemma4.linear(x[:2], w, b)  # two rows (the MLP + router GEMM): cuBLAS was faster (ROUTED_ROWS)
        gemma4.linear(torch.cat([x, x, x]), w, b)  # 9 rows: a prefill
    assert len(routed) == (1 if on else 0)
    with torch.enable_grad():
        gemma4.linear(x[:1], w, b)  # training never takes the op
    assert len(routed) == (1 if on else 0)


def test_linear_keeps_cpu_tensors_on_torch_by_default(monkeypatch):
    """Without the widened device condition CPU tensors never reach the op, switch on or off."""
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "dense_gemv", True)
    monkeypatch.setattr(gemv_ops, "gemv", lambda *a: pytest.fail("a CPU tensor reached localrun::gemv"))
    x, w, b = case(1, 70, 300, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(gemma4.linear(x, w, b), F.linear(x, w, b))


def test_decoder_projections_go_through_the_op(monkeypatch, tiny_moe):
    """A bf16 token through the tiny 26B-A4B-shaped model: every projection (q/k/v, o, gate/up, down,
    router, lm_head) of every layer takes the op, one row each, and with the op computing F.linear
    the logits are the torch path's bit for bit (the routing hands over and takes back the right
    tensors; the kernel's own accuracy is tested above: its other roundings can flip a tiny
    model's top-k experts). A 6-token prefill takes none."""
    routed = route_to(monkeypatch, F.linear)
    model = load_model(tiny_moe, dtype=torch.bfloat16, experts="bf16").model
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        monkeypatch.setitem(gemma4.DECODE_KERNELS, "dense_gemv", False)
        expected = model(ids[:, :1])
        monkeypatch.setitem(gemma4.DECODE_KERNELS, "dense_gemv", True)
        model(ids)
        assert routed == []
        got = model(ids[:, :1])
    assert len(routed) == 5 * len(model.layers) + 1 and all(rows == 1 for rows, _, _ in routed)
    assert routed[-1][1:] == tuple(model.embed_tokens.weight.shape)
    assert torch.equal(got, expected)
