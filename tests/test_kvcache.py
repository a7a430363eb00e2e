"""KV cache: sliding layers stop growing at the window; full layers grow with the context."""

from __future__ import annotations

import torch

from localrun.config import ModelArgs
from localrun.kvcache import FullKV, KVCache, RingKV, attention_mask
from localrun.tiny import tiny_config


def test_sliding_memory_stops_at_the_window():
    args = ModelArgs.from_dict(tiny_config("moe"))
    cache = KVCache(args, reserve=4)
    sizes = []
    for pos in range(40):
        for i, layer in enumerate(cache.layers):
            N, D = args.layer_kv_heads(i), args.layer_head_dim(i)
            layer.update(torch.randn(1, N, 1, D), torch.randn(1, N, 1, D), torch.tensor([pos]))
        sizes.append({i: layer.nbytes for i, layer in enumerate(cache.layers)})
    sliding = [i for i in range(args.num_hidden_layers) if args.is_sliding(i)]
    full = [i for i in range(args.num_hidden_layers) if not args.is_sliding(i)]
    for i in sliding:
        assert isinstance(cache.layers[i], RingKV)
        assert len({s[i] for s in sizes}) == 1  # never grows
        assert cache.layers[i].k.shape[2] == args.sliding_window
    for i in full:
        assert isinstance(cache.layers[i], FullKV) and cache.layers[i].length == 40
        assert sizes[-1][i] > sizes[3][i]  # grew with the context


def test_ring_keeps_the_last_window_positions():
    ring = RingKV(1, 1, 2, window=4, dtype=torch.float32, device="cpu")
    for pos in range(7):
        k, v, pos_S = ring.update(torch.full((1, 1, 1, 2), float(pos)), torch.zeros(1, 1, 1, 2), torch.tensor([pos]))
    assert sorted(pos_S.tolist()) == [3, 4, 5, 6]
    assert sorted(k[0, 0, :, 0].tolist()) == [3.0, 4.0, 5.0, 6.0]
    # a prefill chunk sees the old window plus itself, then the ring holds only the newest window
    k, _, pos_S = ring.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.tensor([7, 8, 9]))
    assert sorted(pos_S.tolist()) == [3, 4, 5, 6, 7, 8, 9]
    assert sorted(ring.pos.tolist()) == [6, 7, 8, 9]


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
