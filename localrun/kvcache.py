"""KV cache for one sequence: full-length buffers for global layers, ring buffers for sliding ones.

Shape letters: B batch, N kv heads, S cached positions, T new tokens, D head dim.
Every layer returns the keys and values it attends over together with their absolute
positions, so the attention mask is one function of (query positions, key positions).
For a single new token (decode) every key a cache returns is visible to it, so decode
attends without a mask.
"""

from __future__ import annotations

import torch

from .config import ModelArgs


class FullKV:
    """Keys and values for every position so far. Grows by doubling, so decode never reallocates
    more than log2(context) times; `reserve` preallocates when the context length is known."""

    def __init__(self, B: int, N: int, D: int, dtype, device, reserve: int = 256):
        self.k = torch.empty(B, N, reserve, D, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pos = torch.arange(reserve, device=device)  # positions of the slots, sliced, not rebuilt per step
        self.length = 0

    def _grow(self, need: int) -> None:
        cap = self.k.shape[2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], new_cap, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.pos = torch.arange(new_cap, device=self.pos.device)

    def update(self, k_BNTD, v_BNTD, pos_T):
        T = k_BNTD.shape[2]
        self._grow(self.length + T)
        self.k[:, :, self.length : self.length + T] = k_BNTD
        self.v[:, :, self.length : self.length + T] = v_BNTD
        self.length += T
        end = self.length
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:end]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class RingKV:
    """The last `window` positions of a sliding-attention layer; memory stops growing at the window."""

    def __init__(self, B: int, N: int, D: int, window: int, dtype, device):
        self.window = window
        self.k = torch.zeros(B, N, window, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((window,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.filled = 0  # slots [0, filled) hold positions: positions start at 0, slot = pos % window
        self.next = 0  # the next position to write

    def _write(self, k_BNTD, v_BNTD, pos_T) -> None:
        keep = min(k_BNTD.shape[2], self.window)
        k_BNTD, v_BNTD, pos_T = k_BNTD[:, :, -keep:], v_BNTD[:, :, -keep:], pos_T[-keep:]
        slots = pos_T % self.window
        self.k[:, :, slots] = k_BNTD
        self.v[:, :, slots] = v_BNTD
        self.pos[slots] = pos_T
        self.filled = min(self.window, self.filled + keep)

    def update(self, k_BNTD, v_BNTD, pos_T):
        self.next += k_BNTD.shape[2]
        if k_BNTD.shape[2] == 1:  # decode: the slot we overwrite is exactly the one leaving the window
            s = (self.next - 1) % self.window  # slices, not index tensors: a plain copy per buffer
            self.k[:, :, s : s + 1] = k_BNTD
            self.v[:, :, s : s + 1] = v_BNTD
            self.pos[s : s + 1] = pos_T
            self.filled = min(self.window, self.filled + 1)
            n = self.filled  # only filled slots: then every returned key is visible (no mask needed)
            return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n]
        # prefill chunk: queries early in the chunk still need keys the chunk would overwrite;
        # only the filled slots: a first chunk attends over its own keys alone, not `window` empty ones
        n = self.filled
        k = torch.cat([self.k[:, :, :n], k_BNTD], dim=2)
        v = torch.cat([self.v[:, :, :n], v_BNTD], dim=2)
        pos = torch.cat([self.pos[:n], pos_T])
        self._write(k_BNTD, v_BNTD, pos_T)
        return k, v, pos

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class KVCache:
    """Per-layer caches of one sequence. KV-shared layers (E2B/E4B) own none: they read their
    source layer's keys and values from the same forward pass."""

    def __init__(self, args: ModelArgs, *, batch: int = 1, dtype=torch.float32, device="cpu", reserve: int = 256):
        self.offset = 0  # positions already in the cache
        self.layers: list[FullKV | RingKV | None] = []
        for i in range(args.num_hidden_layers):
            if args.kv_source_layer(i) != i:
                self.layers.append(None)
                continue
            N, D = args.layer_kv_heads(i), args.layer_head_dim(i)
            if args.is_sliding(i):
                self.layers.append(RingKV(batch, N, D, args.sliding_window, dtype, device))
            else:
                self.layers.append(FullKV(batch, N, D, dtype, device, reserve))

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers if layer is not None)


def attention_mask(pos_q_T: torch.Tensor, pos_k_S: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, S] bool: query at position i sees key at j when 0 <= j <= i (and i - window < j if sliding)."""
    q, k = pos_q_T[:, None], pos_k_S[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    return mask
