"""kernels.DecodeLayer: the front of a Gemma 4 MoE layer for one fp32 CPU token as one C call;
kernels.MoEDecodeLayer: a Qwen3-MoE or Mixtral MoE layer the same way.

They call the very C functions the module path calls one by one, on the same buffers, so tokens and
logits are asserted bit for bit equal to the module path (DECODE_KERNELS["decode_layer"] off), at
every placement, across sliding-ring wraps (rollback slots masked), at 1 and 2 threads; for Qwen3-MoE
and Mixtral also through the prefix cache's rollbacks and against the static step."""

from __future__ import annotations

import pytest
import torch

import localrun.models.gemma4 as gemma4
from localrun import kernels
from localrun.bench import bench_prompt
from localrun.generate import generate
from localrun.kvcache import ContextFull, FullKV, KVCache, RingKV
from localrun.loader import load_model
from localrun.moe import ACTIVATIONS
from localrun.sampling import SamplingParams, make_sampler

torch.set_num_threads(1)


def run(model, ids, cache, n, decode_layer: bool, monkeypatch, sampling=SamplingParams()):
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "decode_layer", decode_layer)
    steps = list(generate(model, ids, make_sampler(sampling), max_tokens=n, cache=cache))
    return [s.token for s in steps], torch.stack([s.logits for s in steps])


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_tokens_and_logits_bit_identical_to_module_path(lib, tiny_moe, monkeypatch, threads, fraction, n_threads):
    threads(n_threads)
    loaded = load_model(tiny_moe, dtype=torch.float32, resident_fraction=fraction, context=512)
    window = loaded.args.sliding_window
    ids = bench_prompt(window + 7, loaded.args.vocab_size)  # decode starts with the ring past its window
    sampling = SamplingParams(temperature=0.8, seed=3)  # sampled: more varied routing than greedy
    fast = run(loaded.model, ids, loaded.kv, 3 * window, True, monkeypatch, sampling)
    kernels_used = [layer.decode_c for layer in loaded.model.layers if layer.moe]
    assert all(isinstance(k, kernels.DecodeLayer) for k in kernels_used)
    # resident 4-bit experts go inside the C call; an ExpertStore (offloaded) stays a Python call
    assert all((k.experts is not None) == (fraction == 1.0) for k in kernels_used)
    slow = run(loaded.model, ids, loaded.kv, 3 * window, False, monkeypatch, sampling)
    assert fast[0] == slow[0]
    assert torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("experts, fraction", [("bf16", 1.0), ("nf4", 0.5)])
def test_bench_model_bit_identical(lib, tmp_path, monkeypatch, experts, fraction):
    from localrun.bench import bench_model_dir

    loaded = load_model(bench_model_dir(tmp_path), dtype=torch.float32, experts=experts, resident_fraction=fraction,
                        context=400)
    ids = bench_prompt(140, loaded.args.vocab_size)  # past the 128-position window
    fast = run(loaded.model, ids, loaded.kv, 24, True, monkeypatch)
    assert (loaded.model.layers[0].decode_c.experts is not None) == (fraction == 1.0)
    slow = run(loaded.model, ids, loaded.kv, 24, False, monkeypatch)
    assert fast[0] == slow[0] and torch.equal(fast[1], slow[1])


def test_router_hooks_keep_the_module_path(lib, tiny_moe, monkeypatch):
    """profile.py counts experts with forward hooks on the routers: those must still fire."""
    loaded = load_model(tiny_moe, dtype=torch.float32, context=128)
    seen = []
    layer = next(layer for layer in loaded.model.layers if layer.moe)
    handle = layer.router.register_forward_hook(lambda m, args, out: seen.append(out[0].shape))
    try:
        tokens, _ = run(loaded.model, bench_prompt(12, loaded.args.vocab_size), loaded.kv, 5, True, monkeypatch)
    finally:
        handle.remove()
    assert len(seen) == 1 + 4  # the prefill, then each decoded token that was fed back


