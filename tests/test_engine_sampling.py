"""The engine's speculative sampling is lossless in distribution (static and dspark modes, top_k and top_p).

Many seeded requests share one engine; the second output token is the first one decided by
verification (a drafted token accepted, or resampled from the residual). Its empirical
distribution is compared with the exact one, P(t2) = sum over t1 of p(t1) p(t2 | t1) under the
same warping, by a chi-square test at significance 1e-3. Power: the same test, with the same
number of samples, must reject the drafter's own distribution (what an engine that accepted
drafts unverified would produce) with probability >= 0.9, estimated by simulation.
"""
from __future__ import annotations

import pytest
import torch

from orchestrator.drafting import ModelDrafter
from orchestrator.engine import Engine, EngineConfig
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams, warp_logits
from orchestrator.step_cost import StepCostProfile
from tests.test_speculative_engine import shallow_copy

SAMPLES = 240
ALPHA = 1e-3
MIN_POWER = 0.9
PARAMS = dict(temperature=1.0, top_k=8, top_p=0.9)


def chi2_critical(df: int, alpha: float) -> float:
    """x with P(chi2_df > x) = alpha, by bisection on the regularized lower incomplete gamma."""
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 1 - float(torch.special.gammainc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(mid / 2, dtype=torch.float64))) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def second_token_distribution(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact P(t2) over the vocabulary under the request's warping."""
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        slot = cache.allocate()
        p1 = warp_logits(model(torch.tensor(prompt), [slot], [len(prompt)], cache,
                               logits_indices=torch.tensor([len(prompt) - 1])).logits[0], params)
        marginal = torch.zeros_like(p1, dtype=torch.float64)
        for t1 in torch.nonzero(p1).flatten().tolist():
            cache.truncate(slot, len(prompt))
            logits = model(torch.tensor([t1]), [slot], [1], cache, logits_indices=torch.tensor([0])).logits[0]
            marginal += float(p1[t1]) * warp_logits(logits, params).double()
    return marginal


def chi2_statistic(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Cells with expected count >= 5, the rest pooled into one; returns (statistic, degrees of freedom)."""
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    wanted = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep]
    return float(((observed - wanted) ** 2 / wanted).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("mode", ["static", "dspark"])
def test_speculative_sampling_in_the_engine_draws_from_the_target_distribution(smollm2_fp32, smollm2_encoder, mode):
    target = smollm2_fp32
    prompt = smollm2_encoder.encode("My favourite animal is the", False)
    params = [SamplingParams(max_tokens=3, seed=seed, **PARAMS) for seed in range(SAMPLES)]
    draft_model = shallow_copy(target, 4)
    engine = Engine(target, smollm2_encoder.tokenizer, EngineConfig(SAMPLES, 32, 8),
                    ModelDrafter(draft_model, SAMPLES, 32), StepCostProfile((1, 1024), (0.05, 0.051)))
    outs = [[] for _ in range(SAMPLES)]
    for p, out in zip(params, outs):
        engine.submit(prompt, p, out.append, spec=SpeculationParams(mode, 3))
    while engine.step():
        pass
    assert engine.stats.speculation.rounds > SAMPLES // 2, "most second tokens must come from verification"
    second = torch.tensor([[t for c in out for t in c.token_ids][1] for out in outs])

    exact = second_token_distribution(target, prompt, params[0])
    counts = torch.bincount(second, minlength=exact.numel()).double()
    statistic, df = chi2_statistic(counts, SAMPLES * exact)
    critical = chi2_critical(df, ALPHA)
    assert statistic < critical, f"chi2 {statistic:.1f} >= {critical:.1f} (df {df})"

    # Power against accepting unverified drafts: the drafter's own second-token distribution.
    drafted = second_token_distribution(draft_model, prompt, params[0])
    with torch.random.fork_rng():  # a fixed simulation: the power estimate must not flake
        torch.manual_seed(0)
        simulated = torch.distributions.Multinomial(SAMPLES, probs=drafted).sample((500,))
    rejected = sum(chi2_statistic(row, SAMPLES * exact)[0] >= critical for row in simulated)
    assert rejected / len(simulated) >= MIN_POWER


def token_distribution(model, prompt: list[int], params: SamplingParams, position: int) -> torch.Tensor:
    """Exact P(token at `position`) (1-based) under the request's warping, summed over every prefix."""
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        slot = cache.allocate()

        def walk(context: list[int], weight: float, depth: int) -> torch.Tensor:
            cache.truncate(slot, 0)
            logits = model(torch.tensor(context), [slot], [len(context)], cache,
                           logits_indices=torch.tensor([len(context) - 1])).logits[0]
            p = warp_logits(logits, params).double()
            if depth == position:
                return weight * p
            return sum(walk(context + [t], weight * float(p[t]), depth + 1) for t in torch.nonzero(p).flatten().tolist())

        return walk(list(prompt), 1.0, 1)


class ParityConfidenceDrafter:
    """Drafts with confidences that, as DSpark's, read the token before each position: high after an
    even draft token, low after an odd one. The scheduler's cut then depends on drafted tokens, which
    stays lossless only while a token's own verification is decided from the tokens before it."""

    name, tap_layers, sequential = "parity", (), False

    def __init__(self, inner: ModelDrafter) -> None:
        self.inner = inner

    def __getattr__(self, attribute: str):
        return getattr(self.inner, attribute)

    def propose(self, requests):
        drafts = self.inner.propose(requests)
        for draft in drafts:
            draft.confidences = [0.7] + [0.97 if t % 2 == 0 else 0.03 for t in draft.tokens[:-1]]
        return drafts


def _peeking_plan(survival, *args, **kwargs) -> list[int]:
    """A planner that breaks the rule: it verifies the first draft token only when the confidence read
    from that token itself is high."""
    return [2 if len(row) > 1 and row[1] > 0.3 else 0 for row in survival]


@pytest.mark.parametrize("planner", ["engine", "peeking"])
def test_confidence_cuts_that_read_drafted_tokens_stay_lossless(smollm2_fp32, smollm2_encoder, planner, monkeypatch):
    """dspark mode with token-dependent confidences and a cost that makes the cut bite (a draft position
    pays from about 0.3 survival): the 2nd and 3rd tokens keep the target's distribution. The drafter is
    the target itself, so every verified draft is accepted and a cut that chose by the token would show
    fully. Power: the same test rejects a planner whose cut peeks at the token it decides on."""
    if planner == "peeking":
        monkeypatch.setattr("orchestrator.engine.plan_verification", _peeking_plan)
    target = smollm2_fp32
    prompt = smollm2_encoder.encode("I like to eat", False)  # 2nd and 3rd tokens: ~3 nats, both parities
    params = [SamplingParams(max_tokens=4, seed=seed, end_ids=(target.config.vocab_size - 1,), **PARAMS)
              for seed in range(SAMPLES)]  # an end id outside every top_k here: no answer ends early
    per_token = 0.05 / 560  # admits a position from ~0.3 survival with every request in the batch
    engine = Engine(target, smollm2_encoder.tokenizer, EngineConfig(SAMPLES, 32, 8),
                    ParityConfidenceDrafter(ModelDrafter(target, SAMPLES, 32)),
                    StepCostProfile((1, 1024), (0.05 + per_token, 0.05 + 1024 * per_token)))
    outs = [[] for _ in range(SAMPLES)]
    for p, out in zip(params, outs):
        engine.submit(prompt, p, out.append, spec=SpeculationParams("dspark", 3))
    while engine.step():
        pass
    assert engine.stats.speculation.rounds > SAMPLES // 2, "most 2nd tokens must come from verification"
    tokens = torch.tensor([[t for c in out for t in c.token_ids][:3] for out in outs])
    verdicts = []
    for position in (2, 3):
        exact = token_distribution(target, prompt, params[0], position)
        counts = torch.bincount(tokens[:, position - 1], minlength=exact.numel()).double()
        statistic, df = chi2_statistic(counts, SAMPLES * exact)
        verdicts.append(statistic < chi2_critical(df, ALPHA))
    assert verdicts == ([True, True] if planner == "engine" else [False, True])
