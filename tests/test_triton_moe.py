"""The 4-bit grouped MoE: ExpertBuffer, the Triton kernels (under TRITON_INTERPRET=1) and the
localrun::moe_4bit op, against bitsandbytes' dequantize_4bit + fp32 matmuls.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.
The Triton tests skip only where triton is not installed; everything else runs everywhere.
"""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads

import pytest
import torch
from bitsandbytes import functional as bnbf
from bitsandbytes.functional import QuantState

from localrun.kernels.moe_4bit import moe_4bit, reference
from localrun.moe import activation
from quant.ffn import QuantizedExperts
from quant.layer import ExpertBuffer
from quant.nf4 import PackedExpert, pack_experts
from quant.spec import QuantSpec

triton_moe = triton_module("triton_moe")

needs_triton = pytest.mark.skipif(triton_moe is None, reason="triton is not installed (pip install triton)")

RTOL = 1e-5  # max |y - ref| / max |ref|
GEMMA_26B = (2816, 704)  # H, I: gate_up [1408, 2816], down [2816, 704]


def make_buffer(spec: QuantSpec, e: int, h: int, i: int, seed: int = 0) -> ExpertBuffer:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, h, generator=g) * 0.05
    down = torch.randn(e, h, i, generator=g) * 0.05
    return ExpertBuffer.from_experts(pack_experts(gate_up, down, spec))


def routing(t: int, k: int, e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] is made by the caller; ids [T, K] distinct per token, repeated across tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if t > 1:
        ids[1] = ids[0].flip(0)  # the same experts in another order
    w = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return ids, w


