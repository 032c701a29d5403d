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

from orchestrator.step_cost import BatchShape, StepCost


def survival_probabilities(confidences: Sequence[float]) -> list[float]:
    """P(draft tokens 1..k all accepted) for each k, from per-position conditional confidences."""
    out, running = [], 1.0
    for c in confidences:
        running *= min(max(float(c), 0.0), 1.0)
        out.append(running)
    return out


class PrefixAcceptance:
    """Survival estimate for drafters without a confidence head, from the verify rounds seen so far.

    Position k's conditional rate P(token k accepted | tokens before k accepted) is counted only over
    rounds that drafted position k *and* reached it (every earlier token accepted); survival of a
    prefix is the product of those rates. Laplace-smoothed (an unseen position counts as 1/2).
    """

    def __init__(self, max_positions: int) -> None:
        self.reached = [0] * max_positions
        self.accepted = [0] * max_positions

    def record(self, num_drafted: int, num_accepted: int) -> None:
        for k in range(min(num_drafted, num_accepted + 1)):
            self.reached[k] += 1
            self.accepted[k] += k < num_accepted

    def conditional(self, positions: int) -> list[float]:
        return [(a + 1) / (r + 2) for a, r in zip(self.accepted[:positions], self.reached[:positions])]

    def survival(self, positions: int) -> list[float]:
        return survival_probabilities(self.conditional(positions))


class ObservedCalibration:
    """A drafter's confidences corrected by the acceptance this server's verifications observe.

    The drafter is calibrated offline on its training distribution (paper Sec. 4.3); served prompts
    differ. Measured on Qwen2.5-Coder-1.5B with its shipped drafter, 16 code requests, greedy: first
    tokens verified at a mean confidence of 0.58 survived 46% of the time, and the 0.2-0.4 bin 10%, so
    the scheduler verified tokens that did not pay for their place in the forward. Every position a
    verification reached is an outcome for its confidence: per confidence bin, an exponentially
    decayed count of outcomes and of (accepted - confidence); a confidence moves by its bin's mean
    gap, shrunk towards no move while the bin has few outcomes (`prior` pseudo-outcomes of gap 0).
    Only past rounds feed it, so the correction adds no dependence on this round's draft tokens (the
    confidences it corrects read them only as plan_verification allows).
    """

    def __init__(self, bins: int = 10, prior: float = 10.0, decay: float = 0.998) -> None:
        self.bins, self.prior, self.decay = bins, prior, decay
        self.outcomes = [0.0] * bins
        self.gap = [0.0] * bins

    def _bin(self, confidence: float) -> int:
        return min(max(int(confidence * self.bins), 0), self.bins - 1)

    def record(self, confidences: Sequence[float], num_accepted: int) -> None:
        """One verification: `confidences` of the tokens it verified, the first `num_accepted` accepted."""
        for k, c in enumerate(confidences[: num_accepted + 1]):
            b = self._bin(c)
            self.outcomes[b] = self.decay * self.outcomes[b] + 1.0
            self.gap[b] = self.decay * self.gap[b] + (float(k < num_accepted) - c)

    def correct(self, confidences: Sequence[float]) -> list[float]:
        """Per-position conditional confidences, moved by what verification observed at their level."""
        out = []
        for c in confidences:
            b = self._bin(c)
            out.append(min(max(c + self.gap[b] / (self.outcomes[b] + self.prior), 0.0), 1.0))
        return out


def expected_throughput(expected_tokens: float, tokens: int, cost: StepCost, overhead_s: float = 0.0,
                        shape: BatchShape | None = None) -> float:
    """Tokens per second of a step that verifies `tokens` tokens and is expected to emit `expected_tokens`."""
    return expected_tokens / (cost.step_seconds(tokens, shape) + overhead_s)


