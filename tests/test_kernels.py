"""localrun.kernels (bf16-stored weights computed in fp32 on the CPU) and blocked prefill attention.

Oracles are float64: a bf16 weight widens to fp32/fp64 exactly, so the only error allowed is the
rounding of fp32 sums. For a length-n dot product (plus a bias) computed in fp32 in any order,
|y - y_exact| <= gamma_{n+1} * (|x| @ |w|^T + |b|) with gamma_m ~ m * 2^-24 (Higham, Accuracy and
Stability of Numerical Algorithms, 3.1); blocked / pairwise / FMA summation only lowers it. That
bound is orders of magnitude below the error of any bf16 rounding of the activations (2^-8
relative), so a kernel that narrowed x, mixed up rows or dropped a tail would fail it.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

import localrun.models.gemma4 as gemma4
from localrun.kernels import attention as attention_ops
from localrun import kernels
from localrun.kvcache import KVCache, attention_mask
from localrun.loader import load_model
from localrun.moe import ACTIVATIONS, dispatch, expert_ffn

EPS32 = 2.0**-24  # unit roundoff of fp32


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def assert_fp32_linear(y, x, w, b=None):
    """y == x @ w^T + b up to fp32 summation error (elementwise bound, see module docstring)."""
    assert y.dtype == torch.float32
    assert y.shape == (*x.shape[:-1], w.shape[0])
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    if b is not None:
        ref, mag = ref + b.double(), mag + b.double().abs()
    bound = (x.shape[-1] + 1) * EPS32 * mag + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# linear


SHAPES = [(37, 5), (130, 19), (64, 48), (520, 130)]  # (I, O): tails of 16 columns / 4 rows, and
# 520 x 130 >= PARALLEL_MIN so the C kernel splits rows between threads
ROWS = [1, 3, 4, 5, 17, 128, 129]  # 129 > C_KERNEL_MAX_ROWS: widened weight + oneDNN


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("I,O", SHAPES)
def test_linear_bf16_weight_matches_fp64(I, O, T, bias):
    x = rand(T, I, seed=1)
    w = rand(O, I, seed=2, dtype=torch.bfloat16)
    b = rand(O, seed=3) if bias else None
    with torch.inference_mode():
        y = kernels.linear(x, w, b)
    assert_fp32_linear(y, x, w, b)


@pytest.mark.parametrize("B,T", [(2, 3), (2, 64), (3, 50)])  # 6, 128 rows: C kernel; 150: oneDNN
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_3d_input(B, T, bias):
    x = rand(B, T, 130, seed=4)
    w = rand(19, 130, seed=5, dtype=torch.bfloat16)
    b = rand(19, seed=6) if bias else None
    y = kernels.linear(x, w, b)
    assert y.shape == (B, T, 19)
    assert_fp32_linear(y, x, w, b)
    assert torch.equal(y.reshape(B * T, 19), kernels.linear(x.reshape(B * T, 130), w, b))


def test_linear_bf16_bias_and_noncontiguous_input(lib):
    x = rand(130, 5, seed=7).T  # [5, 130], not contiguous
    w = rand(19, 130, seed=8, dtype=torch.bfloat16)
    b = rand(19, seed=9, dtype=torch.bfloat16)
    assert_fp32_linear(kernels.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("T", [1, 5, 128, 129])
@pytest.mark.parametrize("I,O", [(520, 130), (1030, 70)])  # both over PARALLEL_MIN
def test_linear_thread_count(threads, I, O, T):
    """Right with 1 and 2 threads; the C kernel (<= 128 rows) computes each output on one thread in
    a fixed order, so its result does not depend on the thread count at all."""
    x = rand(T, I, seed=10)
    w = rand(O, I, seed=11, dtype=torch.bfloat16)
    b = rand(O, seed=12)
    threads(1)
    y1 = kernels.linear(x, w, b)
    threads(2)
    y2 = kernels.linear(x, w, b)
    assert_fp32_linear(y1, x, w, b)
    assert_fp32_linear(y2, x, w, b)
    if T <= kernels.C_KERNEL_MAX_ROWS and kernels.library() is not None:
        assert torch.equal(y1, y2)


@pytest.mark.parametrize("T", [129, 300])
@pytest.mark.parametrize("O,bias", [(300, True), (520, False), (256, True), (1000, True)])
def test_many_rows_widen_the_weight_a_block_at_a_time(T, O, bias, monkeypatch):
    """Past the C kernel's rows, a bf16 weight is widened WIDEN_ROWS rows at a time into a reused
    scratch for oneDNN: the very values of widening it whole (blocks of rows, a last partial one), with
    its bias, and 3-D inputs."""
    x = rand(2, T, 96, seed=20)
    w = rand(O, 96, seed=21, dtype=torch.bfloat16)
    b = rand(O, seed=22, dtype=torch.bfloat16) if bias else None
    calls = []
    real = kernels._widened_linear
    monkeypatch.setattr(kernels, "WIDEN_WHOLE_MAX", 0)  # these small weights would be widened whole
    monkeypatch.setattr(kernels, "_widened_linear", lambda *a: calls.append(1) or real(*a))
    y = kernels.linear(x, w, b)
    assert calls or not kernels._ONEDNN
    whole = kernels._onednn(x, w.float(), None if b is None else b.float()) if kernels._ONEDNN else \
        F.linear(x, w.float(), None if b is None else b.float())
    assert y.shape == (2, T, O) and torch.equal(y, whole)
    assert_fp32_linear(y, x, w, None if b is None else b.float())


def test_linear_same_dtype_and_mixed_dtypes():
    x = rand(3, 37, seed=13)
    w32 = rand(5, 37, seed=14)
    assert_fp32_linear(kernels.linear(x, w32), x, w32)
    xb, wb = x.bfloat16(), w32.bfloat16()
    assert torch.equal(kernels.linear(xb, wb), F.linear(xb, wb))
    with pytest.raises(TypeError):
        kernels.linear(xb, w32)  # bf16 x with fp32 w: not a supported mix
    with pytest.raises(TypeError):
        kernels.linear(x.double(), wb)


# ---------------------------------------------------------------------------------------------
# decode / prefill consistency


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("I,O", [(37, 5), (130, 19), (64, 48), (520, 130)])
def test_linear_row_independent_of_batch(lib, I, O, bias):
    """A token's output row is bitwise the same alone (decode, T=1) as inside any batch of up to
    C_KERNEL_MAX_ROWS rows (prefill): 4-token register blocking keeps dot_rows' summation order."""
    w = rand(O, I, seed=20, dtype=torch.bfloat16)
    b = rand(O, seed=21) if bias else None
    x = rand(kernels.C_KERNEL_MAX_ROWS, I, seed=22)
    alone = torch.cat([kernels.linear(x[t : t + 1], w, b) for t in range(len(x))])
    assert_fp32_linear(alone, x, w, b)
    for T in (2, 3, 4, 5, 7, 8, 13, 17, 64, 127, 128):
        batch = kernels.linear(x[:T], w, b)
        assert torch.equal(batch, alone[:T]), f"T={T}: rows differ from one-token results"
    # also as [B, T, I] and from an offset inside the batch
    assert torch.equal(kernels.linear(x[:12].reshape(3, 4, I), w, b), alone[:12].reshape(3, 4, O))
    assert torch.equal(kernels.linear(x[5:14], w, b), alone[5:14])


