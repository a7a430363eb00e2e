"""The fused glue of a Gemma 4 layer (kernels/fused.py, kernels/triton_fused.py): the Triton kernels
under TRITON_INTERPRET=1 against the ops' formulas, and those formulas against the unfused layer
(DecoderLayer.forward vs forward_fused on the tiny model), so the CUDA path computes what the
decoder computes everywhere else."""

from __future__ import annotations

from interpreted import triton_module  # noqa: E402 - sets TRITON_INTERPRET=1 before triton loads
from interpreted import BF16_ROUNDS_TO_NEAREST, bf16_ulps

import pytest
import torch
import torch.nn.functional as F

from localrun.kernels import fused as fused_ops

triton_fused = triton_module("triton_fused")

needs_triton = pytest.mark.skipif(triton_fused is None, reason="triton is not installed (pip install triton)")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@needs_triton
@pytest.mark.parametrize("T,H,dtype", [(1, 2816, torch.float32), (3, 40, torch.float32), (2, 2816, torch.bfloat16)])
def test_attention_residual_norms(T, H, dtype):
    x, res = rand(1, T, H, seed=1, dtype=dtype) * 3, rand(1, T, H, seed=2, dtype=dtype)
    ws = [rand(H, seed=s, dtype=dtype) for s in range(3, 7)]
    y, moe, mlp, router = triton_fused.attention_residual_norms_triton(x, ws[0], res, ws[1], ws[2], ws[3], H ** -0.5,
                                                                      1e-6)  # the op's order
    ours = (y, mlp, moe, router)
    ref = fused_ops.attention_residual_norms_reference(x, ws[0], res, ws[1], ws[2], ws[3], H ** -0.5, 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype
        assert rel(a, b) < tol


@needs_triton
@pytest.mark.parametrize("T,H,dtype", [(1, 2816, torch.float32), (5, 24, torch.float32), (1, 2816, torch.bfloat16)])
def test_ffn_residual(T, H, dtype):
    mlp, moe, res = (rand(T, H, seed=s, dtype=dtype) for s in (1, 2, 3))
    w1, w2, w = (rand(H, seed=s, dtype=dtype) for s in (4, 5, 6))
    scalar = torch.tensor([0.7], dtype=dtype)
    ours = triton_fused.ffn_residual_triton(mlp, w1, moe, w2, w, res, scalar, 1e-6)
    ref = fused_ops.ffn_residual_reference(mlp, w1, moe, w2, w, res, scalar, 1e-6)
    assert ours.dtype == dtype and rel(ours, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@needs_triton
@pytest.mark.parametrize("T,H,dtype", [(1, 2816, torch.float32), (5, 24, torch.float32), (2, 2816, torch.bfloat16)])
def test_ffn_residual_with_the_next_input_norm(T, H, dtype):
    """The output is ffn_residual's, bit for bit; the norm is the next layer's rms_norm of that
    (rounded) output, as the standalone norm kernel computes it."""
    from localrun.kernels.norm import rms_norm_reference

    triton_norm = triton_module("triton_norm")
    mlp, moe, res = (rand(1, T, H, seed=s, dtype=dtype) for s in (1, 2, 3))
    w1, w2, w, w_next = (rand(H, seed=s, dtype=dtype) for s in (4, 5, 6, 7))
    scalar = torch.tensor([0.7], dtype=dtype)
    x, normed = triton_fused.ffn_residual_triton(mlp, w1, moe, w2, w, res, scalar, 1e-6, w_next)
    assert torch.equal(x, triton_fused.ffn_residual_triton(mlp, w1, moe, w2, w, res, scalar, 1e-6))
    standalone = triton_norm.rms_norm_triton(x, w_next, 1e-6)
    assert normed.shape == x.shape and normed.dtype == dtype
    assert rel(normed, standalone) < (1e-6 if dtype == torch.float32 else 1e-2)
    ref_x, ref_normed = fused_ops.ffn_residual_norm_reference(mlp, w1, moe, w2, w, res, scalar, w_next, 1e-6)
    assert rel(ref_normed, rms_norm_reference(ref_x, w_next, 1e-6)) < 1e-6
    assert rel(x, ref_x) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel(normed, ref_normed) < (1e-6 if dtype == torch.float32 else 1e-2)
    torch.library.opcheck(fused_ops.ffn_residual_norm_op, (mlp, w1, moe, w2, w, res, scalar, w_next, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))


@needs_triton
@pytest.mark.parametrize("half,dtype", [(128, torch.float32), (256, torch.bfloat16), (24, torch.float16)])
def test_rope_rows(half, dtype):
    """One launch per layer kind: the cos / sin rows of the torch formula (Gemma4Model.rope), sin's
    first half negated, at positions up to a long context."""
    from localrun.models.gemma4 import rope_inv_freq

    inv = rope_inv_freq({"rope_theta": 10000.0}, 2 * half)
    pos = torch.tensor([0, 1, 17, 4095, 131071])
    cos, sin = triton_fused.rope_rows_triton(pos, inv, dtype)
    ref_cos, ref_sin = fused_ops.rope_rows_reference(pos, inv, dtype)
    assert cos.shape == sin.shape == (5, 1, 2 * half) and cos.dtype == sin.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 2**-7
    assert (cos.float() - ref_cos.float()).abs().max() <= tol and (sin.float() - ref_sin.float()).abs().max() <= tol
    assert torch.equal(sin[..., :half], -sin[..., half:]) and torch.equal(cos[..., :half], cos[..., half:])
    torch.library.opcheck(fused_ops.rope_rows_op, (pos, inv, dtype), test_utils=("test_schema", "test_faketensor"))


@needs_triton
@pytest.mark.parametrize("T,E,K", [(1, 128, 8), (4, 32, 8), (3, 12, 3), (2, 8, 8)])
def test_route(T, E, K):
    logits = rand(T, E, seed=E) * 4
    scale = rand(E, seed=1).abs() + 0.5
    ids, w = triton_fused.route_triton(logits, scale, K)
    ref_ids, ref_w = fused_ops.route_reference(logits, scale, K)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, ref_ids)  # largest first, as torch.topk sorts them
    assert rel(w, ref_w) < 1e-6


@needs_triton
def test_route_ties_take_the_lower_id():
    logits = torch.zeros(1, 16)
    logits[0, [3, 9, 12]] = 1.0
    ids, w = triton_fused.route_triton(logits, torch.ones(16), 4)
    assert ids[0, :3].tolist() == [3, 9, 12] and ids[0, 3].item() == 0
    assert abs(w.sum().item() - 1.0) < 1e-6


@needs_triton
def test_route_never_names_an_expert_past_the_last_whatever_the_logits():
    """NaN or inf router logits (a broken checkpoint, an overflow) give NaN probabilities, which no
    comparison picks: the ids must still name experts, or the MoE kernels read past the layer's buffer."""
    E, K = 128, 8
    logits = rand(4, E, seed=3)
    logits[0] = float("nan")
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, [1, 2]] = float("-inf")
    ids, w = triton_fused.route_triton(logits, torch.ones(E), K)
    assert ((ids >= 0) & (ids < E)).all(), ids
    for row in range(3):  # a NaN row: the lowest K ids with NaN weights, as the CPU's lr_route picks them
        assert ids[row].tolist() == list(range(K)) and w[row].isnan().all(), (ids[row], w[row])
    ref_ids, ref_w = fused_ops.route_reference(logits[3:], torch.ones(E), K)  # -inf: as torch
    assert torch.equal(ids[3], ref_ids[0]) and rel(w[3], ref_w[0]) < 1e-6


