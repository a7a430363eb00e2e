"""Scaled RoPE for Qwen3-MoE and Mixtral: "linear" and "yarn" `rope_type`s besides "default".

Qwen's model cards extend Qwen3's 32K context to 128K by adding `"rope_scaling": {"rope_type": "yarn",
"factor": 4.0, "original_max_position_embeddings": 32768}` to config.json. Both scalings only change
the inverse frequencies and, for YaRN, scale cos and sin by an attention factor m (transformers'
`attention_scaling`). Scaling both rotated q and k by m scales their dot product by m^2, so localrun
folds m^2 into the attention scale (`attention_factor`) and every RoPE kernel stays as it is.

The frequencies follow transformers' `_compute_yarn_parameters` (the YaRN paper's ramp between
interpolated and extrapolated frequencies, beta_fast 32 / beta_slow 1, truncated correction range).
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, is_number

SCALED = ("linear", "yarn")


def check_scaling(params: dict, where: str) -> None:
    """ConfigError naming the first field of a linear or YaRN `params` that localrun cannot use."""
    kind = params.get("rope_type")
    if kind not in SCALED:
        return
    factor = params.get("factor")
    derived = kind == "yarn" and factor is None  # transformers' YaRN then derives it (`resolved`)
    if not derived and not (is_number(factor) and factor >= 1):
        raise ConfigError(f"{where}.factor must be a number >= 1 for rope_type {kind!r}, not {factor!r}")
    if kind != "yarn":
        return
    original = params.get("original_max_position_embeddings")
    if not (isinstance(original, int) and not isinstance(original, bool) and original > 0):
        raise ConfigError(f"{where}.original_max_position_embeddings must be a positive integer for YaRN, "
                          f"not {original!r}")
    for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = params.get(name)
        if value is not None and not (is_number(value) and value > 0):
            raise ConfigError(f"{where}.{name} must be a positive number or null, not {value!r}")
    if not isinstance(params.get("truncate", True), bool):
        raise ConfigError(f"{where}.truncate must be true or false, not {params['truncate']!r}")


def resolved(params: dict, max_position_embeddings: int) -> dict:
    """`params` with a YaRN `factor` of null read as transformers reads it (DeepSeek-V3's configs spell it
    so): the ratio of max_position_embeddings to original_max_position_embeddings."""
    if params.get("rope_type") != "yarn" or params.get("factor") is not None:
        return params
    return {**params, "factor": max_position_embeddings / params["original_max_position_embeddings"]}


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)


def inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] of a "default", "linear" or "yarn" RoPE."""
    kind, theta = params.get("rope_type", "default"), params["rope_theta"]
    if kind == "linear":
        return default_inv_freq(theta, head_dim) / params["factor"]
    if kind != "yarn":
        return default_inv_freq(theta, head_dim)
    wavelengths = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)  # in transformers' order
    low, high = _correction_range(params, head_dim)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp  # the high frequencies keep their values, the low ones are interpolated
    return 1.0 / (params["factor"] * wavelengths) * (1 - extrapolated) + 1.0 / wavelengths * extrapolated


def _correction_range(params: dict, head_dim: int) -> tuple[float, float]:
    """The dims between which YaRN's ramp moves from extrapolation (fast rotations) to interpolation."""
    theta, original = params["rope_theta"], params["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times over the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def attention_factor(params: dict) -> float:
    """YaRN's m, by which transformers scales cos and sin (1 for the other types)."""
    if params.get("rope_type") != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = params["factor"], params.get("mscale"), params.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


def positions(params: dict, max_position_embeddings: int) -> int:
    """The positions a YaRN-scaled model reaches: factor x the original context, where that is more than
    max_position_embeddings (Qwen's cards extend the context by adding rope_scaling alone; vLLM reads it so)."""
    if params.get("rope_type") != "yarn":
        return max_position_embeddings
    return max(max_position_embeddings, int(params["factor"] * params["original_max_position_embeddings"]))