# ---------------------------------------------------------------------------------------------
# moe


def moe_fp64(x, gate_up, down, ids, w, act):
    """sum_k w[t,k] * down[e] @ (act(gate[e] @ x[t]) * (up[e] @ x[t])), e = ids[t,k], in float64."""
    fn = ACTIVATIONS[act]
    gu = gate_up.double()[ids]  # [T, K, 2F, H]
    h = torch.einsum("tkfh,th->tkf", gu, x.double())
    g, u = h.chunk(2, dim=-1)
    y = torch.einsum("tkhf,tkf->tkh", down.double()[ids], fn(g) * u)
    return (w.double()[..., None] * y).sum(1)


def moe_inputs(T, E=32, K=8, H=40, F2=40, seed=0):
    """x [T, H] fp32, bf16 experts (H = 40, F = 20: neither a multiple of 16), K distinct unsorted
    experts per token, softmax-like weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    gate_up = (torch.randn(E, F2, H, generator=gen) * H**-0.5).bfloat16()
    down = (torch.randn(E, H, F2 // 2, generator=gen) * (F2 // 2) ** -0.5).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    return x, gate_up, down, ids, w


def assert_moe_close(y, ref):
    # Two chained fp32 dot products (length 40 and 20) and a K=8 sum: a few 1e-7 relative to the
    # output scale in practice; 2e-6 leaves margin and is still ~2000x below a bf16 rounding.
    err = (y.double() - ref).abs().max().item()
    assert err <= 2e-6 * ref.abs().max().item(), f"max err {err:.3g} vs scale {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("act", list(kernels.ACTIVATION_CODES))
@pytest.mark.parametrize("T", [1, 2, 7, 64])
def test_moe_matches_fp64(lib, T, act):
    x, gate_up, down, ids, w = moe_inputs(T, seed=T)
    y = kernels.moe(x, gate_up, down, ids, w, act)
    assert y is not None
    assert y.dtype == torch.float32 and y.shape == (T, 40)
    ref = moe_fp64(x, gate_up, down, ids, w, act)
    assert_moe_close(y, ref)
    # the expert-by-expert fallback (what DenseExperts does without the kernel) agrees too
    fallback = dispatch(x, ids, w, lambda e, xx: expert_ffn(xx, gate_up[e], down[e], ACTIVATIONS[act]))
    assert_moe_close(fallback, ref)


def test_moe_noncontiguous_inputs(lib):
    x, gate_up, down, ids, w = moe_inputs(7, seed=30)
    y = kernels.moe(x.T.contiguous().T, gate_up, down, ids.int().T.contiguous().T, w.T.contiguous().T, "silu")
    assert_moe_close(y, moe_fp64(x, gate_up, down, ids, w, "silu"))


@pytest.mark.parametrize("T", [1, 64])
def test_moe_thread_count(lib, threads, T):
    """T * H * F over PARALLEL_MIN: threads split the work. Many tokens add each token's experts in
    id order whatever the thread count (bitwise); one token only depends on the thread count."""
    x, gate_up, down, ids, w = moe_inputs(T, H=72, F2=80, seed=40)
    ref = moe_fp64(x, gate_up, down, ids, w, "gelu_pytorch_tanh")
    threads(1)
    y1 = kernels.moe(x, gate_up, down, ids, w, "gelu_pytorch_tanh")
    threads(2)
    y2 = kernels.moe(x, gate_up, down, ids, w, "gelu_pytorch_tanh")
    assert_moe_close(y1, ref)
    assert_moe_close(y2, ref)
    if T > 1:
        assert torch.equal(y1, y2)


def test_moe_not_applicable_returns_none(lib):
    x, gate_up, down, ids, w = moe_inputs(3, seed=50)
    assert kernels.moe(x.bfloat16(), gate_up, down, ids, w, "silu") is None
    assert kernels.moe(x, gate_up.float(), down.float(), ids, w, "silu") is None
    assert kernels.moe(x, gate_up, down, ids, w, "relu") is None
    assert kernels.moe(x, gate_up, down.float(), ids, w, "silu") is None  # each expert tensor's dtype counts
    assert kernels.moe(x, gate_up, down, ids, w, "silu") is not None  # and the inputs were fine


@pytest.mark.parametrize("T", [1, 5])
def test_moe_rejects_expert_ids_out_of_range(lib, T):
    x, gate_up, down, ids, w = moe_inputs(T, seed=51)
    for bad in (gate_up.shape[0], -1):
        wrong = ids.clone()
        wrong[-1, -1] = bad
        with pytest.raises(ValueError, match="expert ids"):
            kernels.moe(x, gate_up, down, wrong, w, "silu")


def test_outputs_are_fp32_whatever_the_default_dtype(lib):
    x, w, b = rand(5, 37, seed=52), rand(5, 37, seed=53, dtype=torch.bfloat16), rand(5, seed=54)
    mx, gate_up, down, ids, mw = moe_inputs(3, seed=55)
    want_moe = kernels.moe(mx, gate_up, down, ids, mw, "silu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y = kernels.linear(x, w, b)
        got_moe = kernels.moe(mx, gate_up, down, ids, mw, "silu")
    finally:
        torch.set_default_dtype(previous)
    assert y.dtype == torch.float32 and got_moe.dtype == torch.float32
    assert_fp32_linear(y, x, w, b)
    assert torch.equal(got_moe, want_moe)


@pytest.mark.parametrize("T", [1, 129])  # the C path and the widened one
def test_linear_bf16_bias_on_every_path(T):
    x, w, b = rand(T, 37, seed=56), rand(5, 37, seed=57, dtype=torch.bfloat16), rand(5, seed=58, dtype=torch.bfloat16)
    assert_fp32_linear(kernels.linear(x, w, b), x, w, b.float())


# ---------------------------------------------------------------------------------------------
# fallbacks and build


@pytest.mark.parametrize("value", ["0", "OFF", "False", " no "])
def test_disabled_by_env(fresh_kernels, monkeypatch, value):
    monkeypatch.setenv("LOCALRUN_CPU_KERNELS", value)
    kernels.reset()
    assert kernels.library() is None
    assert kernels.storage_dtype(torch.float32, torch.device("cpu"), torch.bfloat16) == torch.float32
    assert kernels.storage_dtype(torch.float32, "cpu", torch.bfloat16) == torch.float32
    for T in (1, 5, 129):  # bf16 weights still work: widened, plain torch / oneDNN
        x = rand(T, 130, seed=60)
        w = rand(19, 130, seed=61, dtype=torch.bfloat16)
        b = rand(19, seed=62)
        assert_fp32_linear(kernels.linear(x, w, b), x, w, b)
    x, gate_up, down, ids, w = moe_inputs(4, seed=63)
    assert kernels.moe(x, gate_up, down, ids, w, "silu") is None
    assert kernels.moe(x[:1], gate_up, down, ids[:1], w[:1], "silu") is None


def test_enabled_storage_dtype(fresh_kernels, lib):
    cpu = torch.device("cpu")
    assert kernels.storage_dtype(torch.float32, cpu, torch.bfloat16) == torch.bfloat16
    assert kernels.storage_dtype(torch.float32, cpu, torch.float32) == torch.float32
    assert kernels.storage_dtype(torch.bfloat16, cpu, torch.bfloat16) == torch.bfloat16
    assert kernels.storage_dtype(torch.float16, cpu, torch.bfloat16) == torch.float16
    assert kernels.storage_dtype(torch.float32, torch.device("meta"), torch.bfloat16) == torch.float32


def test_missing_compiler(fresh_kernels, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError):
        kernels.build(compiler="/nonexistent/cc", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the temporary .so was removed
    # through the environment: library() gives up quietly and everything stays fp32
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    kernels.reset()
    assert kernels.library() is None
    assert kernels.storage_dtype(torch.float32, torch.device("cpu"), torch.bfloat16) == torch.float32
    assert [p.name for p in (tmp_path / "xdg").rglob("*") if p.is_file()] == []


def test_failing_compiler(fresh_kernels, tmp_path):
    false = "/bin/false" if os.path.exists("/bin/false") else "/usr/bin/false"
    if not os.path.exists(false):
        pytest.skip("no `false` binary")
    import subprocess

    with pytest.raises(subprocess.CalledProcessError):
        kernels.build(compiler=false, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_build_is_cached_and_loads(lib, tmp_path):
    path = kernels.build(cache_dir=tmp_path)
    assert path.is_file() and path.parent == tmp_path
    mtime = path.stat().st_mtime_ns
    again = kernels.build(cache_dir=tmp_path)
    assert again == path and again.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    built = kernels._load(path)
    assert isinstance(built, ctypes.CDLL)
    # and it computes: one call through the freshly built library
    x = rand(3, 37, seed=70)
    w = rand(5, 37, seed=71, dtype=torch.bfloat16)
    y = torch.empty(3, 5)
    built.lr_linear(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), 3, 37, 5)
    assert_fp32_linear(y, x, w)


# ---------------------------------------------------------------------------------------------
# loader integration


def _dtypes(model):
    layer = model.layers[0]
    return {
        "q_proj": layer.self_attn.q_proj.weight.dtype,
        "embed": model.embed_tokens.weight.dtype,
        "gate_up": layer.experts.gate_up_proj.dtype,
        "down": layer.experts.down_proj.dtype,
        "router": layer.router.proj.weight.dtype,
        "norm": model.norm.weight.dtype,
        "input_norm": layer.input_layernorm.weight.dtype,
    }


def test_loader_keeps_bf16_matrices(fresh_kernels, monkeypatch, tiny_moe, lib):
    ids = torch.tensor([[2] + list(range(107, 130))])  # 24 tokens, > sliding_window 8
    kept = load_model(tiny_moe, dtype=torch.float32, experts="bf16")
    bf, fp = torch.bfloat16, torch.float32
    assert _dtypes(kept.model) == {"q_proj": bf, "embed": bf, "gate_up": bf, "down": bf, "router": bf,
                                   "norm": fp, "input_norm": fp}
    assert kept.model.compute_dtype == fp
    with torch.inference_mode():
        logits_bf16 = kept.model(ids, last_only=False)

    monkeypatch.setenv("LOCALRUN_CPU_KERNELS", "0")
    kernels.reset()
    plain = load_model(tiny_moe, dtype=torch.float32, experts="bf16")
    assert set(_dtypes(plain.model).values()) == {fp}
    with torch.inference_mode():
        logits_fp32 = plain.model(ids, last_only=False)

    assert logits_bf16.dtype == logits_fp32.dtype == fp
    assert logits_bf16.shape == logits_fp32.shape == (1, ids.shape[1], 512)
    torch.testing.assert_close(logits_bf16, logits_fp32, rtol=0, atol=1e-4)
    assert torch.equal(logits_bf16.argmax(-1), logits_fp32.argmax(-1))


# ---------------------------------------------------------------------------------------------
# attend: blocks of queries over the visible key slice == one masked call


def _attend_case(old_pos, T, seed, B=2, N=4, KV=2, D=8):
    gen = torch.Generator().manual_seed(seed)
    start = max(old_pos, default=-1) + 1
    pos_T = torch.arange(start, start + T)
    pos_S = torch.cat([torch.tensor(old_pos, dtype=torch.long), pos_T])
    S = len(pos_S)
    q = torch.randn(B, N, T, D, generator=gen)
    k = torch.randn(B, KV, S, D, generator=gen)
    v = torch.randn(B, KV, S, D, generator=gen)
    return q, k, v, pos_T, pos_S


ATTEND_CASES = {
    # name: (old key positions as the cache returns them, new tokens, window)
    "full-fresh": ([], 20, None),
    "full-prefix": (list(range(7)), 13, None),
    "sliding-fresh": ([], 20, 5),
    "sliding-ring": ([5, 6, 2, 3, 4], 13, 5),  # a ring cache's window keys, rotated
    "sliding-short-history": ([0, 1, 2], 17, 5),  # fewer old keys than the window
    "sliding-ring-larger-block": ([5, 6, 2, 3, 4], 4, 5),  # fewer new tokens than the window
}


@pytest.mark.parametrize("block", [1, 3, 4, 128])
@pytest.mark.parametrize("case", list(ATTEND_CASES))
def test_attend_blocks_match_one_masked_call(monkeypatch, case, block, attention_path):
    """Both CPU paths; the oneDNN one masks a full layer's block over its own new keys only."""
    old, T, window = ATTEND_CASES[case]
    q, k, v, pos_T, pos_S = _attend_case(old, T, seed=len(case) + block)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pos_T, pos_S, window), scale=1.0,
                                              enable_gqa=True)
    monkeypatch.setattr(attention_ops, "QUERY_BLOCK", block)
    assert kernels.prefill_attention_applies(q, k) == (attention_path == "onednn")
    got = gemma4.attend(q, k, v, pos_T, pos_S, window, masks={})
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _attention_fp64(q, k, v, visible_TS, scale):
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, dim=1), v.double().repeat_interleave(G, dim=1)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~visible_TS, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("B,N,KV,T,S,D,masked,scale", [
    (1, 8, 1, 64, 3500, 128, "causal", 1.0),  # the bench model's full layer: 64 new queries over a long history
    (1, 8, 4, 37, 300, 64, "window", 1.0),  # a sliding layer's block: every key masked by position
    (2, 6, 2, 5, 40, 16, "none", 0.25),  # nothing masked, a scale, batch 2
    (1, 4, 4, 9, 9, 8, "causal", 0.5),  # no grouping, no history
])
@pytest.mark.parametrize("chunk", ["one", "uneven"])
def test_cpu_attention_matches_fp64_and_sdpa(monkeypatch, B, N, KV, T, S, D, masked, scale, chunk):
    """kernels.prefill_attention (oneDNN GEMMs) against float64 and against SDPA's fused kernel, the
    path it replaces: both within fp32 rounding of the exact result, and of each other. "causal" gives the
    kernel a mask over the queries' own new keys only (the history is visible to all, as in attend's
    full layers); a key hidden or shown by mistake moves the result far past these bounds. "uneven":
    scores bounded to 2 queries at a time, plus a shorter last chunk where T is odd."""
    if chunk == "uneven":
        monkeypatch.setattr(kernels, "PREFILL_ATTENTION_CHUNK_SCORES", 2 * (N // KV) * S + 1)
    gen = torch.Generator().manual_seed(S + T)
    q = (torch.randn(B, T, N, D, generator=gen) * D**-0.5).transpose(1, 2)  # a head view, as attention projects it
    k, v = torch.randn(B, KV, S, D, generator=gen), torch.randn(B, KV, S, D, generator=gen)
    pos_q, pos_k = torch.arange(S - T, S), torch.arange(S)
    visible = {"causal": attention_mask(pos_q, pos_k, None), "window": attention_mask(pos_q, pos_k, 20),
               "none": torch.ones(T, S, dtype=torch.bool)}[masked]
    given = {"causal": visible[:, S - T + 1:], "window": visible, "none": None}[masked]
    got = kernels.prefill_attention(q, k, v, given, scale)
    want = _attention_fp64(q, k, v, visible, scale)
    sdpa = gemma4.grouped_sdpa(q, k, v, visible, scale)
    assert got.dtype == torch.float32 and got.shape == (B, N, T, D)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(sdpa.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, sdpa, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["moe", "dense_e2b"])
def test_decoder_in_small_query_blocks_matches_one_block(monkeypatch, tiny_checkpoint, kind):
    """Through the whole decoder (masks reused across the layers of a kind, KV sharing, chunked
    prefill over a cache prefix): small blocks give the logits one block gives."""
    model = load_model(tiny_checkpoint(kind), dtype=torch.float32, experts="bf16").model
    ids = torch.tensor([[2] + list(range(107, 146))])  # 40 tokens: several windows of the tiny model

    def logits():
        cache = KVCache(model.args)
        with torch.inference_mode():
            return torch.cat([model(ids[:, i : i + 13], cache) for i in range(0, 40, 13)], dim=1)

    monkeypatch.setattr(attention_ops, "QUERY_BLOCK", 1000)
    want = logits()
    monkeypatch.setattr(attention_ops, "QUERY_BLOCK", 3)
    torch.testing.assert_close(logits(), want, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(kernels, "PREFILL_ATTENTION_MIN_WORK", 0)  # every block through the oneDNN path
    torch.testing.assert_close(logits(), want, atol=1e-5, rtol=1e-5)


def test_bench_model_tokens_equal_on_both_attention_paths(tmp_path, monkeypatch):
    """At real shapes (head dim 128, 8 query heads per KV head), without forcing: a 1200-token prompt
    prefilled in 512-token chunks takes the oneDNN path, and its fp32 greedy tokens are SDPA's."""
    from localrun.bench import bench_model_dir, bench_prompt
    from localrun.generate import generate
    from localrun.sampling import SamplingParams, make_sampler

    loaded = load_model(bench_model_dir(tmp_path), dtype=torch.float32, context=1300)
    ids = bench_prompt(1200, loaded.args.vocab_size)
    q = torch.empty(1, loaded.args.num_attention_heads, 512, loaded.args.global_head_dim)
    assert kernels.prefill_attention_applies(q, torch.empty(1, 1, 1200, loaded.args.global_head_dim))

    def greedy():
        steps = list(generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=16, cache=loaded.kv))
        return [s.token for s in steps], torch.tensor([s.logprob for s in steps])

    onednn = greedy()
    monkeypatch.setattr(kernels, "PREFILL_ATTENTION_MIN_WORK", 1 << 62)
    sdpa = greedy()
    assert onednn[0] == sdpa[0]
    # this random model routes near ties: SDPA alone moves these logprobs by 5e-3 between query
    # blocks of 32 and 64 (fp32 summation order only); the tokens are what must not move
    torch.testing.assert_close(onednn[1], sdpa[1], rtol=0, atol=1e-2)


def test_attend_one_token_sees_all_keys():
    """Decode: the cache returns only visible keys, so one query attends to all of them unmasked."""
    q, k, v, pos_T, pos_S = _attend_case([5, 6, 3, 4], 1, seed=3)  # window 5 at position 7: keys 3..7
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pos_T, pos_S, 5), scale=1.0,
                                              enable_gqa=True)
    torch.testing.assert_close(gemma4.attend(q, k, v, pos_T, pos_S, 5), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# rms_norm and the fused q/k norm + RoPE


@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 7, 40), (2, 5, 4, 10), (300, 64)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_fp64(lib, shape, weighted):
    x = rand(*shape, seed=70) * 3
    w = rand(shape[-1], seed=71) if weighted else None
    y = kernels.rms_norm(x, w, 1e-6)
    x64 = x.double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 if w is None else w.double())
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-6)