@needs_triton
@pytest.mark.parametrize("I, E, K, dtype, act", [(2112, 128, 8, torch.bfloat16, "gelu_pytorch_tanh"),
                                                (48, 8, 2, torch.float32, "silu"), (300, 60, 3, torch.float32, "gelu")])
def test_gated_route_is_gated_and_route(I, E, K, dtype, act):
    """One launch for a decoded token's two small consumers of its two-row GEMM: the same results as
    `gated` and `route` apart (26B-A4B's 2,112-wide MLP and 128 experts first), from views of one row."""
    y = rand(2, 2 * I + E, seed=I, dtype=dtype) * 3  # the two-row GEMM's output, as DecoderLayer slices it
    gate_up, logits = y[:1, : 2 * I].reshape(1, 1, 2 * I), y[1:, 2 * I:]
    scale = rand(E, seed=2, dtype=dtype).abs() + 0.5
    a, ids, w = triton_fused.gated_route_triton(gate_up, logits, scale, K, act)
    assert torch.equal(a, triton_fused.gated_triton(gate_up, act)) and a.shape == (1, 1, I)
    ref_ids, ref_w = triton_fused.route_triton(logits, scale, K)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
    ref_a, (r_ids, r_w) = fused_ops.gated_reference(gate_up, act), fused_ops.route_reference(logits, scale, K)
    assert rel(a, ref_a) < (1e-6 if dtype == torch.float32 else 1e-2) and torch.equal(ids, r_ids)


