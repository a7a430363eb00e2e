"""The static decode step (localrun/step.py): the same tokens as the eager path at every placement,
spans that never outgrow the cache, and a step torch.compile traces whole (nothing in it syncs)."""

from __future__ import annotations

import pytest
import torch

from localrun.bench import bench_prompt
from localrun.generate import generate
from localrun.loader import load_model
from localrun.sampling import SamplingParams, make_sampler
from localrun.step import MIN_SPAN, StaticStep, span_for
from quant.ffn import BufferedExperts
from quant.layer import ExpertBuffer

torch.set_num_threads(1)
GEN = 20


def greedy(model, ids, step, cache=None, n=GEN):
    steps = list(generate(model, ids, make_sampler(SamplingParams()), max_tokens=n, step=step, cache=cache))
    return [s.token for s in steps], [s.logprob for s in steps]


def test_span_buckets():
    assert span_for(0, 8192) == MIN_SPAN and span_for(MIN_SPAN - 1, 8192) == MIN_SPAN
    assert span_for(MIN_SPAN, 8192) == 2 * MIN_SPAN
    assert span_for(5000, 8192) == 8192 and span_for(100, 200) == 200  # never past the cache
    for p in range(0, 3000, 7):
        s = span_for(p, 4096)
        assert p < s <= 4096 and (s == 4096 or s & (s - 1) == 0)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_static_step_matches_eager_at_every_placement(tiny_moe, fraction):
    loaded = load_model(tiny_moe, dtype=torch.float32, resident_fraction=fraction, context=600)
    ids = bench_prompt(30, loaded.args.vocab_size)
    eager_tokens, eager_lp = greedy(loaded.model, ids, "eager", loaded.kv)
    static_tokens, static_lp = greedy(loaded.model, ids, "static", loaded.kv)
    assert static_tokens == eager_tokens
    assert static_lp == eager_lp  # bit for bit: the same kernels, RoPE rows included (masked keys add exact zeros)


def test_static_step_crosses_span_buckets_and_the_window(tiny_moe):
    """A decode that runs from span 256 into 512 and wraps the sliding ring many times."""
    loaded = load_model(tiny_moe, dtype=torch.float32, context=1024)
    ids = bench_prompt(MIN_SPAN - 8, loaded.args.vocab_size)
    eager = greedy(loaded.model, ids, "eager", loaded.kv, n=24)
    static = greedy(loaded.model, ids, "static", loaded.kv, n=24)
    assert static == eager


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_bench_model_static_step_matches_eager(tmp_path_factory, fraction):
    from localrun.bench import bench_model_dir

    root = tmp_path_factory.getbasetemp() / "bench-model"  # written once for the three placements
    loaded = load_model(bench_model_dir(root), dtype=torch.float32, resident_fraction=fraction, context=512)
    ids = bench_prompt(40, loaded.args.vocab_size)
    eager = greedy(loaded.model, ids, "eager", loaded.kv, n=12)
    static = greedy(loaded.model, ids, "static", loaded.kv, n=12)
    assert static == eager  # tokens and logprobs, bit for bit


def test_a_reply_that_reaches_the_context_stops_with_length(tiny_moe):
    loaded = load_model(tiny_moe, dtype=torch.float32, context=40)
    ids = bench_prompt(30, loaded.args.vocab_size)
    before = loaded.kv.nbytes
    steps = list(generate(loaded.model, ids, make_sampler(SamplingParams()), max_tokens=100, cache=loaded.kv))
    assert len(steps) == 10 and steps[-1].finish_reason == "length"
    assert loaded.kv.nbytes == before


def buffered(loaded):
    """The loaded CPU model with every MoE layer on BufferedExperts (the op the CUDA path uses)."""
    for layer in loaded.model.layers:
        if layer.moe:
            layer.set_experts(BufferedExperts(ExpertBuffer.from_experts(layer.experts.experts), layer.experts.act_name))
    return loaded