def bnb_dequantize(expert: PackedExpert, name: str) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of one matrix, in fp32.

    Asked for the matrix as one row: bitsandbytes 0.50's CPU kernel indexes absmax per row, wrong
    where a block crosses rows (e.g. down [2816, 704] at blocksize 128); its CUDA kernel and its
    pure-torch default are flat, like the packing. One row gives the flat answer from the CPU kernel.
    """
    st = expert.quant_state(name, torch.float32)
    shape = expert.layout.matrix(name).shape
    flat = QuantState(absmax=st.absmax, shape=torch.Size([1, shape[0] * shape[1]]), code=st.code,
                      blocksize=st.blocksize, quant_type=st.quant_type, dtype=torch.float32,
                      offset=st.offset, state2=st.state2)
    return bnbf.dequantize_4bit(expert.codes(name), flat).view(shape)


def bnb_moe(buf: ExpertBuffer, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, act: str) -> torch.Tensor:
    """The oracle: bitsandbytes dequantize, fp32 matmuls, fp32 weighted sum, token by token."""
    fn = activation(act)
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            expert = buf.expert(int(ids[t, k]))
            gate, up = (x[t].float() @ bnb_dequantize(expert, "gate_up").T).chunk(2)
            y[t] += w[t, k].float() * ((fn(gate) * up) @ bnb_dequantize(expert, "down").T)
    return y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def run_triton(buf: ExpertBuffer, x, ids, w, act: str, blocks=None) -> torch.Tensor:
    spec = buf.layout.spec
    h, i = buf.layout.down.shape
    return triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i,
                                      spec.blocksize, spec.double_quant, act, blocks=blocks)


SPECS = [QuantSpec(q, bs, dq) for q in ("nf4", "fp4") for dq in (False, True) for bs in (32, 64, 128)]
SPEC_IDS = [f"{s.quant_type}-bs{s.blocksize}{'-dq' if s.double_quant else ''}" for s in SPECS]
# small and odd: rows of 36 / 10 weights, so blocks cross rows, and a partial last block
SMALL = [(36, 10, 5), (64, 48, 6)]


# -- the Triton kernels against bitsandbytes ------------------------------------------------


@needs_triton
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("h,i,e", SMALL, ids=[f"H{h}-I{i}" for h, i, _ in SMALL])
def test_triton_matches_bnb_small(spec, h, i, e):
    buf = make_buffer(spec, e, h, i)
    for t, k in ((1, 2), (4, 3)):
        ids, w = routing(t, k, e, seed=t)
        x = torch.randn(t, h, generator=torch.Generator().manual_seed(t))
        ref = bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")
        assert rel_err(run_triton(buf, x, ids, w, "gelu_pytorch_tanh"), ref) < RTOL, (t, k)


# 26B-A4B's shapes; every quant type / double quant, blocksize 64 and 128 between them
BIG = [QuantSpec("nf4", 64, False), QuantSpec("nf4", 128, True), QuantSpec("fp4", 128, False),
       QuantSpec("fp4", 64, True)]


@needs_triton
@pytest.mark.parametrize("spec", BIG, ids=[f"{s.quant_type}-bs{s.blocksize}{'-dq' if s.double_quant else ''}" for s in BIG])
def test_triton_matches_bnb_gemma_26b_shape(spec):
    h, i = GEMMA_26B
    e = 3
    buf = make_buffer(spec, e, h, i)
    t, k = (1, 3) if spec.double_quant else (2, 2)
    ids, w = routing(t, k, e)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1))
    ref = bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")
    assert rel_err(run_triton(buf, x, ids, w, "gelu_pytorch_tanh"), ref) < RTOL


@needs_triton
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "silu"])
def test_triton_activations_and_bf16(act):
    buf = make_buffer(QuantSpec("nf4", 64, True), 4, 64, 48)
    ids, w = routing(3, 2, 4)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 4  # reach gelu's tails
    ref = bnb_moe(buf, x, ids, w, act)
    assert rel_err(run_triton(buf, x, ids, w, act), ref) < RTOL
    # bf16 in and out: fp32 inside, one rounding at the end
    xb, wb = x.bfloat16(), w.bfloat16()
    yb = run_triton(buf, xb, ids, wb, act)
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb, bnb_moe(buf, xb.float(), ids, wb.float(), act)) < 1e-2


@needs_triton
def test_triton_every_token_on_one_expert_and_int32_ids():
    buf = make_buffer(QuantSpec("fp4", 32, False), 3, 36, 10)
    ids = torch.full((5, 2), 1, dtype=torch.int32)
    ids[:, 1] = 2
    w = torch.rand(5, 2)
    x = torch.randn(5, 36)
    assert rel_err(run_triton(buf, x, ids, w, "silu"), bnb_moe(buf, x, ids.long(), w, "silu")) < RTOL


@needs_triton
def test_benchmark_helper_runs_on_cpu():
    from localrun.kernels.triton_moe_bench import benchmark_moe_4bit

    out = benchmark_moe_4bit(device="cpu", num_experts=4, hidden=64, inter=32, top_k=2, iters=1,
                                        double_quant=True, baseline=False)
    assert out["max_rel_err"] < RTOL
    assert out["us_per_call"] > 0 and out["bytes_per_call"] > 0


@needs_triton
def test_default_decode_kernels_by_shape(monkeypatch):
    """v2 where rows are whole words, else the grouped kernels (USE_V4 and USE_FUSED off: the default the
    H200 measured)."""
    used = []
    for name in ("moe_4bit_grouped", "_moe_4bit_v2", "_moe_4bit_v4", "_moe_4bit_fused"):
        real = getattr(triton_moe, name)
        monkeypatch.setattr(triton_moe, name,
                            lambda *a, real=real, name=name, **kw: used.append(name) or real(*a, **kw))
    spec = QuantSpec("nf4", 64, False)
    for h, i in ((64, 32), (64, 48), (36, 10)):
        buf = make_buffer(spec, 4, h, i)
        ids, w = routing(1, 2, 4)
        run_triton(buf, torch.randn(1, h), ids, w, "silu")
    assert used == ["_moe_4bit_v2", "_moe_4bit_v2", "moe_4bit_grouped"]
    assert triton_moe.chunks_fit(64, 32, 64) and not triton_moe.chunks_fit(64, 48, 64)
    assert not triton_moe.chunks_fit(64, 32, 16) and not triton_moe.chunks_fit(64, 32, 96)


@needs_triton
def test_the_benchmark_names_its_default_row_by_what_runs(monkeypatch):
    from localrun.kernels.triton_moe_bench import default_name

    assert [default_name(t, h, i, 64) for t, h, i in ((1, 64, 32), (17, 64, 32), (1, 36, 10))] == \
        ["v2", "grouped", "grouped"]
    monkeypatch.setattr(triton_moe, "USE_V4", True)
    assert default_name(2, 64, 32, 64) == "v4" and default_name(2, 64, 48, 64) == "v2"
    monkeypatch.setattr(triton_moe, "V4_DOWN", False)
    assert default_name(2, 64, 32, 64) == "v4 gate_up, v2 down"
    monkeypatch.setattr(triton_moe, "USE_FUSED", True)
    assert default_name(1, 64, 32, 64) == "v5" and default_name(2, 64, 32, 64) == "v4 gate_up, v2 down"


@needs_triton
@pytest.mark.parametrize("name", ["v1", "v3", "V2", ""])
def test_kernels_asked_for_by_a_name_they_do_not_have_refuse(name):
    """v1 and v3 were deleted (2026-11-28): a caller asking for them gets an error, not v2's answer."""
    spec = QuantSpec("nf4", 64, False)
    buf = make_buffer(spec, 4, 64, 32)
    with pytest.raises(ValueError, match=f"no 4-bit MoE kernels named '{name}': the versions are v2, v4, v5"):
        run_triton(buf, torch.randn(1, 64), *routing(1, 2, 4), "silu", blocks=name)