class BatchPlan:
    """The active batch a plan is priced on: the forward's sequences besides the planned ones, as
    (new tokens, context after the step) rows, and each planned request's context after its pending
    token. `tokens` (the plan's base N) counts the others' tokens and one pending token per planned request."""

    def __init__(self, others: Sequence[tuple[int, int]], contexts: Sequence[int]) -> None:
        self.others = tuple(others)
        self.contexts = tuple(contexts)
        self.tokens = sum(new for new, _ in self.others) + len(self.contexts)

    @property
    def sequences(self) -> int:
        """Sequences in the forward: each yields one token for sure (the plan's base expected tokens)."""
        return len(self.others) + len(self.contexts)

    def shape(self, plan: Sequence[int]) -> BatchShape:
        """The forward's shape when planned request r verifies `plan[r]` draft tokens (missing: none)."""
        drafts = list(plan) + [0] * (len(self.contexts) - len(plan))
        return BatchShape(self.others + tuple((1 + k, c + k) for c, k in zip(self.contexts, drafts)))


def _admit_best_first(survival: Sequence[Sequence[float]], base_tokens: int, base_expected_tokens: float,
                      cost: StepCost, overhead_s: float, batch: BatchPlan | None = None,
                      first_cost_s: Sequence[float] | None = None) -> list[int]:
    """Algorithm 1's greedy: slots best first, each admitted when it raises expected throughput, priced
    on the batch shape it makes. With a flat price per token the first slot that does not pay ends the
    pass; with shape-dependent prices (a draft 4,000 tokens into its answer costs more attention than
    one 100 tokens in) a later slot can still pay, so the pass goes on. A request's first slot also
    pays its `first_cost_s` (what drafting it at all costs)."""
    slots = sorted(
        ((p, k, r) for r, row in enumerate(survival) for k, p in enumerate(row)),
        key=lambda slot: (-slot[0], slot[1]),
    )
    chosen = [0] * len(survival)
    n, expected, paid = base_tokens, base_expected_tokens, overhead_s
    best = expected_throughput(expected, n, cost, paid, batch.shape(chosen) if batch is not None else None)
    for p, k, r in slots:
        if k != chosen[r]:
            continue  # a later position can only follow its prefix
        chosen[r] += 1
        extra = first_cost_s[r] if first_cost_s is not None and k == 0 else 0.0
        gain = expected_throughput(expected + p, n + 1, cost, paid + extra,
                                   batch.shape(chosen) if batch is not None else None)
        if gain <= best:
            chosen[r] -= 1  # not worth it here; a cheaper slot further down may still be
            continue
        n += 1
        expected += p
        paid += extra
        best = gain
    return chosen


def plan_verification(
    survival: Sequence[Sequence[float]],
    base_tokens: int,
    base_expected_tokens: float,
    cost: StepCost,
    overhead_s: float = 0.0,
    batch: BatchPlan | None = None,
) -> list[int]:
    """How many of its drafted tokens each request verifies this step (Algorithm 1).

    survival[r][k]: probability that request r's draft tokens 1..k+1 all survive (non-increasing in k).
    base_tokens: tokens in the forward regardless of drafts (one per running request, prefills, and the
    planned load of waiting requests); base_expected_tokens: tokens those yield for sure.
    overhead_s: time the step spends besides the target forward (drafting already paid).
    batch: the active batch, when the cost depends on its shape (contexts, attention groups).

    Lossless: survival[r][k] may depend on request r's draft tokens before position k (a DSpark
    confidence reads the token before it), never on token k or later ones, and the greedy admits each
    request's positions in order, from the most likely to survive down. So whether token k is verified
    is decided from the tokens before it, a stopping rule, which leaves the accepted tokens distributed
    as the target's. Plans that compare different longest lengths (`plan_drafting` with a per-position
    drafting price) would look at later positions; they run only before drafting.
    """
    return _admit_best_first(survival, base_tokens, base_expected_tokens, cost, overhead_s, batch)