def test_not_built_for_fp32_matrices(lib):
    H, N, KV, D, I, E = 64, 4, 2, 16, 32, 8
    bf = lambda *s: torch.randn(*s).bfloat16()  # noqa: E731
    vectors = {n: torch.ones(H) for n in ("w_in", "w_post", "w_mlp", "w_moe", "w_router_scale")}
    vectors |= {"w_qn": torch.ones(D), "w_kn": torch.ones(D), "expert_scale": torch.ones(E)}
    common = dict(heads=N, kv_heads=KV, head_dim=D, eps=1e-6, router_root=H**-0.5, top_k=2, act="gelu_pytorch_tanh",
                  vectors=vectors, qkv_bias=None, o=bf(H, N * D), o_bias=None, gate_up=bf(2 * I, H), down=bf(H, I),
                  router=bf(E, H))
    assert isinstance(kernels.DecodeLayer.build(qkv=bf((N + 2 * KV) * D, H), **common), kernels.DecodeLayer)
    assert isinstance(kernels.DecodeLayer.build(qkv=bf((N + KV) * D, H), **common), kernels.DecodeLayer)  # K = V
    assert kernels.DecodeLayer.build(qkv=bf((N + 2 * KV) * D, H).float(), **common) is None
    assert kernels.DecodeLayer.build(qkv=bf((N + 3 * KV) * D, H), **common) is None  # not a q/k/v layout
    assert kernels.DecodeLayer.build(qkv=bf((N + 2 * KV) * D, H), **common | {"act": "relu"}) is None


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "silu"])
def test_gated_matches_torch(lib, act):
    gate_up = torch.randn(3, 2 * 160) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    exact = (ACTIVATIONS[act](gate.double()) * up.double()).float()
    torch.testing.assert_close(kernels.gated(gate_up, act), exact, rtol=1e-5, atol=4e-6)  # as close as torch's fp32:
    torch.testing.assert_close(ACTIVATIONS[act](gate) * up, exact, rtol=1e-5, atol=4e-6)
    assert kernels.gated(gate_up.double(), act) is None


def test_moe_layers_with_kv_sharing_decode_as_the_prompt_pass(tmp_path):
    """A Gemma 4 MoE whose last layers share KV (num_kv_shared_layers, no per-layer inputs): a sharing
    layer reads its source layer's keys from the same pass, which the source's C call does not leave
    there, so these decode through the module path: the logits of the whole sequence in one pass, and the
    static step's tokens bit for bit (once a KeyError at the first decoded token)."""
    from localrun.tiny import tiny_config, write_checkpoint

    model_dir = write_checkpoint(tmp_path / "m", tiny_config("moe", num_kv_shared_layers=2))
    loaded = load_model(model_dir, dtype=torch.float32, context=64)
    ids = bench_prompt(12, loaded.args.vocab_size)
    steps = list(generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=6, cache=loaded.kv))
    tokens = [s.token for s in steps]
    with torch.inference_mode():
        whole = loaded.model(torch.tensor([ids + tokens[:-1]]))[0, len(ids) - 1:]
    torch.testing.assert_close(torch.stack([s.logits for s in steps]), whole, rtol=0, atol=1e-4)
    static = list(generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=6, cache=loaded.kv,
                           step="static"))
    assert [s.token for s in static] == tokens and [s.logprob for s in static] == [s.logprob for s in steps]


def test_claim_is_a_one_token_update(tiny_moe):
    """FullKV/RingKV.claim leave the host counters where a one-token `update` leaves them."""
    args = load_model(tiny_moe, dtype=torch.float32, context=64).args
    a, b = KVCache(args, capacity=40), KVCache(args, capacity=40)
    for p in range(40):
        for la, lb in zip(a.layers, b.layers):
            if la is None:
                continue
            N, D = la.k.shape[1], la.k.shape[3]
            la.update(torch.zeros(1, N, 1, D), torch.zeros(1, N, 1, D), torch.tensor([p]))
            slot, n_keys, window = lb.claim()
            if isinstance(lb, RingKV):
                assert (slot, n_keys, window) == ((lb.next - 1) % lb.size, la.filled, la.window)
                assert (la.next, la.filled) == (lb.next, lb.filled)
            else:
                assert isinstance(lb, FullKV) and (slot, n_keys, window) == (p, p + 1, 0) and la.length == lb.length
    full = next(layer for layer in b.layers if isinstance(layer, FullKV))
    with pytest.raises(ContextFull):
        full.claim()


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("T", [1, 3])
def test_logits_kernel_matches_torch(lib, cap, T):
    x, w = torch.randn(T, 96), (torch.randn(1000, 96) * 0.5).bfloat16()
    y = x.double() @ w.double().T
    if cap:
        y = torch.tanh(y / cap) * cap
    torch.testing.assert_close(kernels.logits(x, w, cap), y.float(), rtol=1e-5, atol=2e-5)
    assert kernels.logits(x, w.float(), cap) is None  # fp32 matrices: torch's path