@needs_triton
@pytest.mark.parametrize("H, I, E, K, dtype, act", [(2816, 2112, 128, 8, torch.bfloat16, "gelu_pytorch_tanh"),
                                                   (40, 48, 8, 2, torch.float32, "silu"),
                                                   (300, 300, 60, 3, torch.float32, "gelu")])
def test_gated_gemv_route_is_the_gemvs_gated_and_route(H, I, E, K, dtype, act):
    """A decoded token's MLP gate / up and router projections with their consumers in one launch: the very
    bits of the GEMV kernel's two projections (the same steps) followed by `gated` and `route`'s kernels,
    call after call (the counter is back at 0 after each); and the formula's within rounding (26B-A4B's
    2,112-wide MLP and 128 experts first; a router tile past the last expert; a K of whole steps and not)."""
    from interpreted import triton_module as interpreted_module

    triton_gemv = interpreted_module("triton_gemv")
    rows = rand(2, H, seed=H, dtype=dtype)
    weight = rand(2 * I + E, H, seed=I, dtype=dtype) * H ** -0.5
    scale = rand(E, seed=2).abs() + 0.5
    gate_up = triton_gemv.gemv_triton(rows[:1], weight[: 2 * I])
    logits = triton_gemv.gemv_triton(rows[1:], weight[2 * I:])
    want_a = triton_fused.gated_triton(gate_up, act)
    want_ids, want_w = triton_fused.route_triton(logits, scale, K)
    for _ in range(2):
        a, ids, w = triton_fused.gated_gemv_route_triton(rows, weight, I, scale, K, act)
        assert torch.equal(a, want_a) and torch.equal(ids, want_ids) and torch.equal(w, want_w)
    ref_a, ref_ids, ref_w = fused_ops.gated_gemv_route_reference(rows, weight, I, scale, K, act)
    assert a.shape == ref_a.shape == (1, I) and torch.equal(ids, ref_ids)
    assert rel(a, ref_a) < (1e-5 if dtype == torch.float32 else 1e-2) and rel(w, ref_w) < 1e-2


@needs_triton
def test_gated_gemv_route_refuses_what_it_cannot_read():
    rows, weight, scale = rand(2, 40), rand(2 * 48 + 8, 40), rand(8).abs()
    with pytest.raises(ValueError, match=r"two input rows"):
        triton_fused.gated_gemv_route_triton(rows[:1], weight, 48, scale, 2, "silu")
    with pytest.raises(ValueError, match=r"weight must be"):
        triton_fused.gated_gemv_route_triton(rows, weight[:, :32], 48, scale, 2, "silu")
    with pytest.raises(ValueError, match=r"weight must be"):
        triton_fused.gated_gemv_route_triton(rows, weight[: 2 * 48], 48, scale, 2, "silu")  # no router rows