@needs_triton
@pytest.mark.parametrize("blocks", ["v4", "v5"])
def test_chunk_kernels_with_an_unaligned_code_table(blocks):
    """The chunk kernels OR nibble offsets into the table's address (under the interpreter v4 and v5 read
    the table from memory): a table off a 64-byte boundary is copied first."""
    spec = QuantSpec("fp4", 64, True)
    buf = make_buffer(spec, 4, 64, 32)
    code, nested = buf.code_tables()
    backing = torch.zeros(code.numel() + 1)
    shifted = backing[1:]
    shifted.copy_(code)
    assert shifted.data_ptr() % triton_moe.TABLE_ALIGN
    t = 1 if blocks == "v5" else 3  # v5 takes one token
    ids, w = routing(t, 2, 4)
    x = torch.randn(t, 64)
    y = triton_moe.moe_4bit_triton(x, ids, w, buf.data, shifted, nested, buf.offsets(), 64, 32, 64, True, "silu",
                                   blocks=blocks)
    assert rel_err(y, bnb_moe(buf, x, ids, w, "silu")) < RTOL


# -- the v4 decode kernels (the table in the lanes; under the interpreter it is read from memory) ----

# rows of 2 / 3 chunks; blocks of 128 span rows of 64 and 96 weights
CHUNK_SHAPES = [(64, 32, 5), (96, 64, 4)]
SMALL_V4_TILES = triton_moe.V4Tiles(gate_up_n=8, gate_up_w=4, gate_up_warps=1, down_n=16, down_w=4,
                                    down_warps=1) if triton_moe else None


@needs_triton
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_v4_matches_bnb(spec):
    """v4 at its interpreter tiles: steps wider than the rows (the chunks past a row weigh 0, also with
    double quant, whose masked absmax would be the nested offset), top-3 padded to 4 expert slots."""
    h, i, e = CHUNK_SHAPES[SPECS.index(spec) % 2]
    buf = make_buffer(spec, e, h, i)
    for t, k in ((1, 2), (4, 3)):  # T > 1: the same experts again in another order
        ids, w = routing(t, k, e, seed=t)
        x = torch.randn(t, h, generator=torch.Generator().manual_seed(t))
        y = triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, spec.blocksize,
                                       spec.double_quant, "gelu_pytorch_tanh", blocks="v4")
        assert rel_err(y, bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")) < RTOL, (t, k)


@needs_triton
def test_v4_small_tiles_loop_over_rows():
    """Tiles of one chunk a step: every row takes several steps (the next step's codes requested ahead)."""
    spec = QuantSpec("nf4", 64, True)
    h, i, e = 64, 64, 4
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(2, 2, e)
    x = torch.randn(2, h, generator=torch.Generator().manual_seed(2))
    y = triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, spec.blocksize,
                                   spec.double_quant, "silu", blocks=SMALL_V4_TILES)
    assert rel_err(y, bnb_moe(buf, x, ids, w, "silu")) < RTOL


@needs_triton
def test_v4_top_8_and_bf16():
    """Eight experts a token in one down tile, x in fp32 and in bf16 (a word's 8 elements read as two
    loads of 4 either way): bf16 is exact but for rounding y to bf16."""
    h, i, e = 96, 64, 10
    spec = QuantSpec("nf4", 64, False)
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(2, 8, e)
    x = torch.randn(2, h, generator=torch.Generator().manual_seed(5))
    args = (buf.data, *buf.code_tables(), buf.offsets(), h, i, 64, False, "silu")
    assert rel_err(triton_moe.moe_4bit_triton(x, ids, w, *args, blocks="v4"), bnb_moe(buf, x, ids, w, "silu")) < RTOL
    x16 = x.bfloat16()
    y16 = triton_moe.moe_4bit_triton(x16, ids, w, *args, blocks="v4")
    assert y16.dtype == torch.bfloat16 and rel_err(y16, bnb_moe(buf, x16.float(), ids, w, "silu")) < 8e-3


@needs_triton
def test_down_prefetch_applies_to_one_token_on_cuda_only(monkeypatch):
    """PREFETCH_DOWN gives the gate_up launch the down matrix's first byte (DOWN_OFF) for one token on CUDA,
    compiled (tests/test_sass_stats.py checks what it issues); a prompt's call, the CPU, the interpreter and
    the switch off launch as before."""
    from types import SimpleNamespace

    buf = make_buffer(QuantSpec("nf4", 64, False), 3, 64, 32)
    call = SimpleNamespace(T=1, x=SimpleNamespace(device=SimpleNamespace(type="cuda")), offsets=buf.offsets())
    monkeypatch.setattr(triton_moe, "interpreted", lambda: False)
    assert triton_moe._down_off(call) == {}  # off by default
    monkeypatch.setattr(triton_moe, "PREFETCH_DOWN", True)
    assert triton_moe._down_off(call) == {"DOWN_OFF": buf.layout.down.codes.offset} and buf.layout.down.codes.offset > 0
    assert triton_moe._down_off(SimpleNamespace(**{**vars(call), "T": 2})) == {}
    assert triton_moe._down_off(SimpleNamespace(**{**vars(call), "x": torch.zeros(1)})) == {}
    monkeypatch.setattr(triton_moe, "interpreted", lambda: True)
    assert triton_moe._down_off(call) == {}
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(9))  # interpreted: the same result as off
    ids, w = routing(1, 2, 3)
    on = run_triton(buf, x, ids, w, "silu")
    monkeypatch.setattr(triton_moe, "PREFETCH_DOWN", False)
    assert torch.equal(on, run_triton(buf, x, ids, w, "silu"))


