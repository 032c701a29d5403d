"""Accept/resample maths: greedy prefix matching and lossless rejection sampling.

The statistical tests compare empirical distributions with the target's using a total-variation
bound TV <= 1/2 * sum_i Z * sigma_i, sigma_i = sqrt(p_i (1 - p_i) / n), Z = 5. If every cell's
frequency lies within Z standard errors of p_i, TV cannot exceed it; by the union bound a correct
verifier breaks it with probability <= V * P(|N(0,1)| > 5) ~ 6 * 6e-7 per check. A zero-probability
token gives sigma = 0, so a single occurrence of it fails the check.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

from orchestrator.sampling import SamplingParams, make_generator, sample_from_uniform, warp_logits
from orchestrator.verification import (
    BatchVerifyResult,
    VerifyResult,
    verify_greedy,
    verify_sampling,
    verify_sampling_batched,
)

BatchVerifier = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], BatchVerifyResult
]

V = 6
Z = 5.0
NUM_ROUNDS = 100_000


# ---------------------------------------------------------------- greedy


def _logits_with_argmax(argmaxes: list[int], vocab: int = 10) -> torch.Tensor:
    """[len, vocab] logits whose row-wise argmax is `argmaxes`, with noise elsewhere."""
    logits = torch.randn(len(argmaxes), vocab, generator=torch.Generator().manual_seed(1))
    logits[torch.arange(len(argmaxes)), argmaxes] = 10.0
    return logits


def test_greedy_all_accepted_appends_bonus() -> None:
    result = verify_greedy([3, 1, 4], _logits_with_argmax([3, 1, 4, 7]))
    assert result == VerifyResult(tokens=[3, 1, 4, 7], num_accepted=3)


def test_greedy_first_token_rejected() -> None:
    result = verify_greedy([3, 1, 4], _logits_with_argmax([5, 1, 4, 7]))
    assert result == VerifyResult(tokens=[5], num_accepted=0)


def test_greedy_middle_rejection_stops_even_if_later_tokens_match() -> None:
    result = verify_greedy([3, 1, 4, 1], _logits_with_argmax([3, 2, 4, 1, 9]))
    assert result == VerifyResult(tokens=[3, 2], num_accepted=1)


def test_greedy_no_draft_is_plain_argmax() -> None:
    assert verify_greedy([], _logits_with_argmax([8])) == VerifyResult(tokens=[8], num_accepted=0)


def test_greedy_rejects_wrong_logit_rows() -> None:
    with pytest.raises(ValueError, match="K\\+1"):
        verify_greedy([1, 2], _logits_with_argmax([1, 2]))


def test_sampling_with_greedy_warp_equals_greedy_verification() -> None:
    """One-hot p and q (greedy target and drafter) turn the sampling rule into prefix matching."""
    gen = torch.Generator().manual_seed(5)
    greedy = SamplingParams()
    for _ in range(200):
        k = int(torch.randint(0, 5, (), generator=gen))
        target_logits = torch.randn(k + 1, 4, generator=gen)
        draft = torch.randint(0, 4, (k,), generator=gen).tolist()
        draft_probs = torch.nn.functional.one_hot(torch.tensor(draft, dtype=torch.long), 4).float()
        expected = verify_greedy(draft, target_logits)
        target_probs = warp_logits(target_logits, greedy)
        got = verify_sampling(draft, draft_probs, target_probs, make_generator(0))
        assert got == expected


# ---------------------------------------------------------------- sampling: losslessness


class MarkovPair(NamedTuple):
    """Target and drafter as position-dependent Markov chains over V tokens.

    Token k+1's distribution depends on position k and the token at k, so the target rows a
    verifier sees differ per position and per draft, and the target's conditional of the second
    token given the first is known exactly: p_next[0][a].
    """

    p_first: torch.Tensor  # [V]
    q_first: torch.Tensor  # [V]
    p_next: torch.Tensor  # [K, V, V]: p_next[k][a] = target row after token a at position k
    q_next: torch.Tensor  # [K, V, V]


def _markov_pair(k: int) -> MarkovPair:
    gen = torch.Generator().manual_seed(1234)
    # Far apart on purpose (TV 0.5), with a token the target never emits (5) and one the drafter
    # never proposes (0), so both the rejection and the residual paths carry real mass.
    p_first = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10, 0.00])
    q_first = torch.tensor([0.00, 0.10, 0.15, 0.20, 0.25, 0.30])
    p_next = torch.softmax(1.5 * torch.randn(k, V, V, generator=gen), -1)
    q_next = torch.softmax(1.5 * torch.randn(k, V, V, generator=gen), -1)
    return MarkovPair(p_first, q_first, p_next, q_next)


def _draft_rounds(
    pair: MarkovPair, k: int, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n independent draft rounds: drafter tokens [n, K], q [n, K, V], p [n, K+1, V]."""
    q_rows = [pair.q_first.expand(n, V)]
    p_rows = [pair.p_first.expand(n, V)]
    tokens = []
    for pos in range(k):
        token = torch.multinomial(q_rows[-1], 1, generator=gen).squeeze(1)
        tokens.append(token)
        p_rows.append(pair.p_next[pos][token])
        if pos + 1 < k:
            q_rows.append(pair.q_next[pos][token])
    draft = torch.stack(tokens, 1) if tokens else torch.zeros(n, 0, dtype=torch.long)
    draft_probs = torch.stack(q_rows[:k], 1) if k else torch.zeros(n, 0, V)
    return draft, draft_probs, torch.stack(p_rows, 1)


