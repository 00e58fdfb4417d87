"""Next-token choice: greedy is argmax, top-k / top-p filter as documented, seeds reproduce draws, and
SamplingParams.validate refuses bad values."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.infer.sampling import SamplingParams, new_generator, next_tokens, sample


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [sample(logits, params, generator) for _ in range(n)]


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p (written independently of the module)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


# --- greedy -----------------------------------------------------------------------------------------

def test_greedy_rows_are_the_argmax():
    logits = torch.randn(5, 37, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams()] * 5
    assert next_tokens(logits, params, [None] * 5) == [int(row.argmax()) for row in logits]


def test_greedy_has_no_generator_and_sampling_does():
    assert SamplingParams().greedy
    assert new_generator(SamplingParams(temperature=0.0, seed=4)) is None
    generator = new_generator(SamplingParams(temperature=0.7))  # no seed: still a stream of its own
    assert isinstance(generator, torch.Generator)


def test_bf16_logits_give_the_fp32_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert next_tokens(logits, [SamplingParams()] * 3, [None] * 3) == logits.float().argmax(dim=-1).tolist()


def test_top_k_1_equals_greedy_for_every_seed():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    greedy = logits.argmax(dim=-1).tolist()
    for seed in range(10):
        params = [SamplingParams(temperature=1.5, top_k=1, seed=seed)] * 4
        assert next_tokens(logits, params, [new_generator(p) for p in params]) == greedy


def test_each_row_uses_its_own_params():
    """A greedy row next to a sampled row still gets its argmax; the sampled row draws from its own stream."""
    logits = torch.zeros(2, 100)
    logits[0, 17] = 5.0  # greedy row: clear argmax
    sampled = SamplingParams(temperature=1.0, seed=9)
    params = [SamplingParams(), sampled]
    tokens = next_tokens(logits, params, [None, new_generator(sampled)])
    assert tokens[0] == 17
    # the sampled row's draw is exactly what its own seeded stream gives on that row
    assert tokens[1] == sample(logits[1], sampled, new_generator(sampled))


# --- temperature ------------------------------------------------------------------------------------

def test_temperature_zero_is_deterministic_and_positive_temperature_explores():
    logits = log_probs([0.4, 0.3, 0.2, 0.1])
    greedy = SamplingParams(temperature=0.0)
    assert {next_tokens(logits[None], [greedy], [None])[0] for _ in range(20)} == {0}
    assert len(set(draws(logits, SamplingParams(temperature=1.0), 200))) == 4


def test_draws_follow_softmax_of_logits_over_temperature():
    logits = log_probs([0.6, 0.3, 0.1])
    for temperature in (0.5, 2.0):
        n = 4000
        counts = torch.bincount(torch.tensor(draws(logits, SamplingParams(temperature=temperature), n, seed=11)), minlength=3)
        expected = torch.softmax(logits / temperature, dim=-1)
        assert torch.allclose(counts.float() / n, expected, atol=0.04), (temperature, counts, expected)


# --- top-k and top-p --------------------------------------------------------------------------------

def test_top_k_keeps_only_the_k_best():
    logits = log_probs([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    drawn = set(draws(logits, SamplingParams(temperature=1.0, top_k=3), 400))
    assert drawn == {1, 3, 4}


def test_top_k_larger_than_the_vocabulary_is_no_limit():
    logits = log_probs([0.25] * 4)
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=100), 200)) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p", [0.3, 0.45, 0.6, 0.79, 0.81, 0.93, 0.99])
def test_top_p_keeps_the_smallest_nucleus(top_p):
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    drawn = set(draws(log_probs(probs), SamplingParams(temperature=1.0, top_p=top_p), 400))
    assert drawn == nucleus(probs, top_p)


def test_top_p_always_keeps_the_most_likely_token():
    logits = log_probs([0.9, 0.05, 0.05])
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.01), 100)) == {0}


def test_top_k_filters_before_top_p():
    """After top-k=2 the survivors renormalise to 4/7 and 3/7, so top-p=0.5 keeps token 0 alone (applied
    to the unfiltered distribution, 0.4 < 0.5 would have kept token 1 too)."""
    logits = log_probs([0.4, 0.3, 0.2, 0.1])
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5), 300)) == {0}


# --- seeds ------------------------------------------------------------------------------------------

def test_same_seed_same_tokens_different_seeds_differ():
    logits = torch.zeros(1, 128)  # uniform: 30 draws of two different streams agree with probability 128**-30

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        generator = new_generator(params)
        return [next_tokens(logits, [params], [generator])[0] for _ in range(30)]

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)


def test_a_seeded_stream_is_independent_of_the_global_rng():
    logits = torch.zeros(64)
    params = SamplingParams(temperature=1.0, seed=7)
    torch.manual_seed(0)
    first = [sample(logits, params, g) for g in [new_generator(params)] for _ in range(10)]
    torch.manual_seed(999)
    torch.rand(100)
    second = [sample(logits, params, g) for g in [new_generator(params)] for _ in range(10)]
    assert first == second


# --- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_validate_refuses_bad_values(kwargs, field):
    params = SamplingParams(**kwargs)
    with pytest.raises(LorakitError, match=field):
        params.validate()


def test_validate_reports_every_problem_at_once():
    params = SamplingParams(max_tokens=0, temperature=-1.0, top_p=2.0, top_k=-5)
    assert len(params.problems()) == 4
    with pytest.raises(LorakitError) as caught:
        params.validate()
    for field in ("max_tokens", "temperature", "top_p", "top_k"):
        assert field in str(caught.value)


@pytest.mark.parametrize("kwargs", [dict(), dict(max_tokens=1), dict(temperature=0.0, top_p=1.0, top_k=0),
                                    dict(temperature=2.0, top_p=0.01, top_k=1, max_tokens=4096)])
def test_validate_accepts_good_values_and_returns_the_params(kwargs):
    params = SamplingParams(**kwargs)
    assert params.problems() == []
    assert params.validate() is params


# --- values that would fail a whole decode step, refused at submission --------------------------------

@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_validate_refuses_a_temperature_that_is_not_finite(temperature):
    # nan < 0 is False: a plain range check let it through, and torch.multinomial then failed every row
    # of the step it ran in
    with pytest.raises(LorakitError, match="temperature"):
        SamplingParams(temperature=temperature).validate()


def test_validate_refuses_a_fractional_top_k():
    with pytest.raises(LorakitError, match="top_k"):
        SamplingParams(temperature=1.0, top_k=2.5).validate()