@needs_triton
@pytest.mark.parametrize("H,E,K,dtype", [(2816, 128, 8, torch.bfloat16), (40, 12, 3, torch.float32)])
def test_norms_route_is_the_norms_the_router_and_route(H, E, K, dtype):
    """One decoded token's norms, router projection and routing in one launch: the norms the very bits
    of attention_residual_norms' kernel, the routing the formula's (the logits summed in another order:
    ids equal, weights within rounding), call after call (the counter is back at 0 after each)."""
    x, res = rand(1, 1, H, seed=1, dtype=dtype) * 3, rand(1, 1, H, seed=2, dtype=dtype)
    ws = [rand(H, seed=s, dtype=dtype) for s in range(3, 7)]
    router, scale = rand(E, H, seed=7, dtype=dtype), rand(E, seed=8).abs() + 0.5
    y, moe, mlp, _ = triton_fused.attention_residual_norms_triton(x, ws[0], res, ws[1], ws[2], ws[3], H ** -0.5, 1e-6)
    ref_rows, ref_ids, ref_w = fused_ops.norms_route_reference(x, ws[0], res, ws[1], ws[2], ws[3], H ** -0.5, 1e-6,
                                                               router, scale, K)
    for _ in range(2):
        rows, ids, w = triton_fused.norms_route_triton(x, ws[0], res, ws[1], ws[2], ws[3], H ** -0.5, 1e-6, router,
                                                       scale, K)
        assert torch.equal(rows[0], y) and torch.equal(rows[1], mlp) and torch.equal(rows[2], moe)
        assert torch.equal(ids, ref_ids) and rel(w, ref_w) < (1e-6 if dtype == torch.float32 else 1e-2)
        assert not triton_fused.counters.held("norms_route", x.device, 1).any()
    assert torch.equal(fused_ops.norms_route_op(x, ws[0], res, ws[1], ws[2], ws[3], H ** -0.5, 1e-6, router, scale,
                                                K)[1], ref_ids)  # the op off CUDA: the formula


def norm64(x, w=None, eps=1e-6):
    x = x.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return n if w is None else n * w.double()


rounds_like_the_gpu = pytest.mark.skipif(not BF16_ROUNDS_TO_NEAREST,
                                         reason="this Triton's interpreter cannot be made to round bf16 to nearest")


@needs_triton
@rounds_like_the_gpu
def test_interpreter_rounds_bf16_to_nearest_as_the_gpu():
    """tests/interpreted.py: a bf16 output is the fp32 value rounded to nearest even (the interpreter
    itself truncates; a GPU rounds). Here the kernel's fp32 value is exact: residual * scalar."""
    H = 256
    res, zero = rand(1, H, seed=1, dtype=torch.bfloat16) * 5, torch.zeros(H, dtype=torch.bfloat16)
    scalar = torch.tensor([0.7], dtype=torch.bfloat16)
    mlp = rand(1, H, seed=2, dtype=torch.bfloat16)
    out = triton_fused.ffn_residual_triton(mlp, zero, mlp, zero, zero, res, scalar, 1e-6)
    assert torch.equal(out, (res.float() * scalar.float()).bfloat16())


