"""Sampling transforms on hand-built distributions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from localrun import sampling
from localrun.errors import UsageError
from localrun.sampling import (SamplingParams, apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p,
                               draw, make_sampler, softmax)

NONE = torch.tensor([], dtype=torch.long)


def logits_of(probs):
    return torch.tensor(probs).log()


def kept(logits):
    return torch.isfinite(logits).nonzero()[:, 0].tolist()


def test_top_k_keeps_the_k_best():
    assert kept(apply_top_k(logits_of([0.1, 0.4, 0.2, 0.3]), 2)) == [1, 3]
    assert kept(apply_top_k(logits_of([0.1, 0.4, 0.2, 0.3]), 0)) == [0, 1, 2, 3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = logits_of([0.05, 0.5, 0.15, 0.3])
    assert kept(apply_top_p(probs, 0.5)) == [1]
    assert kept(apply_top_p(probs, 0.6)) == [1, 3]
    assert kept(apply_top_p(probs, 0.81)) == [1, 2, 3]
    assert kept(apply_top_p(probs, 1.0)) == [0, 1, 2, 3]
    assert kept(apply_top_p(probs, 1e-46)) == [1]  # 0 in fp32: still the top token, not all dropped (NaN)


def test_min_p_is_relative_to_the_top_token():
    assert kept(apply_min_p(logits_of([0.05, 0.5, 0.15, 0.3]), 0.5)) == [1, 3]
    assert kept(apply_min_p(logits_of([0.05, 0.5, 0.15, 0.3]), 0.2)) == [1, 2, 3]


def test_repetition_penalty_like_transformers():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # pure


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e39, 1e300])
def test_an_extreme_repetition_penalty_samples_a_token(penalty):
    """A penalty whose fp32 result overflows to inf made the sampler's shift inf - inf (NaN): a 500 in serve."""
    logits = torch.tensor([30.0, -20.0, 0.0, 5.0])
    assert torch.isfinite(apply_repetition_penalty(logits, torch.tensor([0, 1, 2]), penalty)).all()
    sample = make_sampler(SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=0))
    assert sample(logits, torch.tensor([0, 1])) == (0 if penalty < 1 else 3)


def test_greedy_is_argmax_and_draws_nothing():
    sample = make_sampler(SamplingParams(temperature=0.0))
    assert sample(torch.tensor([0.1, 3.0, 2.9]), NONE) == 1
    assert sample(torch.tensor([0.1, 3.0, 2.9]), torch.tensor([1])) == 1  # penalty off by default
    penalized = make_sampler(SamplingParams(repetition_penalty=2.0))
    assert penalized(torch.tensor([0.1, 3.0, 2.9]), torch.tensor([1])) == 2


def test_seed_makes_sampling_reproducible_and_matches_the_distribution():
    logits = logits_of([0.2, 0.5, 0.3])
    draws = lambda seed: [make_sampler(SamplingParams(temperature=1.0, seed=seed))(logits, NONE) for _ in range(1)]
    a = make_sampler(SamplingParams(temperature=1.0, seed=7))
    b = make_sampler(SamplingParams(temperature=1.0, seed=7))
    seq_a = [a(logits, NONE) for _ in range(50)]
    assert seq_a == [b(logits, NONE) for _ in range(50)]
    c = make_sampler(SamplingParams(temperature=1.0, seed=8))
    assert seq_a != [c(logits, NONE) for _ in range(50)]
    many = make_sampler(SamplingParams(temperature=1.0, seed=0))
    counts = torch.bincount(torch.tensor([many(logits, NONE) for _ in range(4000)]), minlength=3) / 4000
    assert torch.allclose(counts, torch.tensor([0.2, 0.5, 0.3]), atol=0.03)
    assert draws(1) == draws(1)