@pytest.mark.parametrize("experts", ["nf4", "bf16", "nf4 buffered"])
def test_static_step_compiles_as_one_graph(tiny_moe, experts):
    """torch.compile(fullgraph=True) of the step, with the experts the CPU loader builds (4-bit: one op
    whose CPU kernel is the C one; bf16: one op over the fused weights) and with the CUDA path's:
    any host sync, data-dependent branch or opaque call inside it would break the graph and fail here."""
    loaded = load_model(tiny_moe, dtype=torch.float32, context=300, experts=experts.split()[0])
    if experts.endswith("buffered"):
        loaded = buffered(loaded)
    model, cache = loaded.model, loaded.kv
    ids = bench_prompt(20, loaded.args.vocab_size)
    reference, _ = greedy(model, ids, "eager", cache, n=8)

    step = StaticStep(model, cache)
    compiled = torch.compile(step.forward, fullgraph=True, backend="eager", dynamic=False)
    sampler = make_sampler(SamplingParams())
    with torch.inference_mode():
        cache.reset()
        from localrun.generate import prefill

        logits = prefill(model, ids, cache)
        tokens = []
        for n in range(8):
            token = int(sampler.token(logits, torch.tensor(ids)))
            tokens.append(token)
            position = len(ids) + n
            step.token.fill_(token)
            step.pos.fill_(position)
            logits = compiled(span_for(position, cache.capacity))
            cache.advance(position + 1)
    assert tokens == reference


def test_auto_takes_graphs_where_experts_route_on_the_device_else_segments_else_eager(monkeypatch):
    """On CUDA: graphs when every MoE layer routes on the device, segments for an offloaded model that
    can cut its step at the experts (Gemma 4), eager for one that cannot; on the CPU eager."""
    from types import SimpleNamespace

    from localrun.step import resolve_mode

    monkeypatch.delenv("LOCALRUN_DECODE_STEP", raising=False)

    def model(device: str, safe: bool, cuts: bool):
        experts = SimpleNamespace(graph_safe=safe)
        m = SimpleNamespace(embed_tokens=SimpleNamespace(weight=SimpleNamespace(device=torch.device(device))),
                            layers=[SimpleNamespace(moe=True, experts=experts)])
        if cuts:
            m.decode_segments = lambda *a: None
        return m

    assert resolve_mode(model("cuda", True, True)) == "graphs"
    assert resolve_mode(model("cuda", False, True)) == "segments"
    assert resolve_mode(model("cuda", False, True), "graphs") == "segments"
    assert resolve_mode(model("cuda", False, False)) == "eager"
    assert resolve_mode(model("cpu", True, True)) == "eager"
    with pytest.raises(ValueError, match="segmented decode step needs"):
        resolve_mode(model("cuda", False, False), "segments")
    monkeypatch.setenv("LOCALRUN_DECODE_STEP", "eager")
    assert resolve_mode(model("cuda", True, True)) == "eager"


def test_make_step_modes(tiny_moe, monkeypatch):
    from localrun.step import EagerStep, make_step

    loaded = load_model(tiny_moe, dtype=torch.float32, context=64)
    assert isinstance(make_step(loaded.model, loaded.kv, "auto"), EagerStep)  # CPU: eager
    monkeypatch.setenv("LOCALRUN_DECODE_STEP", "static")
    assert isinstance(make_step(loaded.model, loaded.kv, "auto"), StaticStep)
    for mode in ("graphs", "compiled"):
        with pytest.raises(ValueError, match="CUDA"):
            make_step(loaded.model, loaded.kv, mode)
    monkeypatch.setenv("LOCALRUN_DECODE_STEP", "fast")
    with pytest.raises(ValueError, match="LOCALRUN_DECODE_STEP"):
        make_step(loaded.model, loaded.kv, "auto")
    with pytest.raises(ValueError, match="decode step must be"):
        make_step(loaded.model, loaded.kv, "warp")