@needs_triton
@rounds_like_the_gpu
@pytest.mark.parametrize("H", [64, 2816])
def test_glue_kernels_round_once_in_bf16(H):
    """Each half-precision glue kernel on bf16 inputs is within half a bf16 ulp of its formula in fp64
    (computed in fp32, rounded once), so no farther from fp32 than the unfused bf16 ops, which round
    after every op. A wrong rounding point, a missed residual, a weight offset (1 + w) would be ulps
    off, another eps too (a row whose mean square is eps's order). (The residual stream y is rounded
    before its norms, as the unfused layer does.)"""
    from localrun.moe import ACTIVATIONS
    from localrun.models.gemma4 import rope_inv_freq

    bf, eps = torch.bfloat16, 1e-6
    rows = torch.tensor([3.0, 1e-3, 30.0])[:, None]  # the second row's mean square ~ eps
    x, res = (rand(1, 3, H, seed=1) * rows).to(bf), rand(1, 3, H, seed=2, dtype=bf) * 10
    w_post, w_mlp, w_moe, w_router = (rand(H, seed=s, dtype=bf) for s in range(3, 7))
    y, moe, mlp, router = triton_fused.attention_residual_norms_triton(x, w_post, res, w_mlp, w_moe, w_router,
                                                                      H ** -0.5, eps)
    want = norm64(x, w_post) + res.double()
    y_unfused = norm64(x, w_post).to(bf) + res  # the unfused layer: the norm rounded, then the add
    assert bf16_ulps(y, want) <= 0.51 < bf16_ulps(y_unfused, want)
    n = norm64(y)
    for out, want in ((mlp, n * w_mlp.double()), (moe, n * w_moe.double()),
                      (router, n * w_router.double() * H ** -0.5)):
        assert bf16_ulps(out, want) <= 0.51

    a, b, r = ((rand(1, 3, H, seed=s) * k).to(bf) for s, k in ((7, rows), (8, 5), (9, 10)))
    w1, w2, w, w_next = (rand(H, seed=s, dtype=bf) for s in range(10, 14))
    scalar = torch.tensor([0.7], dtype=bf)
    out, normed = triton_fused.ffn_residual_triton(a, w1, b, w2, w, r, scalar, eps, w_next)
    want = (norm64(norm64(a, w1) + norm64(b, w2), w) + r.double()) * scalar.double()
    assert bf16_ulps(out, want) <= 0.51 and bf16_ulps(normed, norm64(out, w_next)) <= 0.51

    gate_up = (rand(1, 1, 2 * H, seed=14) * 1.5).clamp(-3, 3).to(bf)  # past -3 gelu's 1 + tanh cancels in fp32
    gate, up = gate_up.double().chunk(2, dim=-1)
    want = F.gelu(gate, approximate="tanh") * up
    unfused = ACTIVATIONS["gelu_pytorch_tanh"](gate_up[..., :H]) * gate_up[..., H:]
    assert bf16_ulps(triton_fused.gated_triton(gate_up, "gelu_pytorch_tanh"), want) <= 0.51 < bf16_ulps(unfused, want)

    inv = rope_inv_freq({"rope_theta": 10000.0}, 256)
    pos = torch.tensor([0, 1, 17, 4095, 131071])
    cos, sin = triton_fused.rope_rows_triton(pos, inv, bf)
    angles = (pos[:, None].float() * inv[None, :]).double()[:, None, :]  # fp32 angles, as both compute them
    assert bf16_ulps(cos, torch.cat((angles.cos(), angles.cos()), -1)) <= 0.51
    assert bf16_ulps(sin, torch.cat((-angles.sin(), angles.sin()), -1)) <= 0.51


def test_fused_layer_computes_the_unfused_layer(tiny_moe):
    """forward_fused (what CUDA runs in half precision) against forward, both in fp32 on the CPU:
    the ops' formulas are the layer's."""
    from localrun.loader import load_model

    loaded = load_model(tiny_moe, dtype=torch.float32, experts="bf16")
    model = loaded.model
    layer = next(l for l in model.layers if l.moe)
    x = rand(1, 5, model.args.hidden_size, seed=7)
    pos = torch.arange(5)
    kind = model.args.layer_types[list(model.layers).index(layer)]
    cos, sin = model.rope(pos, torch.float32)[kind]
    with torch.no_grad():
        a = layer.forward(x, cos, sin, pos, None, {})
        b = layer.forward_fused(x, cos, sin, pos, None, {})
    assert rel(b, a) < 1e-5