@needs_triton
@pytest.mark.parametrize("version", ["v2", "v4"])
@pytest.mark.parametrize("spec", [QuantSpec("nf4", 64, True), QuantSpec("fp4", 32, False)], ids=["nf4-dq", "fp4"])
def test_early_loads_are_exact_whatever_the_ids_held_before_the_wait(version, spec):
    """EARLY (EARLY_LOADS under PDL): each stage requests its first step for the experts the ids hold before
    the wait, then reads the ids again and requests the step again where they differ. Whatever they held (the
    same experts, others, ids outside the buffer, which it clamps), h and y are bit for bit EARLY off's."""
    h, i, e = 96, 64, 10
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(1, 3, e, seed=4)  # top-3: down's fourth expert slot padded
    x = torch.randn(1, h, generator=torch.Generator().manual_seed(4))
    gate_up, down = getattr(triton_moe, f"_gate_up_{version}"), getattr(triton_moe, f"_down_{version}")
    tiles = triton_moe.INTERPRETER_TILES if version == "v2" else triton_moe.INTERPRETER_V4

    def run(early: bool, early_ids=None):
        c = triton_moe._prepare(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, spec.blocksize,
                                spec.double_quant, "silu")
        c.early, c.early_ids = early, early_ids
        gate_up(c, tiles)
        down(c, tiles)
        return c.h, c.y

    h_off, y_off = run(False)
    assert rel_err(y_off, bnb_moe(buf, x, ids, w, "silu")) < RTOL
    for early_ids in (None, torch.tensor([[int(ids[0, 0]), -3, 10**6]]), (ids + 1) % e):
        h_on, y_on = run(True, early_ids)
        assert torch.equal(h_on, h_off) and torch.equal(y_on, y_off), early_ids


@needs_triton
def test_early_loads_only_for_one_token_under_pdl(monkeypatch):
    """EARLY applies where EARLY_LOADS is on, the launch has PDL, and the call is one token (a prompt's
    gate_up programs read their pair from the step's sorted order, after the wait)."""
    buf = make_buffer(QuantSpec("nf4", 64, False), 3, 64, 32)
    one, two = routing(1, 2, 3), routing(2, 2, 3)
    calls = [triton_moe._prepare(torch.randn(t, 64), ids, w, buf.data, *buf.code_tables(), buf.offsets(), 64, 32,
                                 64, False, "silu") for t, (ids, w) in ((1, one), (2, two))]
    early = lambda c: triton_moe._early(c)["EARLY"]  # noqa: E731
    pdl = {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(triton_moe.triton_pdl, "launch", lambda device: pdl)
    assert not early(calls[0])  # EARLY_LOADS off by default
    monkeypatch.setattr(triton_moe, "EARLY_LOADS", True)
    assert early(calls[0]) and not early(calls[1])
    assert triton_moe._early(calls[0])["early_ids_ptr"] is calls[0].ids
    assert triton_moe._early(calls[0])["N_EXPERTS"] == 3
    monkeypatch.setattr(triton_moe.triton_pdl, "launch", lambda device: {})
    assert not early(calls[0])


@needs_triton
def test_use_v4_switches_the_default(monkeypatch):
    """USE_V4 sends the default decode path to v4 where `chunks_fit`, and leaves the other shapes to v2;
    v4 tiles refuse rows of partial chunks."""
    used = []
    for name in ("_moe_4bit_v2", "_moe_4bit_v4"):
        real = getattr(triton_moe, name)
        monkeypatch.setattr(triton_moe, name,
                            lambda *a, real=real, name=name, **kw: used.append(name[-2:]) or real(*a, **kw))
    monkeypatch.setattr(triton_moe, "USE_V4", True)
    spec = QuantSpec("nf4", 64, False)
    for h, i in ((64, 32), (64, 48)):
        buf = make_buffer(spec, 4, h, i)
        ids, w = routing(1, 2, 4)
        x = torch.randn(1, h)
        y = run_triton(buf, x, ids, w, "silu")
        assert rel_err(y, bnb_moe(buf, x, ids, w, "silu")) < RTOL
    assert used == ["v4", "v2"]
    with pytest.raises(ValueError, match="multiples of 32"):
        triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), 64, 48, 64, False,
                                   "silu", blocks="v4")


@needs_triton
def test_v4_gate_up_with_v2_down(monkeypatch):
    """USE_V4 with V4_DOWN off: v4's gate_up stage, then v2's down over the same h rows, exact (FP4 with
    double quant, top-8, T = 2 with an expert in both tokens); blocks="v4" still runs both v4 stages."""
    stages = []
    for name in ("_down_v2", "_down_v4", "_gate_up_v4", "_gate_up_v2"):
        real = getattr(triton_moe, name)
        monkeypatch.setattr(triton_moe, name, lambda *a, real=real, name=name: stages.append(name) or real(*a))
    monkeypatch.setattr(triton_moe, "USE_V4", True)
    monkeypatch.setattr(triton_moe, "V4_DOWN", False)
    spec = QuantSpec("fp4", 64, True)
    h, i, e = 96, 64, 10
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(2, 8, e)
    x = torch.randn(2, h, generator=torch.Generator().manual_seed(11))
    assert rel_err(run_triton(buf, x, ids, w, "silu"), bnb_moe(buf, x, ids, w, "silu")) < RTOL
    assert stages == ["_gate_up_v4", "_down_v2"]
    triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, 64, True, "silu",
                               blocks="v4")
    assert stages[2:] == ["_gate_up_v4", "_down_v4"]


