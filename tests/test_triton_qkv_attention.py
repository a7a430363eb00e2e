"""The q/k/v write inside the decode attention launch (`localrun::qkv_attention`,
DECODE_KERNELS["fused_qkv_attention"], on by default; kernels/triton_attention.py's `_qkv_attention_kernel`) under
TRITON_INTERPRET=1: bit for bit the two launches it replaces (qkv_write, then decode attention over
the step's view and mask) on full layers and rings (wrapped, with rollback slots emptied, a span of
one), GQA groups of 1, 2 and 8, head dims 128, 256 and 512, K=V, the new slot in a middle split,
the combine in place and apart, v as projected with a scale (Qwen3-MoE); the op's registration and CPU
formula; Gemma 4's and Qwen3-MoE's static steps with the switch on."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads
from interpreted import BF16_ROUNDS_TO_NEAREST

import pytest
import torch

from localrun import kernels, kvcache
from localrun.kernels.qkv_write import qkv_attention, qkv_attention_reference
from localrun.kvcache import FullKV, RingKV
from localrun.loader import load_model
from localrun.models import gemma4

from decoding import counting, static_greedy

triton_attention = triton_module("triton_attention")
triton_qkv_write = triton_module("triton_qkv_write")

needs_triton = pytest.mark.skipif(triton_attention is None, reason="triton is not installed (pip install triton)")

EPS = 1e-6


def rope_row(D: int, seed: int, rotated: int | None = None):
    """cos, sin [1, 1, D] of one token, sin's first half negated (Gemma4Model.rope); only the first
    `rotated` pairs turn (proportional RoPE's partial rotary: the rest cos 1, sin 0)."""
    angle = torch.rand(1, 1, D // 2, generator=torch.Generator().manual_seed(seed)) * 6.28
    if rotated is not None:
        angle[..., rotated:] = 0
    emb = torch.cat([angle, angle], dim=-1)
    sin = emb.sin()
    sin[..., : D // 2] *= -1
    return emb.cos(), sin


def raw_heads(N: int, KV: int, D: int, k_eq_v: bool, dtype, seed: int):
    """One token's raw q [1, 1, N, D], k and v [1, 1, KV, D]: views of the fused projection (v is k
    itself with K=V)."""
    width = N * D + KV * D * (1 if k_eq_v else 2)
    qkv = (torch.randn(1, 1, width, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    parts = qkv.split([N * D, KV * D] + ([] if k_eq_v else [KV * D]), dim=-1)
    q, k = parts[0].view(1, 1, N, D), parts[1].view(1, 1, KV, D)
    return q, k, k if k_eq_v else parts[2].view(1, 1, KV, D)


def noisy(cache):
    g = torch.Generator().manual_seed(99)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


def caches(kind: str, KV: int, D: int, dtype):
    """Two equal caches, their slots noise: a full layer of 300 positions, or a ring of window 60
    with 80 rollback slots (size 140)."""
    make = (lambda: FullKV(1, KV, D, dtype, "cpu", capacity=300)) if kind == "full" else \
        (lambda: RingKV(1, KV, D, 60, dtype, "cpu", size=140))
    return noisy(make()), noisy(make())


def two_launches(cache, args, pos_1, span: int, in_place: bool, norm_v: bool = True, scale: float = 1.0):
    """qkv_write's kernel through the cache (write_raw: the mask after the write), then the decode
    attention kernel over the step's view."""
    q, k, v, visible = cache.write_raw(*args, pos_1, span, {}, norm_v=norm_v)
    return triton_attention.decode_attention_triton(q.transpose(1, 2), k, v, visible, scale, in_place=in_place), visible


def one_launch(cache, args, pos_1, span: int, in_place: bool, norm_v: bool = True, scale: float = 1.0):
    out, k, v, visible = cache.write_attend(*args, pos_1, span, {}, scale=scale, norm_v=norm_v)
    return out, visible


@pytest.fixture
def triton_ops(monkeypatch):
    """The caches' ops as their interpreted Triton kernels; the partial programs cut into 4 splits."""
    monkeypatch.setattr(triton_attention, "_programs_wanted", lambda device: 8)
    monkeypatch.setattr(kvcache, "qkv_write", triton_qkv_write.qkv_write_triton)
    state = {"in_place": True}
    monkeypatch.setattr(kvcache, "qkv_attention", lambda *a: triton_attention.qkv_attention_triton(
        *a, in_place=state["in_place"]))
    return state


# Positions a layer writes in turn (the span each sees; 2 to 5 splits of a KV head from 256 keys):
# a full layer from 0 (span 1), then into a middle and the last split; a ring from 0, into a middle
# split, wrapped (position 150 in slot 10), rolled back to 145 (slot 10 emptied), on over the wrapped
# slots (200 in slot 60, its window in slots 1-60 and 141-139: older positions and empty slots masked).
STEPS = {"full": [(0, 1), (5, 16), (70, 256), (200, 256)],
         "ring": [(0, 1), (70, 256), (150, 256), "rollback 145", (200, 256)]}


def run_both(kind, N, KV, D, k_eq_v, dtype, triton_ops, in_place=True, rotated=None, norm_v=True, scale=1.0):
    fused, plain = caches(kind, KV, D, dtype)
    qw = (torch.rand(D, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    kw = (torch.rand(D, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype)
    triton_ops["in_place"] = in_place
    filled = 0
    for i, step in enumerate(STEPS[kind]):
        if isinstance(step, str):  # the prefix cache rolls the ring back (kvcache.RingKV.truncate)
            end = int(step.split()[1])
            fused.next = plain.next = filled
            assert fused.truncate(end) and plain.truncate(end)
            assert (fused.pos == -1).any()
            continue
        p, span = step
        raw_q, raw_k, raw_v = raw_heads(N, KV, D, k_eq_v, dtype, seed=i)
        cos, sin = (t.to(dtype) for t in rope_row(D, seed=i, rotated=rotated))
        args = (raw_q, qw, raw_k, raw_v, kw, cos, sin, EPS)
        pos_1 = torch.tensor([p])
        want, seen = two_launches(plain, args, pos_1, span, in_place, norm_v, scale)
        got, shown = one_launch(fused, args, pos_1, span, in_place, norm_v, scale)
        filled = p + 1
        assert torch.equal(shown, seen), (kind, p)  # the mask built before the write is the one after it
        assert got.shape == want.shape == (1, N, 1, D) and got.dtype == dtype
        assert torch.equal(got, want), (kind, p, (got.float() - want.float()).abs().max())
        assert torch.equal(fused.k, plain.k) and torch.equal(fused.v, plain.v)
        if kind == "ring":
            assert torch.equal(fused.pos, plain.pos)
    return fused


SHAPES = [(4, 2, 256, False), (8, 1, 512, True), (2, 2, 128, False)]  # N, KV, D, K=V


@needs_triton
@pytest.mark.parametrize("kind", ["full", "ring"])
@pytest.mark.parametrize("dtype,N,KV,D,k_eq_v", [(torch.bfloat16, *shape) for shape in SHAPES]
                         + [(torch.float32, *SHAPES[0])])
def test_one_launch_is_qkv_write_then_attention(kind, dtype, N, KV, D, k_eq_v, triton_ops):
    """26B-A4B's sliding heads (G = 2, D = 256), its full ones (G = 8, D = 512, K=V, a quarter of the
    pairs rotated) and G = 1 at D = 128, in bf16 (the GPU's rounding) and fp32: the same output,
    caches and ring positions, bit for bit."""
    if dtype == torch.bfloat16 and not BF16_ROUNDS_TO_NEAREST:
        pytest.skip("this Triton's interpreter cannot round bf16 to nearest")
    run_both(kind, N, KV, D, k_eq_v, dtype, triton_ops, rotated=D // 8 if k_eq_v else None)


@needs_triton
@pytest.mark.parametrize("kind", ["full", "ring"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_launch_with_v_as_projected_and_a_scale(kind, dtype, triton_ops):
    """Qwen3-MoE's layers (G = 8, D = 128): v written as projected (norm_v False), scores scaled by the
    layer's D^-0.5 (times YaRN's factor): still the two launches' bits."""
    if dtype == torch.bfloat16 and not BF16_ROUNDS_TO_NEAREST:
        pytest.skip("this Triton's interpreter cannot round bf16 to nearest")
    run_both(kind, 8, 1, 128, False, dtype, triton_ops, norm_v=False, scale=128 ** -0.5 * 1.1)


@needs_triton
def test_one_launch_with_the_combine_kernel(triton_ops):
    """Where the partial rows are many the combine is a launch of its own: still the same bits."""
    run_both("ring", 4, 2, 128, False, torch.float32, triton_ops, in_place=False)
    assert not triton_attention._counters(torch.device("cpu")).any()


@needs_triton
def test_l1_prefetch_switch_leaves_the_interpreter_alone(triton_ops, monkeypatch):
    """triton_attention.L1_PREFETCH asks the L1 in inline PTX: only where that compiles (an NVIDIA GPU), so
    the switch on changes nothing interpreted (the same bits as the two launches); its SASS (the same sums
    and key loop, the prefetches after the wait) is tests/test_sass_stats.py's."""
    monkeypatch.setattr(triton_attention, "L1_PREFETCH", True)
    assert not triton_attention.inline_ptx(torch.device("cpu"))
    run_both("ring", 4, 2, 256, False, torch.float32, triton_ops)


@needs_triton
def test_the_split_holding_the_slot_writes_it(monkeypatch):
    """The program whose split holds the new slot writes it and reads it back after its barrier (the
    slot held NaN: no split reads the stale bytes), and a slot past the keys attended (no split holds
    it; the step never asks for one) is still written, by the last split. Against the formula."""
    monkeypatch.setattr(triton_attention, "_programs_wanted", lambda device: 8)
    N, KV, D = 4, 2, 128
    raw_q, raw_k, raw_v = raw_heads(N, KV, D, False, torch.float32, seed=5)
    cos, sin = rope_row(D, seed=5)
    w = torch.rand(D) + 0.5
    for slot, keys in ((9, 32), (30, 16)):
        cache, formula = (noisy(FullKV(1, KV, D, torch.float32, "cpu", capacity=40)) for _ in range(2))
        cache.k[:, :, slot] = cache.v[:, :, slot] = float("nan")
        visible = torch.ones(1, keys, dtype=torch.bool)
        args = (raw_q, w, raw_k, raw_v, w, cos, sin, EPS)
        out = triton_attention.qkv_attention_triton(*args, cache.k, cache.v, None, torch.tensor([slot]), 40, True, keys,
                                                    visible, 1.0)
        ref = qkv_attention_reference(*args, formula.k, formula.v, None, torch.tensor([slot]), 40, True, keys, visible,
                                      1.0)
        assert not out.isnan().any()
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
        assert ((cache.k - formula.k).abs().max() / formula.k.abs().max()).item() < 1e-5


def test_qkv_attention_op_registration():
    """The op's schema, fake (meta) implementation and mutations, for a ring and a full layer; its CPU
    formula is qkv_write's, then the decode attention models/gemma4.attend takes on the CPU."""
    N, KV, D = 4, 2, 16
    raw_q, raw_k, raw_v = raw_heads(N, KV, D, False, torch.float32, seed=0)
    cos, sin = rope_row(D, seed=0)
    w = torch.rand(D) + 0.5
    for cache in (noisy(RingKV(1, KV, D, 4, torch.float32, "cpu", size=5)),
                  noisy(FullKV(1, KV, D, torch.float32, "cpu", capacity=8))):
        ring = cache.pos if isinstance(cache, RingKV) else None
        size = cache.size if ring is not None else cache.capacity
        visible = torch.ones(1, 5, dtype=torch.bool)
        torch.library.opcheck(qkv_attention, (raw_q, w, raw_k, raw_v, w, cos, sin, EPS, cache.k, cache.v, ring,
                                              torch.tensor([3]), size, True, 5, visible, 1.0),
                              test_utils=("test_schema", "test_faketensor"))


def test_write_attend_traces_as_one_graph():
    """Cache.write_attend under torch.compile(fullgraph=True): the buffers' mutations kept, the same
    outputs, buffers and masks as eager (a ring's mask built before the write)."""
    N, KV, D = 2, 1, 16
    raw_q, raw_k, raw_v = raw_heads(N, KV, D, True, torch.float32, seed=3)
    cos, sin = rope_row(D, seed=3)
    w = torch.rand(D) + 0.5

    def step(full, ring, pos_1):
        memo: dict = {}
        out_full, _, _, seen_full = full.write_attend(raw_q, w, raw_k, raw_v, w, cos, sin, EPS, pos_1, 8, memo)
        out_ring, _, _, seen_ring = ring.write_attend(raw_q, w, raw_k, raw_v, w, cos, sin, EPS, pos_1, 8, memo)
        return out_full, out_ring, seen_full, seen_ring

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    make = lambda: (noisy(FullKV(1, KV, D, torch.float32, "cpu", 8)),  # noqa: E731
                    noisy(RingKV(1, KV, D, 4, torch.float32, "cpu", size=5)))
    eager, traced = make(), make()
    for p in (5, 6, 7):
        pos_1 = torch.tensor([p])
        assert all(torch.equal(a, b) for a, b in zip(step(*eager, pos_1), compiled(*traced, pos_1)))
    for a, b in zip(eager, traced):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.pos, b.pos)


# The decoder ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["moe", "dense_e2b"])
def test_static_step_with_the_switch_on(tiny_checkpoint, monkeypatch, kind):
    """DECODE_KERNELS["fused_qkv_attention"] where CUDA's half-precision step would write q/k/v with
    one kernel (gemma4.fused_on_cuda stood in for on the CPU): every layer with a cache of its own
    attends in the one op (rings and full layers, K=V; E2B's KV-shared layers then attend over the
    written caches under the mask built before the write), and the tokens and logprobs are those of
    qkv_write + decode attention, exactly (here the op's CPU formula)."""
    loaded = load_model(tiny_checkpoint(kind, "text"), dtype=torch.float32, context=600,
                        **({"experts": "bf16"} if kind == "dense_e2b" else {}))
    monkeypatch.setattr(gemma4, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
    writes, fused = [], []
    monkeypatch.setattr(kvcache, "qkv_write", counting(kvcache.qkv_write, writes))
    monkeypatch.setattr(kvcache, "qkv_attention", counting(kvcache.qkv_attention, fused))
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", False)
    apart = static_greedy(loaded, 8, prompt=30)
    writers = sum(layer is not None for layer in loaded.kv.layers)
    assert len(writes) == 7 * writers and not fused  # the first token comes from the prefill
    writes.clear()
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", True)
    assert static_greedy(loaded, 8, prompt=30) == apart
    assert len(fused) == 7 * writers and not writes
    assert {args[10] is None for args in fused} == {True, False}  # full layers and rings


@needs_triton
def test_static_step_with_the_interpreted_kernels(tiny_moe, monkeypatch):
    """The same with the Triton kernels interpreted on both sides (qkv_write's and decode attention's,
    against the one launch): the same tokens and logprobs, bit for bit."""
    loaded = load_model(tiny_moe, dtype=torch.float32, context=600)
    monkeypatch.setattr(gemma4, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
    monkeypatch.setattr(kvcache, "qkv_write", triton_qkv_write.qkv_write_triton)
    fused = []
    monkeypatch.setattr(kvcache, "qkv_attention", counting(triton_attention.qkv_attention_triton, fused))
    monkeypatch.setattr(kernels, "decode_attention", triton_attention.decode_attention_triton)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", False)
    apart = static_greedy(loaded, 3, prompt=30)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", True)
    assert static_greedy(loaded, 3, prompt=30) == apart
    assert len(fused) == 2 * sum(layer is not None for layer in loaded.kv.layers)