@torch.no_grad()  # inference: what the decoder's norms run as (the C kernels; with grad, torch's)
def test_cpu_kernels_are_the_unfused_ops_bit_for_bit(lib):
    """On the CPU in fp32 the glue ops are C calls that repeat the unfused layer's fp32 ops in order:
    the same bits as models/gemma4's norms and adds (the router's weights up to its exp)."""
    from localrun.models.gemma4 import rms_norm

    H, eps = 2816, 1e-6
    x, res, mlp, moe = (rand(1, 3, H, seed=s) for s in (1, 2, 3, 4))
    w = [rand(H, seed=s) for s in range(5, 11)]
    scalar = torch.tensor([0.5])
    y, o_mlp, o_moe, o_router, _ = fused_ops.attention_residual_norms(x, w[0], res, w[1], w[2], w[3], H ** -0.5, eps)
    ref_y = rms_norm(x, w[0], eps) + res
    assert torch.equal(y, ref_y)
    assert torch.equal(o_mlp, rms_norm(ref_y, w[1], eps)) and torch.equal(o_moe, rms_norm(ref_y, w[2], eps))
    assert torch.equal(o_router, rms_norm(ref_y, None, eps) * w[3] * H ** -0.5)
    out = fused_ops.ffn_residual(mlp, w[4], moe, w[5], w[0], res, scalar, eps)
    ref = (rms_norm(rms_norm(mlp, w[4], eps) + rms_norm(moe, w[5], eps), w[0], eps) + res) * scalar
    assert torch.equal(out, ref)
    logits = rand(3, 128, seed=12) * 3
    scale = rand(128, seed=13).abs()
    ids, wt = fused_ops.route(logits, scale, 8)
    ref_ids, ref_w = fused_ops.route_reference(logits, scale, 8)
    assert torch.equal(ids, ref_ids) and rel(wt, ref_w) < 1e-6


def test_ops_trace_under_compile():
    """The ops have fake implementations: torch.compile(fullgraph=True) traces the glue (the CPU's C
    calls step aside while tracing), and the compiled function computes the formulas."""
    H = 64
    x, res = rand(1, 2, H, seed=1), rand(1, 2, H, seed=2)
    ws = [rand(H, seed=s) for s in range(3, 7)]

    def glue(x, res):
        y, a, b, c, _ = fused_ops.attention_residual_norms(x, ws[0], res, ws[1], ws[2], ws[3], 0.125, 1e-6)
        ids, w = fused_ops.route(c.reshape(-1, H)[:, :16], ws[0][:16].abs(), 4)
        return fused_ops.ffn_residual(a, ws[1], b, ws[2], ws[3], y, torch.ones(1), 1e-6), ids, w

    out, ids, w = torch.compile(glue, fullgraph=True)(x, res)
    ref_out, ref_ids, ref_w = glue(x, res)
    assert torch.equal(ids, ref_ids) and rel(out, ref_out) < 1e-6 and rel(w, ref_w) < 1e-6


@needs_triton
def test_static_step_with_the_interpreted_gated_gemv_kernel(tiny_moe, monkeypatch):
    """`gated_gemv` in the decoder with its Triton kernel interpreted (fp32: the stored bf16 rows widened, as
    the CPU's linear reads them): each decoded layer's call takes the decoder's own tensors (the glue's two
    rows, DecoderLayer.stacked, the router's scale) and the tokens are the step's without it; the logprobs
    within the GEMV's summation order."""
    from decoding import counting, static_greedy

    from localrun import kernels
    from localrun.loader import load_model
    from localrun.models import gemma4

    loaded = load_model(tiny_moe, dtype=torch.float32, context=600)
    plain = static_greedy(loaded, 4, prompt=30)
    monkeypatch.setattr(kernels, "attention_residual_norms", lambda *a: None)  # the op: rows of one tensor
    monkeypatch.setattr(gemma4, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "gated_gemv", True)
    calls = []
    kernel = lambda rows, w, *rest: triton_fused.gated_gemv_route_triton(rows, w.to(rows.dtype), *rest)  # noqa: E731
    monkeypatch.setattr(fused_ops, "gated_gemv_route_op", counting(kernel, calls))
    got = static_greedy(loaded, 4, prompt=30)
    assert [t for t, _ in got] == [t for t, _ in plain]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, plain)) < 1e-4
    moe_layers = [layer for layer in loaded.model.layers if layer.moe]
    assert len(calls) == 3 * len(moe_layers) and all(args[0].shape == (2, loaded.args.hidden_size) for args in calls)
