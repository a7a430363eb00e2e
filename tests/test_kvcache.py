"""KV cache: sliding layers stop growing at the window; full layers grow with the context."""

from __future__ import annotations

import pytest
import torch

from localrun.config import ModelArgs
from localrun.kvcache import ContextFull, FullKV, KVCache, RingKV, attention_mask
from localrun.tiny import tiny_config


def test_memory_is_allocated_once_for_the_capacity():
    """Sliding layers hold a ring of the window plus the rollback slots, full layers the capacity,
    from the first token on: writing positions moves no byte count, and one position past the
    capacity is refused."""
    args = ModelArgs.from_dict(tiny_config("moe"))
    cache = KVCache(args, capacity=40, rollback=16)
    before = {i: layer.nbytes for i, layer in enumerate(cache.layers)}
    pointers = [t.data_ptr() for t in cache.tensors()]
    for pos in range(40):
        for i, layer in enumerate(cache.layers):
            N, D = args.layer_kv_heads(i), args.layer_head_dim(i)
            layer.update(torch.randn(1, N, 1, D), torch.randn(1, N, 1, D), torch.tensor([pos]))
    assert {i: layer.nbytes for i, layer in enumerate(cache.layers)} == before
    assert [t.data_ptr() for t in cache.tensors()] == pointers
    for i, layer in enumerate(cache.layers):
        if args.is_sliding(i):
            assert isinstance(layer, RingKV) and layer.k.shape[2] == args.sliding_window + 16
        else:
            assert isinstance(layer, FullKV) and layer.length == 40 and layer.k.shape[2] == 40
    full = next(layer for layer in cache.layers if isinstance(layer, FullKV))
    with pytest.raises(ContextFull):
        full.update(torch.zeros(1, full.k.shape[1], 1, full.k.shape[3]), torch.zeros(1, full.k.shape[1], 1, full.k.shape[3]),
                    torch.tensor([40]))
    cache.reset()
    assert cache.offset == 0 and all(layer.length == 0 for layer in cache.layers if isinstance(layer, FullKV))


def test_static_writes_match_host_driven_updates():
    """FullKV/RingKV.write (device positions, fixed span, mask) stores what update stores, and its
    mask shows exactly the keys update would return."""
    torch.manual_seed(0)
    full_a, full_b = FullKV(1, 2, 4, torch.float32, "cpu", 16), FullKV(1, 2, 4, torch.float32, "cpu", 16)
    ring_a, ring_b = RingKV(1, 2, 4, 5, torch.float32, "cpu"), RingKV(1, 2, 4, 5, torch.float32, "cpu")
    for pos in range(12):
        k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
        for a, b in ((full_a, full_b), (ring_a, ring_b)):
            ka, va, pa = a.update(k, v, torch.tensor([pos]))
            kb, vb, visible = b.write(k, v, torch.tensor([pos]), span=16)
            shown = kb[:, :, visible[0]]
            assert sorted(shown[0, 0, :, 0].tolist()) == sorted(ka[0, 0, :, 0].tolist())
            assert visible.shape[-1] == kb.shape[2]
    assert torch.equal(full_a.k[:, :, :12], full_b.k[:, :, :12])
    assert torch.equal(ring_a.k, ring_b.k) and torch.equal(ring_a.pos, ring_b.pos)



def test_a_ring_larger_than_the_span_shows_only_its_first_span_slots():
    """The static step's span is above the token's position, so a ring of more slots than the span
    shows the first `span` slots (every visible key is among them) until the span covers the ring."""
    torch.manual_seed(0)
    host, static = (RingKV(1, 1, 2, window=6, dtype=torch.float32, device="cpu", size=40) for _ in range(2))
    for pos in range(100):
        k, v = torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2)
        span = 8  # step.span_for's buckets from 8: 8 ... 32 below the ring's 40 slots, then 64, 128
        while span <= pos:
            span *= 2
        kh, _, ph = host.update(k, v, torch.tensor([pos]))
        ks, _, visible = static.write(k, v, torch.tensor([pos]), span=span)
        assert ks.shape[2] == min(span, 40) and visible.shape[-1] == ks.shape[2]
        shown = sorted(ks[0, 0, visible[0], 0].tolist())
        assert shown == sorted(kh[0, 0, (ph >= 0) & (ph > pos - 6), 0].tolist())

def test_ring_keeps_the_last_window_positions():
    ring = RingKV(1, 1, 2, window=4, dtype=torch.float32, device="cpu")
    for pos in range(7):
        k, v, pos_S = ring.update(torch.full((1, 1, 1, 2), float(pos)), torch.zeros(1, 1, 1, 2), torch.tensor([pos]))
    assert sorted(pos_S.tolist()) == [3, 4, 5, 6]
    assert sorted(k[0, 0, :, 0].tolist()) == [3.0, 4.0, 5.0, 6.0]
    # a prefill chunk sees the window - 1 positions before it (in order) plus itself, then the ring
    # holds only the newest window
    k, _, pos_S = ring.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.tensor([7, 8, 9]))
    assert pos_S.tolist() == [4, 5, 6, 7, 8, 9]
    assert k[0, 0, :3, 0].tolist() == [4.0, 5.0, 6.0]
    assert sorted(ring.pos.tolist()) == [6, 7, 8, 9]


@pytest.mark.parametrize("size", [5, 8, 11])
def test_ring_prefill_returns_the_window_before_the_chunk_in_order(size):
    """Whatever the chunking, the ring's rollback slots and where the ring wraps: a chunk gets exactly
    the window - 1 positions before it (fewer at the start), their own keys, in order; also after a
    rollback, which empties slots the chunk then refills."""
    window = 5
    ring = RingKV(1, 1, 2, window=window, dtype=torch.float32, device="cpu", size=size)
    end = 0

    def feed(n):
        nonlocal end
        pos = torch.arange(end, end + n)
        k = pos.float().view(1, 1, n, 1).expand(1, 1, n, 2)
        k_S, v_S, pos_S = ring.update(k, k.clone(), pos)
        seen = list(range(max(0, end - window + 1), end + n))
        if n == 1:  # decode: every filled slot, in slot order (attend masks the older ones)
            assert set(seen) <= set(pos_S.tolist())
        else:
            assert pos_S.tolist() == seen and k_S[0, 0, :, 0].tolist() == [float(p) for p in seen]
        end += n

    for n in [3, 1, 4, 2, 7, 1, 1, 6, 3, 9, 2, 1, 4]:
        feed(n)
        if ring.can_truncate(end - 2):
            assert ring.truncate(end - 2)
            end -= 2


def test_attention_mask_sliding_and_causal():
    q, k = torch.tensor([5, 6]), torch.tensor([-1, 2, 3, 4, 5, 6])
    assert attention_mask(q, k, None).tolist() == [[False, True, True, True, True, False],
                                                   [False, True, True, True, True, True]]
    assert attention_mask(q, k, 3).tolist() == [[False, False, True, True, True, False],
                                                [False, False, False, True, True, True]]


def test_kv_shared_layers_own_no_cache():
    args = ModelArgs.from_dict(tiny_config("dense_e2b"))
    cache = KVCache(args)
    assert [layer is None for layer in cache.layers] == [False] * 4 + [True] * 2
