"""Generation: chunked prefill, then one token at a time. Yields token ids and timings; never prints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .kvcache import KVCache
from .sampling import Sampler

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory, not the result
KV_RESERVE_MAX = 8192  # a huge --max-tokens must not preallocate KV for positions never reached


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt processing, up to the first token's logits
    ttft_s: float = 0.0  # start to first token sampled
    decode_s: float = 0.0  # after the first token to the last

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "ttft_s": round(self.ttft_s, 6),
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


def prefill(model, ids: list[int], cache: KVCache, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt through the model in chunks; fp32 logits [V] of the last position."""
    device = model.embed_tokens.weight.device
    h = None
    for start in range(0, len(ids), chunk):
        piece = torch.tensor([ids[start : start + chunk]], device=device)
        h = model.hidden(piece, cache)
    return model.logits(h[:, -1:])[0, -1].float()


def decode_one(model, token: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
    """fp32 logits [V] after one token (an int, or a [1, 1] id tensor already on the device)."""
    ids = token if isinstance(token, torch.Tensor) else torch.tensor([[token]], device=model.embed_tokens.weight.device)
    return model.logits(model.hidden(ids, cache))[0, -1].float()


@torch.inference_mode()
def generate(
    model,
    prompt_ids: list[int],
    sampler: Sampler,
    *,
    max_tokens: int,
    stop_ids: list[int] | tuple[int, ...] = (),
    cache: KVCache | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[Step]:
    """Yield generated tokens until an id in `stop_ids` (included, finish "stop") or `max_tokens` ("length")."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    w = model.embed_tokens.weight
    reserve = min(len(prompt_ids) + max_tokens, KV_RESERVE_MAX)  # full layers grow by doubling past it
    cache = cache or KVCache(model.args, dtype=model.compute_dtype, device=w.device, reserve=reserve)
    timings = Timings(prompt_tokens=len(prompt_ids))
    seen = torch.empty(len(prompt_ids) + max_tokens, dtype=torch.long, device=w.device)  # prompt, then outputs
    seen[: len(prompt_ids)] = torch.tensor(prompt_ids)
    n_seen = len(prompt_ids)
    stop = set(stop_ids)
    start = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, prefill_chunk)
    timings.prefill_s = time.perf_counter() - start
    for n in range(1, max_tokens + 1):
        token = sampler(logits, seen[:n_seen])
        now = time.perf_counter()
        if n == 1:
            timings.ttft_s = now - start
            first = now
        else:
            timings.decode_s = now - first
        timings.generated_tokens = n
        finish = "stop" if token in stop else "length" if n == max_tokens else None
        yield Step(token, logits, finish, timings)
        if finish:
            return
        seen[n_seen] = token
        n_seen += 1
        logits = decode_one(model, seen[n_seen - 1 : n_seen].view(1, 1), cache)