def test_set_experts_rebuilds_the_layer_call(lib, tiny_moe, monkeypatch):
    loaded = load_model(tiny_moe, dtype=torch.float32, context=128)
    ids = bench_prompt(12, loaded.args.vocab_size)
    before = run(loaded.model, ids, loaded.kv, 6, True, monkeypatch)
    layer = next(layer for layer in loaded.model.layers if layer.moe)
    assert layer.decode_c is not None
    layer.set_experts(layer.experts)
    assert layer.decode_c is None
    assert run(loaded.model, ids, loaded.kv, 6, True, monkeypatch)[0] == before[0]


def test_rope_row_and_embed_match_torch(lib):
    from localrun.models.gemma4 import rope_inv_freq

    inv = rope_inv_freq({"rope_type": "default", "rope_theta": 10000.0}, 64)
    for position in (0, 1, 127, 4097, 131071):
        freqs = torch.tensor([position]).float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        sin = emb.sin()
        sin[..., :32] *= -1
        cos_c, sin_c = kernels.rope_row(inv, position)
        torch.testing.assert_close(cos_c, emb.cos(), rtol=0, atol=2e-7)  # libm vs torch: the last bit at most
        torch.testing.assert_close(sin_c, sin, rtol=0, atol=2e-7)
    w = torch.randn(50, 24).bfloat16()
    ids = torch.tensor([[3, 49, 0]])
    scale = 24**0.5
    assert torch.equal(kernels.embed(ids, w, scale), torch.nn.functional.embedding(ids, w).float()
                       * torch.tensor(scale, dtype=torch.float32))
    with pytest.raises(IndexError):
        kernels.embed(torch.tensor([[50]]), w, scale)


def test_dtype_auto_is_fp32_on_the_cpu_with_bf16_matrices(lib, tiny_moe, fresh_kernels, monkeypatch):
    """`--dtype auto` (the default of run, chat, serve, profile): fp32 compute on the CPU, so the C
    decode path applies, over bf16 matrices; without the kernels, bf16 (fp32 would double the bytes)."""
    from localrun.commands._options import load_kwargs

    kwargs = load_kwargs("cpu", "auto", None, None, None, 64)
    assert kwargs["dtype"] is None
    model = load_model(tiny_moe, **kwargs).model
    assert model.compute_dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_kwargs("cpu", "bf16", None, None, None, 64)["dtype"] == torch.bfloat16
    monkeypatch.setenv("LOCALRUN_CPU_KERNELS", "0")
    kernels.reset()
    assert load_model(tiny_moe, **kwargs).model.compute_dtype == torch.bfloat16


def test_refused_weights_rebuild_the_layer_call(lib, tiny_moe, monkeypatch):
    """fuse_projections() again allocates new fused weights: the C call must read those, not the old."""
    loaded = load_model(tiny_moe, dtype=torch.float32, context=128)
    ids = bench_prompt(12, loaded.args.vocab_size)
    run(loaded.model, ids, loaded.kv, 4, True, monkeypatch)
    for layer in loaded.model.layers:  # new q weights in new storage: fusing again concatenates anew
        q = layer.self_attn.q_proj
        q.weight = torch.nn.Parameter(q.weight.detach().clone() * 0.5, requires_grad=False)
    loaded.model.fuse_projections()
    fast = run(loaded.model, ids, loaded.kv, 6, True, monkeypatch)
    slow = run(loaded.model, ids, loaded.kv, 6, False, monkeypatch)
    assert fast[0] == slow[0] and torch.equal(fast[1], slow[1])