def _plan_paying_per_position(survival: Sequence[Sequence[float]], base_tokens: int, base_expected_tokens: float,
                              cost: StepCost, draft_seconds: float, draft_step_s: float, batch: BatchPlan | None,
                              first_cost_s: Sequence[float] | None, copied: Sequence[bool] | None) -> list[int]:
    """The best plan when drafting costs `draft_step_s` per position of the longest model draft (a drafter
    that drafts token by token, batched over requests) and `first_cost_s[r]` for request r drafting at all.

    The first token at each position costs a whole drafting step, which the greedy pass alone would
    refuse; so every longest length L of the model's drafts is planned with its drafting paid up front
    (copied drafts run no drafting step and keep their length), and the best plan wins.
    """
    def throughput(plan: list[int]) -> float:
        paid = _drafting_paid(plan, draft_seconds, draft_step_s, first_cost_s, copied)
        return _plan_throughput(survival, plan, base_tokens, base_expected_tokens, cost, paid, batch)

    if draft_step_s <= 0.0:
        return _admit_best_first(survival, base_tokens, base_expected_tokens, cost, draft_seconds, batch, first_cost_s)
    copy = list(copied) if copied is not None else [False] * len(survival)
    best = [0] * len(survival)
    for longest in range(1, max((len(row) for row in survival), default=0) + 1):
        plan = _admit_best_first([row if c else row[:longest] for row, c in zip(survival, copy)], base_tokens,
                                 base_expected_tokens, cost, draft_seconds + draft_step_s * longest, batch, first_cost_s)
        if throughput(plan) > throughput(best):
            best = plan
    return best


def _first_costs(plan: Sequence[int], first_cost_s: Sequence[float] | None) -> float:
    """What the requests that draft in `plan` pay for drafting at all."""
    return 0.0 if first_cost_s is None else sum(c for c, k in zip(first_cost_s, plan) if k > 0)


def _drafting_paid(plan: Sequence[int], draft_seconds: float, draft_step_s: float, first_cost_s: Sequence[float] | None,
                   copied: Sequence[bool] | None) -> float:
    """The drafting time `plan` pays: nothing when it drafts copied drafts only, else `draft_seconds`,
    `draft_step_s` per position of its longest model draft and each drafting request's `first_cost_s`."""
    modelled = list(plan) if copied is None else [k for k, copy in zip(plan, copied) if not copy]
    if copied is not None and not any(modelled):
        return 0.0
    return draft_seconds + draft_step_s * max(modelled, default=0) + _first_costs(plan, first_cost_s)


def _plan_throughput(survival: Sequence[Sequence[float]], plan: Sequence[int], base_tokens: int,
                     base_expected_tokens: float, cost: StepCost, paid: float, batch: BatchPlan | None) -> float:
    expected = base_expected_tokens + sum(sum(row[:c]) for row, c in zip(survival, plan))
    return expected_throughput(expected, base_tokens + sum(plan), cost, paid,
                               batch.shape(plan) if batch is not None else None)


def plan_drafting(
    predicted: Sequence[Sequence[float]],
    base_tokens: int,
    base_expected_tokens: float,
    cost: StepCost,
    draft_seconds: float,
    draft_step_s: float = 0.0,
    batch: BatchPlan | None = None,
    first_cost_s: Sequence[float] | None = None,
    copied: Sequence[bool] | None = None,
) -> list[int]:
    """How many tokens each request should draft this step (0: none), decided before drafting from
    predicted survival probabilities.

    predicted[r]: request r's survival estimate per draft position (e.g. its previous block's
    calibrated confidences, or the measured prefix acceptance). Drafting is worth its cost only if the
    best verification plan, paying `draft_seconds` for the drafting (plus `draft_step_s` per position
    of the longest draft, for drafters that draft token by token, and each drafting request's
    `first_cost_s`), beats a plain step; then each request gets the count that plan would verify.
    copied[r]: request r's draft is copied from its context (prompt lookup first), which costs no
    drafting: the plan of the copied drafts alone, paying nothing, competes with the plan of all.
    Taken every step, so speculation returns as soon as the load (base_tokens) drops or predictions
    improve.
    """
    def throughput(plan: list[int]) -> float:
        paid = _drafting_paid(plan, draft_seconds, draft_step_s, first_cost_s, copied)
        return _plan_throughput(predicted, plan, base_tokens, base_expected_tokens, cost, paid, batch)

    plans = [_plan_paying_per_position(predicted, base_tokens, base_expected_tokens, cost, draft_seconds, draft_step_s,
                                       batch, first_cost_s, copied)]
    if copied is not None and any(copied):
        plans.append(plan_verification([row if copy else [] for row, copy in zip(predicted, copied)],
                                       base_tokens, base_expected_tokens, cost, batch=batch))
    counts = max(plans, key=throughput)
    if throughput(counts) <= _plan_throughput(predicted, [], base_tokens, base_expected_tokens, cost, 0.0, batch):
        return [0] * len(predicted)
    return counts
