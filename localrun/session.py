"""The prefix cache: a conversation's token ids and the KV cache that holds them.

A new prompt keeps the longest common token prefix with what the cache holds; only the rest is
prefilled. Gemma 4's template re-renders earlier turns differently (it drops the model's thinking
from past replies), so the common prefix can end before the last reply: the cache rolls back to
it (`KVCache.truncate`). Full layers keep every position and roll back anywhere; a sliding
layer's ring keeps `plan.KV_ROLLBACK` positions beyond its window, so a rollback of up to that
many positions keeps the cache, and a longer one (a reply longer than that, say) prefills the
prompt from the start: slower, never different.

`chat` keeps one Session for the conversation; `serve` one per slot (--parallel) and sends a
request to the slot with the longest common prefix.
"""

from __future__ import annotations

from .kvcache import KVCache


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    """A KV cache and the ids of the positions it holds (`tokens[i]` is at position i)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.tokens: list[int] = []
        self.reused = 0  # prompt tokens the last `prepare` kept

    def reset(self) -> None:
        self.tokens = []
        self.cache.reset()

    def common_prefix(self, ids: list[int]) -> int:
        """How many of `ids` the cache already holds (before any rollback limit); 0 when the cache
        moved without this session (someone else generated into it)."""
        return common_prefix(self.tokens, ids) if len(self.tokens) == self.cache.offset else 0

    def prepare(self, prompt_ids: list[int]) -> int:
        """Roll the cache back to the longest common prefix with `prompt_ids`, never all of it (the
        last prompt token goes through the model again for its logits); the positions kept."""
        keep = min(self.common_prefix(prompt_ids), len(prompt_ids) - 1)
        if not self.cache.truncate(keep):  # a ring no longer holds the window before `keep`
            keep = 0
        self.tokens = self.tokens[:keep]
        self.reused = keep
        return keep

    def sync(self) -> None:
        """After a generation ended (or broke off): `tokens` cut to what the cache holds; a cache
        ahead of the known ids (a step queued but never read) is reset."""
        if self.cache.offset <= len(self.tokens):
            self.tokens = self.tokens[: self.cache.offset]
        else:
            self.reset()
