"""DECODE_KERNELS["l2_prefetch"] (opt-in; models/gemma4.py, kernels/triton_prefetch.py): in the CUDA
graphs step each MoE layer asks the L2, on the step's side stream, for the weights it reads a few
kernels later. The prefetch itself is CUDA only (tests/test_sass_stats.py compiles it); here, on the
CPU with the side stream and the launch stood in for, which weights each layer asks for and when,
that the stream joins back within the layer, and that nothing it does changes a token."""

from __future__ import annotations

import pytest
import torch

from localrun.loader import load_model
from localrun.models import gemma4

from decoding import static_greedy


@pytest.fixture
def recorded(monkeypatch):
    """The switch's device condition widened to any one-token pass, the launch and the join recorded
    in order: ("ask", stream, weights) and ("join", stream)."""
    events = []
    monkeypatch.setattr(gemma4, "l2_prefetch", lambda x: x.shape[:-1].numel() == 1)
    monkeypatch.setattr(gemma4, "prefetch_beside", lambda stream, *weights: events.append(("ask", stream, weights)))
    monkeypatch.setattr(gemma4, "join_stream", lambda stream: events.append(("join", stream)))
    return events


@pytest.mark.parametrize("targets", [("o_proj", "next_qkv"), ("o_proj", "mlp", "next_qkv"), ("next_qkv",)])
def test_each_moe_layer_asks_for_what_it_reads_next(tiny_moe, recorded, monkeypatch, targets):
    """Per decoded token and MoE layer: before its attention its o_proj (and with "mlp" its MLP +
    router GEMM's and its down projection's weights), before its experts the next layer's fused q/k/v
    weight (none after the last layer), then the join; the prompt's pass asks for nothing; the tokens
    and logprobs are the step's without the switch."""
    monkeypatch.setattr(gemma4, "L2_PREFETCH", targets)
    loaded = load_model(tiny_moe, dtype=torch.float32, context=64)
    expected = static_greedy(loaded, 6)
    assert recorded == []  # no side stream lent: the switch does nothing
    loaded.kv.side_stream = "side"
    assert static_greedy(loaded, 6) == expected
    layers = loaded.model.layers
    assert all(layer.moe for layer in layers)
    one_token = []
    for i, layer in enumerate(layers):
        front = [layer.self_attn.o_proj.weight] if "o_proj" in targets else []
        if "mlp" in targets:
            front += [layer.stacked, layer.mlp.down_proj.weight]
        if front:
            one_token.append(("ask", "side", tuple(front)))
        if i + 1 < len(layers):
            one_token.append(("ask", "side", (layers[i + 1].self_attn.qkv[0],)))
        one_token.append(("join", "side"))
    decoded = 5  # the first of the 6 tokens comes from the prompt's pass
    assert len(recorded) == decoded * len(one_token)
    for got, want in zip(recorded, one_token * decoded):
        assert got[:2] == want[:2] and len(got) == len(want)
        if got[0] == "ask":
            assert all(a is b for a, b in zip(got[2], want[2], strict=True)), (got, want)


def test_the_switch_applies_to_one_half_precision_token_on_cuda_only(monkeypatch):
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "l2_prefetch", True)
    assert not gemma4.l2_prefetch(torch.zeros(1, 1, 8, dtype=torch.bfloat16))  # the CPU
    meta = torch.zeros(1, 1, 8, dtype=torch.bfloat16, device="meta")
    assert not gemma4.l2_prefetch(meta)
    monkeypatch.setitem(gemma4.DECODE_KERNELS, "l2_prefetch", False)
    assert not gemma4.l2_prefetch(torch.zeros(1, 1, 8, dtype=torch.bfloat16))