@pytest.mark.parametrize("scale", [0.1, 5.0, 80.0])
def test_softmax_is_torch_softmax_of_one_row(scale):
    """The sampler's softmax (reductions and element-wise ops) equals torch.softmax up to its sum's order,
    with -inf entries (filtered tokens) exactly 0 and the input left as it was."""
    logits = torch.randn(262_144, generator=torch.Generator().manual_seed(int(scale))) * scale
    logits[::7] = float("-inf")
    before = logits.clone()
    got, want = softmax(logits), torch.softmax(logits, dim=-1)
    assert torch.equal(logits, before) and torch.equal(got[::7], torch.zeros_like(got[::7]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)  # 262,144 terms summed in another order
    assert abs(float(got.sum()) - 1.0) < 1e-4


@pytest.mark.parametrize("seed", range(5))
def test_draw_is_torch_multinomial_without_its_host_read(seed, monkeypatch):
    """draw takes the ids torch.multinomial(probs, 1) takes from the same generator state, zeros never,
    and leaves the generator where multinomial would (the next draws agree too); the sampler draws
    through it, never through multinomial (whose validity check reads the device: a second sync)."""
    probs = torch.softmax(torch.randn(5000, generator=torch.Generator().manual_seed(seed)) * 4, dim=-1)
    probs[::3] = 0
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(20):
        got = draw(probs, ours)
        assert got.shape == (1,) and probs[got] > 0
        assert torch.equal(got, torch.multinomial(probs, 1, generator=theirs))
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: pytest.fail("the sampler called torch.multinomial"))
    sampler = make_sampler(SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, seed=seed))
    assert 0 <= sampler(torch.randn(300), NONE) < 300


def test_temperature_sharpens():
    logits = logits_of([0.2, 0.5, 0.3])
    cold = make_sampler(SamplingParams(temperature=0.05, seed=0))
    assert all(cold(logits, NONE) == 1 for _ in range(100))
    topk1 = make_sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert all(topk1(logits, NONE) == 1 for _ in range(100))


@pytest.mark.parametrize("temperature, tie", [(1e-38, {0, 2}), (1e-45, {0, 2}), (5e-324, {0})])
def test_a_tiny_temperature_is_all_but_greedy(temperature, tie):
    """Divided by a tiny temperature the logits overflow; the top one is shifted to 0 first, so the
    draw is the argmax (ties split), never NaN probabilities. One that is 0 in fp32 is greedy."""
    logits = logits_of([0.2, 0.5, 0.3]) * 30
    sampler = make_sampler(SamplingParams(temperature=temperature, top_p=0.9, min_p=0.1, seed=0))
    assert all(sampler(logits, NONE) == 1 for _ in range(50))
    tied = torch.tensor([3.0, 1.0, 3.0])
    assert {make_sampler(SamplingParams(temperature=temperature, seed=s))(tied, NONE) for s in range(40)} == tie


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"min_p": 2}, "min_p"), ({"top_k": -3}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
])
def test_invalid_values_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        SamplingParams(**kwargs)


