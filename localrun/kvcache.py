"""KV cache for one sequence: full-length buffers for global layers, ring buffers for sliding ones.

Shape letters: B batch, N kv heads, S cached positions, T new tokens, D head dim.
Every layer returns the keys and values it attends over together with their absolute
positions, so the attention mask is one function of (query positions, key positions).
A sliding layer's ring keeps `window + rollback` positions (plan.kv_layer_positions), so the
prefix cache (localrun/session.py) can roll a sequence back by up to `rollback` positions and
still hold the window before the new end. A prefill chunk gets the window - 1 positions before
it, in order; one token gets every slot written, and the keys older than its window among them
are masked (attention_mask; `attend` builds that mask when a ring returns more keys than its window).
"""

from __future__ import annotations

import torch

from . import hostmem
from .config import ModelArgs
from .errors import LocalrunError
from .kernels.qkv_write import qkv_attention, qkv_write
from .plan import KV_ROLLBACK, kv_layer_positions


class ContextFull(LocalrunError):
    """More positions than the cache was allocated for (the planned context)."""


class FullKV:
    """Keys and values of every position so far, in buffers allocated once for `capacity` positions
    (the planned context): memory is the plan's from the first token, and never grows or moves."""

    def __init__(self, B: int, N: int, D: int, dtype, device, capacity: int):
        self.k = hostmem.zeros(B, N, capacity, D, dtype=dtype, device=device)
        self.v = hostmem.zeros(B, N, capacity, D, dtype=dtype, device=device)
        self.pos = torch.arange(capacity, device=device)  # positions of the slots, sliced, not rebuilt per step
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        self.length = 0

    def truncate(self, end: int) -> bool:
        """Keep positions [0, end) (slots past it are overwritten before anything reads them)."""
        self.length = min(self.length, end)
        return True

    def update(self, k_BNTD, v_BNTD, pos_T):
        """Append T positions known to the host; (keys, values, positions) of everything so far."""
        T = k_BNTD.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise ContextFull(f"{end} positions exceed the KV cache's {self.capacity}")
        self.k[:, :, self.length : end] = k_BNTD
        self.v[:, :, self.length : end] = v_BNTD
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:end]

    def claim(self) -> tuple[int, int, int]:
        """One decoded position, for a kernel that writes its K/V itself (kernels.DecodeLayer): the
        bookkeeping of `update` for one token, then (slot to write, keys to attend over, window 0)."""
        if self.length >= self.capacity:
            raise ContextFull(f"{self.length + 1} positions exceed the KV cache's {self.capacity}")
        self.length += 1
        return self.length - 1, self.length, 0

    def write(self, k_BN1D, v_BN1D, pos_1, span: int, memo: dict | None = None):
        """The static step's update: write one position given as a device tensor (no host value read),
        return the first `span` slots and their visibility [1, span] (slots past `pos` are masked).
        memo: per step, shared by the layers, so the mask is computed once (it is the same for all)."""
        self.k.index_copy_(2, pos_1, k_BN1D)
        self.v.index_copy_(2, pos_1, v_BN1D)
        return self._static_view(pos_1, span, memo)

    def write_raw(self, raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps: float, pos_1,
                  span: int, memo: dict | None = None, norm_v: bool = True):
        """`write` of the heads before their norms, with the query heads' norm and RoPE, in one kernel
        (kernels/qkv_write.py): q = rope(rms_norm(raw_q) * q_weight), k = rope(rms_norm(raw_k) *
        k_weight), v = rms_norm(raw_v) (raw_v itself when not norm_v), each in fp32, rounded once;
        returns (q [1, 1, N, D], then what `write` returns)."""
        q = qkv_write(raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps, self.k, self.v, None,
                      pos_1, self.capacity, norm_v)
        return (q, *self._static_view(pos_1, span, memo))

    def write_attend(self, raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps: float, pos_1,
                     span: int, memo: dict | None = None, scale: float = 1.0, norm_v: bool = True):
        """write_raw and the token's attention over the step's view as one op (kernels/qkv_write.py's
        `qkv_attention`): (out [1, N, 1, D], then what `write` returns). A full layer's mask is that of
        the positions, written or not."""
        k, v, visible = self._static_view(pos_1, span, memo)
        out = qkv_attention(raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps, self.k, self.v, None,
                            pos_1, self.capacity, norm_v, k.shape[2], visible, scale)
        return out, k, v, visible

    def _static_view(self, pos_1, span: int, memo: dict | None):
        memo = {} if memo is None else memo
        visible = memo.get(("full", span))
        if visible is None:
            visible = memo["full", span] = (self.pos[:span] <= pos_1)[None, :]
        return self.k[:, :, :span], self.v[:, :, :span], visible

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class RingKV:
    """The last `size` positions of a sliding-attention layer (size = window + rollback slots, see
    the module docstring); memory stops growing at `size`. Slot of position p: p % size."""

    def __init__(self, B: int, N: int, D: int, window: int, dtype, device, size: int | None = None):
        self.window = window  # what attention sees
        self.size = size = window if size is None else size  # what the ring keeps (< window: the whole context)
        self.k = hostmem.zeros(B, N, size, D, dtype=dtype, device=device)
        self.v = hostmem.zeros(B, N, size, D, dtype=dtype, device=device)
        self.pos = torch.full((size,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.filled = 0  # slots [0, filled) have been written since the reset
        self.next = 0  # the next position to write

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.filled = self.next = 0

    def can_truncate(self, end: int) -> bool:
        """Whether the ring still holds the window before `end` (positions max(0, end - window) on)."""
        return end <= self.next and max(0, self.next - self.size) <= max(0, end - self.window)

    def truncate(self, end: int) -> bool:
        """Forget positions >= end (their slots are marked empty); False, and nothing changed, when
        the ring no longer holds the window before `end`."""
        if not self.can_truncate(end):
            return False
        if end < self.next:
            self.pos.masked_fill_(self.pos >= end, -1)
            if self.next <= self.size:  # never wrapped: slots [0, end) hold [0, end)
                self.filled = end
            self.next = end
        return True

    def _write(self, k_BNTD, v_BNTD, pos_T) -> None:
        keep = min(k_BNTD.shape[2], self.size)
        k_BNTD, v_BNTD, pos_T = k_BNTD[:, :, -keep:], v_BNTD[:, :, -keep:], pos_T[-keep:]
        slots = pos_T % self.size
        self.k[:, :, slots] = k_BNTD
        self.v[:, :, slots] = v_BNTD
        self.pos[slots] = pos_T
        self.filled = max(self.filled, min(self.size, self.next))

    def update(self, k_BNTD, v_BNTD, pos_T):
        self.next += k_BNTD.shape[2]
        if k_BNTD.shape[2] == 1:  # decode: the slot we overwrite is exactly the one leaving the ring
            s = (self.next - 1) % self.size  # slices, not index tensors: a plain copy per buffer
            self.k[:, :, s : s + 1] = k_BNTD
            self.v[:, :, s : s + 1] = v_BNTD
            self.pos[s : s + 1] = pos_T
            self.filled = max(self.filled, min(self.size, self.next))
            # only written slots; with rollback slots some are older than the window or emptied by a
            # rollback, and `attend` masks those (a ring of exactly the window needs no mask)
            n = self.filled
            return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n]
        # prefill chunk: its first query sees the window - 1 positions before the chunk (which the
        # chunk may overwrite) and no older one, so only those come along, in position order: one or
        # two runs of slots (the ring holds them: see can_truncate), not every slot of the ring
        start = self.next - k_BNTD.shape[2]  # the chunk's first position
        n = min(start, self.window - 1)
        a = (start - n) % self.size
        head = min(n, self.size - a)  # slots up to the ring's end, then the rest from slot 0
        runs = (slice(a, a + head), slice(0, n - head))
        k = torch.cat([self.k[:, :, r] for r in runs] + [k_BNTD], dim=2)
        v = torch.cat([self.v[:, :, r] for r in runs] + [v_BNTD], dim=2)
        pos = torch.cat([self.pos[r] for r in runs] + [pos_T])
        self._write(k_BNTD, v_BNTD, pos_T)
        return k, v, pos

    def claim(self) -> tuple[int, int, int]:
        """FullKV.claim for the ring: the bookkeeping of a one-token `update`; the kernel writes the
        slot's K/V and position and masks slots outside the window when it sees more than the window."""
        self.next += 1
        self.filled = max(self.filled, min(self.size, self.next))
        return (self.next - 1) % self.size, self.filled, self.window

    def write(self, k_BN1D, v_BN1D, pos_1, span: int, memo: dict | None = None):
        """The static step's update (see FullKV.write): slot pos % size, then the first min(span, size)
        slots, empty ones (-1) and those older than the window masked. The step's `span` is above the
        token's position (step.span_for), and a key the token can see sits at a position p <= pos, in
        slot p when p < size: so a ring larger than the span shows only its first `span` slots (a
        short chat reads 256 slots of a 1,536-slot ring, not all of them) and otherwise all of them.
        Every ring of a model holds the same positions, so the slot and the mask are computed once a step."""
        memo = {} if memo is None else memo
        key = ("ring", self.window, self.size)
        slot = memo.get(key + ("slot",))
        if slot is None:
            slot = memo[key + ("slot",)] = pos_1 % self.size
        self.k.index_copy_(2, slot, k_BN1D)
        self.v.index_copy_(2, slot, v_BN1D)
        self.pos.index_copy_(0, slot, pos_1)  # every ring keeps its own positions (eager updates read them)
        return self._static_view(pos_1, span, memo)

    def write_raw(self, raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps: float, pos_1,
                  span: int, memo: dict | None = None, norm_v: bool = True):
        """FullKV.write_raw for the ring: the one kernel also writes the position into its slot."""
        q = qkv_write(raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps, self.k, self.v, self.pos,
                      pos_1, self.size, norm_v)
        return (q, *self._static_view(pos_1, span, {} if memo is None else memo))

    def write_attend(self, raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps: float, pos_1,
                     span: int, memo: dict | None = None, scale: float = 1.0, norm_v: bool = True):
        """FullKV.write_attend for the ring. The op writes the slot's position as it attends, so the mask
        is built before it, as it will stand after the write: the slot pos % size shows pos (visible),
        whatever older position (or -1) the table holds there now; the same mask `_static_view` builds
        after a write, kept for the step's other rings."""
        n = min(span, self.size)
        visible = self._visible(pos_1, n, {} if memo is None else memo, before_write=True)
        out = qkv_attention(raw_q_11ND, q_weight, raw_k_11ND, raw_v_11ND, k_weight, cos, sin, eps, self.k, self.v,
                            self.pos, pos_1, self.size, norm_v, n, visible, scale)
        return out, self.k[:, :, :n], self.v[:, :, :n], visible

    def _static_view(self, pos_1, span: int, memo: dict):
        """The first min(span, size) slots and their visibility, after this step's write."""
        n = min(span, self.size)
        return self.k[:, :, :n], self.v[:, :, :n], self._visible(pos_1, n, memo, before_write=False)

    def _visible(self, pos_1, n: int, memo: dict, before_write: bool):
        """[1, n] visibility of the first n slots to the token at pos_1 once it is written, kept in `memo`
        for the step's other rings of this shape. before_write: the table does not hold pos_1 yet, so
        its slot pos_1 % size is shown visible whatever older position (or -1) is there."""
        key = ("ring", self.window, self.size, n)
        visible = memo.get(key)
        if visible is None:
            pos = self.pos[:n]
            visible = (pos >= 0) & (pos > pos_1 - self.window)
            if before_write:
                visible = visible | (torch.arange(n, device=pos.device) == pos_1 % self.size)
            visible = memo[key] = visible[None, :]
        return visible

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class KVCache:
    """Per-layer caches of one sequence, allocated once for `capacity` positions. KV-shared layers
    (E2B/E4B) own none: they read their source layer's keys and values from the same forward pass.

    `offset` counts the positions written so far (the host knows it: it drives generation). The
    static decode step (localrun/step.py) writes at a device position instead and sets `span`,
    the number of full-layer slots its attention reads (a fixed bucket, so shapes stay static).
    """

    def __init__(self, args: ModelArgs, *, batch: int = 1, dtype=torch.float32, device="cpu", capacity: int = 256,
                 rollback: int = KV_ROLLBACK):
        if capacity < 1:
            raise ValueError(f"KV capacity must be at least 1 position, not {capacity}")
        self.capacity = capacity
        self.offset = 0  # positions already in the cache
        self.span: int | None = None  # set by the static step while it runs
        self.side_stream = None  # a CUDA stream the graphs step lends a layer for work beside its main chain
        self.steps: dict = {}  # decode mode -> step over these buffers (step.make_step: graphs captured once)
        self.layers: list[FullKV | RingKV | None] = []
        for i in range(args.num_hidden_layers):
            if args.kv_source_layer(i) != i:
                self.layers.append(None)
                continue
            N, D = args.layer_kv_heads(i), args.layer_head_dim(i)
            if args.is_sliding(i):
                size = kv_layer_positions(args, i, capacity, rollback)
                self.layers.append(RingKV(batch, N, D, args.sliding_window, dtype, device, size=size))
            else:
                self.layers.append(FullKV(batch, N, D, dtype, device, capacity))

    def reset(self) -> None:
        """Forget the sequence (the buffers stay: a new generation reuses them)."""
        self.offset = 0
        for layer in self.layers:
            if layer is not None:
                layer.reset()

    def truncate(self, end: int) -> bool:
        """Roll back to positions [0, end): True when every layer could; False (and the cache
        reset) when a ring no longer holds the window before `end`, so the caller prefills from 0."""
        if end > self.offset:
            raise ValueError(f"cannot roll forward: the cache holds {self.offset} positions, not {end}")
        if not all(layer.can_truncate(end) for layer in self.layers if isinstance(layer, RingKV)):
            self.reset()
            return end == 0
        for layer in self.layers:
            if layer is not None:
                layer.truncate(end)
        self.offset = end
        return True

    def advance(self, end: int) -> None:
        """After the static step wrote position end - 1 at a device position: bring the host's
        counters (offset, each layer's length / ring fill) to where eager updates would have left them."""
        self.offset = end
        for layer in self.layers:
            if isinstance(layer, FullKV):
                layer.length = end
            elif isinstance(layer, RingKV):
                layer.next, layer.filled = end, max(layer.filled, min(layer.size, end))

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers if layer is not None for t in (layer.k, layer.v, layer.pos)]

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