class Check(NamedTuple):
    """One TV comparison, kept with its bound and sample size so a failure prints all three."""

    label: str
    tv: float
    bound: float
    n: int


def _tv_check(label: str, samples: torch.Tensor, p: torch.Tensor) -> Check:
    n = samples.numel()
    freq = torch.bincount(samples, minlength=V).double() / n
    p = p.double()
    tv = 0.5 * float((freq - p).abs().sum())
    bound = 0.5 * Z * float((p * (1 - p) / n).sqrt().sum())
    return Check(label, tv, bound, n)


def _losslessness_checks(verifier: BatchVerifier, k: int, n: int = NUM_ROUNDS) -> list[Check]:
    """Runs n rounds through `verifier` and compares emitted tokens with the target's law.

    First emitted token vs p_first. Second emitted token (present when the first draft token was
    accepted) given the first token a vs the target's conditional p_next[0][a]: once x_1 = a is
    accepted, what follows is drawn against the row the target computed after a.
    """
    pair = _markov_pair(max(k, 1))
    gen = torch.Generator().manual_seed(99)
    draft, draft_probs, target_probs = _draft_rounds(pair, k, n, gen)
    result = verifier(draft, draft_probs, target_probs, gen)
    checks = [_tv_check("first token", result.tokens[:, 0], pair.p_first)]
    if k >= 1:
        has_second = result.num_accepted >= 1
        first, second = result.tokens[has_second, 0], result.tokens[has_second, 1]
        for a in range(V):
            given_a = second[first == a]
            if given_a.numel() >= 1000:
                checks.append(_tv_check(f"second token | first={a}", given_a, pair.p_next[0][a]))
    return checks


@pytest.mark.parametrize("k", [0, 1, 3])
def test_sampling_verification_is_lossless(k: int) -> None:
    checks = _losslessness_checks(verify_sampling_batched, k)
    assert len(checks) >= (1 if k == 0 else 4)  # conditionals need enough accepted rounds
    for check in checks:
        assert check.tv <= check.bound, check


def test_single_request_calls_replay_the_batched_stream() -> None:
    """Uniforms are drawn row-major, so B single calls on one generator equal one batched call."""
    pair = _markov_pair(2)
    draft, draft_probs, target_probs = _draft_rounds(pair, 2, 300, torch.Generator().manual_seed(4))
    batched = verify_sampling_batched(draft, draft_probs, target_probs, make_generator(8))
    gen = make_generator(8)
    for row, (d, q, p) in enumerate(zip(draft, draft_probs, target_probs)):
        single = verify_sampling(d.tolist(), q, p, gen)
        n = int(batched.num_accepted[row])
        assert single == VerifyResult(batched.tokens[row, : n + 1].tolist(), n)
        assert (batched.tokens[row, n + 1 :] == -1).all()


def _always_accept(draft, draft_probs, target_probs, gen) -> BatchVerifyResult:
    """Wrong: keeps every draft token, then a bonus from p_K."""
    b, k = draft.shape
    u = torch.rand(b, generator=gen, dtype=torch.float64)
    bonus = sample_from_uniform(target_probs[:, k], u)
    return BatchVerifyResult(torch.cat([draft, bonus[:, None]], 1), torch.full((b,), k))


def _resample_from_target(draft, draft_probs, target_probs, gen) -> BatchVerifyResult:
    """Wrong: the right accept test, but a rejection resamples from p, not max(0, p - q)."""
    b, k = draft.shape
    u = torch.rand((b, k + 1), generator=gen, dtype=torch.float64)
    p_x = target_probs[:, :k].gather(-1, draft[..., None]).squeeze(-1)
    q_x = draft_probs.gather(-1, draft[..., None]).squeeze(-1)
    num_accepted = (u[:, :k] * q_x < p_x).long().cumprod(-1).sum(-1)
    final = sample_from_uniform(target_probs[torch.arange(b), num_accepted], u[:, k])
    tokens = torch.cat([draft, draft[:, :1]], 1).scatter(1, num_accepted[:, None], final[:, None])
    return BatchVerifyResult(tokens, num_accepted)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("wrong", [_always_accept, _resample_from_target])
