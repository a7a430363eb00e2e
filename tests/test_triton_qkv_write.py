"""The CUDA decode step's q/k/v norms + K/V write and gated activation as one kernel each
(kernels/qkv_write.py, kernels/triton_qkv_write.py; `localrun::gated` in kernels/fused.py): the Triton kernels under
TRITON_INTERPRET=1 against the ops' formulas and against the unfused kernels they replace, the ops'
registrations (fake tensors, torch.compile), and the decoder taking them where CUDA would (the
device check patched, on the tiny model) with the tokens of the unfused step."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads
from interpreted import BF16_ROUNDS_TO_NEAREST, bf16_ulps

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from localrun import kvcache
from localrun.bench import bench_prompt
from localrun.generate import generate
from localrun.kernels import fused as fused_ops
from localrun.kernels.qkv_write import qkv_write, qkv_write_reference
from localrun.kvcache import FullKV, RingKV
from localrun.loader import load_model
from localrun.models import gemma4
from localrun.moe import activation
from localrun.sampling import SamplingParams, make_sampler

from decoding import counting, static_greedy

triton_qkv_write = triton_module("triton_qkv_write")
triton_norm = triton_module("triton_norm")
triton_fused = triton_module("triton_fused")

needs_triton = pytest.mark.skipif(triton_qkv_write is None, reason="triton is not installed (pip install triton)")

EPS = 1e-6
N_Q = 4  # query heads in front of the k heads in the fused projection


def rope_row(D: int, seed: int = 0):
    """cos, sin [1, 1, D] of one token, sin's first half negated (Gemma4Model.rope)."""
    angle = torch.rand(1, 1, D // 2, generator=torch.Generator().manual_seed(seed)) * 6.28
    emb = torch.cat([angle, angle], dim=-1)
    sin = emb.sin()
    sin[..., : D // 2] *= -1
    return emb.cos(), sin


def raw_heads(KV: int, D: int, k_eq_v: bool, dtype, seed: int):
    """One token's q [1, 1, N_Q, D], k and v heads [1, 1, KV, D] as Attention.project leaves them:
    views into the fused q/k/v output (v is k itself when the layer has K=V)."""
    width = N_Q * D + KV * D * (1 if k_eq_v else 2)
    qkv = (torch.randn(1, 1, width, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    parts = qkv.split([N_Q * D, KV * D] + ([] if k_eq_v else [KV * D]), dim=-1)
    q, k = parts[0].view(1, 1, N_Q, D), parts[1].view(1, 1, KV, D)
    return q, k, k if k_eq_v else parts[2].view(1, 1, KV, D)


def q_weight(D: int, dtype):
    return (torch.rand(D, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype)


def make_cache(kind: str, KV: int, D: int, dtype):
    """A full layer of 8 slots or a ring of 5 (window 4), its buffers filled with noise (slots the
    write must leave alone)."""
    cache = FullKV(1, KV, D, dtype, "cpu", capacity=8) if kind == "full" else RingKV(1, KV, D, 4, dtype, "cpu", size=5)
    g = torch.Generator().manual_seed(99)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


POSITIONS = {"full": [0, 5, 7], "ring": [0, 3, 4, 7, 12]}  # the ring wraps: slots 0, 3, 4, 2, 2


def size_of(cache) -> int:
    return cache.capacity if isinstance(cache, FullKV) else cache.size


def ring_of(cache):
    return cache.pos if isinstance(cache, RingKV) else None


def one_rounding(got: torch.Tensor, want: torch.Tensor, dtype) -> bool:
    """got == want up to one rounding of `dtype` (fp32: ~1e-6 relative)."""
    rel = 2**-7 if dtype == torch.bfloat16 else 1e-6
    return bool(((got.float() - want.float()).abs() <= rel * want.float().abs() + 1e-6).all())


@needs_triton
@pytest.mark.parametrize("kind", ["full", "ring"])
@pytest.mark.parametrize("k_eq_v", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("KV,D", [(2, 16), (1, 32)])  # 26B-A4B's sliding (8 x 256) and full (2 x 512) heads, scaled
def test_qkv_write_kernel_is_the_unfused_write(kind, k_eq_v, dtype, KV, D):
    """The one kernel returns the q heads and leaves the cache as the unfused CUDA path does
    (triton_norm's norm + RoPE and norm kernels, then index_copy_ into slot pos % size, the ring's
    position too): bit for bit, and within one rounding of the formula, whatever slots it has to wrap to."""
    w = (torch.rand(D, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    wq = q_weight(D, dtype)
    fused, unfused, formula = (make_cache(kind, KV, D, dtype) for _ in range(3))
    for i, p in enumerate(POSITIONS[kind]):
        raw_q, raw_k, raw_v = raw_heads(KV, D, k_eq_v, dtype, seed=i)
        assert raw_k.storage_offset() == N_Q * D  # a view into the projection, past the q heads
        cos, sin = (t.to(dtype) for t in rope_row(D, seed=i))
        pos_1 = torch.tensor([p])
        q = triton_qkv_write.qkv_write_triton(raw_q, wq, raw_k, raw_v, w, cos, sin, EPS, fused.k, fused.v,
                                              ring_of(fused), pos_1, size_of(fused), True)
        q_unfused = triton_norm.rms_norm_rope_triton(raw_q, wq, cos, sin, EPS)
        k = triton_norm.rms_norm_rope_triton(raw_k, w, cos, sin, EPS).transpose(1, 2)
        v = triton_norm.rms_norm_triton(raw_v, None, EPS).transpose(1, 2)
        unfused.write(k, v, pos_1, span=8)
        q_formula = qkv_write_reference(raw_q, wq, raw_k, raw_v, w, cos, sin, EPS, formula.k, formula.v,
                                        ring_of(formula), pos_1, size_of(formula), True)
        assert q.shape == (1, 1, N_Q, D) and q.dtype == dtype and q.is_contiguous()
        assert torch.equal(q, q_unfused) and one_rounding(q, q_formula, dtype)
    assert torch.equal(fused.k, unfused.k) and torch.equal(fused.v, unfused.v)
    assert torch.equal(fused.pos, unfused.pos) and torch.equal(fused.pos, formula.pos)
    assert one_rounding(fused.k, formula.k, dtype) and one_rounding(fused.v, formula.v, dtype)


@needs_triton
@pytest.mark.skipif(not BF16_ROUNDS_TO_NEAREST, reason="this Triton's interpreter cannot round bf16 to nearest")
@pytest.mark.parametrize("D", [16, 512])
def test_qkv_write_rounds_once_in_bf16(D):
    """q, k and v in bf16 are within half an ulp of their formula in fp64 on the same bf16 inputs (and
    cos / sin rows): one rounding, in the slot of the position, the ring's position stored."""
    KV, bf = 2, torch.bfloat16
    w, wq = (torch.rand(D, generator=torch.Generator().manual_seed(1)) + 0.5).to(bf), q_weight(D, bf)
    raw_q, raw_k, raw_v = raw_heads(KV, D, False, bf, seed=3)
    cos, sin = (t.to(bf) for t in rope_row(D, seed=3))
    cache = make_cache("ring", KV, D, bf)
    q = triton_qkv_write.qkv_write_triton(raw_q, wq, raw_k, raw_v, w, cos, sin, EPS, cache.k, cache.v, cache.pos,
                                          torch.tensor([7]), cache.size, True)

    def norm64(x, weight=None):
        x = x.double()
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        return n if weight is None else n * weight.double()

    def rope64(x, weight):
        n = norm64(x, weight)
        return n * cos.double() + n.roll(D // 2, dims=-1) * sin.double()
    slot = 7 % cache.size
    assert bf16_ulps(q, rope64(raw_q, wq)) <= 0.51
    assert bf16_ulps(cache.k[:, :, slot], rope64(raw_k, w)[:, 0]) <= 0.51
    assert bf16_ulps(cache.v[:, :, slot], norm64(raw_v)[:, 0]) <= 0.51 and cache.pos[slot] == 7


@needs_triton
@pytest.mark.parametrize("kind", ["full", "ring"])
def test_qkv_write_kernel_without_the_v_norm(kind):
    """norm_v=False (Qwen3: k normed, v as projected): v lands in its slot exactly as it came."""
    KV, D, dtype = 2, 16, torch.bfloat16
    w = torch.rand(D, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5
    wq = q_weight(D, dtype)
    fused, formula = make_cache(kind, KV, D, dtype), make_cache(kind, KV, D, dtype)
    for i, p in enumerate(POSITIONS[kind]):
        raw_q, raw_k, raw_v = raw_heads(KV, D, False, dtype, seed=i)
        cos, sin = (t.to(dtype) for t in rope_row(D, seed=i))
        pos_1 = torch.tensor([p])
        for impl, cache in ((triton_qkv_write.qkv_write_triton, fused), (qkv_write_reference, formula)):
            impl(raw_q, wq, raw_k, raw_v, w, cos, sin, EPS, cache.k, cache.v, ring_of(cache), pos_1, size_of(cache),
                 False)
        assert torch.equal(fused.v[0, :, p % size_of(fused)], raw_v[0, 0])
    assert torch.equal(fused.v, formula.v) and torch.equal(fused.pos, formula.pos)
    assert one_rounding(fused.k, formula.k, dtype)


@needs_triton
def test_qkv_write_kernel_reads_any_head_stride():
    """Heads further apart than D (the kernel takes their stride), and a strided head dim (copied first)."""
    KV, D = 2, 16
    x = torch.randn(1, 1, KV, 4 * D, generator=torch.Generator().manual_seed(5))
    raw_k, raw_v = x[..., :D], x[..., D : 3 * D : 2]
    raw_q = torch.randn(1, 1, 3, 3 * D, generator=torch.Generator().manual_seed(6))[..., D : 2 * D]
    assert raw_k.stride(2) == 4 * D and raw_v.stride(-1) == 2 and raw_q.stride(2) == 3 * D
    w, wq = torch.rand(D) + 0.5, torch.rand(D) + 0.5
    cos, sin = rope_row(D)
    fused, formula = make_cache("ring", KV, D, torch.float32), make_cache("ring", KV, D, torch.float32)
    qs = [impl(raw_q, wq, raw_k, raw_v, w, cos, sin, EPS, cache.k, cache.v, cache.pos, torch.tensor([9]), cache.size,
               True)
          for impl, cache in ((triton_qkv_write.qkv_write_triton, fused), (qkv_write_reference, formula))]
    assert one_rounding(fused.k, formula.k, torch.float32) and one_rounding(fused.v, formula.v, torch.float32)
    assert one_rounding(qs[0], qs[1], torch.float32)


def test_qkv_write_op_registration():
    """The op's schema, fake (meta) implementation and mutations, for a ring and a full layer."""
    KV, D = 2, 16
    raw_q, raw_k, raw_v = raw_heads(KV, D, False, torch.float32, seed=0)
    cos, sin = rope_row(D)
    w = torch.rand(D) + 0.5
    for cache in (make_cache("ring", KV, D, torch.float32), make_cache("full", KV, D, torch.float32)):
        torch.library.opcheck(qkv_write, (raw_q, q_weight(D, torch.float32), raw_k, raw_v, w, cos, sin, EPS, cache.k,
                                          cache.v, ring_of(cache), torch.tensor([6]), size_of(cache), True),
                              test_utils=("test_schema", "test_faketensor"))


def test_write_raw_reads_no_device_value():
    """On meta tensors (no values at all) write_raw still runs: nothing reads the position on the host,
    as a CUDA graph needs."""
    KV, D = 2, 16
    raw_q, raw_k, raw_v = (t.to("meta") for t in raw_heads(KV, D, False, torch.float32, seed=0))
    weight, cos, sin = (t.to("meta") for t in (torch.ones(D), *rope_row(D)))
    for cache in (FullKV(1, KV, D, torch.bfloat16, "meta", 8), RingKV(1, KV, D, 4, torch.bfloat16, "meta", size=5)):
        q, k, v, visible = cache.write_raw(raw_q, weight, raw_k, raw_v, weight, cos, sin, EPS,
                                           torch.zeros(1, dtype=torch.long, device="meta"), 8)
        assert q.shape == (1, 1, N_Q, D)
        assert k.shape == v.shape == (1, KV, size_of(cache), D) and visible.shape == (1, size_of(cache))


def test_write_raw_traces_as_one_graph():
    """Cache.write_raw under torch.compile(fullgraph=True): the buffers' mutations kept, the same
    buffers and masks as eager."""
    KV, D = 1, 16
    raw_q, raw_k, raw_v = raw_heads(KV, D, True, torch.float32, seed=3)
    cos, sin = rope_row(D)
    w = torch.rand(D) + 0.5

    def step(full, ring, pos_1):
        memo: dict = {}
        q, _, _, seen_full = full.write_raw(raw_q, w, raw_k, raw_v, w, cos, sin, EPS, pos_1, 8, memo)
        _, _, _, seen_ring = ring.write_raw(raw_q, w, raw_k, raw_v, w, cos, sin, EPS, pos_1, 8, memo)
        return q, seen_full, seen_ring

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    eager = (make_cache("full", KV, D, torch.float32), make_cache("ring", KV, D, torch.float32))
    traced = (make_cache("full", KV, D, torch.float32), make_cache("ring", KV, D, torch.float32))
    for p in (6, 7):
        pos_1 = torch.tensor([p])
        masks = step(*eager, pos_1), compiled(*traced, pos_1)
        assert all(torch.equal(a, b) for a, b in zip(*masks))
    for a, b in zip(eager, traced):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.pos, b.pos)


@needs_triton
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "silu"])
@pytest.mark.parametrize("rows,I,dtype", [(1, 2112, torch.float32), (3, 40, torch.float32), (2, 1100, torch.bfloat16)])
def test_gated_kernel(act, rows, I, dtype):
    """act(gate) * up in fp32, rounded once: rows of several column blocks, and partial ones."""
    gate_up = (torch.randn(1, rows, 2 * I, generator=torch.Generator().manual_seed(I)) * 3).to(dtype)
    got = triton_fused.gated_triton(gate_up, act)
    want = fused_ops.gated_reference(gate_up, act)
    assert got.shape == (1, rows, I) and got.dtype == dtype
    if dtype == torch.float32:  # erf and tanh are not torch's to the last bit: relative to the row's scale
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6
    else:
        assert one_rounding(got, want, dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(want.float(), activation(act)(gate) * up, rtol=2**-7 if dtype == torch.bfloat16 else 0,
                               atol=1e-6)


def test_gated_op_registration():
    torch.library.opcheck(fused_ops.gated_op, (torch.randn(2, 3, 48), "gelu_pytorch_tanh"),
                          test_utils=("test_schema", "test_faketensor"))


# The decoder ---------------------------------------------------------------------------------------

@pytest.fixture
def as_on_cuda(monkeypatch):
    """The decoder takes its CUDA-only glue (gemma4.fused_on_cuda) wherever it takes the fused glue,
    the interpreted Triton kernels behind it; returns the lists their calls are recorded in."""
    calls: dict[str, list] = {"qkv_write": [], "gated": [], "ffn_residual_norm": [], "rope_rows": []}
    monkeypatch.setattr(gemma4, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
    monkeypatch.setattr(gemma4, "rope_on_cuda", lambda pos, dtype: gemma4.DECODE_KERNELS["fused_glue"])
    rope = triton_fused.rope_rows_triton if triton_fused is not None else fused_ops.rope_rows_op
    monkeypatch.setattr(fused_ops, "rope_rows_op", counting(rope, calls["rope_rows"]))
    kernel = triton_qkv_write.qkv_write_triton if triton_qkv_write is not None else qkv_write
    monkeypatch.setattr(kvcache, "qkv_write", counting(kernel, calls["qkv_write"]))
    gated = triton_fused.gated_triton if triton_fused is not None else fused_ops.gated_op
    monkeypatch.setattr(fused_ops, "gated_op", counting(gated, calls["gated"]))
    glue = fused_ops.ffn_residual_norm_op  # (..., scalar, w_next, eps); the Triton function takes eps, then w_next
    if triton_fused is not None:
        glue = lambda *a: triton_fused.ffn_residual_triton(*a[:7], a[8], a[7])  # noqa: E731
    monkeypatch.setattr(fused_ops, "ffn_residual_norm_op", counting(glue, calls["ffn_residual_norm"]))
    return calls


def test_only_half_precision_on_cuda_takes_the_cuda_glue(monkeypatch):
    """gemma4.fused_on_cuda on fake CUDA tensors: bf16 and fp16 inference take it; fp32 (the reference
    CUDA is checked against), the CPU, training and the fused_glue switch off do not."""
    with FakeTensorMode():
        half, fp16, fp32 = (torch.empty(1, 8, dtype=t, device="cuda") for t in (torch.bfloat16, torch.half, torch.float))
    cpu = torch.empty(1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert gemma4.fused_on_cuda(half) and gemma4.fused_on_cuda(fp16)
        assert not gemma4.fused_on_cuda(fp32) and not gemma4.fused_on_cuda(cpu)
        monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_glue", False)
        assert not gemma4.fused_on_cuda(half)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_glue", True)
    with torch.enable_grad():
        assert not gemma4.fused_on_cuda(half)


def test_static_decode_takes_the_fused_kernels(tiny_moe, as_on_cuda, monkeypatch):
    """Where CUDA would, the static step norms every layer's q and k and writes its K/V with one
    qkv_write (rings and full layers, K=V and v_proj layers), the dense MLP runs `gated`, each
    layer but the last computes the next one's input norm with its FFN residual (the next layer's
    input_layernorm then never runs), and each layer kind's RoPE rows are one rope_rows; the tokens
    are the unfused step's. DECODE_KERNELS["fused_glue"] off (scripts/gpu_check.py's switch) takes
    none of them. (fused_qkv_attention, on by default, takes qkv_write's work into the attention launch:
    tests/test_triton_qkv_attention.py.)"""
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_qkv_attention", False)
    loaded = load_model(tiny_moe, dtype=torch.float32, context=64)
    with monkeypatch.context() as plain:
        plain.setattr(gemma4, "fused_on_cuda", lambda x: False)
        plain.setattr(gemma4, "rope_on_cuda", lambda pos, dtype: False)
        expected = static_greedy(loaded, 10)
    assert not as_on_cuda["rope_rows"]
    layers = loaded.model.layers
    input_norms = []
    for layer in layers:
        layer.input_layernorm.register_forward_hook(lambda *a: input_norms.append(1))
    got = static_greedy(loaded, 10)
    passes = 10  # the prefill (its glue is fused too), then 9 decoded tokens
    assert len(as_on_cuda["ffn_residual_norm"]) == passes * (len(layers) - 1)
    assert len(as_on_cuda["rope_rows"]) == passes * len(set(loaded.args.layer_types))
    assert len(input_norms) == passes  # the first layer's only
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert max(abs(a[1] - b[1]) for a, b in zip(got, expected)) < 1e-4
    writers = [l for l in loaded.kv.layers if l is not None]
    assert len(as_on_cuda["qkv_write"]) == len(writers) * 9  # the first token comes from the prefill
    ring_sizes = {args[12] for args in as_on_cuda["qkv_write"] if args[10] is not None}
    assert ring_sizes == {l.size for l in writers if isinstance(l, RingKV)}
    assert any(args[2] is args[3] for args in as_on_cuda["qkv_write"])  # K=V: the same heads
    assert any(args[2] is not args[3] for args in as_on_cuda["qkv_write"])
    assert as_on_cuda["gated"]
    for calls in as_on_cuda.values():
        calls.clear()
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "fused_glue", False)
    assert [t for t, _ in static_greedy(loaded, 10)] == [t for t, _ in expected]
    assert not any(as_on_cuda.values())


def test_segmented_step_hands_the_next_input_norm_across_the_experts(tiny_moe, as_on_cuda):
    """With offloaded experts the step is cut at each MoE layer's experts (step.SegmentedGraphStep):
    a layer's back() and the next layer's front() meet in the next segment, and the next input
    norm still comes with the FFN residual; the tokens are the eager step's."""
    from localrun.step import make_step

    loaded = load_model(tiny_moe, dtype=torch.float32, resident_fraction=0.5, context=64)
    ids = bench_prompt(12, loaded.args.vocab_size)
    sampler = make_sampler(SamplingParams())
    eager = [s.token for s in generate(loaded.model, ids, sampler, max_tokens=6, step="eager", cache=loaded.kv)]
    as_on_cuda["ffn_residual_norm"].clear()
    make_step(loaded.model, loaded.kv, "segments")
    segments = [s.token for s in generate(loaded.model, ids, sampler, max_tokens=6, step="segments", cache=loaded.kv)]
    assert segments == eager
    assert len(as_on_cuda["ffn_residual_norm"]) == 6 * (len(loaded.model.layers) - 1)
