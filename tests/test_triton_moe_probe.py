"""The v4 MoE kernels' probes (kernels/triton_moe_probe.py) under the Triton interpreter: each computes
what its name says, so that a GPU timing of it means what the probe module says it means."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads

import pytest
import torch

from localrun.kernels.moe_4bit import reference
from quant.spec import QuantSpec
from test_triton_moe import make_buffer, rel_err, routing

probe = triton_module("triton_moe_probe")
triton_moe = triton_module("triton_moe")
needs_triton = pytest.mark.skipif(probe is None, reason="triton is not installed (pip install triton)")

H, I, E = 64, 32, 6
SMALL_TILES = None if triton_moe is None else triton_moe.V4Tiles(gate_up_n=8, gate_up_w=4, down_n=16, down_w=4)


def call(buf, x, ids, w, act="gelu_pytorch_tanh"):
    spec = buf.layout.spec
    return triton_moe._prepare(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), H, I, spec.blocksize,
                               spec.double_quant, act)


@needs_triton
@pytest.mark.parametrize("tiles", [None, "small"])
def test_as_is_is_the_kernels_result(tiles):
    """PROBE 0 is the v4 kernels as the step runs them, bit for bit."""
    tiles = SMALL_TILES if tiles else triton_moe.INTERPRETER_V4
    buf = make_buffer(QuantSpec("nf4", 64, True), E, H, I)
    ids, w = routing(1, 3, E)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(1))
    expected = triton_moe.moe_4bit_triton(x, ids, w, buf.data, *buf.code_tables(), buf.offsets(), H, I, 64, True,
                                          "gelu_pytorch_tanh", blocks=tiles)
    assert torch.equal(probe.run_v4(call(buf, x, ids, w), tiles), expected)


@needs_triton
@pytest.mark.parametrize("dq", [False, True])
def test_no_table_is_the_kernels_math_with_2_to_the_23_plus_the_nibble(dq):
    """PROBE 1 reads the same codes and statistics and does the same sums, with code[n] = 2^23 + n: the
    reference with that table (x >= 0: every gate is a large positive value, which the activation keeps;
    fp32 holds them)."""
    buf = make_buffer(QuantSpec("nf4", 64, dq), E, H, I)
    ids, w = routing(1, 3, E, seed=2)
    x = torch.rand(1, H, generator=torch.Generator().manual_seed(2))
    y = probe.run_v4(call(buf, x, ids, w), SMALL_TILES, "no_table")
    table = 2.0 ** 23 + torch.arange(16, dtype=torch.float32)
    ref = reference(x, ids, w, buf.data, table, buf.code_tables()[1], buf.offsets(), H, I, 64, dq,
                    "gelu_pytorch_tanh")
    assert rel_err(y, ref) < 1e-5
    as_is = probe.run_v4(call(buf, x, ids, w), SMALL_TILES)
    assert rel_err(as_is, ref) > 0.5  # the real table gives another result: the probe did swap it


@needs_triton
def test_loads_only_reads_the_selected_experts_down_codes_and_nothing_of_x():
    """PROBE 2's y: for each selected expert its down rows' code words XOR-ed a chunk at a time, times the
    chunk's absmax, weighted: another x leaves it, a code byte of a selected expert's down matrix moves it,
    one of an expert not selected does not."""
    buf = make_buffer(QuantSpec("nf4", 64, False), E, H, I)
    ids, w = routing(1, 2, E, seed=3)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(3))
    y = probe.run_v4(call(buf, x, ids, w), SMALL_TILES, "loads_only").clone()
    assert y.abs().max() > 0
    assert torch.equal(probe.run_v4(call(buf, 3 * x + 1, ids, w), SMALL_TILES, "loads_only"), y)
    codes = buf.part("down", "codes")
    unselected = next(e for e in range(E) if e not in ids[0].tolist())
    codes[unselected].view(-1)[5] ^= 0x5A
    assert torch.equal(probe.run_v4(call(buf, x, ids, w), SMALL_TILES, "loads_only"), y)
    codes[int(ids[0, 1])].view(-1)[5] ^= 0x5A
    assert not torch.equal(probe.run_v4(call(buf, x, ids, w), SMALL_TILES, "loads_only"), y)


@needs_triton
def test_probe_report_names_each_stage_and_probe():
    """The dry report (the CPU's scaled-down layer): every probe of both stages timed both ways, the empty
    launch on the stage's grid, the tiles it ran."""
    out = probe.probe_v4("cpu", dry=True)
    assert out["tiles"] == repr(triton_moe.INTERPRETER_V4) and out["sets"] == 2
    for stage in probe.STAGES:
        for name in probe.PROBES:
            assert out[stage][name]["l2_us"] > 0 and out[stage][name]["dram_us"] > 0
        assert out[stage]["empty"]["launch_us"] > 0 and "launch_pdl_us" not in out[stage]["empty"]
    assert out["gate_up"]["empty"]["programs"] == 2 and out["down"]["empty"]["programs"] == 1
