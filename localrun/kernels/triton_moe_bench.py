"""One 4-bit MoE layer of random experts timed on the GPU (or interpreted on the CPU, scaled down), each
kernel version of kernels/triton_moe.py against bitsandbytes' per-expert backend: what
scripts/gpu_check.py's kernels step reports."""

from __future__ import annotations

import math

import torch

from . import triton_moe as tm
from .timing import graph_us, time_us
from .triton_moe import GROUPED_MIN_TOKENS, FusedTiles, V4Tiles, fused_fits, fused_left_zero, interpreted, moe_4bit_triton


def tuned_configs(kernels: str = "v2") -> dict:
    """The configs the autotuner picked for the last shape it ran (None before the first CUDA call),
    with every config's time where Triton kept them (`configs_timings`: ms at the 0.5/0.2/0.8 quantiles)."""
    pair = {"v5": (tm._moe_fused_tuned,), "v4": (tm._gate_up_v4_tuned, tm._down_v4_tuned),
            "v2": (tm._gate_up_v2_tuned, tm._down_v2_tuned)}[kernels]
    out = {}
    for name, tuner in zip(("fused",) if kernels == "v5" else ("gate_up", "down"), pair):
        out[name] = str(getattr(tuner, "best_config", None))
        timings = getattr(tuner, "configs_timings", None) or {}
        if timings:
            out[name + "_us"] = {str(cfg): round(1e3 * (t[0] if isinstance(t, (list, tuple)) else t), 2)
                                 for cfg, t in timings.items()}
    return out


# benchmark_moe_4bit's default on CUDA: the default (None: v2; v4 with USE_V4, v5 with USE_FUSED), v4 and v2
# each alone, autotuned
SWEEP = (None, "v4", "v2")  # v5 (opt-in) in gpu_check's "one launch" row