def test_steps_are_kept_with_their_cache(tiny_moe):
    """A cache's step is made once per mode (a graphs step captures once a model load, not once a
    reply), and a reused step still gives the tokens of a fresh one."""
    from localrun.kvcache import KVCache
    from localrun.step import make_step

    loaded = load_model(tiny_moe, dtype=torch.float32, context=64)
    static = make_step(loaded.model, loaded.kv, "static")
    assert make_step(loaded.model, loaded.kv, "static") is static
    assert make_step(loaded.model, loaded.kv, "eager") is not static
    other = KVCache(loaded.model.args, capacity=64)
    assert make_step(loaded.model, other, "static") is not static
    runs = [greedy(loaded.model, [2, 10, 11], "static", loaded.kv)[0] for _ in range(2)]
    assert runs[0] == runs[1] == greedy(loaded.model, [2, 10, 11], "eager", loaded.kv)[0]


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_segmented_step_matches_eager_at_every_placement(tiny_moe, fraction):
    """The step cut at each MoE layer's experts (what SegmentedGraphStep captures between them on
    CUDA) gives the eager tokens; on the CPU its segments run in order without capture."""
    from localrun.step import SegmentedGraphStep, make_step

    loaded = load_model(tiny_moe, dtype=torch.float32, resident_fraction=fraction, context=600)
    assert isinstance(make_step(loaded.model, loaded.kv, "segments"), SegmentedGraphStep)
    ids = bench_prompt(30, loaded.args.vocab_size)
    eager_tokens, eager_lp = greedy(loaded.model, ids, "eager", loaded.kv)
    tokens, lp = greedy(loaded.model, ids, "segments", loaded.kv)
    assert tokens == eager_tokens
    assert lp == eager_lp


def test_dense_model_steps_match_eager(tiny_checkpoint):
    """A Gemma 4 without routed experts (E2B: per-layer inputs, KV sharing): static and segments (one
    segment, no experts to cut at) give the eager tokens and logprobs."""
    loaded = load_model(tiny_checkpoint("dense_e2b"), dtype=torch.float32, context=64)
    ids = bench_prompt(20, loaded.args.vocab_size)
    eager = greedy(loaded.model, ids, "eager", loaded.kv, n=8)
    assert greedy(loaded.model, ids, "static", loaded.kv, n=8) == eager
    assert greedy(loaded.model, ids, "segments", loaded.kv, n=8) == eager


def test_decode_segments_end_at_each_moe_layers_experts(tiny_moe):
    """first() and next() stop at every MoE layer's experts in layer order, each asking for that
    layer's experts on its own router's ids, and end with the final hidden state: one segment
    more than MoE layers. The experts' output goes in by next(), nowhere else."""
    loaded = load_model(tiny_moe, dtype=torch.float32, resident_fraction=0.5, context=64)
    model, cache = loaded.model, loaded.kv
    step = StaticStep(model, cache)
    step.token.fill_(7)
    cache.span = 64
    try:
        segments = model.decode_segments(step.token, cache, step.pos)
        out, asked = segments.first(), []
        while isinstance(out, tuple):
            x_TH, ids_TK, w_TK = out
            asked.append(list(model.layers).index(segments.layer_at()))
            assert x_TH.shape == (1, model.args.hidden_size) and ids_TK.shape == w_TK.shape
            out = segments.next(torch.zeros_like(x_TH))  # experts that add nothing
        moe_layers = [i for i, layer in enumerate(model.layers) if layer.moe]
        assert asked == moe_layers and out.shape == (1, 1, model.args.hidden_size)
    finally:
        cache.span = None



def test_dense_mlp_and_router_as_one_gemm_of_two_rows(tiny_moe, monkeypatch):
    """Where the glue op hands out x_mlp and x_router as two rows of one tensor (CUDA's kernel, or the
    op's formula where the C call steps aside, as here), a decoded token's dense gate/up and router
    projections are one GEMM over the layer's stacked rows (gate, up, router: one storage from the
    loader): the same tokens as each projection on its own, logprobs within fp32 rounding."""
    from localrun import kernels

    loaded = load_model(tiny_moe, dtype=torch.float32, context=600)
    model = loaded.model
    for layer in model.layers:
        gate, router = layer.mlp.gate_proj.weight, layer.router.proj.weight
        assert layer.stacked.data_ptr() == gate.data_ptr()  # placed as one by the loader: no copy
        assert router.data_ptr() == gate.data_ptr() + 2 * gate.numel() * gate.element_size()
    ids = bench_prompt(30, loaded.args.vocab_size)
    apart_tokens, apart_lp = greedy(model, ids, "static", loaded.kv)
    monkeypatch.setattr(kernels, "attention_residual_norms", lambda *a: None)  # the op: rows of one tensor
    calls = []
    real = type(model.layers[0])._mlp_and_router

    def counted(layer, rows):
        out = real(layer, rows)
        calls.append(out[0] is not None)
        return out

    monkeypatch.setattr(type(model.layers[0]), "_mlp_and_router", counted)
    tokens, lp = greedy(model, ids, "static", loaded.kv)
    assert tokens == apart_tokens and max(abs(a - b) for a, b in zip(lp, apart_lp)) < 1e-5
    assert calls.count(True) == (GEN - 1) * len(model.layers)  # every decoded token, no prompt pass
    from localrun.models import gemma4

    monkeypatch.setitem(gemma4.DECODE_KERNELS, "mlp_router_gemm", False)  # scripts/gpu_check.py's switch
    calls.clear()
    assert greedy(model, ids, "static", loaded.kv)[0] == apart_tokens and calls and not any(calls)