# -- v5: a decoded token's experts in one launch (gate_up rows j, then down's columns j, added atomically) --

# several row steps (H = 96 in 32-row steps, the last program rounding out each), an intermediate block half
# past I (I = 96 at 64 a block)
SMALL_V5_TILES = triton_moe.FusedTiles(block_j=64, block_w=4, block_r=32, warps=2) if triton_moe else None


def held_left_zero(h: int) -> bool:
    """v5's accumulator and counters back at zero, as its last programs leave them for the next call."""
    held = triton_moe.counters._HELD
    acc, count = held[f"moe_fused_acc_{h}", torch.device("cpu")], held["moe_fused", torch.device("cpu")]
    return not acc.any() and not count.any()


@needs_triton
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_v5_matches_bnb(spec):
    """v5 at its interpreter tiles, NF4 and FP4, with and without double quant, top-2 / 3 / 4 of 4-5 experts
    (3 padded to no slot: the grid is K programs a column block), I = 64 in two column blocks at every spec;
    called again, the same bits (the accumulator and counters left zero in between)."""
    h, i, e = CHUNK_SHAPES[1]
    buf = make_buffer(spec, e, h, i)
    for k in (2, 3, 4):
        ids, w = routing(1, k, e, seed=k)
        x = torch.randn(1, h, generator=torch.Generator().manual_seed(k))
        args = (x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, spec.blocksize, spec.double_quant,
                "gelu_pytorch_tanh")
        y = triton_moe.moe_4bit_triton(*args, blocks="v5")
        assert rel_err(y, bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")) < RTOL, k
        assert held_left_zero(h)
        assert torch.equal(triton_moe.moe_4bit_triton(*args, blocks="v5"), y)


@needs_triton
@pytest.mark.parametrize("spec", [QuantSpec("nf4", 64, True), QuantSpec("fp4", 32, False)], ids=["nf4-dq", "fp4"])
def test_v5_small_tiles_several_row_steps_and_a_partial_column_block(spec):
    """Rows in three steps of 32, a 64-wide column block of which only 32 columns are I's
    (their codes masked, their absmax 0), gate_up rows in steps of one chunk; top-8 of 10, x in bf16."""
    h, i, e = 96, 96, 10
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(1, 8, e, seed=4)
    x = torch.randn(1, h, generator=torch.Generator().manual_seed(4))
    args = (buf.data, *buf.code_tables(), buf.offsets(), h, i, spec.blocksize, spec.double_quant, "silu")
    y = triton_moe.moe_4bit_triton(x, ids, w, *args, blocks=SMALL_V5_TILES)
    assert rel_err(y, bnb_moe(buf, x, ids, w, "silu")) < RTOL and held_left_zero(h)
    y16 = triton_moe.moe_4bit_triton(x.bfloat16(), ids, w, *args, blocks=SMALL_V5_TILES)
    assert y16.dtype == torch.bfloat16 and rel_err(y16, bnb_moe(buf, x.bfloat16().float(), ids, w, "silu")) < 8e-3


@needs_triton
def test_v5_at_the_26b_shape():
    """26B-A4B's rows (H = 2,816 in 11 steps of 256 rows, I = 704 in 22 column blocks), NF4 with double quant,
    two of three experts."""
    h, i = GEMMA_26B
    spec = QuantSpec("nf4", 64, True)
    buf = make_buffer(spec, 3, h, i)
    ids, w = routing(1, 2, 3, seed=6)
    x = torch.randn(1, h, generator=torch.Generator().manual_seed(6))
    y = triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, 64, True,
                                   "gelu_pytorch_tanh", blocks="v5")
    assert rel_err(y, bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")) < RTOL and held_left_zero(h)


@needs_triton
def test_use_fused_switches_one_token_only(monkeypatch):
    """USE_FUSED sends a decoded token to v5 where its rows are whole chunks; two tokens, and rows that are
    not whole chunks keep their kernels; v5 asked for by name refuses what it cannot run, in one line."""
    used = []
    for name in ("_moe_4bit_v2", "_moe_4bit_fused"):
        real = getattr(triton_moe, name)
        monkeypatch.setattr(triton_moe, name,
                            lambda *a, real=real, name=name, **kw: used.append(name) or real(*a, **kw))
    monkeypatch.setattr(triton_moe, "USE_FUSED", True)
    spec = QuantSpec("nf4", 64, False)
    for t, (h, i) in ((1, (64, 32)), (2, (64, 32)), (1, (64, 48))):
        buf = make_buffer(spec, 4, h, i)
        ids, w = routing(t, 2, 4)
        x = torch.randn(t, h)
        assert rel_err(run_triton(buf, x, ids, w, "silu"), bnb_moe(buf, x, ids, w, "silu")) < RTOL
    assert used == ["_moe_4bit_fused", "_moe_4bit_v2", "_moe_4bit_v2"]
    buf = make_buffer(spec, 4, 64, 32)
    args = (buf.data, *buf.code_tables(), buf.offsets(), 64, 32, 64, False, "silu")
    ids, w = routing(2, 2, 4)
    with pytest.raises(ValueError, match="one token"):
        triton_moe.moe_4bit_triton(torch.randn(2, 64), ids, w, *args, blocks="v5")
    with pytest.raises(ValueError, match="multiples of 32"):
        triton_moe.moe_4bit_triton(torch.randn(1, 64), ids[:1], w[:1], buf.data, *buf.code_tables(), buf.offsets(),
                                   64, 32, 16, False, "silu", blocks="v5")
    for bad in (dict(block_j=48), dict(block_j=16), dict(block_w=2), dict(block_r=96), dict(warps=3)):
        with pytest.raises(ValueError, match="v5 tiles need"):
            triton_moe.moe_4bit_triton(torch.randn(1, 64), ids[:1], w[:1], *args, blocks=triton_moe.FusedTiles(**bad))


@needs_triton
@pytest.mark.parametrize("blocks", ["v2", "v4"])
def test_at_the_26b_shape(blocks):
    """v2 (the default) and v4 (opt-in) exact at 26B-A4B's rows (for v4, H = 2816 is 2.75 steps of 128
    words, I = 704 less than one: the chunks past a row read the last chunk's x / h and weigh 0); an
    expert repeated across the tokens."""
    h, i = GEMMA_26B
    spec = QuantSpec("nf4", 64, True)
    buf = make_buffer(spec, 3, h, i)
    ids, w = routing(2, 2, 3)
    x = torch.randn(2, h, generator=torch.Generator().manual_seed(3))
    y = triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, 64, True,
                                   "gelu_pytorch_tanh", blocks=blocks)
    assert rel_err(y, bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")) < RTOL


@needs_triton
@pytest.mark.parametrize("blocks", [None, "v2"])
def test_top_8_through_v2s_tiles(blocks):
    """Eight experts a token in v2's down tile (KE x rows x weights) stays within Triton's tensor size:
    the default path at a shape v4 does not take (H, I not multiples of 32), and v2 forced."""
    h, i, e = 200, 72, 10
    spec = QuantSpec("nf4", 64, False)
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(2, 8, e)
    x = torch.randn(2, h, generator=torch.Generator().manual_seed(5))
    y = triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i, 64, False,
                                   "silu", blocks=blocks)
    assert rel_err(y, bnb_moe(buf, x, ids, w, "silu")) < RTOL


