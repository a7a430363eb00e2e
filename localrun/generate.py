"""Generation: chunked prefill, then one token at a time. Yields token ids and timings; never prints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .kvcache import ContextFull, KVCache
from .plan import PREFILL_CHUNK  # tokens per prefill forward: the plan's workspace is sized for it
from .sampling import Sampler
from .session import Session
from .step import make_step


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache held already (not prefilled)
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt processing, up to the first token's logits
    ttft_s: float = 0.0  # start to first token sampled
    decode_s: float = 0.0  # after the first token to the last

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "ttft_s": round(self.ttft_s, 6),
            "cached_tokens": self.cached_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }


@dataclass
class Step:
    """One generated token. `logprob`: under the model's distribution (softcapped, before sampling
    transforms). `finish_reason` is set on the last step: "stop" (an eos id) or "length"."""

    token: int
    logits: torch.Tensor = field(repr=False)  # fp32 [V] the token was sampled from
    finish_reason: str | None
    timings: Timings

    @property
    def logprob(self) -> float:
        """log_softmax at the token, computed when asked (a full-vocabulary reduction per token)."""
        return float(self.logits[self.token] - torch.logsumexp(self.logits, dim=-1))


def prefill(model, ids: list[int], cache: KVCache, chunk: int = PREFILL_CHUNK, between=None) -> torch.Tensor:
    """Run the prompt through the model in chunks; fp32 logits [V] of the last position. between: called
    before each chunk after the first."""
    device = model.embed_tokens.weight.device
    h = None
    for start in range(0, len(ids), chunk):
        if between is not None and start:
            between()
        piece = torch.tensor([ids[start : start + chunk]], device=device)
        h = model.hidden(piece, cache)
    return model.logits(h[:, -1:])[0, -1].float()


def decode_one(model, token: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
    """fp32 logits [V] after one token (an int, or a [1, 1] id tensor already on the device)."""
    ids = token if isinstance(token, torch.Tensor) else torch.tensor([[token]], device=model.embed_tokens.weight.device)
    return model.logits(model.hidden(ids, cache))[0, -1].float()


class _HostToken:
    """The sampled id's trip to the host, started as soon as it is sampled and waited for only when
    the host needs it: on CUDA the next step is already queued by then, so the GPU never idles on it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._host = [torch.empty(1, dtype=torch.long).pin_memory() for _ in range(2)]
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._n = 0

    def start(self, token_1: torch.Tensor):
        if not self.cuda:
            return token_1
        i = self._n = self._n ^ 1
        self._host[i].copy_(token_1, non_blocking=True)
        self._events[i].record()
        return i

    def wait(self, ticket) -> int:
        if not self.cuda:
            return int(ticket)
        self._events[ticket].synchronize()
        return int(self._host[ticket])


@torch.inference_mode()
def generate(
    model,
    prompt_ids: list[int],
    sampler: Sampler,
    *,
    max_tokens: int,
    stop_ids: list[int] | tuple[int, ...] = (),
    cache: KVCache | None = None,
    session: Session | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    step: str = "eager",
    between: Callable[[], object] | None = None,
) -> Iterator[Step]:
    """Yield generated tokens until an id in `stop_ids` (included, finish "stop"), `max_tokens` or the
    cache's capacity (finish "length": prompt plus reply never outgrow the context).

    cache: the KV buffers to use (a loaded model's, allocated once for the planned context; reset
    here), else a cache sized for this prompt and reply. session: a prefix cache instead
    (localrun/session.py): its cache keeps the longest common prefix with the prompt and only the
    rest is prefilled; afterwards it holds the prompt and every token fed back. step: the decode
    step (localrun/step.py): "eager", "static", "graphs" or "auto". The host reads one value per
    token, the sampled id; on CUDA it reads it while the next step already runs, so a reply that
    stops computes one step more. between: called between prefill chunks and between decoded tokens, in
    the thread that runs the model (hardware.IdleCoreWatch.poll: the thread count follows the idle cores).
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    w = model.embed_tokens.weight
    if session is not None:
        cache = session.cache
    elif cache is None:
        capacity = min(len(prompt_ids) + max(max_tokens, 1), model.args.max_position_embeddings)
        cache = KVCache(model.args, dtype=model.compute_dtype, device=w.device, capacity=max(capacity, 1))
    if len(prompt_ids) >= cache.capacity:
        raise ContextFull(f"the prompt has {len(prompt_ids)} tokens but the context holds {cache.capacity}: "
                          "no room for a reply")
    start = time.perf_counter()
    if session is not None:
        keep = session.prepare(prompt_ids)
        session.tokens = list(prompt_ids)  # what the cache will hold; `sync` cuts it to what it does
    else:
        cache.reset()
        keep = 0
    try:
        yield from _decode(model, prompt_ids, keep, sampler, max_tokens, stop_ids, cache, session,
                           prefill_chunk, step, start, between)
    finally:
        if session is not None:
            session.sync()


def _decode(model, prompt_ids, keep, sampler, max_tokens, stop_ids, cache, session, prefill_chunk, step, start,
            between):
    w = model.embed_tokens.weight
    limit = min(max_tokens, cache.capacity - len(prompt_ids))  # the last token sampled is never fed back
    decode = make_step(model, cache, step)
    timings = Timings(prompt_tokens=len(prompt_ids), cached_tokens=keep)
    seen = torch.empty(len(prompt_ids) + limit, dtype=torch.long, device=w.device)  # prompt, then outputs
    seen[: len(prompt_ids)] = torch.tensor(prompt_ids)
    n_seen = len(prompt_ids)
    stop = set(stop_ids)
    host = _HostToken(w.device)
    logits = prefill(model, prompt_ids[keep:], cache, prefill_chunk, between)
    timings.prefill_s = time.perf_counter() - start
    fed = session.tokens if session is not None else []  # the ids the cache holds, appended as fed

    def queue(token_1: torch.Tensor, position: int):
        """Feed a sampled id (still on the device) back in and sample the next one."""
        seen[position : position + 1] = token_1
        logits = decode(token_1.view(1, 1), position)
        token = sampler.token(logits, seen[: position + 1])
        return logits, token, host.start(token)

    token_1 = sampler.token(logits, seen[:n_seen])
    ticket = host.start(token_1)
    for n in range(1, limit + 1):
        ahead = host.cuda and n < limit  # CUDA: queue the next step before reading this token
        if ahead:
            upcoming = queue(token_1, n_seen)
        token = host.wait(ticket)
        if ahead:
            fed.append(token)
        now = time.perf_counter()
        if n == 1:
            timings.ttft_s = now - start
            first = now
        else:
            timings.decode_s = now - first
        timings.generated_tokens = n
        finish = "stop" if token in stop else "length" if n == limit else None
        yield Step(token, logits, finish, timings)
        if finish:
            return
        if between is not None:
            between()
        if not ahead:
            upcoming = queue(token_1, n_seen)
            fed.append(token)
        n_seen += 1
        logits, token_1, ticket = upcoming
