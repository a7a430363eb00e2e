"""The CPU 4-bit expert kernel (lr_moe_4bit in localrun/kernels/cpu_bf16.c) over localrun's packed layout.

Oracle: each expert dequantized with the flat-array math of bitsandbytes' dequantize_4bit
(`moe_4bit.dequantize_matrix`, checked here against bitsandbytes itself on every shape, where rows
hold whole blocks) and float64 matmuls. The kernel multiplies the very fp32 weights bitsandbytes
writes, so only fp32 summation order separates them: 1e-5 of the output's scale.
"""

from __future__ import annotations

import functools

import pytest
import torch

from localrun import kernels
from localrun.experts import ExpertStore
from localrun.kernels.moe_4bit import dequantize_matrix
from localrun.moe import activation, dispatch, expert_ffn
from quant import ffn as qffn
from quant.layer import ExpertBuffer
from quant.nf4 import pack_experts
from quant.spec import QuantSpec

ACT = "gelu_pytorch_tanh"
RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def layer(spec: QuantSpec, E: int, H: int, I: int, seed: int = 0) -> ExpertBuffer:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    down = torch.randn(E, H, I, generator=g) * I**-0.5
    return ExpertBuffer.from_experts(pack_experts(gate_up, down, spec))



def inputs(buf: ExpertBuffer, T: int, K: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    H = buf.layout.down.shape[0]
    ids = torch.stack([torch.randperm(buf.num_experts, generator=g)[:K] for _ in range(T)])
    return torch.randn(T, H, generator=g), ids, torch.softmax(torch.randn(T, K, generator=g), -1)


def dequantized(buf: ExpertBuffer, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec, code, nested = buf.layout.spec, *buf.code_tables()
    H, I = buf.layout.down.shape
    o = buf.offsets()
    return tuple(dequantize_matrix(buf.data[e], offs, shape, spec.blocksize, spec.double_quant, code, nested)
                 for offs, shape in ((o[:4], (2 * I, H)), (o[4:], (H, I))))


def oracle(buf: ExpertBuffer, x, ids, w, act=ACT) -> torch.Tensor:
    fn = activation(act)
    return dispatch(x.double(), ids, w.double(), lambda e, xx: expert_ffn(xx, *(m.double() for m in dequantized(buf, e)), fn))


def kernel(buf: ExpertBuffer, x, ids, w, act=ACT, lib=None) -> torch.Tensor | None:
    rows = qffn.rows_table(buf.experts(), buf.num_experts)
    H, I = buf.layout.down.shape
    spec, (code, nested) = buf.layout.spec, buf.code_tables()
    offsets = torch.tensor(buf.offsets(), dtype=torch.int64)
    return kernels.moe_q4(x, rows, offsets, code, nested, ids, w, H, I, spec.blocksize, spec.double_quant, act,
                          lib=lib)


def assert_close(y, ref):
    assert y is not None and y.dtype == torch.float32
    err = (y.double() - ref).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"max err {err:.3g} vs scale {ref.abs().max().item():.3g}"


# (H, I, blocksizes that divide both): 96 and 160 are 3 and 5 chunks of 32 (not a multiple of the
# 64 values an AVX-512 step pair covers); 26B-A4B's experts are gate_up 1408 x 2816, down 2816 x 704
SHAPES = [(96, 32, (32,)), (64, 160, (32,)), (256, 128, (32, 64, 128))]
CASES = [(q, dq, bs, H, I) for q in ("nf4", "fp4") for dq in (False, True) for H, I, bss in SHAPES for bs in bss]


@pytest.mark.parametrize("q,dq,bs,H,I", CASES)
@pytest.mark.parametrize("T", [1, 6])
def test_matches_bitsandbytes_dequantize_fp32_matmul(lib, q, dq, bs, H, I, T):
    buf = layer(QuantSpec(q, bs, dq), 5, H, I)
    for name, m in zip(("gate_up", "down"), dequantized(buf, 0)):  # the oracle is bitsandbytes' own math here
        assert torch.equal(m, buf.expert(0).dequantize(torch.float32)[0 if name == "gate_up" else 1])
    x, ids, w = inputs(buf, T, 3)
    assert_close(kernel(buf, x, ids, w), oracle(buf, x, ids, w))


@pytest.mark.parametrize("bs,dq", [(64, True), (32, False)])
def test_gemma_26b_expert_shape(lib, bs, dq):
    buf = layer(QuantSpec("nf4", bs, dq), 2, 2816, 704)
    x, ids, w = inputs(buf, 3, 2)
    assert_close(kernel(buf, x, ids, w), oracle(buf, x, ids, w))
    x1, ids1, w1 = x[:1], ids[:1], w[:1]
    assert_close(kernel(buf, x1, ids1, w1), oracle(buf, x1, ids1, w1))


@pytest.mark.parametrize("act", list(kernels.ACTIVATION_CODES))
def test_activations(lib, act):
    buf = layer(QuantSpec("nf4", 64, True), 4, 128, 64)
    x, ids, w = inputs(buf, 5, 2)
    assert_close(kernel(buf, x, ids, w, act), oracle(buf, x, ids, w, act))


def test_rows_identical_whatever_the_batch_and_threads(lib, threads):
    buf = layer(QuantSpec("nf4", 64, True), 8, 256, 128)
    x, ids, w = inputs(buf, 11, 4)
    threads(2)
    full = kernel(buf, x, ids, w)
    for t in range(11):  # one token: threads split the experts; many: experts in id order
        assert torch.equal(kernel(buf, x[t : t + 1], ids[t : t + 1], w[t : t + 1])[0], full[t]), t
    assert torch.equal(kernel(buf, x[3:8], ids[3:8], w[3:8]), full[3:8])
    threads(1)
    assert torch.equal(kernel(buf, x, ids, w), full)
    assert torch.equal(kernel(buf, x[:1], ids[:1], w[:1]), full[:1])
    # K = 1 (one expert at a time, the store's per-expert compute) with weight 1 is that expert's output
    y = qffn.ffn_4bit_cpu(x[:2], buf.expert(5), ACT)
    assert torch.equal(y, kernel(buf, x[:2], torch.full((2, 1), 5), torch.ones(2, 1)))


def test_quantized_experts_and_store_are_bit_identical(lib):
    """Every placement reads the same bytes through the same call: resident, hit, copied or host."""
    buf = layer(QuantSpec("nf4", 64, True), 8, 128, 64)
    experts = buf.experts()
    backend = qffn.QuantizedExperts(experts, ACT)
    for T in (1, 6):
        x, ids, w = inputs(buf, T, 3, seed=T)
        want = backend(x, ids, w)
        assert_close(want, oracle(buf, x, ids, w))
        for resident in (range(8), (0, 3, 5), ()):
            store = ExpertStore({0: experts}, lambda p, xx: qffn.ffn_4bit(xx, p, ACT), "cpu", {0: resident}, slots=2,
                                compute_layer=qffn.CpuLayerCompute(buf.layout, ACT))
            for _ in range(2):  # second call: hits in the slots
                assert torch.equal(store(0)(x, ids, w), want)
            assert store.stats()["misses"] == (0 if len(resident) == 8 else store.stats()["misses"])


def test_the_ops_cpu_kernel_is_this_kernel(lib):
    """`localrun::moe_4bit` on the CPU (what a traced step calls) runs the C kernel: the eager
    QuantizedExperts' bits exactly; bf16 x (which the kernel does not take) gets the reference. The
    untraced call (ExpertStore's decoded token: the kernel without the op's dispatch) gives the op's bits."""
    buf = layer(QuantSpec("nf4", 64, True), 8, 128, 64)
    for T in (1, 5):
        x, ids, w = inputs(buf, T, 3, seed=T)
        want = qffn.QuantizedExperts(buf.experts(), ACT)(x, ids, w)
        assert torch.equal(buf.moe(x, ids, w, ACT), want)
        assert torch.equal(buf.moe(x, ids, w, ACT, untraced=True), want)
        half = buf.moe(x.bfloat16(), ids, w, ACT)
        assert half.dtype == torch.bfloat16
        assert (half.double() - oracle(buf, x, ids, w)).abs().max() < 2e-2 * want.abs().max()
        assert torch.equal(buf.moe(x.bfloat16(), ids, w, ACT, untraced=True), half)


def test_fallbacks(lib, monkeypatch):
    buf = layer(QuantSpec("fp4", 64, False), 4, 128, 64)
    x, ids, w = inputs(buf, 3, 2)
    assert kernel(buf, x.bfloat16(), ids, w) is None  # fp32 only
    assert kernel(buf, x, ids, w, "relu") is None
    assert not kernels.moe_q4_applies(x, 128, 96, 64, ACT)  # blocksize 64 does not divide 96
    backend = qffn.QuantizedExperts(buf.experts(), ACT)
    want = backend(x, ids, w)
    calls = []
    monkeypatch.setattr(kernels, "moe_q4_applies", lambda *a: calls.append(1) and False)
    fallback = backend(x, ids, w)  # today's path: bitsandbytes per expert, dispatch's sum
    assert calls and torch.testing.assert_close(fallback, want, rtol=1e-4, atol=1e-5) is None
    wrong = ids.clone()
    wrong[0, 0] = 4
    monkeypatch.undo()
    with pytest.raises(ValueError, match="expert ids"):
        kernel(buf, x, wrong, w)


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("LOCALRUN_CPU_KERNELS", "0")
    kernels.reset()
    try:
        buf = layer(QuantSpec("nf4", 64, False), 4, 128, 64)
        x, ids, w = inputs(buf, 2, 2)
        assert kernel(buf, x, ids, w) is None
        assert_close(qffn.QuantizedExperts(buf.experts(), ACT)(x, ids, w).float(), oracle(buf, x, ids, w))
    finally:
        monkeypatch.undo()
        kernels.reset()


@pytest.mark.parametrize("flags,isa", [(("-mno-avx512f",), "avx2"),
                                       (("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-avx"), "scalar")])
def test_avx2_and_scalar_paths(lib, tmp_path, flags, isa):
    """The other builds of the same source (what a CPU without AVX-512 / AVX2 compiles)."""
    try:
        other = kernels._load(kernels.build(cache_dir=tmp_path, extra_flags=flags))
    except Exception as exc:  # noqa: BLE001 - a compiler without these flags: nothing to test
        pytest.skip(f"cannot build with {flags}: {exc}")
    if "avx2" in isa and other.lr_q4_isa().decode() != "avx2":
        pytest.skip("this machine's compiler does not target AVX2")
    assert other.lr_q4_isa().decode() == isa
    for spec, (H, I) in ((QuantSpec("nf4", 32, True), (96, 32)), (QuantSpec("fp4", 128, False), (256, 128))):
        buf = layer(spec, 5, H, I)
        x, ids, w = inputs(buf, 6, 3)
        full = kernel(buf, x, ids, w, lib=other)
        assert_close(full, oracle(buf, x, ids, w))
        assert torch.equal(kernel(buf, x[2:3], ids[2:3], w[2:3], lib=other)[0], full[2])
    from quant.nf4 import _buckets

    weights = torch.randn(37, 65, generator=torch.Generator().manual_seed(3))  # full blocks and a partial one
    weights[3, 5], weights[9, 1] = float("nan"), float("inf")
    for quant_type, dtype in (("nf4", torch.bfloat16), ("fp4", torch.float32)):
        bounds, order = _buckets(quant_type)
        w = weights.to(dtype)
        expected = kernels.quantize_4bit(w, 64, bounds, order)  # this build's: bitsandbytes' values (test_quant)
        packed, absmax = torch.empty_like(expected[0]), torch.empty_like(expected[1])
        b32, codes = bounds.float().contiguous(), order.to(torch.uint8).contiguous()
        other.lr_quantize_4bit(w.data_ptr(), int(dtype == torch.bfloat16), w.numel(), 64, b32.data_ptr(),
                               codes.data_ptr(), packed.data_ptr(), absmax.data_ptr())
        assert torch.equal(packed, expected[0])
        assert torch.allclose(absmax, expected[1], rtol=0, atol=0, equal_nan=True)
