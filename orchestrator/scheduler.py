"""DSpark's load-aware verification scheduler (the paper's Algorithm 1), as a pure function.

Every (request, draft position) is a slot with a survival probability: the chance that it and all
draft tokens before it are accepted (product of per-position confidences). Admitting a slot adds
one token to the verify batch, which lowers steps/second on the measured cost curve, and adds its
survival probability to the expected tokens per step. Slots are admitted best first while the
expected throughput tau(N) * SPS(N) rises; the first admission that would lower it stops the plan.
Under light load many slots are worth verifying; under heavy load few or none (plain AR).
"""
from __future__ import annotations

from collections.abc import Sequence

from orchestrator.step_cost import StepCostProfile


def survival_probabilities(confidences: Sequence[float]) -> list[float]:
    """P(draft tokens 1..k all accepted) for each k, from per-position conditional confidences."""
    out, running = [], 1.0
    for c in confidences:
        running *= min(max(float(c), 0.0), 1.0)
        out.append(running)
    return out


def expected_throughput(expected_tokens: float, tokens: int, cost: StepCostProfile, overhead_s: float = 0.0) -> float:
    """Tokens per second of a step that verifies `tokens` tokens and is expected to emit `expected_tokens`."""
    return expected_tokens / (cost.step_seconds(tokens) + overhead_s)


def plan_verification(
    survival: Sequence[Sequence[float]],
    base_tokens: int,
    base_expected_tokens: float,
    cost: StepCostProfile,
    overhead_s: float = 0.0,
) -> list[int]:
    """How many draft tokens each request verifies this step.

    survival[r][k]: probability that request r's draft tokens 1..k+1 all survive (non-increasing in k).
    base_tokens: tokens in the forward regardless of drafts (one per running request, prefills, and the
    planned load of waiting requests); base_expected_tokens: tokens those yield for sure.
    overhead_s: time the step spends besides the target forward (drafting), already paid.
    The plan depends only on these probabilities and the load, never on the draft tokens themselves,
    which keeps verification lossless.
    """
    slots = sorted(
        ((p, k, r) for r, row in enumerate(survival) for k, p in enumerate(row)),
        key=lambda slot: (-slot[0], slot[1]),
    )
    chosen = [0] * len(survival)
    n, expected = base_tokens, base_expected_tokens
    best = expected_throughput(expected, n, cost, overhead_s)
    for p, k, r in slots:
        if k != chosen[r]:
            continue  # a later position can only follow its prefix
        gain = expected_throughput(expected + p, n + 1, cost, overhead_s)
        if gain <= best:
            break
        chosen[r] += 1
        n += 1
        expected += p
        best = gain
    return chosen
