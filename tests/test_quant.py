"""quant: packing 4-bit experts, the 4-bit expert FFN, and safetensors (de)serialization.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.
bitsandbytes' own quantize -> dequantize is the oracle for the 4-bit math.
"""

from __future__ import annotations

import json

import pytest
import torch
from bitsandbytes import functional as bnbf
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from localrun.errors import LocalrunError
from localrun.moe import DenseExperts, activation, expert_ffn
from quant import ffn as qffn
from quant.io import (
    experts_from_tensors,
    experts_to_tensors,
    layout_key,
    load_packed_experts,
    packed_key,
    save_packed_experts,
)
from quant.nf4 import MATRICES, PackedExpert, dequantize, pack_expert, pack_experts, quantize
from quant.spec import PART_ALIGN, QuantSpec

H, I, E = 64, 32, 4
ACT = "gelu_pytorch_tanh"
SPECS = [QuantSpec(q, 64, dq) for q in ("nf4", "fp4") for dq in (False, True)]
SPEC_IDS = [f"{s.quant_type}{'-dq' if s.double_quant else ''}" for s in SPECS]


def weights(h=H, i=I, e=None, dtype=torch.bfloat16, seed=0):
    """(gate_up [2I, H], down [H, I]) or, with e, the fused [E, 2I, H], [E, H, I]."""
    g = torch.Generator().manual_seed(seed)
    lead = () if e is None else (e,)
    gate_up = torch.randn(*lead, 2 * i, h, generator=g).to(dtype)
    down = torch.randn(*lead, h, i, generator=g).mul(0.5).to(dtype)
    return gate_up, down


def bnb_round_trip(w, spec, dtype=None):
    codes, state = bnbf.quantize_4bit(
        w, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type
    )
    if dtype is not None:
        state.dtype = dtype
    return bnbf.dequantize_4bit(codes, state)


# -- quantize / dequantize / pack -----------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_packed_dequantize_is_bnb_round_trip_bit_for_bit(spec):
    gate_up, down = weights()
    expert = pack_expert(gate_up, down, spec)
    for w, got in zip((gate_up, down), expert.dequantize()):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, bnb_round_trip(w, spec))
    for w, got in zip((gate_up, down), expert.dequantize(torch.float32)):
        assert got.dtype == torch.float32
        assert torch.equal(got, bnb_round_trip(w, spec, torch.float32))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_matrix_quantize_dequantize_is_bnb_round_trip(spec):
    w = weights()[0]
    codes, state = quantize(w, spec)
    assert torch.equal(dequantize(codes, state), bnb_round_trip(w, spec))
    assert torch.equal(dequantize(codes, state, torch.float32), bnb_round_trip(w, spec, torch.float32))
    assert state.dtype == torch.bfloat16  # asking for fp32 must not change the caller's state


