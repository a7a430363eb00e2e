"""Sampling: small pure logits -> logits functions, composed by `make_sampler`.

Each transform takes fp32 logits [V] and returns logits of the same shape, with removed
tokens set to -inf. Temperature 0 means argmax (greedy); no randomness is drawn then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UsageError

NEG_INF = float("-inf")
FLT_MAX = torch.finfo(torch.float32).max
FLT_MIN = torch.finfo(torch.float32).tiny  # the smallest normal fp32
PENALTY_REACH = 1e30  # a repetition penalty beyond [1/this, this] acts as this: fp32 logits would overflow to inf


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (0 <= self.temperature < math.inf, "temperature must be >= 0 and finite"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0 < self.repetition_penalty < math.inf, "repetition_penalty must be > 0 and finite"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be an integer from {SEED_MIN} to {SEED_MAX}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small it is 0 in the fp32 the logits are divided in."""
        return torch.tensor(self.temperature, dtype=torch.float32).item() == 0.0


def softmax(logits_V: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """torch.softmax of one row, as reductions and element-wise ops over the whole device: CUDA's
    softmax kernel gives a row one block, ~100 us for a 262,144-token vocabulary on an H200 (three of
    them were a tenth of a sampled token, docs/gpu/2026-11-27-h200-resident.md); these take a few.
    total: when logits_V are the top candidates of a longer row (max included), that row's sum of
    exp(logit - max), so each probability is a share of the whole row (default: of logits_V)."""
    e = (logits_V - logits_V.max()).exp_()
    return e.div_(e.sum() if total is None else total)


def apply_repetition_penalty(logits_V: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style, as transformers does it: seen tokens' logits divided by penalty if > 0, else multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits_V
    penalty = min(max(penalty, 1 / PENALTY_REACH), PENALTY_REACH)
    picked = logits_V[seen]
    # scatter, not `out[seen] = ...` (index_put_): a token seen twice writes the same value twice
    return logits_V.scatter(0, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def apply_top_k(logits_V: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits_V.shape[-1]:
        return logits_V
    kth = torch.topk(logits_V, k).values[-1]
    return logits_V.masked_fill(logits_V < kth, NEG_INF)


def apply_top_p(logits_V: torch.Tensor, p: float, total: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one).
    total: as softmax's, for candidates of a longer row."""
    if p >= 1.0:
        return logits_V
    sorted_logits, order = torch.sort(logits_V, descending=True)
    probs = softmax(sorted_logits, total)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token: exactly 0 before the first
    # so the top token stays whatever p: one that is 0 in fp32 would drop every token (p >= FLT_MIN > 0 keeps
    # it, where `drop[0] = False` was a host scalar copied in, a host sync a sampled token on CUDA)
    drop_sorted = before >= max(p, FLT_MIN)
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits_V.masked_fill(drop, NEG_INF)


def apply_min_p(logits_V: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0.0:
        return logits_V
    probs = softmax(logits_V)
    return logits_V.masked_fill(probs < min_p * probs.max(), NEG_INF)


def draw(probs_V: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id drawn from probs_V, as a device tensor [1]: argmax(p / q), q ~ Exp(1), which is what
    torch.multinomial(probs, 1) computes (the same draws from the same generator state), less its
    validity check, a host read of min and max that would be a second sync a decoded token on CUDA.
    probs_V comes from a softmax, so it holds no negative value or inf."""
    q = torch.empty_like(probs_V).exponential_(1, generator=generator)
    return torch.argmax(probs_V / q).view(1)


def reads_are_free(device: torch.device) -> bool:
    """Whether the host may read a tensor's value there for nothing: on the CPU, whose draws use such
    reads (top_candidates, draw_by_cdf); on CUDA a read is a sync, and a sampled token keeps to one."""
    return device.type == "cpu"


CDF_BLOCK = 512  # tokens a block of draw_by_cdf's two-level cumulative sum


def draw_by_cdf(probs_V: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id drawn from probs_V (no negative value, inf or NaN; some mass), as a tensor [1]: the token
    at which the cumulative probability passes u x the total for one uniform u, the cumulative sums in
    fp64 over blocks of CDF_BLOCK tokens, then within the block drawn. A token of probability 0 is never
    drawn. One random number where `draw` takes one a token: 262,144 exponentials cost ~7-9 ms on two
    CPU cores. It reads the block's index on the host: the CPU's draw over a whole row."""
    V = probs_V.shape[-1]
    padded = torch.nn.functional.pad(probs_V, (0, -V % CDF_BLOCK))
    blocks = padded.view(-1, CDF_BLOCK).sum(1, dtype=torch.float64).cumsum(0)
    total = blocks[-1:]
    target = torch.rand(1, dtype=torch.float64, generator=generator, device=probs_V.device) * total
    # the first block whose running total passes the target; at most the last block with mass (a target
    # that rounds up to the total would pass none)
    b = int(torch.minimum(torch.searchsorted(blocks, target, right=True), torch.searchsorted(blocks, total)))
    within = target - (blocks[b - 1] if b else 0.0)
    sums = padded[b * CDF_BLOCK : (b + 1) * CDF_BLOCK].double().cumsum(0)
    i = torch.minimum(torch.searchsorted(sums, within, right=True), torch.searchsorted(sums, sums[-1:]))
    return i + b * CDF_BLOCK


def filtered_probs(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [V] after top-k, then top-p, then min-p (filtered tokens exactly 0)."""
    logits = apply_min_p(apply_top_p(apply_top_k(logits_V, params.top_k), params.top_p), params.min_p)
    return softmax(logits)


CPU_CANDIDATES = 1024  # tokens a filtered draw on the CPU looks among first without top-k (top_candidates)


def top_candidates(logits_V: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(probs, ids) of the top_k + 1 (without top-k: CPU_CANDIDATES) most likely tokens after the filters, the
    distribution filtered_probs gives over the whole row, or None where that row must be taken: no
    filter set, a row no longer than the candidates, or filters that keep the last candidate (more
    tokens may follow it). Sorting a 262,144-token row for top-p and drawing as many exponentials cost
    28.7 ms a token on two Xeon cores at Gemma 4's defaults (top-k 64, top-p 0.95), a sixth of 26B-A4B's
    decode on two EPYC cores; among the 65 candidates 1.9 ms. It reads values on the host (the fallback
    test): for the CPU, where that costs nothing; on CUDA it would be a second sync a token."""
    count = params.top_k + 1 if params.top_k else CPU_CANDIDATES  # top-k's survivors, and one to see they end
    if not (params.top_k or params.top_p < 1.0 or params.min_p > 0.0) or count >= logits_V.shape[-1]:
        return None
    values, ids = torch.topk(logits_V, count)  # descending: values[0] is the row's max
    kept = apply_top_k(values, params.top_k)
    if params.top_k and kept[-1] > NEG_INF:  # the k-th value's ties run past the candidates
        return None
    # top-k's survivors all lie among the candidates; without top-k every token of the row counts
    total = None if params.top_k else (logits_V - values[0]).exp_().sum()
    kept = apply_min_p(apply_top_p(kept, params.top_p, total), params.min_p)
    if kept[-1] > NEG_INF:
        return None
    return softmax(kept), ids


class Sampler:
    """sampler(logits_V, seen_ids) -> token id. Greedy at temperature 0, else the filters then a draw.

    `token(logits_V, seen_ids)` does the same on the logits' device and returns the id as a device
    tensor [1] without reading it: generation can queue the next step before the host learns it.
    """

    def __init__(self, params: SamplingParams, device="cpu"):
        self.params = params
        self.greedy = params.greedy
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def token(self, logits_V: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        params = self.params
        logits = apply_repetition_penalty(logits_V.float(), seen, params.repetition_penalty)
        if self.greedy:
            return torch.argmax(logits).view(1)
        # A model's overflow: +inf logits take all the mass (as greedy's argmax picks them), NaN ones none.
        # Else the shift below makes the whole row NaN and draw returns id 0 with no error (multinomial
        # raised, but its check is a host read); a row of NaN alone still does.
        logits = logits.nan_to_num(nan=NEG_INF, posinf=FLT_MAX, neginf=NEG_INF)
        # the top logit to 0 first: divided by a tiny temperature the rest go to -inf, never the top to
        # inf (inf - inf is NaN); softmax, top-k, top-p and min-p are all blind to the shift
        logits = (logits - logits.max()) / params.temperature
        if reads_are_free(logits.device):
            among = top_candidates(logits, params)
            if among is not None:
                probs, ids = among
                return ids[draw(probs, self.generator)]
            return draw_by_cdf(filtered_probs(logits, params), self.generator)
        return draw(filtered_probs(logits, params), self.generator)

    def __call__(self, logits_V: torch.Tensor, seen: torch.Tensor) -> int:
        return int(self.token(logits_V, seen))


def make_sampler(params: SamplingParams, device="cpu") -> Sampler:
    """A Sampler for `params` whose random draws (if any) come from a generator on `device`."""
    return Sampler(params, device)