def test_non_finite_logits_sample_as_greedy_picks_not_id_0():
    """draw has no validity check (torch.multinomial's raised on inf or NaN probabilities): an overflowed
    +inf logit made the shifted row NaN and every draw id 0. Now +inf logits take all the mass, the id
    greedy picks, and a NaN logit is never drawn."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    logits[500] = float("inf")
    greedy = make_sampler(SamplingParams())(logits, NONE)
    assert greedy == 500
    for seed in range(5):
        assert make_sampler(SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, seed=seed))(logits, NONE) == 500
    logits = logits_of([0.001, 0.998, 0.001])
    logits[0] = float("nan")
    assert {make_sampler(SamplingParams(temperature=1.0, seed=s))(logits, NONE) for s in range(20)} <= {1, 2}


# aten ops that make the host wait for a CUDA device (a sampled token must sync once: its id's read):
# a host value copied in (lift_fresh + copy_: `t[i] = 0` with a Python scalar), a device value read out
# (_local_scalar_dense: item(), int(), bool()), and the ops whose output size depends on the data.
HOST_SYNCING_OPS = ("aten.lift_fresh", "aten.copy_", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select",
                    "aten.index_put_", "aten.unique", "aten._unique2", "aten.repeat_interleave")


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repetition_penalty=1.3),
                                    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
                                                   repetition_penalty=1.2, seed=0),
                                    SamplingParams(temperature=1.0, top_p=1e-46, seed=1)],
                         ids=["greedy", "greedy-penalty", "every-filter", "top_p-0-in-fp32"])
def test_a_token_is_chosen_without_an_op_that_waits_for_the_device(params, monkeypatch):
    """Sampler.token, greedy and with every filter, runs no op that would sync the host on CUDA (the
    2026-11-27 H200 counted 2 syncs a sampled token: apply_top_p's `drop[0] = False`), so the id's read is
    a token's only one (scripts/gpu_check.py's per_token_graphs_sampled counts them on a GPU). The CPU's
    own draws read values by design and run where reads are free: off here, so what is recorded is what
    CUDA runs."""
    monkeypatch.setattr(sampling, "reads_are_free", lambda device: False)
    recorder = _OpRecorder()
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    seen, sampler = torch.tensor([1, 5, 7, 5]), make_sampler(params)
    with torch.inference_mode(), recorder:
        token = sampler.token(logits, seen)
    assert token.shape == (1,)
    syncing = [op for op in recorder.ops if op.startswith(HOST_SYNCING_OPS)]
    assert not syncing and recorder.ops, syncing


# ---------------------------------------------------------------------------------------------
# the CPU's draw among the top candidates


def peaked(V: int, seed: int, scale: float = 8.0) -> torch.Tensor:
    """Shifted logits (max 0) of a row whose mass sits in a few dozen tokens, as a language model's does."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale
    return logits - logits.max()


def candidates_as_row(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """top_candidates' probabilities scattered into a row of zeros (None where it steps aside)."""
    among = sampling.top_candidates(logits, params)
    return None if among is None else torch.zeros_like(logits).scatter(0, among[1], among[0])


CANDIDATE_CASES = [SamplingParams(temperature=1.0, top_k=64, top_p=0.95), SamplingParams(temperature=1.0, top_k=20),
                   SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.05),
                   SamplingParams(temperature=1.0, top_k=300, min_p=0.01), SamplingParams(temperature=1.0, top_p=1e-46),
                   SamplingParams(temperature=1.0, top_k=1)]


@pytest.mark.parametrize("params", CANDIDATE_CASES, ids=lambda p: f"k{p.top_k}-p{p.top_p}-min{p.min_p}")
@pytest.mark.parametrize("seed", range(3))
def test_top_candidates_are_the_whole_rows_distribution(params, seed):
    """Among the top candidates the filters keep the very tokens they keep over the whole row, with its
    probabilities (top-p's shares of the whole row's mass, not of the candidates')."""
    logits = peaked(50_000, seed)
    got = candidates_as_row(logits, params)
    assert got is not None
    want = sampling.filtered_probs(logits, params)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_top_candidates_give_way_to_the_whole_row():
    flat = torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 0.1
    flat -= flat.max()
    assert sampling.top_candidates(flat, SamplingParams(temperature=1.0, top_p=0.9)) is None  # > 1,024 kept
    assert sampling.top_candidates(flat, SamplingParams(temperature=1.0, min_p=0.5)) is None
    assert sampling.top_candidates(flat, SamplingParams(temperature=1.0)) is None  # no filter: the whole row
    assert sampling.top_candidates(flat[:1000], SamplingParams(temperature=1.0, top_p=0.5)) is None  # short row
    tied = peaked(50_000, 1)
    tied[torch.topk(tied, 80).indices[5:]] = tied.topk(6).values[-1]  # the 6th value's ties run past 6 + 1
    assert sampling.top_candidates(tied, SamplingParams(temperature=1.0, top_k=6)) is None
    assert int((sampling.filtered_probs(tied, SamplingParams(temperature=1.0, top_k=6)) > 0).sum()) == 80