def assert_same_quantization(w, spec):
    """quant.nf4.quantize (the C kernel on the CPU) returns what bitsandbytes' own quantize_4bit does:
    the same code bytes, absmax (NaN where bitsandbytes has NaN) and QuantState fields."""
    codes, state = quantize(w, spec)
    ref_codes, ref = bnbf.quantize_4bit(w.contiguous(), blocksize=spec.blocksize,
                                        compress_statistics=spec.double_quant, quant_type=spec.quant_type)
    assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
    assert torch.equal(codes, ref_codes)
    assert torch.equal(state.absmax, ref.absmax) or torch.allclose(state.absmax, ref.absmax, rtol=0, atol=0,
                                                                    equal_nan=True)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (ref.shape, ref.dtype, ref.blocksize,
                                                                            ref.quant_type)
    assert torch.equal(state.code, ref.code)
    assert state.nested == ref.nested
    if ref.nested:
        assert torch.equal(state.offset, ref.offset) or (state.offset.isnan() and ref.offset.isnan())
        assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.state2.code, ref.state2.code)
        assert state.state2.blocksize == ref.state2.blocksize


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_cpu_quantize_is_bitsandbytes_value_for_value(spec, dtype):
    """The CPU kernel against bitsandbytes on 26B-A4B's expert shapes and on ones whose last block is
    partial (and odd-sized), with the values that test its rules: all-zero blocks, tiny and huge
    magnitudes, weights exactly on a midpoint between two codes, -0.0."""
    from localrun import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler: quantize is bitsandbytes' own")
    g = torch.Generator().manual_seed(1)
    for shape in [(1408, 2816), (2816, 704), (7, 33), (3, 5), (1, 1)]:
        assert_same_quantization((torch.randn(shape, generator=g) * 0.02).to(dtype), spec)
    assert_same_quantization(torch.zeros(3, 5, dtype=dtype), spec)  # a partial block's absmax is stored clamped
    w = torch.randn(64, 64, generator=g)
    w[0] = 0.0
    w[1] = -0.0
    w[2, :32] *= 1e-30
    w[3] *= 1e4 if dtype == torch.float16 else 1e30
    code = bnbf.get_4bit_type(spec.quant_type, device="cpu").sort().values
    w[4, :15] = (code[:-1] + code[1:]) / 2  # a block of absmax 1: these scale to the midpoints themselves
    w[4, 15] = 1.0
    w[5, :16] = -w[4, :16]
    assert_same_quantization(w.to(dtype), spec)


@pytest.mark.parametrize("spec", SPECS[:2], ids=SPEC_IDS[:2])
@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
def test_cpu_quantize_matches_bitsandbytes_at_every_blocksize(spec, blocksize):
    from localrun import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    w = torch.randn(40, 300, generator=torch.Generator().manual_seed(blocksize)).to(torch.bfloat16)
    assert_same_quantization(w, QuantSpec(spec.quant_type, blocksize, spec.double_quant))


def test_cpu_quantize_scales_full_and_partial_blocks_as_bitsandbytes():
    """bitsandbytes scales a full block by the reciprocal of its absmax and divides the partial last
    block by it; the two round differently, and a weight next to a midpoint takes another code by it."""
    from localrun import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    code = bnbf.get_4bit_type("nf4", device="cpu").sort().values
    mids = (code[:-1] + code[1:]) / 2
    m = torch.tensor(0.3)
    near = (mids[:, None] * m) * (1 + torch.arange(-64, 65) * torch.finfo(torch.float32).eps)
    split = near[torch.bucketize(near / m, mids) != torch.bucketize(near * (1.0 / m), mids)]
    assert split.numel() > 0  # such weights exist: the test below can tell the two rules apart
    for n in (64, 2 + split.numel()):  # one full block; one partial block
        w = torch.zeros(n)
        w[0], w[1:1 + split.numel()] = m, split
        assert_same_quantization(w[None], QuantSpec("nf4", 64, False))


def test_cpu_quantize_keeps_bitsandbytes_non_finite_rules():
    """A block holding NaN quantizes (codes and absmax) as bitsandbytes' does, and so does one holding inf."""
    from localrun import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    w[2, 7] = float("inf")
    w[3, 9] = float("-inf")
    for spec in SPECS[::2]:
        assert_same_quantization(w, spec)


def test_quantization_is_lossy_but_close():
    # guards against a dequantize that returns garbage consistently on both sides
    gate_up, _ = weights(dtype=torch.float32)
    got = pack_expert(gate_up, weights(dtype=torch.float32)[1], SPECS[0]).dequantize()[0]
    err = (got - gate_up).abs().mean() / gate_up.abs().mean()
    assert 0 < err < 0.15


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_every_part_is_a_view_into_one_buffer(spec):
    expert = pack_expert(*weights(), spec)
    buf = expert.buffer
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.is_contiguous()
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    for name in MATRICES:
        state = expert.quant_state(name)
        views = [expert.codes(name), state.absmax]
        if spec.double_quant:
            views += [state.state2.absmax, state.offset]
        for t in views:
            assert t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi
            assert t.data_ptr() % PART_ALIGN == buf.data_ptr() % PART_ALIGN