def test_rms_norm_noncontiguous_and_not_applicable(lib):
    x = rand(6, 2 * 24, seed=72)[:, :24]  # a column slice, as the fused q/k/v projection's heads are
    w = rand(24, seed=73)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm(x.contiguous(), w, 1e-6))
    assert kernels.rms_norm(x.double(), None, 1e-6) is None
    assert kernels.rms_norm(x, w.double(), 1e-6) is None


@pytest.mark.parametrize("view", ["q", "k", "one token", "three tokens of one", "transposed"])
def test_norms_read_head_views_in_place(lib, view):
    """The heads of a fused q/k/v projection are column slices: read in place, same bits as a copy."""
    fused = rand(2, 5, 3 * 16 + 8, seed=86)
    x = {"q": fused[..., :32].view(2, 5, 2, 16), "k": fused[..., 32:48].view(2, 5, 1, 16),
         "one token": fused[:1, :1, 8:40].view(1, 1, 2, 16),
         "three tokens of one": rand(3, 1, 40, seed=87)[..., 8:40].view(3, 1, 2, 16),
         "transposed": rand(16, 2, 5, seed=88).permute(1, 2, 0).unsqueeze(2)}[view]
    w, cos, sin = rand(16, seed=89), rand(x.shape[1], 1, 16, seed=90), rand(x.shape[1], 1, 16, seed=91)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm(x.contiguous(), w, 1e-6))
    assert torch.equal(kernels.rms_norm(x, None, 1e-6), kernels.rms_norm(x.contiguous(), None, 1e-6))
    assert torch.equal(kernels.rms_norm_rope(x, w, cos, sin, 1e-6), kernels.rms_norm_rope(x.contiguous(), w, cos, sin, 1e-6))