# Qwen3-MoE and Mixtral: kernels.MoEDecodeLayer ----------------------------------------------------

def write_family(out, family: str, **overrides):
    """A tiny random bf16 checkpoint of `family` (qwen3_moe or mixtral) in its Hugging Face layout, experts
    fused (both families read that), the tiny factory's values (localrun.tiny._random_tensor)."""
    import json

    from safetensors.torch import save_file

    from localrun.models import family as family_module
    from localrun.tiny import _random_tensor

    config = dict(model_type=family, vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, eos_token_id=1, rope_theta=1e6, hidden_act="silu",
                  num_experts_per_tok=3)
    if family == "qwen3_moe":
        config |= dict(intermediate_size=96, num_experts=8, moe_intermediate_size=64, norm_topk_prob=False)
    else:
        config |= dict(intermediate_size=64, num_local_experts=8)
    config |= overrides
    module = family_module(family)
    args = module.args_from_dict(config)
    tensors = {}
    for key, shape in module.checkpoint_shapes(args).items():
        t = _random_tensor(key, shape, 0) * (8.0 if key == "embed_tokens.weight" else 1.0)  # no sqrt(H) scale
        tensors[key if key == "lm_head.weight" else "model." + key] = t.bfloat16()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    return out


FAMILY_VARIANTS = {
    # norm_topk_prob off, layer 1 a dense MLP (the module path), full caches
    "qwen": ("qwen3_moe", dict(mlp_only_layers=[1])),
    # renormalized top-k, q/k/v/o biases, YaRN (the attention scale times m^2), every layer sliding
    "qwen_bias_yarn_sliding": ("qwen3_moe", dict(
        norm_topk_prob=True, attention_bias=True, use_sliding_window=True, sliding_window=16,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "mixtral": ("mixtral", {}),  # no q/k norms: RoPE alone
    "mixtral_sliding": ("mixtral", dict(sliding_window=16)),
}


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory):
    built: dict = {}

    def get(variant: str):
        if variant not in built:
            family, overrides = FAMILY_VARIANTS[variant]
            built[variant] = write_family(tmp_path_factory.mktemp(variant), family, **overrides)
        return built[variant]

    return get


def moe_kernels(model):
    return [layer.decode_c for layer in model.layers if layer.moe]


@pytest.mark.parametrize("experts, fraction", [("bf16", 1.0), ("nf4", 1.0), ("nf4", 0.5), ("nf4", 0.0)])
@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_moe_families_bit_identical_to_module_path(lib, family_checkpoint, monkeypatch, variant, experts, fraction):
    loaded = load_model(family_checkpoint(variant), dtype=torch.float32, experts=experts, resident_fraction=fraction,
                        context=512)
    ids = bench_prompt(40, loaded.args.vocab_size)  # sliding variants: decode starts with the ring past its window
    cache = KVCache(loaded.args, dtype=torch.float32, capacity=512, rollback=4)  # rings of 20 slots: they wrap
    sampling = SamplingParams(temperature=0.8, seed=3)  # sampled: more varied routing than greedy
    fast = run(loaded.model, ids, cache, 30, True, monkeypatch, sampling)
    assert all(isinstance(k, kernels.MoEDecodeLayer) for k in moe_kernels(loaded.model))
    assert all(layer.decode_c is False for layer in loaded.model.layers if not layer.moe)
    # resident experts go inside the C call; an ExpertStore (some experts in host RAM) stays a Python call
    assert all((k.experts is not None) == (fraction == 1.0) for k in moe_kernels(loaded.model))
    slow = run(loaded.model, ids, cache, 30, False, monkeypatch, sampling)
    assert fast[0] == slow[0]
    assert torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("n_threads", [1, 2])
def test_moe_family_bit_identical_at_both_thread_counts(lib, family_checkpoint, monkeypatch, threads, n_threads):
    threads(n_threads)
    loaded = load_model(family_checkpoint("qwen_bias_yarn_sliding"), dtype=torch.float32, experts="bf16", context=256)
    ids = bench_prompt(30, loaded.args.vocab_size)
    cache = KVCache(loaded.args, dtype=torch.float32, capacity=256, rollback=4)
    fast = run(loaded.model, ids, cache, 40, True, monkeypatch)
    slow = run(loaded.model, ids, cache, 40, False, monkeypatch)
    assert fast[0] == slow[0] and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("variant", ["qwen", "qwen_bias_yarn_sliding", "mixtral_sliding"])
def test_moe_families_static_step_is_the_eager_one_bit_for_bit(lib, family_checkpoint, monkeypatch, variant):
    """The static step runs the module path at fixed shapes (masked slots weigh exactly 0); the eager step
    the C layer call: the same tokens and logits."""
    loaded = load_model(family_checkpoint(variant), dtype=torch.float32, experts="nf4", context=256)
    ids = bench_prompt(30, loaded.args.vocab_size)
    runs = [list(generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=24, cache=loaded.kv,
                          step=step)) for step in ("eager", "static")]
    assert all(k.experts is not None for k in moe_kernels(loaded.model))
    assert [s.token for s in runs[0]] == [s.token for s in runs[1]]
    assert torch.equal(torch.stack([s.logits for s in runs[0]]), torch.stack([s.logits for s in runs[1]]))