@pytest.mark.parametrize("gated_gemv", [False, True])
def test_gated_route_in_one_launch_where_cuda_would(tiny_moe, monkeypatch, gated_gemv):
    """Where the two-row GEMM runs and the CUDA-only glue applies, its two small consumers (the dense
    MLP's act(gate) * up and the router's top-k) are one localrun::gated_route call a layer; with
    `gated_gemv` the GEMM and both consumers are one localrun::gated_gemv_route call instead (no GEMM, no
    gated_route). A hooked router still sees (ids, weights), and the tokens are the step's without any of it."""
    from localrun import kernels
    from localrun.kernels import fused as fused_ops
    from localrun.models import gemma4

    loaded = load_model(tiny_moe, dtype=torch.float32, context=600)
    model = loaded.model
    ids = bench_prompt(30, loaded.args.vocab_size)
    plain_tokens, plain_lp = greedy(model, ids, "static", loaded.kv)
    monkeypatch.setattr(kernels, "attention_residual_norms", lambda *a: None)  # the op: rows of one tensor
    monkeypatch.setattr(gemma4, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "gated_gemv", gated_gemv)
    calls, seen = [], []
    ops = ("gated_gemv_route_op", "gated_route_op")
    for name in ops:
        real = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    gemm = type(model.layers[0])._mlp_and_router

    def counted(layer, rows):  # the two-row GEMM, where it ran
        out = gemm(layer, rows)
        if out[0] is not None:
            calls.append("gemm")
        return out

    monkeypatch.setattr(type(model.layers[0]), "_mlp_and_router", counted)
    model.layers[0].router.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    tokens, lp = greedy(model, ids, "static", loaded.kv)
    assert tokens == plain_tokens and max(abs(a - b) for a, b in zip(lp, plain_lp)) < 1e-4
    a_layer = [ops[0]] if gated_gemv else ["gemm", ops[1]]  # decoded tokens only: a prompt projects apart
    assert calls == a_layer * ((GEN - 1) * len(model.layers))
    assert len(seen) == GEN and all(shape[-1] == loaded.args.top_k_experts for shape in seen)


class _Streams:
    """Stand-ins for torch.cuda's stream calls on the CPU: which stream is current, and every wait."""

    def __init__(self):
        self.current, self.log = "main", []

    def stream_named(self, name):
        streams = self

        class Stream:
            def __init__(self):
                self.name = name

            def wait_stream(self, other):
                streams.log.append((self.name, "waits for", other.name))

        return Stream()

    def current_stream(self, device=None):
        return self.stream_named(self.current)

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def on():
            before, self.current = self.current, s.name
            try:
                yield
            finally:
                self.current = before

        return on()