@pytest.mark.parametrize("B, T, N, D", [(1, 1, 8, 64), (1, 37, 4, 128), (2, 5, 3, 10)])
def test_rms_norm_rope_is_norm_then_rope(lib, B, T, N, D):
    x, w = rand(B, T, N, D, seed=74), rand(D, seed=75)
    cos, sin = rand(T, 1, D, seed=76), rand(T, 1, D, seed=77)
    got = kernels.rms_norm_rope(x, w, cos, sin, 1e-6)
    # bit-identical to the two steps it fuses (no FMA contraction in the C build)
    assert torch.equal(got, gemma4.apply_rope(kernels.rms_norm(x, w, 1e-6), cos, sin))
    want = gemma4.apply_rope(F.rms_norm(x.double(), (D,), w.double(), 1e-6), cos.double(), sin.double())
    torch.testing.assert_close(got.double(), want, atol=1e-6 * want.abs().max().item(), rtol=1e-6)


def test_rms_norm_rope_not_applicable(lib):
    x, w = rand(1, 3, 2, 8, seed=78), rand(8, seed=79)
    cos, sin = rand(3, 1, 8, seed=80), rand(3, 1, 8, seed=81)
    assert kernels.rms_norm_rope(x.double(), w, cos, sin, 1e-6) is None
    assert kernels.rms_norm_rope(x, w, cos[:2], sin[:2], 1e-6) is None  # cos/sin not one row per token
    odd = rand(1, 3, 2, 7, seed=82)
    assert kernels.rms_norm_rope(odd, rand(7, seed=83), rand(3, 1, 7, seed=84), rand(3, 1, 7, seed=85), 1e-6) is None
