"""Routing profiles: which experts each layer's router picks on real prompts.

`localrun profile` runs prompts greedily and counts, per (layer, expert), how many tokens the
router sent there; the plan keeps the most-routed experts resident (see `plan.rank_experts`).
The counts come from forward hooks on each MoE layer's `router` module, so the model code
knows nothing about profiling. Every token the router sees is counted, prompt and generated.

Shape letters: T tokens, K top-k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_text_atomic
from .errors import LocalrunError, UsageError
from .resolve import ROUTING_PROFILE
from .sampling import SamplingParams

FORMAT = "localrun.routing_profile"
VERSION = 1

Trace = list[list[list[int]]]  # [token][moe layer] -> expert ids, what scripts/bench_cache.py replays


@dataclass
class RoutingProfile:
    """Per-layer expert counts over `tokens` routed tokens, and optionally the per-token trace."""

    num_experts: int
    counts: dict[int, list[int]]  # layer -> [count per expert]
    tokens: int = 0
    trace: Trace | None = None

    def to_json(self) -> dict:
        """The routing_profile.json document (`loader.read_routing_profile` reads its "layers")."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "tokens": self.tokens,
            "num_experts": self.num_experts,
            "layers": {str(layer): list(c) for layer, c in sorted(self.counts.items())},
        }


class RoutingRecorder:
    """Counts the router's choices of every MoE layer of `model` while in a `with` block.

    trace=True also keeps, per token, the expert ids of every MoE layer (layers in model order);
    the trace lists tokens in the order the model saw them (a prefill chunk's tokens in order).
    """

    def __init__(self, model, trace: bool = False) -> None:
        self.layers = [i for i, layer in enumerate(model.layers) if getattr(layer, "moe", False)]
        if not self.layers:
            raise LocalrunError("the model has no MoE layers: there is no routing to profile")
        self._model = model
        self.num_experts = model.args.num_experts
        self._counts = {i: torch.zeros(self.num_experts, dtype=torch.int64) for i in self.layers}
        self._tokens = 0
        self._trace: Trace | None = [] if trace else None
        self._pending: dict[int, list[list[int]]] = {}  # this forward's rows per layer, until the last layer
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        for i in self.layers:
            self._handles.append(self._model.layers[i].router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def record(_module, _inputs, output) -> None:
            ids_TK = output[0].detach().to("cpu", torch.int64)
            self._counts[layer] += torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
            if layer == self.layers[0]:
                self._tokens += ids_TK.shape[0]
            if self._trace is not None:
                self._pending[layer] = ids_TK.tolist()
                if layer == self.layers[-1]:
                    rows = [self._pending.pop(i) for i in self.layers]
                    self._trace.extend([list(r[t]) for r in rows] for t in range(ids_TK.shape[0]))
        return record

    def result(self) -> RoutingProfile:
        counts = {i: [int(c) for c in self._counts[i]] for i in self.layers}
        trace = [list(t) for t in self._trace] if self._trace is not None else None
        return RoutingProfile(self.num_experts, counts, self._tokens, trace)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, else one prompt per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompts file {path} not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {path}: {e}") from None
    prompts = None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"prompts file {path} looks like JSON but does not parse: {e}") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise UsageError(f"prompts file {path}: a JSON prompts file must be a list of strings")
        prompts = [p for p in data if p.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} has no prompts")
    return prompts


def profile_prompts(engine, prompts: list[str], *, max_tokens: int = 64, trace: bool = False) -> RoutingProfile:
    """Run each prompt (chat template, greedy, up to `max_tokens`) and count its routing."""
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    greedy = SamplingParams(temperature=0.0)
    encoded = [engine.encode_prompt(prompt) for prompt in prompts]
    context = engine.loaded.kv.capacity
    for i, ids in enumerate(encoded, 1):  # before any runs: a long prompt last would waste the others' time
        if len(ids) >= context:
            raise LocalrunError(f"prompt {i} of {len(encoded)} has {len(ids)} tokens but the context holds "
                                f"{context}: no room for a reply")
    # eager: the hooks must see each token once. On CUDA "auto" takes graphs, or segments for offloaded
    # experts, whose capture first runs the step twice more (step._warm_up: two extra tokens counted)
    # and whose replays would call no hook at all (here the hook's host copy fails the capture instead).
    with RoutingRecorder(engine.model, trace=trace) as recorder:
        for ids in encoded:
            for _ in engine.stream(ids, greedy, max_tokens=max_tokens, step="eager"):
                pass
    return recorder.result()


def write_routing_profile(path: str | Path, profile: RoutingProfile) -> Path:
    """Write the profile to `path` (atomically; a directory means its routing_profile.json); returns the path."""
    path = Path(path)
    if path.is_dir():
        path = path / ROUTING_PROFILE
    try:
        write_text_atomic(path, json.dumps(profile.to_json()))
    except OSError as e:
        raise LocalrunError(f"cannot write {path}: {e}") from None
    return path


def write_trace(path: str | Path, trace: Trace) -> None:
    try:
        write_text_atomic(path, json.dumps(trace))
    except OSError as e:
        raise LocalrunError(f"cannot write trace {path}: {e}") from None
