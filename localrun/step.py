"""Decode steps: how one token goes through the model after the prompt.

`EagerStep` is the host-driven path: the host knows every position, caches return exactly the
keys written so far, and every kernel launches from Python. `StaticStep` runs the same model at
fixed shapes: the token and its position are device tensors, every layer writes its K/V at that
device position (FullKV / RingKV `.write`) and attends over a fixed `span` of slots with a
visibility mask, so no Python decision reads a device value. Its `forward(span)` is what
`torch.compile(fullgraph=True)` traces (a proof that nothing in it syncs with the host) and what
`CudaGraphStep` captures once per span bucket and then replays per token. Where the experts need
the host (offloaded: their ids decide the copies), `SegmentedGraphStep` captures what lies between two
layers' experts instead, and runs the experts between the replays.

Spans are buckets (powers of two from MIN_SPAN up to the cache's capacity): a token at position p
uses the smallest bucket above p, so a short chat reads 256 full-layer slots, not the whole planned
context (and no more than 256 slots of a sliding layer's ring: RingKV.write), and there are at most
log2(context) graphs. Masked slots weigh exactly zero, and on the CPU in fp32 the step runs the
kernels the eager path runs (the C decode attention, RoPE rows from the C kernel for its one
position), so its tokens and logprobs are the eager path's bit for bit (tests/test_step.py).
"""

from __future__ import annotations

import os

import torch

from .kvcache import KVCache

MIN_SPAN = 256


def span_for(position: int, capacity: int) -> int:
    """The full-layer key span a token at `position` attends over: a power of two > position."""
    span = MIN_SPAN
    while span <= position:
        span *= 2
    return min(span, capacity)


class EagerStep:
    """One token at a host-known position through the host-driven caches."""

    graphs = False

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache

    def __call__(self, token_11: torch.Tensor, position: int) -> torch.Tensor:
        """fp32 logits [V] of the token (a [1, 1] id tensor on the device) at `position` (= cache.offset)."""
        return self.model.logits(self.model.hidden(token_11, self.cache))[0, -1].float()


class StaticStep:
    """One token at fixed shapes (see the module docstring). Its inputs live in `self.token` [1, 1]
    and `self.pos` [1]; `forward(span)` reads only those and the cache's buffers."""

    graphs = False

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        device = model.embed_tokens.weight.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    def forward(self, span: int) -> torch.Tensor:
        """fp32 logits [V] of `self.token` at `self.pos`, attending over `span` full-layer slots."""
        self.cache.span = span
        try:
            h = self.model.hidden(self.token, self.cache, pos_T=self.pos)
        finally:
            self.cache.span = None
        return self.model.logits(h)[0, -1].float()

    def _load(self, token_11: torch.Tensor, position: int) -> int:
        if position >= self.cache.capacity:
            raise ValueError(f"position {position} is past the KV cache's {self.cache.capacity}")
        self.token.copy_(token_11.view(1, 1))
        self.pos.fill_(position)  # a host scalar into a device tensor: a kernel argument, no sync
        return span_for(position, self.cache.capacity)

    def __call__(self, token_11: torch.Tensor, position: int) -> torch.Tensor:
        span = self._load(token_11, position)
        logits = self.forward(span)
        self.cache.advance(position + 1)
        return logits


class CudaGraphStep(StaticStep):
    """StaticStep captured as one CUDA graph per span bucket, replayed per token.

    Capture needs every op in the step to be capturable: no host syncs (the MoE layers must route on
    the device), no allocations that outlive the step. A capture that fails leaves the step eager
    (`disabled` says why) rather than failing the generation.
    """

    graphs = True
    lends_side_stream = True  # a layer may run work beside its main chain (models/gemma4.DECODE_KERNELS["parallel_mlp"])

    def __init__(self, model, cache: KVCache):
        super().__init__(model, cache)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.disabled: str | None = None
        self._side = torch.cuda.Stream(self.token.device) if self.lends_side_stream else None

    def forward(self, span: int) -> torch.Tensor:
        """StaticStep.forward with the cache's side stream lent: a layer that forks onto it joins back
        within the layer, so the whole step (warm-up, capture, an uncaptured fallback) stays one graph."""
        self.cache.side_stream = self._side
        try:
            return super().forward(span)
        finally:
            self.cache.side_stream = None

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        _warm_up(self.forward, span)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.forward(span)
        return graph, out

    def __call__(self, token_11: torch.Tensor, position: int) -> torch.Tensor:
        span = self._load(token_11, position)
        _capture_once(self, span)
        if self.disabled is not None:
            logits = self.forward(span)
        else:
            graph, out = self._graphs[span]
            graph.replay()
            logits = out.clone()  # the next replay overwrites `out`; a Step may still read these logits
        self.cache.advance(position + 1)
        return logits