@needs_triton
@pytest.mark.parametrize("h,i", [(35, 10), (36, 9), (35, 9), (36, 10)])
def test_rows_of_partial_words_run_grouped_or_refuse(h, i):
    """ExpertBuffer refuses odd H / I, but the op's arguments are raw bytes: there the GEMV kernels would
    read rows from mid-byte (a silently wrong answer), and rows of an even length not a multiple of 8 from
    mid-word; so the default runs the grouped kernels (which index weights) at any T, and the GEMV
    kernels asked for by name refuse."""
    from quant.layer import layout_offsets
    from quant.nf4 import _code_table

    spec = QuantSpec("nf4", 64, False)
    g = torch.Generator().manual_seed(0)
    experts = pack_experts(torch.randn(3, 2 * i, h, generator=g) * 0.05, torch.randn(3, h, i, generator=g) * 0.05,
                           spec)
    data = torch.stack([e.buffer for e in experts])
    oracle = type("Experts", (), {"expert": staticmethod(lambda e: experts[e])})
    args = (data, _code_table("nf4", data.device), _code_table("dynamic", data.device),
            layout_offsets(experts[0].layout), h, i, 64, False, "silu")
    for t in (1, 3):
        ids, w = routing(t, 2, 3, seed=t)
        x = torch.randn(t, h, generator=g)
        assert rel_err(triton_moe.moe_4bit_triton(x, ids, w, *args), bnb_moe(oracle, x, ids, w, "silu")) < RTOL
    for blocks in ("v2", "v4", "v5", triton_moe.INTERPRETER_TILES, triton_moe.INTERPRETER_V4):
        with pytest.raises(ValueError, match="multiples of 8"):
            triton_moe.moe_4bit_triton(x, ids, w, *args, blocks=blocks)


# -- the grouped GEMMs (prefill: from GROUPED_MIN_TOKENS tokens) ----------------------------