def test_writing_the_buffer_changes_the_weights():
    # the QuantStates must read the buffer, not cached copies of it
    expert = pack_expert(*weights(), QuantSpec("nf4", 64, True))
    before = expert.dequantize()[1]
    copy = PackedExpert(expert.buffer.clone(), expert.layout)
    expert.buffer.zero_()
    assert not torch.equal(expert.dequantize()[1], before)
    assert torch.equal(copy.dequantize()[1], before)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_to_is_one_copy_and_preserves_values():
    expert = pack_expert(*weights(), QuantSpec("nf4", 64, True))
    with _OpLog() as log:
        moved = expert.to("meta", non_blocking=True)
    assert log.ops == ["_to_copy"]
    assert moved.device.type == "meta" and moved.layout is expert.layout and moved.nbytes == expert.nbytes
    # a round trip through another buffer (what a host->device->host move does) keeps every bit
    back = PackedExpert(expert.to("cpu").buffer.clone(), expert.layout)
    assert torch.equal(back.buffer, expert.buffer)
    assert all(torch.equal(a, b) for a, b in zip(back.dequantize(), expert.dequantize()))
    assert expert.to("cpu").buffer is expert.buffer  # already there: no copy


def test_experts_of_a_layer_share_one_layout_object():
    experts = pack_experts(*weights(e=E), SPECS[0])
    assert len(experts) == E
    assert all(x.layout is experts[0].layout for x in experts)
    assert len({x.buffer.data_ptr() for x in experts}) == E


def test_bad_shapes_are_refused():
    gate_up, down = weights()
    with pytest.raises(ValueError):
        pack_expert(gate_up, down.t(), SPECS[0])
    with pytest.raises(ValueError):
        PackedExpert(torch.zeros(10, dtype=torch.uint8), pack_expert(gate_up, down, SPECS[0]).layout)


# -- byte cost ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("h,i", [(64, 32), (80, 32), (96, 48)])
def test_nbytes_formula_is_exact(spec, h, i):
    gate_up, down = weights(h, i)
    expert = pack_expert(gate_up, down, spec)
    assert expert.nbytes == spec.nbytes(gate_up.numel()) + spec.nbytes(down.numel())
    # and the parts bitsandbytes produced fit the layout, padded by less than PART_ALIGN each
    raw = 0
    for w in (gate_up, down):
        codes, state = quantize(w, spec)
        parts = [codes, state.absmax] + ([state.state2.absmax, state.offset] if spec.double_quant else [])
        raw += sum(t.numel() * t.element_size() for t in parts)
    n_parts = 2 * (4 if spec.double_quant else 2)
    assert raw <= expert.nbytes < raw + n_parts * PART_ALIGN


def test_nbytes_of_a_full_size_gemma4_expert():
    # 3 x 704 x 2816 params: 4-bit codes + one fp32 absmax per 64 values, already 16-aligned
    spec = QuantSpec("nf4")
    total = spec.nbytes(1408 * 2816) + spec.nbytes(2816 * 704)
    assert total == 3 * 704 * 2816 // 2 + 4 * 3 * 704 * 2816 // 64 == 3_345_408


# -- 4-bit FFN ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("tokens", [1, 3, qffn.MATMUL_4BIT_MAX_TOKENS + 9])
def test_ffn_4bit_matches_expert_ffn_on_dequantized_weights(spec, tokens):
    expert = pack_expert(*weights(), spec)
    x_TH = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1))
    act = activation(ACT)
    # the oracle in float64: fp32 kernels (bitsandbytes', oneDNN's, MKL's) differ in summation order
    want = expert_ffn(x_TH.double(), *(w.double() for w in expert.dequantize(torch.float32)), act)
    for path in (qffn.ffn_matmul_4bit, qffn.ffn_dequantized, qffn.ffn_4bit):
        got = path(x_TH, expert, act)
        assert got.dtype == torch.float32 and got.shape == (tokens, H)
        torch.testing.assert_close(got.double(), want, atol=2e-6 * want.abs().max().item(), rtol=1e-5)