def test_the_cpu_sampler_draws_among_the_candidates_with_the_rows_distribution(monkeypatch):
    logits = peaked(30_000, 4, scale=5.0)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=0)
    want = sampling.filtered_probs(logits, params)
    calls = []
    real = sampling.top_candidates
    monkeypatch.setattr(sampling, "top_candidates", lambda *a: calls.append(1) or real(*a))
    sampler = make_sampler(params)
    draws = torch.tensor([sampler(logits, NONE) for _ in range(3000)])
    assert len(calls) == 3000 and (want[draws] > 0).all()
    top = torch.topk(want, 3).indices
    freq = torch.stack([(draws == t).float().mean() for t in top])
    assert torch.allclose(freq, want[top], atol=0.03), (freq, want[top])


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(V=st.integers(1100, 6000), scale=st.sampled_from([0.5, 3.0, 8.0, 30.0]), seed=st.integers(0, 2**16),
       top_k=st.sampled_from([0, 1, 2, 40, 64, 1000]), top_p=st.sampled_from([1.0, 0.99, 0.9, 0.5, 1e-3]),
       min_p=st.sampled_from([0.0, 0.01, 0.2, 1.0]), tie=st.booleans())
def test_top_candidates_agree_with_the_whole_row_or_step_aside(V, scale, seed, top_k, top_p, min_p, tie):
    """Any row and filters: the candidates' distribution is the whole row's, or top_candidates says None.
    Where top-p's boundary falls inside a run of equal logits, which of them it keeps follows the sort's
    order of equals (on the whole row or on the candidates, both arbitrary): then the kept sets are
    compared as values, the same count of tokens down to the same boundary logit."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale
    if tie:  # a block of equal logits around the top-k boundary
        logits[torch.topk(logits, 70).indices[:60]] = logits.max()
    logits -= logits.max()
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    want = sampling.filtered_probs(logits, params)
    got = candidates_as_row(logits, params)
    if got is None:
        return
    if tie:
        assert int((got > 0).sum()) == int((want > 0).sum())
        assert logits[got > 0].min() == logits[want > 0].min()
        torch.testing.assert_close(got.sort().values, want.sort().values, rtol=1e-5, atol=1e-9)
    else:
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_draw_by_cdf_draws_each_token_at_its_probability_and_never_a_zero():
    """Mass at both ends of blocks, in the first and the last (partial) block, zeros everywhere else."""
    probs = torch.zeros(5000)
    hot = torch.tensor([0, 511, 512, 1023, 4608, 4999])
    probs[hot] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.05, 0.2])
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sampling.draw_by_cdf(probs, gen) for _ in range(20_000)])
    freq = torch.bincount(draws, minlength=5000) / 20_000
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(freq[hot], probs[hot], atol=0.012), freq[hot]
    again = torch.Generator().manual_seed(0)
    assert torch.equal(torch.cat([sampling.draw_by_cdf(probs, again) for _ in range(200)]), draws[:200])


@pytest.mark.parametrize("u, want", [(0.0, 3), (1.0, 1800), (0.5, 1024)])
def test_draw_by_cdf_at_the_ends_of_the_uniform(u, want, monkeypatch):
    """u = 0 draws the first token with mass; u = 1 (a target the total's rounding can reach) the last
    with mass, never a zero past it or an id past the row."""
    probs = torch.zeros(2000)
    probs[[3, 1024, 1800]] = torch.tensor([0.25, 0.5, 0.25])
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full_like(real(*a, **k), u))
    assert sampling.draw_by_cdf(probs, None).tolist() == [want]


def test_the_cpu_sampler_without_filters_draws_by_cdf(monkeypatch):
    logits = peaked(20_000, 5, scale=3.0)
    calls = []
    real = sampling.draw_by_cdf
    monkeypatch.setattr(sampling, "draw_by_cdf", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(sampling, "draw", lambda *a: pytest.fail("drew an exponential a token"))
    a, b = make_sampler(SamplingParams(temperature=0.7, seed=3)), make_sampler(SamplingParams(temperature=0.7, seed=3))
    seq = [a(logits, NONE) for _ in range(50)]
    assert seq == [b(logits, NONE) for _ in range(50)] and len(calls) == 100