def test_parallel_mlp_forks_the_dense_mlp_and_joins_it_before_the_residual(tiny_moe, monkeypatch):
    """DECODE_KERNELS["parallel_mlp"]: with a side stream lent (the CUDA graphs step lends one), a
    decoded token's dense MLP runs on it once it waits for the norms, the router projects on its own
    on the main stream, and the main stream waits for the side before the FFN's residual glue; each
    layer forks once and joins once, and the tokens are those of the step with the router's rows off
    the MLP's GEMM (the same arithmetic). Here on the CPU with torch.cuda's stream calls stood in for."""
    from localrun.models import gemma4

    loaded = load_model(tiny_moe, dtype=torch.float32, context=600)
    model, layers = loaded.model, len(loaded.model.layers)
    ids = bench_prompt(30, loaded.args.vocab_size)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "mlp_router_gemm", False)
    apart_tokens, apart_lp = greedy(model, ids, "static", loaded.kv)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "mlp_router_gemm", True)
    streams = _Streams()
    monkeypatch.setattr(torch.cuda, "current_stream", streams.current_stream)
    monkeypatch.setattr(torch.cuda, "stream", streams.stream)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "parallel_mlp", True)
    monkeypatch.setattr(gemma4, "parallel_mlp", lambda x: x.shape[:-1].numel() == 1)  # CUDA's test, on the CPU
    mlp_on, glue_after = [], []
    real_mlp, real_glue = gemma4.MLP.forward, gemma4.fused_ops.ffn_residual
    monkeypatch.setattr(gemma4.MLP, "forward", lambda self, *a, **k: mlp_on.append(streams.current) or real_mlp(self, *a, **k))
    monkeypatch.setattr(gemma4.fused_ops, "ffn_residual",
                        lambda *a: glue_after.append(streams.log[-1] if streams.log else None) or real_glue(*a))
    loaded.kv.side_stream = streams.stream_named("side")
    try:
        tokens, lp = greedy(model, ids, "static", loaded.kv)
    finally:
        loaded.kv.side_stream = None
    decoded = (GEN - 1) * layers
    assert streams.log == [("side", "waits for", "main"), ("main", "waits for", "side")] * decoded
    assert mlp_on.count("side") == decoded and set(mlp_on) == {"main", "side"}  # the prompt's pass stays on main
    assert glue_after.count(("main", "waits for", "side")) == decoded  # joined before each decoded token's glue
    assert tokens == apart_tokens and lp == apart_lp


def test_norms_route_takes_the_router_into_the_norms_launch(tiny_moe, monkeypatch):
    """DECODE_KERNELS["norms_route"] with the dense MLP beside: a decoded token's norms, router GEMV and
    top-k are one localrun::norms_route call a layer (here its formula, on the CPU, where CUDA runs one
    launch), a hooked router still sees (ids, weights), the MLP still forks and joins, and the tokens
    are those of the parallel step without it (logprobs within fp32 rounding: another sum order)."""
    from localrun.kernels import fused as fused_ops
    from localrun.models import gemma4

    loaded = load_model(tiny_moe, dtype=torch.float32, context=600)
    model, layers = loaded.model, len(loaded.model.layers)
    ids = bench_prompt(30, loaded.args.vocab_size)
    streams = _Streams()
    monkeypatch.setattr(torch.cuda, "current_stream", streams.current_stream)
    monkeypatch.setattr(torch.cuda, "stream", streams.stream)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "parallel_mlp", True)
    monkeypatch.setattr(gemma4, "parallel_mlp", lambda x: x.shape[:-1].numel() == 1)
    loaded.kv.side_stream = streams.stream_named("side")
    try:
        apart_tokens, apart_lp = greedy(model, ids, "static", loaded.kv)
        monkeypatch.setitem(gemma4.DECODE_KERNELS, "norms_route", True)
        monkeypatch.setattr(gemma4, "fused_on_cuda", lambda x: gemma4.use_kernel("fused_glue", x))
        calls, seen = [], []
        real = fused_ops.norms_route_op
        monkeypatch.setattr(fused_ops, "norms_route_op", lambda *a: calls.append(1) or real(*a))
        model.layers[0].router.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
        streams.log.clear()
        tokens, lp = greedy(model, ids, "static", loaded.kv)
    finally:
        loaded.kv.side_stream = None
    decoded = (GEN - 1) * layers
    assert len(calls) == decoded and len(seen) == GEN
    assert streams.log == [("side", "waits for", "main"), ("main", "waits for", "side")] * decoded
    assert tokens == apart_tokens and max(abs(a - b) for a, b in zip(lp, apart_lp)) < 1e-4