def test_ffn_4bit_picks_the_path_by_token_count(monkeypatch):
    calls = []
    monkeypatch.setattr(qffn, "ffn_matmul_4bit", lambda x, e, a: calls.append("4bit") or x)
    monkeypatch.setattr(qffn, "ffn_dequantized", lambda x, e, a: calls.append("dequant") or x)
    expert = pack_expert(*weights(), SPECS[0])
    for t in (1, qffn.MATMUL_4BIT_MAX_TOKENS, qffn.MATMUL_4BIT_MAX_TOKENS + 1):
        qffn.ffn_4bit(torch.zeros(t, H), expert, None)
    assert calls == ["4bit", "4bit", "dequant"]


def test_ffn_4bit_computes_in_bf16():
    expert = pack_expert(*weights(), SPECS[1])
    x_TH = torch.randn(2, H, generator=torch.Generator().manual_seed(2))
    act = activation(ACT)
    want = expert_ffn(x_TH, *expert.dequantize(torch.float32), act)
    for path in (qffn.ffn_matmul_4bit, qffn.ffn_dequantized):
        got = path(x_TH.bfloat16(), expert, act)
        assert got.dtype == torch.bfloat16
        # bf16 keeps ~3 significant digits: compare the error to the output's scale
        assert (got.float() - want).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("tokens", [5, 40])
def test_quantized_experts_match_dense_experts(tokens):
    g = torch.Generator().manual_seed(3)
    experts = pack_experts(*weights(e=E), QuantSpec("nf4", 64, True))
    gate_up, down = zip(*(x.dequantize(torch.float32) for x in experts))
    dense = DenseExperts(torch.stack(gate_up), torch.stack(down), ACT)
    quantized = qffn.QuantizedExperts(experts, ACT)
    assert quantized.experts == experts and quantized.nbytes == sum(x.nbytes for x in experts)
    x_TH = torch.randn(tokens, H, generator=g)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    w_TK = torch.rand(tokens, 2, generator=g)
    with torch.no_grad():
        want = dense(x_TH, ids_TK, w_TK)
    got = quantized(x_TH, ids_TK, w_TK)
    assert want.abs().max() > 0.1
    # DenseExperts multiply input-major weights (another GEMM than bitsandbytes' path): fp32 summation order
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- safetensors ----------------------------------------------------------------------------


def layers_of_experts(spec=QuantSpec("nf4", 64, True)):
    return {i: pack_experts(*weights(e=E, seed=i), spec) for i in (0, 2)}


@pytest.fixture(scope="module")
def packed_layers():
    """Layers 0 and 2 (nf4, double quant), packed once; read-only."""
    return layers_of_experts()


def assert_same_experts(got, want):
    assert sorted(got) == sorted(want)
    for layer in want:
        assert len(got[layer]) == len(want[layer])
        for a, b in zip(got[layer], want[layer]):
            assert a.layout == b.layout
            assert torch.equal(a.buffer, b.buffer)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_file_round_trip_is_bit_identical(tmp_path, spec):
    layers = layers_of_experts(spec)
    path = save_packed_experts(tmp_path / "experts.safetensors", layers)
    loaded = load_packed_experts(path)
    assert_same_experts(loaded, layers)
    assert not list(tmp_path.glob("*.tmp"))
    rows = loaded[2]
    assert all(x.buffer.data_ptr() == rows[0].buffer.data_ptr() + e * rows[0].nbytes for e, x in enumerate(rows))
    assert torch.equal(loaded[2][3].dequantize()[0], layers[2][3].dequantize()[0])


def test_load_only_some_layers(tmp_path, packed_layers):
    layers = packed_layers
    path = save_packed_experts(tmp_path / "experts.safetensors", layers)
    loaded = load_packed_experts(path, layers=[2])
    assert_same_experts(loaded, {2: layers[2]})
    with pytest.raises(LocalrunError, match="no layer 1"):
        load_packed_experts(path, layers=[1])