def test_losslessness_check_detects_wrong_verifiers(wrong: BatchVerifier, k: int) -> None:
    first, *conditionals = _losslessness_checks(wrong, k)
    assert first.tv > 3 * first.bound, first
    if k > 1:  # with K = 1 the second token is the bonus, which both wrong verifiers get right
        assert any(check.tv > check.bound for check in conditionals), conditionals


# ---------------------------------------------------------------- sampling: accepted length


def test_identical_draft_and_target_accepts_every_draft_token() -> None:
    k, n = 4, 10_000
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(n, k + 1, V, generator=gen), -1)
    draft = torch.multinomial(probs[:, :k].reshape(-1, V), 1, generator=gen).view(n, k)
    result = verify_sampling_batched(draft, probs[:, :k], probs, gen)
    assert (result.num_accepted == k).all()
    assert torch.equal(result.tokens[:, :k], draft)


def test_accepted_length_follows_truncated_geometric_law() -> None:
    """Same p and q at every position: each draft survives with beta = sum(min(p, q)) = 1 - TV."""
    k, n = 3, NUM_ROUNDS
    pair = _markov_pair(k)
    p, q = pair.p_first, pair.q_first
    beta = float(torch.minimum(p, q).sum())
    gen = torch.Generator().manual_seed(7)
    draft = torch.multinomial(q.expand(n, V), k, replacement=True, generator=gen)
    result = verify_sampling_batched(draft, q.expand(n, k, V), p.expand(n, k + 1, V), gen)
    law = torch.tensor([beta**j * (1 - beta) for j in range(k)] + [beta**k])
    freq = torch.bincount(result.num_accepted, minlength=k + 1).double() / n
    bound = 0.5 * Z * float((law * (1 - law) / n).sqrt().sum())
    assert 0.5 * float((freq - law).abs().sum()) <= bound


# ---------------------------------------------------------------- sampling: mechanics


def _one_round(k: int, seed: int = 0) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    draft_probs = torch.softmax(torch.randn(k, V, generator=gen), -1)
    target_probs = torch.softmax(torch.randn(k + 1, V, generator=gen), -1)
    draft = [int(torch.multinomial(row, 1, generator=gen)) for row in draft_probs]
    return draft, draft_probs, target_probs


def test_sampling_is_reproducible_for_a_seed() -> None:
    draft, q, p = _one_round(3)
    runs = [
        [verify_sampling(draft, q, p, make_generator(seed)) for seed in range(30)] for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len({tuple(r.tokens) for r in runs[0]}) > 1


def test_sampling_consumes_a_fixed_number_of_draws() -> None:
    """K+1 uniforms whatever gets accepted, so later draws do not depend on this round's outcome."""
    draft, q, p = _one_round(3)
    accept_all = torch.cat([q, p[-1:]])  # p == q on the draft positions
    reject_first = p.clone()
    reject_first[0, draft[0]] = 0.0  # the target never emits the first draft token
    after = []
    for target, accepted in ((accept_all, 3), (reject_first, 0)):
        gen = make_generator(11)
        assert verify_sampling(draft, q, target, gen).num_accepted == accepted
        after.append(torch.rand(4, generator=gen))
    torch.testing.assert_close(after[0], after[1])


def test_sampling_result_shape_and_consistency() -> None:
    for seed in range(50):
        draft, q, p = _one_round(4, seed)
        result = verify_sampling(draft, q, p, make_generator(seed))
        assert 0 <= result.num_accepted <= 4
        assert len(result.tokens) == result.num_accepted + 1
        assert result.tokens[: result.num_accepted] == draft[: result.num_accepted]
        assert all(0 <= t < V for t in result.tokens)


def test_no_draft_is_plain_sampling() -> None:
    _, _, p = _one_round(0)
    result = verify_sampling([], torch.empty(0, V), p, make_generator(3))
    assert result.num_accepted == 0 and len(result.tokens) == 1


def test_empty_residual_falls_back_to_target_row() -> None:
    """p <= q everywhere (p unnormalised, as after rounding) must still yield a token from p."""
    n = 20_000
    p = torch.tensor([0.2, 0.3])
    q = torch.tensor([0.5, 0.5])
    gen = torch.Generator().manual_seed(0)
    draft = torch.zeros(n, 1, dtype=torch.long)
    result = verify_sampling_batched(draft, q.expand(n, 1, 2), p.expand(n, 2, 2), gen)
    rejected = result.tokens[result.num_accepted == 0, 0]
    assert rejected.numel() > 0 and ((rejected == 0) | (rejected == 1)).all()
    share_of_one = float((rejected == 1).double().mean())
    sigma = (0.6 * 0.4 / rejected.numel()) ** 0.5
    assert abs(share_of_one - 0.6) <= Z * sigma


def test_sampling_rejects_mismatched_shapes() -> None:
    draft, q, p = _one_round(3)
    with pytest.raises(ValueError, match="target_probs"):
        verify_sampling(draft, q, p[:3], make_generator(0))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_sampling(draft, q[:2], p, make_generator(0))