class SegmentedGraphStep(StaticStep):
    """StaticStep for a model whose experts tell the host their ids (offloaded experts: the host copies
    the missing ones), cut at each MoE layer's routed experts (`model.decode_segments`): what lies
    between two layers' experts (the back of one layer, the front of the next: attention, glue, router,
    dense MLP) is one CUDA graph per span bucket, the experts run eagerly between replays and write
    their output into the buffer the next graph reads. One host sync per MoE layer (the routing ids)
    remains; about twenty launches per layer become one replay. On the CPU (no CUDA graphs) the same
    segments run in order as they come, which is what the tests check against the eager step.

    Graphs of one span share a memory pool and replay in capture order, so a tensor one segment
    leaves for a later one (the front a back needs, masks, RoPE) stays where the later graph reads it.
    A capture that fails leaves the step uncaptured (`disabled` says why), like CudaGraphStep."""

    graphs = True

    def __init__(self, model, cache: KVCache):
        super().__init__(model, cache)
        self.capture = self.token.device.type == "cuda"
        self._graphs: dict[int, list[tuple]] = {}  # span -> [(graph, experts, their call, output buffer, logits)]
        self._segments: dict = {}  # span -> the captured DecodeSegments: its tensors stay where the graphs read them
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.disabled: str | None = None

    def forward(self, span: int) -> torch.Tensor:
        self.cache.span = span
        try:
            segments = self.model.decode_segments(self.token, self.cache, self.pos)
            out = segments.first()
            while isinstance(out, tuple):
                out = segments.next(segments.layer_at().experts(*out))
        finally:
            self.cache.span = None
        return self.model.logits(out)[0, -1].float()

    def _capture(self, span: int) -> list[tuple]:
        _warm_up(self.forward, span)
        pieces, moe_TH = [], None
        self.cache.span = span
        try:
            segments = self.model.decode_segments(self.token, self.cache, self.pos)
            while True:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = segments.first() if not pieces else segments.next(moe_TH)
                    logits = None if isinstance(out, tuple) else self.model.logits(out)[0, -1].float()
                if logits is not None:
                    pieces.append((graph, None, None, None, logits))
                    self._segments[span] = segments
                    return pieces
                moe_TH = torch.empty_like(out[0])  # outside the pool: the experts' output is copied in
                pieces.append((graph, segments.layer_at().experts, out, moe_TH, None))
        finally:
            self.cache.span = None

    def __call__(self, token_11: torch.Tensor, position: int) -> torch.Tensor:
        span = self._load(token_11, position)
        if self.capture:
            _capture_once(self, span)
        if not self.capture or self.disabled is not None:
            logits = self.forward(span)
        else:
            for graph, experts, call, moe_TH, last in self._graphs[span]:
                graph.replay()
                if experts is not None:
                    moe_TH.copy_(experts(*call))
            logits = last.clone()  # the next replay overwrites it
        self.cache.advance(position + 1)
        return logits