def random_buffer(num_experts: int, hidden: int, inter: int, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False, device: torch.device | str = "cuda", seed: int = 0):
    """An ExpertBuffer of random codes and plausible statistics, built on the device (no quantizing)."""
    from quant.layer import ExpertBuffer
    from quant.nf4 import MATRICES, expert_layout
    from quant.spec import QuantSpec

    layout = expert_layout((2 * inter, hidden), (hidden, inter), QuantSpec(quant_type, blocksize, double_quant),
                           torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(seed)
    data = torch.randint(0, 256, (num_experts, layout.nbytes), dtype=torch.uint8, device=device, generator=g)
    buf = ExpertBuffer(data, layout)
    for m in MATRICES:  # weights of ~0.02, like a trained layer's
        if double_quant:
            nested = buf.part(m, "nested_absmax")
            nested.copy_(torch.rand(nested.shape, device=device, generator=g) * 0.02 + 0.01)
            buf.part(m, "nested_offset").fill_(0.02)
        else:
            absmax = buf.part(m, "absmax")
            absmax.copy_(torch.rand(absmax.shape, device=device, generator=g) * 0.02 + 0.01)
    return buf


def default_name(tokens: int, hidden: int, inter: int, blocksize: int) -> str:
    """What moe_4bit_triton runs with blocks=None at this shape (`default_kernels`), as the benchmark names its
    row: v4 without V4_DOWN runs v2's down stage."""
    kernels = tm.default_kernels(tokens, hidden, inter, blocksize)
    return "v4 gate_up, v2 down" if kernels == "v4" and not tm.V4_DOWN else kernels


def _config_name(blocks, default: str = "v2") -> str:
    """A row's name in benchmark_moe_4bit: None is the `default` kernels (what blocks=None runs)."""
    if blocks is None:
        return f"default ({default})"
    if blocks in tm.VERSIONS:
        return f"{blocks} autotuned"
    kind = "v4" if isinstance(blocks, V4Tiles) else "v5" if isinstance(blocks, FusedTiles) else "v2"
    return f"{kind} {blocks!r}"


def copy_bandwidth_gbps(device: torch.device | str = "cuda", nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), the floor's denominator."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), iters, device)
    return 2 * nbytes / us / 1e3


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (y in any dtype, ref fp32)."""
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def benchmark_moe_4bit(device: torch.device | str = "cuda", num_experts: int = 128, hidden: int = 2816,
                       inter: int = 704, top_k: int = 8, tokens: int = 1, quant_type: str = "nf4",
                       blocksize: int = 64, double_quant: bool = False, act: str = "gelu_pytorch_tanh",
                       dtype: torch.dtype = torch.bfloat16, iters: int = 200, configs=None,
                       baseline: bool = True, graphs: bool = True, seed: int = 0, dry: bool = False) -> dict:
    """One MoE layer of random 4-bit experts (default: Gemma 4 26B-A4B, NF4, top-8, one token).

    Checks the kernel against `moe_4bit.reference` in fp32 (max_rel_err), times each tile config
    in `configs` at `dtype` (default: SWEEP on CUDA, None, "v4" and "v2" interpreted; v5 for one token only; from
    GROUPED_MIN_TOKENS tokens the default kernels alone), eager and CUDA-graph replayed, and (baseline) the per-expert bitsandbytes backend quant.ffn.QuantizedExperts on the
    same bytes. bytes_per_call counts the distinct experts the call reads; gbps = bytes / time.
    `dry`: a scaled-down layer (scripts/gpu_check.py --dry on the CPU, where the kernels need
    TRITON_INTERPRET=1 set before this module was imported).
    """
    if dry:
        num_experts, hidden, inter, top_k, iters, baseline = 8, 64, 32, 2, 2, False
    if torch.device(device).type != "cuda" and not interpreted():
        return {"skipped": "the Triton kernels run on CUDA, or on the CPU with TRITON_INTERPRET=1 set before import"}
    from localrun.kernels.moe_4bit import reference
    from quant.ffn import QuantizedExperts

    device = torch.device(device)
    buf = random_buffer(num_experts, hidden, inter, quant_type, blocksize, double_quant, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, device=device, generator=g)
    ids = torch.rand(tokens, num_experts, device=device, generator=g).topk(top_k, dim=-1).indices
    w = torch.softmax(torch.randn(tokens, top_k, device=device, generator=g), dim=-1)
    args = (buf.data, *buf.code_tables(), buf.offsets(), hidden, inter, blocksize, double_quant, act)
    if configs is None:  # a prefill-sized call: the grouped GEMMs alone (the GEMV kernels' A/B is a decode's)
        configs = ((None,) if tokens >= GROUPED_MIN_TOKENS else SWEEP if device.type == "cuda" and not interpreted()
                   else (None, "v4", "v2"))
    configs = [b for b in configs if b != "v5" or fused_fits(tokens, hidden, inter, blocksize)]  # v5: one token

    ref = reference(x, ids, w, *args)
    xd = x.to(dtype)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "shape": dict(E=num_experts, H=hidden, I=inter, K=top_k, T=tokens), "quant_type": quant_type,
           "blocksize": blocksize, "double_quant": double_quant, "dtype": str(dtype).removeprefix("torch."),
           "bytes_per_call": int(torch.unique(ids).numel()) * buf.layout.nbytes, "configs": {}}
    best, best_us, errs = "unset", math.inf, []
    default = default_name(tokens, hidden, inter, blocksize)
    for blocks in configs:
        y = moe_4bit_triton(x, ids, w, *args, blocks=blocks)  # fp32: the autotuner keys on it separately
        errs.append(((y - ref).abs().max() / ref.abs().max()).item())
        run = lambda blocks=blocks: moe_4bit_triton(xd, ids, w, *args, blocks=blocks)  # noqa: E731
        run()  # autotunes the kernels at this dtype before timing
        us = time_us(run, iters, device)
        name = _config_name(blocks, default)
        out["configs"][name] = {"us_per_call": round(us, 2), "gbps": round(out["bytes_per_call"] / us / 1e3, 1),
                                "max_rel_err": errs[-1]}
        if blocks in tm.VERSIONS:
            out.setdefault("autotuned", {})[name] = tuned_configs(blocks)
        out["configs"][name]["max_rel_err_dtype"] = _rel_err(run(), ref)  # the timed calls' own output
        if graphs and device.type == "cuda":
            replayed = []
            g_us = graph_us(run, iters, device, replayed)
            out["configs"][name].update(us_per_call_graph=round(g_us, 2),
                                        gbps_graph=round(out["bytes_per_call"] / g_us / 1e3, 1),
                                        max_rel_err_graph=_rel_err(replayed[0], ref))
            us = g_us  # the decode step replays a graph: launch overhead is not the kernels' time
        if blocks == "v5" or isinstance(blocks, FusedTiles):  # its accumulator and counter back at zero after it all
            out["configs"][name]["fused_left_zero"] = fused_left_zero(x.device, hidden)
        if us < best_us:
            best, best_us = blocks, us
    best_name = _config_name(best, default)
    best_us = out["configs"][best_name]["us_per_call"]
    out.update(max_rel_err=max(errs), best_config=best_name, us_per_call=best_us,
               gbps=out["bytes_per_call"] / best_us / 1e3)
    if "us_per_call_graph" in out["configs"][best_name]:
        out["us_per_call_graph"] = out["configs"][best_name]["us_per_call_graph"]
        out["gbps_graph"] = out["bytes_per_call"] / out["us_per_call_graph"] / 1e3
    if baseline:
        backend = QuantizedExperts(buf.experts(), act)
        out["us_per_call_bnb_per_expert"] = time_us(lambda: backend(xd, ids, w), max(iters // 4, 1), device)
    if device.type == "cuda":
        out["copy_gbps"] = copy_bandwidth_gbps(device)
        out["fraction_of_copy_bw"] = out["gbps"] / out["copy_gbps"]
        if "gbps_graph" in out:
            out["fraction_of_copy_bw_graph"] = out["gbps_graph"] / out["copy_gbps"]
    return out
