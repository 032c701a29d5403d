"""Sampling parameters, logit warping and seeded draws."""
from __future__ import annotations

import math

import pytest
import torch

from orchestrator.errors import InvalidRequestError
from orchestrator.sampling import (
    MAX_STOP_STRINGS,
    SamplingParams,
    make_generator,
    next_token,
    sample_from_uniform,
    sample_token,
    warp_logits,
)

LIMIT = 512


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=LIMIT),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=0),
        SamplingParams(temperature=2, top_p=1, seed=2**64 - 1),
        SamplingParams(top_p=1e-6),
        SamplingParams(stop=("\n\n", "END")),
        SamplingParams(stop=("x",) * MAX_STOP_STRINGS),
    ],
)
def test_validate_accepts_good_params(params: SamplingParams) -> None:
    params.validate(LIMIT)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=-3), "max_tokens"),
        (SamplingParams(max_tokens=LIMIT + 1), "max_tokens"),
        (SamplingParams(max_tokens=2.0), "max_tokens"),
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(temperature=math.inf), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.01), "top_p"),
        (SamplingParams(top_p=math.nan), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(seed=2**64), "seed"),
        (SamplingParams(stop=("",)), "stop"),
        (SamplingParams(stop=("a", 3)), "stop"),
        (SamplingParams(stop=("x",) * (MAX_STOP_STRINGS + 1)), "stop"),
    ],
)
def test_validate_rejects_bad_params_naming_them(params: SamplingParams, name: str) -> None:
    with pytest.raises(InvalidRequestError, match=name):
        params.validate(LIMIT)


def test_validate_message_states_allowed_range() -> None:
    with pytest.raises(InvalidRequestError, match=r"\[1, 512\]"):
        SamplingParams(max_tokens=1000).validate(LIMIT)
    with pytest.raises(InvalidRequestError, match=r"\(0, 1\]"):
        SamplingParams(top_p=2.0).validate(LIMIT)


def test_greedy_is_temperature_zero() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.5).greedy


def _random_logits(rows: int = 8, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.3, top_k=5),
        SamplingParams(temperature=1.5, top_p=0.5),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9),
        SamplingParams(),
    ],
)
def test_warp_rows_are_distributions(params: SamplingParams) -> None:
    probs = warp_logits(_random_logits(), params)
    assert probs.shape == (8, 50)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))


def test_warp_plain_temperature_is_softmax() -> None:
    logits = _random_logits()
    torch.testing.assert_close(
        warp_logits(logits, SamplingParams(temperature=0.5)), torch.softmax(logits / 0.5, -1)
    )


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_k_most_likely(k: int) -> None:
    logits = _random_logits()
    probs = warp_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    kept = probs > 0
    assert (kept.sum(-1) == k).all()
    top = torch.topk(logits, k, dim=-1).indices
    assert kept.gather(-1, top).all()
    # Renormalised softmax over the survivors.
    expected = torch.softmax(logits.gather(-1, top), -1)
    torch.testing.assert_close(probs.gather(-1, top), expected)


def test_top_p_keeps_minimal_nucleus() -> None:
    probs_in = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    logits = probs_in.log()
    # Sorted mass: 0.4, 0.65, 0.85, 0.95, 1.0.
    cases = {0.3: {1}, 0.6: {1, 3}, 0.7: {1, 3, 4}, 0.9: {1, 3, 4, 2}, 0.99: {0, 1, 2, 3, 4}}
    for top_p, expected in cases.items():
        out = warp_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
        assert set(torch.nonzero(out).flatten().tolist()) == expected, top_p
        kept = sorted(expected)
        torch.testing.assert_close(out[kept], probs_in[kept] / probs_in[kept].sum())


def test_top_p_always_keeps_the_top_token() -> None:
    logits = _random_logits()
    out = warp_logits(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    expected = torch.zeros_like(out).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    torch.testing.assert_close(out, expected)


def test_top_p_nucleus_is_minimal_on_random_rows() -> None:
    logits = _random_logits(rows=64, vocab=100, seed=3)
    top_p = 0.8
    out = warp_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    full = torch.softmax(logits, -1)
    for row_full, row_out in zip(full, out):
        kept = row_out > 0
        assert row_full[kept].sum() >= top_p  # enough mass
        assert row_full[kept].sum() - row_full[kept].min() < top_p  # dropping any one is too little
        assert row_full[kept].min() >= row_full[~kept].max()  # the most likely ones


def test_warp_temperature_to_zero_tends_to_argmax() -> None:
    logits = _random_logits()
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    previous_gap = math.inf
    for temperature in [1.0, 0.3, 0.1, 0.03]:
        gap = (warp_logits(logits, SamplingParams(temperature=temperature)) - one_hot).abs().max()
        assert gap < previous_gap
        previous_gap = gap
    for tiny_temperature in [1e-30, 1e-300]:  # above and below float32's smallest number
        tiny = warp_logits(logits, SamplingParams(temperature=tiny_temperature))
        torch.testing.assert_close(tiny, one_hot)
    torch.testing.assert_close(warp_logits(logits, SamplingParams()), one_hot)


def test_warp_half_precision_logits_give_float32_probs() -> None:
    probs = warp_logits(_random_logits().half(), SamplingParams(temperature=1.0, top_p=0.9))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))


def test_same_seed_same_samples_and_different_seeds_differ() -> None:
    probs = torch.softmax(_random_logits(rows=1, vocab=1000)[0] / 3, -1)

    def draws(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [sample_token(probs, generator) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_unseeded_generators_differ() -> None:
    probs = torch.full((1000,), 1e-3)
    a, b = make_generator(None), make_generator(None)
    draws_a = [sample_token(probs, a) for _ in range(20)]
    assert draws_a != [sample_token(probs, b) for _ in range(20)]


def test_sample_token_matches_distribution_and_skips_zeros() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    generator = make_generator(0)
    counts = torch.bincount(
        torch.tensor([sample_token(probs, generator) for _ in range(4000)]), minlength=6
    )
    assert counts[[0, 2, 5]].sum() == 0
    # Each cell within 5 standard errors of its expectation.
    sigma = (4000 * probs * (1 - probs)).sqrt()
    assert ((counts - 4000 * probs).abs() <= 5 * sigma + 1e-9).all()


def test_sample_from_uniform_edges() -> None:
    probs = torch.tensor([0.0, 0.25, 0.75, 0.0])
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999999999999999])
    assert sample_from_uniform(probs.expand(4, 4), u).tolist() == [1, 1, 2, 2]


def test_next_token_greedy_is_argmax_and_sampling_is_reproducible() -> None:
    logits = _random_logits(rows=1)[0]
    assert next_token(logits, SamplingParams(), make_generator(0)) == int(logits.argmax())
    params = SamplingParams(temperature=5.0, top_k=5)  # flat enough that seeds disagree
    a = [next_token(logits, params, make_generator(s)) for s in range(20)]
    assert a == [next_token(logits, params, make_generator(s)) for s in range(20)]
    assert set(a) <= set(torch.topk(logits, 5).indices.tolist())
    assert len(set(a)) > 1