def test_tensors_and_metadata_are_explicit(packed_layers):
    tensors, meta = experts_to_tensors(packed_layers)
    assert set(tensors) == {packed_key(0), packed_key(2)}
    t = tensors[packed_key(0)]
    assert t.dtype == torch.uint8 and t.shape == (E, packed_layers[0][0].nbytes) and t.is_contiguous()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == "64" and meta["double_quant"] == "true"
    layout = json.loads(meta[layout_key(0)])
    assert layout["gate_up_shape"] == [2 * I, H] and layout["down_shape"] == [H, I] and layout["dtype"] == "bfloat16"
    assert layout["parts"]["gate_up.codes"] == [0, [2 * I * H // 2, 1], "uint8"]


def _corrupt(meta, key, value):
    meta = dict(meta)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    return meta


def _edit_layout(meta, **changes):
    layout = json.loads(meta[layout_key(0)])
    layout.update(changes)
    return _corrupt(meta, layout_key(0), json.dumps(layout))


CORRUPTIONS = {
    "no format": lambda m: _corrupt(m, "format", None),
    "foreign format": lambda m: _corrupt(m, "format", "gguf"),
    "future version": lambda m: _corrupt(m, "format_version", "2"),
    "no quant_type": lambda m: _corrupt(m, "quant_type", None),
    "bad quant_type": lambda m: _corrupt(m, "quant_type", "int4"),
    "bad blocksize": lambda m: _corrupt(m, "blocksize", "sixty-four"),
    "other blocksize": lambda m: _corrupt(m, "blocksize", "128"),
    "bad double_quant": lambda m: _corrupt(m, "double_quant", "yes"),
    "other double_quant": lambda m: _corrupt(m, "double_quant", "false"),
    "no layers": lambda m: _corrupt(m, "layers", None),
    "layers not json": lambda m: _corrupt(m, "layers", "[0,"),
    "layers not ints": lambda m: _corrupt(m, "layers", '["0"]'),
    "extra layer": lambda m: _corrupt(m, "layers", "[0, 1, 2]"),
    "no layout": lambda m: _corrupt(m, layout_key(0), None),
    "layout not json": lambda m: _corrupt(m, layout_key(0), "{"),
    "layout lacks field": lambda m: _corrupt(m, layout_key(0), json.dumps({"dtype": "bfloat16"})),
    "bad dtype": lambda m: _edit_layout(m, dtype="int8"),
    "bad shape": lambda m: _edit_layout(m, gate_up_shape=[64]),
    "other shapes": lambda m: _edit_layout(m, gate_up_shape=[2 * I, 2 * H], down_shape=[2 * H, I]),
    "other num_experts": lambda m: _edit_layout(m, num_experts=E + 1),
    "other nbytes": lambda m: _edit_layout(m, nbytes=16),
    "moved part": lambda m: _edit_layout(
        m, parts=json.loads(m[layout_key(0)])["parts"] | {"gate_up.absmax": [16, [64], "uint8"]}
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_metadata_raises_a_one_line_localrun_error(corruption, packed_layers):
    tensors, meta = experts_to_tensors(packed_layers)
    experts_from_tensors(tensors, meta)  # the uncorrupted pair loads
    with pytest.raises(LocalrunError) as err:
        experts_from_tensors(tensors, CORRUPTIONS[corruption](meta))
    assert "\n" not in str(err.value) and str(err.value)


def test_wrong_tensor_raises_localrun_error(packed_layers):
    tensors, meta = experts_to_tensors(packed_layers)
    for bad in ({packed_key(2): tensors[packed_key(2)]}, tensors | {packed_key(0): tensors[packed_key(0)][:, :-16]},
                tensors | {packed_key(0): tensors[packed_key(0)].view(torch.int8)}):
        with pytest.raises(LocalrunError):
            experts_from_tensors(bad, meta)


def test_foreign_or_broken_files_raise_localrun_error(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    for path in (plain, garbage, tmp_path / "missing.safetensors"):
        with pytest.raises(LocalrunError) as err:
            load_packed_experts(path)
        assert "\n" not in str(err.value)