def skewed_routing(t: int, k: int, e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Most tokens on the same few experts (several blocks of one expert), some experts never hit."""
    g = torch.Generator().manual_seed(seed)
    hot = torch.randperm(e, generator=g)[: k + 1]
    ids = torch.stack([hot[torch.randperm(k + 1, generator=g)[:k]] for _ in range(t)])
    ids[-1] = torch.randperm(e, generator=g)[:k]
    return ids, torch.softmax(torch.randn(t, k, generator=g), dim=-1)


@needs_triton
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("h,i,e", SMALL, ids=[f"H{h}-I{i}" for h, i, _ in SMALL])
def test_grouped_matches_bnb_small(spec, h, i, e):
    buf = make_buffer(spec, e, h, i)
    t0 = triton_moe.GROUPED_MIN_TOKENS
    for t, k, route in ((t0, 2, routing), (t0 + 20, 3, routing), (70, 2, skewed_routing)):
        ids, w = route(t, k, e, seed=t)
        x = torch.randn(t, h, generator=torch.Generator().manual_seed(t))
        ref = bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")
        assert rel_err(run_triton(buf, x, ids, w, "gelu_pytorch_tanh"), ref) < RTOL, (t, k)
        y = triton_moe.moe_4bit_grouped(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), h, i,
                                        spec.blocksize, spec.double_quant, "gelu_pytorch_tanh",
                                        tiles=triton_moe.GroupedTiles(block_n=16, block_k=16))
        assert rel_err(y, ref) < RTOL, ("tiles 16x16", t, k)  # tiles smaller than a row: several column steps


@needs_triton
@pytest.mark.parametrize("spec", BIG[:2], ids=[f"{s.quant_type}-bs{s.blocksize}{'-dq' if s.double_quant else ''}"
                                               for s in BIG[:2]])
def test_grouped_matches_bnb_gemma_26b_shape(spec):
    h, i = GEMMA_26B
    e = 4
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(triton_moe.GROUPED_MIN_TOKENS, 2, e)
    x = torch.randn(ids.shape[0], h, generator=torch.Generator().manual_seed(1))
    assert rel_err(run_triton(buf, x, ids, w, "gelu_pytorch_tanh"), bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")) < RTOL


@needs_triton
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "silu"])
def test_grouped_activations_bf16_and_int32_ids(act):
    buf = make_buffer(QuantSpec("nf4", 64, True), 6, 64, 48)
    ids, w = skewed_routing(40, 2, 6, seed=3)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2)) * 4  # reach gelu's tails
    ref = bnb_moe(buf, x, ids, w, act)
    assert rel_err(run_triton(buf, x, ids.int(), w, act), ref) < RTOL
    # bf16 in and out: h and each expert's output rounded to bf16 (as the dispatch path rounds them)
    xb, wb = x.bfloat16(), w.bfloat16()
    yb = run_triton(buf, xb, ids, wb, act)
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb, bnb_moe(buf, xb.float(), ids, wb.float(), act)) < 2e-2


@needs_triton
@pytest.mark.parametrize("seed", range(4))
def test_pair_blocks_layout(seed):
    g = torch.Generator().manual_seed(seed)
    t, k, e = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)), 9
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    for bm in (16, 32):
        lay = triton_moe.pair_blocks(ids, e, bm)
        P = t * k
        slots = lay.pairs.view(-1, bm)
        assert slots.shape[0] == lay.experts.numel() == -(-P // bm) + min(e, P)
        real = lay.pairs[lay.pairs < P]
        assert sorted(real.tolist()) == list(range(P))  # every pair exactly once, the rest padding (P)
        assert (lay.pairs[lay.pairs >= P] == P).all()
        flat = ids.reshape(-1)
        for b in range(slots.shape[0]):
            pairs = slots[b][slots[b] < P].long()
            if int(lay.experts[b]) >= e:  # past the last expert's blocks: nothing there
                assert pairs.numel() == 0
            else:
                assert (flat[pairs] == lay.experts[b]).all()  # one expert per block
                assert pairs.numel() > 0 and (pairs.diff() > 0).all()  # token order kept within an expert


@needs_triton
@pytest.mark.parametrize("seed", range(3))
def test_pair_blocks_of_a_wave(seed):
    """ExpertStore's waves: only the pairs whose id is below E, each once, in blocks of one id; the
    rest (id E) nowhere; the bound counts the wave's ids."""
    g = torch.Generator().manual_seed(seed)
    t, k, e = 30, 3, 7
    ids = torch.stack([torch.randperm(e + 3, generator=g)[:k] for _ in range(t)]).clamp(max=e)  # 3 ids -> E
    flat = ids.reshape(-1)
    chosen = flat < e
    n, hit = int(chosen.sum()), int(flat[chosen].unique().numel())
    lay = triton_moe.pair_blocks(ids, e, 16, wave=(n, hit))
    P = t * k
    assert lay.experts.numel() == -(-n // 16) + min(hit, n) and lay.pairs.numel() == lay.experts.numel() * 16
    assert sorted(lay.pairs[lay.pairs < P].tolist()) == chosen.nonzero().view(-1).tolist()
    slots = lay.pairs.view(-1, 16)
    for b in range(slots.shape[0]):
        pairs = slots[b][slots[b] < P].long()
        assert pairs.numel() == 0 if int(lay.experts[b]) >= e else (flat[pairs] == lay.experts[b]).all()


# -- the op's CPU implementation ------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_cpu_op_matches_bnb(spec):
    h, i, e = SMALL[0]
    buf = make_buffer(spec, e, h, i)
    ids, w = routing(4, 3, e)
    x = torch.randn(4, h)
    assert rel_err(buf.moe(x, ids, w, "silu"), bnb_moe(buf, x, ids, w, "silu")) < RTOL


def test_cpu_op_matches_bnb_gemma_26b_shape():
    h, i = GEMMA_26B
    buf = make_buffer(QuantSpec("nf4", 128, True), 3, h, i)
    ids, w = routing(3, 2, 3)
    x = torch.randn(3, h)
    y = moe_4bit(x, ids, w, buf, "gelu_pytorch_tanh")
    assert rel_err(y, bnb_moe(buf, x, ids, w, "gelu_pytorch_tanh")) < RTOL


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("dq", [False, True])
def test_cpu_op_matches_quant_ffn(t, dq):
    """The existing expert backend (bitsandbytes matmul_4bit / dequantize per expert) on the same
    experts, viewed in the buffer; rows hold whole blocks, where bitsandbytes' CPU kernels are right."""
    buf = make_buffer(QuantSpec("nf4", 64, dq), 6, 128, 64)
    backend = QuantizedExperts(buf.experts(), "gelu_pytorch_tanh")
    ids, w = routing(t, 3, 6)
    x = torch.randn(t, 128)
    assert rel_err(buf.moe(x, ids, w, "gelu_pytorch_tanh"), backend(x, ids, w)) < RTOL


def test_op_traces_with_compile_fullgraph():
    buf = make_buffer(QuantSpec("nf4", 64, True), 4, 36, 10)
    ids, w = routing(2, 2, 4)
    x = torch.randn(2, 36)

    def layer(x, ids, w):  # routing and residual around the op, as a decoder layer has them
        return x + buf.moe(x * 2, ids, torch.softmax(w, -1), "gelu_pytorch_tanh")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, ids, w), layer(x, ids, w), rtol=0, atol=0)