def _warm_up(forward, span: int) -> None:
    """forward(span) twice on a side stream before a capture: lazy inits, autotuning, workspaces.

    Then the blocks torch's allocator cached for that stream go back to the device: no other stream
    and no graph pool may reuse them, the first call of a shape times its MoE kernels with Triton's
    256 MiB cache-flush buffer, and on a full 16 GiB card a capture whose pool cannot be allocated
    disables the graphs (`_capture_once`)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward(span)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _capture_once(step, span: int) -> None:
    """step._graphs[span] = step._capture(span) unless captured or the step is disabled. A capture
    that fails disables the step's graphs (it runs uncaptured from then on) rather than the generation."""
    if step.disabled is None and span not in step._graphs:
        from .kernels import triton_pdl  # CUDA only: torch's CUDA builds ship triton

        try:
            with triton_pdl.in_graphs():  # warm-up and capture launch alike (the same compiled kernels)
                step._graphs[span] = step._capture(span)
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured still runs
            step.disabled = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            torch.cuda.synchronize()


class CompiledGraphStep(CudaGraphStep):
    """CudaGraphStep whose forward is first compiled by torch.compile (inductor fuses the step's many
    small elementwise kernels, which bound decode today), then captured per span bucket as usual.
    Opt-in (`LOCALRUN_DECODE_STEP=compiled`): compiling 30 layers costs tens of seconds per model load,
    and whether it pays is for scripts/gpu_check.py to measure. One compiled function serves every span
    (the span is an int argument: after the first recompile torch.compile treats it as dynamic)."""

    lends_side_stream = False  # a traced stream switch is not what this step measures

    def __init__(self, model, cache: KVCache):
        super().__init__(model, cache)
        self.forward = torch.compile(self.forward, fullgraph=True)


STEPS = {"eager": EagerStep, "static": StaticStep, "graphs": CudaGraphStep, "compiled": CompiledGraphStep,
         "segments": SegmentedGraphStep}


def make_step(model, cache: KVCache, mode: str = "auto"):
    """The decode step for `mode` (see `resolve_mode`). Kept in `cache.steps`, so a model load captures
    each span's graph (and compiles) once, not once a reply: the graphs read the cache's buffers,
    which live as long as the cache."""
    mode = resolve_mode(model, mode)
    step = cache.steps.get(mode)
    if step is None or step.model is not model:  # one per cache: its graphs stay valid with its buffers
        step = cache.steps[mode] = STEPS[mode](model, cache)
    return step


def resolve_mode(model, mode: str = "auto") -> str:
    """The step `mode` runs as: "eager", "static", "graphs", "compiled" or "segments". "auto": on CUDA,
    graphs when every routed expert is computed on the device without host syncs, else segments where
    the model can cut its step at the experts, else eager; eager on the CPU (the variable
    LOCALRUN_DECODE_STEP overrides what auto picks). "graphs" for a model whose experts need the host
    (offloaded) means "segments": graphs between the layers' experts (every family; Gemma 4 on an H200
    under a 16 GiB budget: 103.5 tok/s against eager's 19.7, docs/gpu/2026-11-27-h200-kernels-offload.md;
    the same tokens, docs/gpu/2026-11-27-h200-16gib.md).
    Raises ValueError for a mode this model or device cannot run."""
    if mode not in ("auto", *STEPS):
        raise ValueError(f"decode step must be auto, {', '.join(STEPS)}, not {mode!r}")
    cuda = model.embed_tokens.weight.device.type == "cuda"
    if mode == "auto":
        mode = os.environ.get("LOCALRUN_DECODE_STEP") or ("graphs" if cuda and (
            graph_safe(model) or hasattr(model, "decode_segments")) else "eager")
        if mode not in STEPS:
            raise ValueError(f"LOCALRUN_DECODE_STEP must be one of {', '.join(STEPS)}, not {mode!r}")
    if mode in ("graphs", "compiled") and not cuda:
        raise ValueError("CUDA graphs need a CUDA device")
    if mode == "graphs" and not graph_safe(model) and hasattr(model, "decode_segments"):
        mode = "segments"
    if mode == "segments" and not hasattr(model, "decode_segments"):
        raise ValueError(f"the segmented decode step needs a model that can cut its step at the experts "
                         f"(decode_segments), not {type(model).__name__}")
    return mode


def graph_safe(model) -> bool:
    """Whether every MoE layer's expert backend routes on the device (declares `graph_safe`)."""
    return all(getattr(layer.experts, "graph_safe", False) for layer in model.layers if layer.moe)