def test_moe_family_prefix_cache_rollback_bit_identical(lib, family_checkpoint, monkeypatch):
    """A conversation through the prefix cache (localrun/session.py) over rings of window 16 + rollback 12:
    turns re-rendered shorter roll the rings back, an undo beyond their reach starts over; the C layer
    call's logits are the module path's at every step."""
    from localrun.session import Session

    loaded = load_model(family_checkpoint("qwen_bias_yarn_sliding"), dtype=torch.float32, experts="nf4", context=512)
    args = loaded.args

    def conversation(decode_layer: bool):
        monkeypatch.setitem(gemma4.DECODE_KERNELS, "decode_layer", decode_layer)
        session = Session(KVCache(args, dtype=torch.float32, capacity=512, rollback=12))
        history, logits, reused = [2], [], []
        for turn in range(6):
            ids = history + [(37 * turn + 11 * j) % (args.vocab_size - 10) + 5 for j in range(9)]
            steps = list(generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=10, session=session))
            reply = [s.token for s in steps]
            logits += [s.logits for s in steps]
            reused.append(session.reused)
            history = ids + (reply[3:] if turn % 2 else reply)  # odd turns: the reply re-rendered shorter
        ids = history[:25] + [7, 8, 9]  # beyond the rollback the rings keep: prefilled from 0
        logits += [s.logits for s in generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=8,
                                               session=session)]
        return torch.stack(logits), reused

    fast, reused = conversation(True)
    assert all(isinstance(k, kernels.MoEDecodeLayer) and k.experts is not None for k in moe_kernels(loaded.model))
    assert all(r > 0 for r in reused[1:]), reused
    slow, _ = conversation(False)
    assert torch.equal(fast, slow)


def test_moe_family_router_hooks_keep_the_module_path(lib, family_checkpoint, monkeypatch):
    """profile.py counts experts with forward hooks on the routers: those must still fire."""
    loaded = load_model(family_checkpoint("qwen"), dtype=torch.float32, context=128)
    seen = []
    layer = next(layer for layer in loaded.model.layers if layer.moe)
    handle = layer.router.register_forward_hook(lambda m, args, out: seen.append(out[0].shape))
    try:
        run(loaded.model, bench_prompt(12, loaded.args.vocab_size), loaded.kv, 5, True, monkeypatch)
    finally:
        handle.remove()
    assert len(seen) == 1 + 4  # the prefill, then each decoded token that was fed back