def test_op_schema_and_fake():
    buf = make_buffer(QuantSpec("fp4", 64, False), 3, 36, 10)
    ids, w = routing(2, 2, 3)
    code, nested = buf.code_tables()
    args = (torch.randn(2, 36), ids, w, buf.data, code, nested, buf.offsets(), 36, 10, 64, False, "silu")
    torch.library.opcheck(torch.ops.localrun.moe_4bit.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_reference_dequantize_is_bnb_bit_for_bit():
    from localrun.kernels.moe_4bit import dequantize_matrix

    for spec in (QuantSpec("nf4", 128, True), QuantSpec("fp4", 32, False)):
        buf = make_buffer(spec, 2, 36, 10)
        code, nested = buf.code_tables()
        offsets = buf.offsets()
        for name, offs, shape in (("gate_up", offsets[:4], (20, 36)), ("down", offsets[4:], (36, 10))):
            got = dequantize_matrix(buf.data[1], offs, shape, spec.blocksize, spec.double_quant, code, nested)
            assert torch.equal(got, bnb_dequantize(buf.expert(1), name))


# -- ExpertBuffer ---------------------------------------------------------------------------


def test_expert_buffer_views_and_store():
    spec = QuantSpec("nf4", 64, True)
    experts = pack_experts(torch.randn(3, 20, 36), torch.randn(3, 36, 10), spec)
    buf = ExpertBuffer.from_experts(experts)
    assert buf.data.shape == (3, experts[0].nbytes) and buf.num_experts == 3
    for e, packed in enumerate(experts):
        view = buf.expert(e)
        assert view.buffer.data_ptr() == buf.data[e].data_ptr()  # a view, not a copy
        for a, b in zip(view.dequantize(torch.float32), packed.dequantize(torch.float32)):
            assert torch.equal(a, b)
    absmax = buf.part("down", "absmax")
    assert absmax.shape == (3, *buf.layout.down.absmax.shape) and absmax.dtype == torch.uint8
    assert torch.equal(buf.part("gate_up", "nested_offset")[2], experts[2].quant_state("gate_up").offset.view(()))
    # a slot is one row copy
    empty = ExpertBuffer.empty(buf.layout, 2)
    empty.store(1, experts[2])
    assert torch.equal(empty.data[1], experts[2].buffer)
    assert len(buf.offsets()) == 8


def test_expert_buffer_rejects_mixed_layouts():
    a = pack_experts(torch.randn(1, 20, 36), torch.randn(1, 36, 10), QuantSpec("nf4", 64))
    b = pack_experts(torch.randn(1, 20, 36), torch.randn(1, 36, 10), QuantSpec("fp4", 64))
    with pytest.raises(ValueError, match="layout"):
        ExpertBuffer.from_experts(a + b)
    with pytest.raises(ValueError, match="layout"):
        ExpertBuffer.from_experts(a).store(0, b[0])