def test_moe_family_set_experts_rebuilds_the_layer_call(lib, family_checkpoint, monkeypatch):
    loaded = load_model(family_checkpoint("mixtral"), dtype=torch.float32, context=128)
    ids = bench_prompt(12, loaded.args.vocab_size)
    before = run(loaded.model, ids, loaded.kv, 6, True, monkeypatch)
    layer = loaded.model.layers[0]
    assert isinstance(layer.decode_c, kernels.MoEDecodeLayer)
    layer.set_experts(layer.experts)
    assert layer.decode_c is None
    after = run(loaded.model, ids, loaded.kv, 6, True, monkeypatch)
    assert after[0] == before[0] and torch.equal(after[1], before[1])


@pytest.mark.parametrize("norm", [True, False])
def test_route_top_k_matches_torch(lib, norm):
    logits = torch.randn(5, 32) * 3
    ids, w = kernels.route_top_k(logits, 8, norm)
    p = torch.softmax(logits, dim=-1)
    ref_w, ref_ids = torch.topk(p, 8, dim=-1)
    if norm:
        ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=2e-6, atol=1e-7)  # libm's expf vs torch's exp: the last bits
    assert kernels.route_top_k(logits.double(), 8, norm) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_routers_keep_ids_in_range_on_a_nan_row(lib, bad):
    """A NaN or +inf logit makes softmax NaN: the C routers still return ids in [0, E) (they returned
    -1 and wrote before their scratch, which corrupted the heap) and NaN weights, as torch does."""
    E, K = 8, 3
    logits = torch.randn(2, E)
    logits[0, 5] = bad
    for ids, w in (kernels.route_top_k(logits, K, True), kernels.route_top_k(logits, K, False),
                   kernels.route(logits, torch.ones(E), K)):
        assert ((ids >= 0) & (ids < E)).all(), ids
        assert ids[0].unique().numel() == K
        assert torch.isnan(w[0]).all() and torch.isfinite(w[1]).all()
    ref_w, ref_ids = torch.topk(torch.softmax(logits[1:], dim=-1), K, dim=-1)
    ids, w = kernels.route_top_k(logits, K, False)
    assert torch.equal(ids[1:], ref_ids)  # the finite row is untouched


def test_moe_layer_not_built_for_fp32_matrices(lib):
    H, N, KV, D, E = 64, 4, 2, 16, 8
    bf = lambda *s: torch.randn(*s).bfloat16()  # noqa: E731
    vectors = {"w_in": torch.ones(H), "w_post": torch.ones(H), "w_qn": torch.ones(D), "w_kn": torch.ones(D)}
    common = dict(heads=N, kv_heads=KV, head_dim=D, eps=1e-6, scale=D**-0.5, top_k=2, norm_topk=True, act="silu",
                  qkv_bias=None, o=bf(H, N * D), o_bias=None, router=bf(E, H))
    qkv = bf((N + 2 * KV) * D, H)
    assert isinstance(kernels.MoEDecodeLayer.build(vectors=vectors, qkv=qkv, **common), kernels.MoEDecodeLayer)
    no_norms = vectors | {"w_qn": None, "w_kn": None}
    assert isinstance(kernels.MoEDecodeLayer.build(vectors=no_norms, qkv=qkv, **common), kernels.MoEDecodeLayer)
    assert kernels.MoEDecodeLayer.build(vectors=vectors | {"w_kn": None}, qkv=qkv, **common) is None
    assert kernels.MoEDecodeLayer.build(vectors=vectors, qkv=qkv.float(), **common) is None
    assert kernels.MoEDecodeLayer.build(vectors=vectors, qkv=bf((N + KV) * D, H), **common) is None  # no K = V here
    assert kernels.MoEDecodeLayer.build(vectors=vectors, qkv=qkv, **common | {"act": "relu"}) is None
    assert kernels.MoEDecodeLayer.build(vectors=vectors, qkv=qkv, **common | {"qkv_bias": torch.ones(3)}) is None
    for name, short in (("w_in", H - 1), ("w_post", H // 2), ("w_qn", D - 2), ("w_kn", 1)):  # the C code would read past them
        assert kernels.MoEDecodeLayer.build(vectors=vectors | {name: torch.ones(short)}, qkv=qkv, **common) is None
