"""Draft-length policies, the step-cost profile and DSpark's load-aware scheduler."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from models.config import TransformerConfig
from models.transformer import Transformer
from orchestrator.drafting import Draft
from orchestrator.engine import Engine, EngineConfig
from orchestrator.policies import SpeculationParams, draft_length, next_adaptive_length
from orchestrator.sampling import SamplingParams
from orchestrator.scheduler import plan_drafting, plan_verification, survival_probabilities
from orchestrator.step_cost import StepCostProfile, measure_step_cost, monotone_envelope

FLAT = StepCostProfile((1, 64), (0.050, 0.052))      # memory-bound: 64 tokens cost ~ 1
STEEP = StepCostProfile((1, 64), (0.010, 0.640))     # compute-bound: cost grows with every token


def test_survival_is_the_running_product_of_confidences():
    assert survival_probabilities([0.9, 0.5, 1.2, -1]) == pytest.approx([0.9, 0.45, 0.45, 0.0])


def test_flat_cost_curve_verifies_more_than_a_steep_one():
    survival = [survival_probabilities([0.8] * 7) for _ in range(4)]
    flat = plan_verification(survival, base_tokens=4, base_expected_tokens=4, cost=FLAT)
    steep = plan_verification(survival, base_tokens=4, base_expected_tokens=4, cost=STEEP)
    assert sum(flat) > sum(steep)
    assert flat == [7, 7, 7, 7]


def test_low_survival_under_heavy_load_verifies_nothing():
    survival = [survival_probabilities([0.2, 0.2, 0.2]) for _ in range(16)]
    linear = StepCostProfile((1, 64), (0.01, 0.64))
    assert plan_verification(survival, base_tokens=48, base_expected_tokens=48, cost=linear) == [0] * 16


def test_light_load_verifies_likely_tokens_first_and_keeps_prefixes():
    survival = [survival_probabilities([0.95, 0.9, 0.9]), survival_probabilities([0.3, 0.3, 0.3])]
    mild = StepCostProfile((1, 8), (0.010, 0.016))
    plan = plan_verification(survival, base_tokens=2, base_expected_tokens=2, cost=mild)
    assert plan[0] >= plan[1]
    assert plan[0] == 3


def test_more_tokens_in_the_forward_make_the_plan_more_conservative():
    survival = [survival_probabilities([0.6] * 5) for _ in range(2)]
    curve = StepCostProfile((1, 8, 64), (0.010, 0.012, 0.090))
    idle = plan_verification(survival, base_tokens=2, base_expected_tokens=2, cost=curve)
    busy = plan_verification(survival, base_tokens=2 + 40, base_expected_tokens=2 + 40, cost=curve)
    assert sum(busy) < sum(idle)


def test_step_cost_interpolates_and_extrapolates():
    profile = StepCostProfile((1, 4, 8), (0.010, 0.013, 0.021))
    assert profile.step_seconds(2) == pytest.approx(0.011)
    assert profile.step_seconds(16) == pytest.approx(0.037)
    assert profile.step_seconds(4) == pytest.approx(0.013)


def test_measured_step_cost_of_a_real_forward_is_positive_and_monotone(tmp_path):
    config = TransformerConfig(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, qk_norm=False, max_position_embeddings=512,
        bos_token_id=None, eos_token_ids=(0,),
    )
    model = Transformer(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    profile = measure_step_cost(model.eval(), token_counts=(1, 4, 16), context=16, repeats=2)
    assert all(s > 0 for s in profile.seconds)
    assert list(profile.seconds) == sorted(profile.seconds)
    profile.save(tmp_path / "p.json")
    assert StepCostProfile.load(tmp_path / "p.json") == profile


def test_a_noise_spike_does_not_raise_the_cost_of_every_larger_batch():
    # a slow phase hit N=8 only: the curve keeps the cheaper later measurements, not the spike
    assert monotone_envelope([50.0, 50.0, 68.0, 60.0, 70.0, 66.0, 90.0]) == [50.0, 50.0, 60.0, 60.0, 66.0, 66.0, 90.0]
    assert monotone_envelope([3.0, 2.0, 1.0]) == [1.0, 1.0, 1.0]


def test_baseline_policies():
    static = SpeculationParams("static", 5)
    assert draft_length(SpeculationParams("off", 5), 3, 1, 4) == 0
    assert draft_length(static, 3, 16, 4) == 5
    assert draft_length(SpeculationParams("batch_limited", 5), 3, 4, 4) == 5
    assert draft_length(SpeculationParams("batch_limited", 5), 3, 5, 4) == 0
    assert draft_length(SpeculationParams("adaptive", 5), 3, 1, 4) == 3
    assert next_adaptive_length(3, 3, 3, 16) == 5
    assert next_adaptive_length(3, 3, 1, 16) == 2
    assert next_adaptive_length(1, 1, 0, 16) == 1
    assert next_adaptive_length(15, 15, 15, 16) == 16
    assert draft_length(SpeculationParams("adaptive", 0), 3, 1, 4) == 0
    assert next_adaptive_length(2, 2, 2, 2) == 2


class FixedDrafter:
    """Proposes given tokens with given confidences: the scheduler must not look at the tokens."""

    name = "fixed"
    tap_layers = ()
    sequential = False

    def __init__(self, tokens, confidences):
        self.tokens, self.confidences = tokens, confidences

    def admit(self, key):
        pass

    def release(self, key):
        pass

    def commit(self, key, n):
        pass

    def uncached(self, key, context_length):
        return 0

    def observe(self, keys, token_ids, hidden):
        pass

    def propose(self, requests):
        return [Draft(self.tokens[: r.num_tokens], None,
                      None if self.confidences is None else self.confidences[: r.num_tokens]) for r in requests]


def _tiny_model():
    config = TransformerConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=16, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, qk_norm=False, max_position_embeddings=256,
        bos_token_id=None, eos_token_ids=(0,),
    )
    torch.manual_seed(0)
    model = Transformer(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


class PrefixConfidenceDrafter(FixedDrafter):
    """Confidence at position j depends on the draft tokens before j (as DSpark's head does, through
    W1[x_{j-1}]): high after an even token, low after an odd one."""

    def propose(self, requests):
        out = []
        for r in requests:
            tokens = self.tokens[: r.num_tokens]
            prev = [r.context[-1]] + tokens[:-1]
            out.append(Draft(tokens, None, [0.95 if p % 2 == 0 else 0.4 for p in prev]))
        return out


def _verified_per_request(tokens, cost, requests=3):
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(4, 128, 32), PrefixConfidenceDrafter(tokens, None), cost)
    for i in range(requests):
        engine.submit([2 + i, 2, 4], SamplingParams(max_tokens=20), lambda c: None, spec=SpeculationParams("dspark", 6))
    engine.step()  # prefill
    engine.step()  # the first drafted step
    return engine.stats.speculation.drafted / requests


@pytest.mark.parametrize("cost", [FLAT, StepCostProfile((1, 4, 8, 64), (0.010, 0.0105, 0.016, 0.2))])
def test_plan_for_a_draft_token_never_depends_on_that_token(cost):
    """Changing draft token j (and so the confidences after it) may change the plan for tokens after j,
    never whether token j itself is verified."""
    base = [2, 4, 6, 8, 10, 12]
    for j in range(6):
        changed = list(base)
        changed[j] = 7  # odd: every confidence after j drops
        a, b = _verified_per_request(base, cost), _verified_per_request(changed, cost)
        assert (a >= j + 1) == (b >= j + 1), (j, a, b)


def test_flat_curve_verifies_more_than_steep_in_the_engine():
    """Both curves must leave drafting worth doing (the steep one for a token or two), so the comparison
    can fail either way."""
    steep = StepCostProfile((1, 4, 8, 64), (0.010, 0.0102, 0.030, 0.300))
    flat_verified = _verified_per_request([2, 4, 6, 8, 10, 12], FLAT)
    steep_verified = _verified_per_request([2, 4, 6, 8, 10, 12], steep)
    assert 0 < steep_verified < flat_verified


def test_drafting_overhead_is_counted_in_the_plan():
    survival = [survival_probabilities([0.5] * 4)]
    curve = StepCostProfile((1, 8), (0.010, 0.014))
    free = plan_verification(survival, base_tokens=1, base_expected_tokens=1, cost=curve)
    paid = plan_verification(survival, base_tokens=1, base_expected_tokens=1, cost=curve, overhead_s=0.5)
    assert sum(free) < sum(paid)  # once drafting is paid for, verifying more of it is worth more
    assert free[0] >= 1


class CountingDrafter(FixedDrafter):
    def __init__(self):
        super().__init__([5, 6, 7, 8], None)
        self.calls = []

    def propose(self, requests):
        self.calls.append(len(requests))
        return super().propose(requests)


def test_dspark_drafting_stops_under_load_and_resumes_within_a_step_when_it_drops():
    """Seven plain requests make the batch too big for drafting to pay on this curve; when they finish,
    the dspark request drafts again at once (no back-off pause)."""
    drafter = CountingDrafter()
    curve = StepCostProfile((1, 2, 8, 64), (0.010, 0.0105, 0.080, 0.640))
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(8, 128, 100), drafter, curve)
    engine.submit([1, 2, 3], SamplingParams(max_tokens=30), lambda c: None, spec=SpeculationParams("dspark", 3))
    for i in range(7):
        engine.submit([4 + i, 5], SamplingParams(max_tokens=4), lambda c: None, spec=SpeculationParams("off"))
    busy_steps = 0
    while engine.num_active + engine.num_waiting > 1 or busy_steps == 0:
        engine.step()
        busy_steps += 1
    assert drafter.calls == []  # 8 running: no drafting
    engine.step()
    assert drafter.calls == [1]  # alone again: drafts in the very next step


def test_drafting_paid_per_position_shortens_the_plan():
    """Flat target cost, a drafter step costing a third of a target step: 4 positions maximise
    (1 + sum p) / (0.3 + 0.1 k); free drafting would take all 7."""
    survival = [[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]]
    flat = StepCostProfile((1, 64), (0.3, 0.3))
    assert plan_drafting(survival, 1, 1, flat, 0.0) == [7]
    assert plan_drafting(survival, 1, 1, flat, 0.0, draft_step_s=0.1) == [4]
    # two requests share the drafter steps: a pass that priced each position alone would stop at [1, 1]
    assert plan_drafting(survival * 2, 2, 2, flat, 0.0, draft_step_s=0.1) == [4, 4]


class LengthRecordingDrafter(FixedDrafter):
    def __init__(self, sequential: bool):
        super().__init__([5, 6, 7, 8], None)
        self.sequential = sequential
        self.asked = []

    def propose(self, requests):
        self.asked += [r.num_tokens for r in requests]
        return super().propose(requests)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_sequential_drafter_drafts_only_what_the_plan_would_verify(sequential):
    """On this curve one draft token pays and a second does not (prior survival 1/2, 1/4): a small-LM
    drafter, whose cost grows per token, is asked for 1; a block drafter for its whole length."""
    drafter = LengthRecordingDrafter(sequential)
    curve = StepCostProfile((1, 2, 8, 64), (0.010, 0.0105, 0.080, 0.640))
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(4, 128, 100), drafter, curve)
    engine.submit([1, 2, 3], SamplingParams(max_tokens=8), lambda c: None, spec=SpeculationParams("dspark", 3))
    while engine.step():
        pass
    assert drafter.asked[:1] == [1 if sequential else 3]  # the first round, before any acceptance is measured


def test_a_request_whose_drafting_costs_more_first_is_left_out():
    """Two requests with the same survival; drafting the second first costs a whole step (a small LM
    reading what it skipped): the plan drafts for the first only."""
    survival = [[0.9, 0.8, 0.7]] * 2
    flat = StepCostProfile((1, 64), (0.3, 0.3))
    assert plan_drafting(survival, 2, 2, flat, 0.0, draft_step_s=0.02) == [3, 3]
    assert plan_drafting(survival, 2, 2, flat, 0.0, draft_step_s=0.02, first_cost_s=[0.0, 0.3]) == [3, 0]


class BackloggedDrafter(FixedDrafter):
    """A small LM (sequential) whose second request has 400 context tokens still to read."""

    sequential = True

    def __init__(self):
        super().__init__([5, 6, 7, 8], None)
        self.keys, self.asked = [], []

    def admit(self, key):
        self.keys.append(key)

    def uncached(self, key, context_length):
        return 400 if key == self.keys[1] else 1

    def propose(self, requests):
        self.asked += [(self.keys.index(r.key), r.num_tokens) for r in requests]
        return super().propose(requests)


def test_the_context_a_small_lm_must_read_first_is_priced():
    """A drafter step costs 2 ms per drafted position; reading 400 skipped tokens first costs what 400
    more tokens cost the forward (~0.4 s here): the backlogged request does not draft, the other does."""
    drafter = BackloggedDrafter()
    curve = StepCostProfile((1, 2, 8, 64, 1024), (0.010, 0.010, 0.0102, 0.080, 1.0))
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(4, 128, 100), drafter, curve)
    engine._draft_cost(2, 0.002)  # drafting timed already: 2 ms per position for two sequences
    for i in range(2):
        engine.submit([1 + i, 2, 3], SamplingParams(max_tokens=8), lambda c: None, spec=SpeculationParams("dspark", 3))
    engine.step()  # both prompts
    engine.step()  # the first drafted step
    assert {index for index, _ in drafter.asked} == {0}


def test_prefix_acceptance_estimates_the_true_prefix_survival():
    """Synthetic verify rounds: position k is accepted with conditional rate q[k] once reached, drafts of
    random lengths (the scheduler truncates them). The estimate must match the true survival products;
    multiplying per-position rates that are already cumulative (the old estimate) does not."""
    import random

    from orchestrator.scheduler import PrefixAcceptance

    q = [0.8, 0.6, 0.5, 0.4, 0.3]
    truth = survival_probabilities(q)
    rng = random.Random(0)
    estimate = PrefixAcceptance(len(q))
    cumulative_drafted, cumulative_accepted = [0] * len(q), [0] * len(q)
    for _ in range(20000):
        drafted = rng.randint(1, len(q))
        accepted = 0
        while accepted < drafted and rng.random() < q[accepted]:
            accepted += 1
        estimate.record(drafted, accepted)
        for k in range(drafted):
            cumulative_drafted[k] += 1
            cumulative_accepted[k] += k < accepted
    assert estimate.survival(len(q)) == pytest.approx(truth, abs=0.02)
    old = survival_probabilities([a / d for a, d in zip(cumulative_accepted, cumulative_drafted)])
    assert abs(old[2] - truth[2]) > 0.1  # the double product underestimates badly


def test_drafting_is_decided_per_step_and_returns_when_load_drops():
    curve = StepCostProfile((1, 8, 64), (0.010, 0.012, 0.080))
    good = [0.9, 0.8, 0.7, 0.6]
    idle = plan_drafting([good], base_tokens=1, base_expected_tokens=1, cost=curve, draft_seconds=0.002)
    assert idle == plan_verification([good], 1, 1, curve, 0.002) and idle[0] > 0  # the count it would verify
    # heavy load: 60 other tokens in the forward make every extra token expensive
    busy = plan_drafting([good] * 2, base_tokens=60, base_expected_tokens=60, cost=curve, draft_seconds=0.002)
    assert busy == [0, 0]
    # drafting that costs more than it can return is skipped even when idle
    assert plan_drafting([[0.1, 0.01]], 1, 1, curve, draft_seconds=0.05) == [0]
    # and comes back at the next step where the load is light again
    assert plan_drafting([good], 1, 1, curve, draft_seconds=0.002) == idle


def test_online_step_cost_follows_the_machine_and_prices_every_step_alike():
    """A neighbour process doubles every step: predictions follow from the first measured forward,
    plain and drafted alike, so the first draft token costs what the profile says it adds, not the
    jump between two ratios; when the neighbour leaves they follow back."""
    from orchestrator.step_cost import BatchShape, OnlineStepCost

    profile = StepCostProfile((1, 8, 64), (0.010, 0.012, 0.080), attention_s=1e-7, context=128)
    online = OnlineStepCost(profile, weight=0.5)
    plain, drafted = BatchShape.uniform(1, 1, 101), BatchShape.uniform(1, 4, 104)
    assert online.step_seconds(1, plain) == pytest.approx(profile.step_seconds(1, plain))
    online.observe(4, 2 * profile.step_seconds(4, drafted), drafted)  # no plain step seen yet
    assert online.step_seconds(1, plain) == pytest.approx(2 * profile.step_seconds(1, plain))
    assert online.step_seconds(4, drafted) - online.step_seconds(1, plain) == pytest.approx(
        2 * (profile.step_seconds(4, drafted) - profile.step_seconds(1, plain)))
    for _ in range(20):  # the neighbour leaves
        online.observe(1, profile.step_seconds(1, plain), plain)
    assert online.step_seconds(4, drafted) == pytest.approx(profile.step_seconds(4, drafted), rel=0.01)


def test_batch_shape_terms_price_context_and_padding():
    """Reference shapes cost the SPS(N) curve; longer contexts and padded drafts cost their measured terms."""
    from orchestrator.step_cost import BatchShape, reference_shape

    profile = StepCostProfile((1, 8, 64), (0.010, 0.012, 0.080), attention_s=1e-7, gather_s=1e-6, context=128)
    assert profile.step_seconds(8, reference_shape(8, 128)) == pytest.approx(0.012)
    ref = reference_shape(8, 128)  # 2 sequences of 4 new tokens, 132 positions
    long = BatchShape.uniform(8, 1, 532)   # 8 decoding sequences 531 tokens in
    extra = 1e-7 * (8 * 532 - ref.attention_pairs) + 1e-6 * (8 * 532 - ref.gathered_positions)
    assert profile.step_seconds(8, long) == pytest.approx(0.012 + extra)


def test_shape_terms_are_recovered_by_the_nonnegative_fit():
    from orchestrator.step_cost import _nonnegative_least_squares

    truth = (3e-7, 5e-6, 2e-3)
    shapes = [(1000, 500, 1), (8000, 2000, 1), (4000, 4000, 3), (500, 3000, 2), (2500, 100, 5)]
    rows = [((a, g, k), truth[0] * a + truth[1] * g + truth[2] * k) for a, g, k in shapes]
    assert _nonnegative_least_squares(rows) == pytest.approx(truth, rel=1e-6)
    # a term that would come out negative is held at zero and the others refitted
    rows = [((a, g, k), 1e-6 * g + 1e-3 * k - 1e-9 * a) for a, g, k in shapes]
    attention_s, gather_s, group_s = _nonnegative_least_squares(rows)
    assert attention_s == 0.0 and gather_s > 0 and group_s > 0


def test_mixed_shapes_pay_per_attention_group():
    """Each distinct new-token count is one more attention call per layer: priced by group_s."""
    from orchestrator.step_cost import BatchShape

    profile = StepCostProfile((1, 64), (0.050, 0.0505), group_s=0.002, context=128)
    uniform = BatchShape.uniform(4, 3, 300)
    mixed = BatchShape(((1, 300), (2, 300), (3, 300), (6, 300)))
    assert uniform.attention_groups == 1 and mixed.attention_groups == 4 and uniform.tokens == mixed.tokens == 12
    assert profile.step_seconds(12, mixed) - profile.step_seconds(12, uniform) == pytest.approx(0.006)


def test_attention_groups_price_each_sequence_on_its_own_context():
    """Attention runs per group of equal new-token counts: one long draft among decoding sequences
    pays for its own queries, not for padding the others; each group's keys span its longest context."""
    from orchestrator.step_cost import BatchShape

    mixed = BatchShape(((1, 501),) * 7 + ((5, 505),))
    assert mixed.tokens == 12
    assert mixed.attention_pairs == 7 * 1 * 501 + 1 * 5 * 505
    assert mixed.gathered_positions == 7 * 501 + 505
    two = BatchShape(((2, 102), (2, 4002), (1, 300)))
    assert two.attention_pairs == 2 * 2 * 4002 + 300 and two.gathered_positions == 2 * 4002 + 300


def test_drafts_go_where_their_attention_is_cheap():
    """Same drafts, four requests 100 tokens in and four 4,000 in, attention dear: the short ones verify
    their drafts, the long ones do not (a padded batch would have priced every draft at 4,000)."""
    from orchestrator.scheduler import BatchPlan

    profile = StepCostProfile((1, 64), (0.050, 0.0505), attention_s=2e-6, context=128)
    survival = [[0.4, 0.2]] * 8
    contexts = [101] * 4 + [4001] * 4
    plan = plan_verification(survival, 8, 8, profile, batch=BatchPlan([], contexts))
    assert plan[:4] == [2] * 4 and plan[4:] == [0] * 4
    assert plan_verification(survival, 8, 8, profile, batch=BatchPlan([], [101] * 8)) == [2] * 8
    assert plan_verification(survival, 8, 8, profile, batch=BatchPlan([], [4001] * 8)) == [0] * 8
    # a prefill in the same step is its own group: it does not make the others' drafts dearer
    with_prefill = BatchPlan([(300, 300)], [101] * 4)
    assert with_prefill.tokens == 304
    assert plan_verification(survival[:4], 304, 4, profile, batch=with_prefill) == [2] * 4

class AlternatingDrafter(FixedDrafter):
    """Calibrated confidences of 0.01 and 0.9 on alternate blocks: a block says nothing of the next."""

    def __init__(self, tokens):
        super().__init__(tokens, None)
        self.calls = 0

    def propose(self, requests):
        self.calls += 1
        confidence = 0.01 if self.calls % 2 else 0.9
        return [Draft(self.tokens[: r.num_tokens], None, [confidence] * r.num_tokens) for r in requests]


def test_a_block_after_a_pessimistic_one_is_still_drafted():
    """The decision to draft is priced on the blocks' mean calibrated survival, not on the last block's:
    after each 0.01 block (which the schedule then cuts) the next block is drafted all the same."""
    drafter = AlternatingDrafter([5, 6, 7, 8])
    curve = StepCostProfile((1, 8, 64), (0.010, 0.016, 0.080))  # a token costs 8.6% of a step: 0.01 does not pay
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(4, 128, 64), drafter, curve)
    engine.step_cost.observe = lambda *args: None  # priced as profiled: the tiny model runs 10x faster
    engine._calibration[True].record = lambda *args: None  # confidences as the drafter gives them
    engine.submit([2, 3, 4], SamplingParams(max_tokens=60), lambda c: None, spec=SpeculationParams("dspark", 4))
    engine.step()  # prefill
    for _ in range(24):
        engine.step()
    assert drafter.calls == 24
    # the mean survival of the blocks, per position: (0.01 + 0.9) / 2 and (0.01^2 + 0.9^2) / 2
    assert engine._expected_survival(2) == pytest.approx([0.455, 0.405], abs=0.03)


def test_drafting_priced_out_is_probed_again():
    """A plan that keeps drafting out learns nothing new of its price: every DRAFT_PROBE_EVERY steps it
    drafts once anyway, so one slow measurement (a drafter's cold first call) cannot keep it out for good."""
    from orchestrator.engine import DRAFT_PROBE_EVERY

    drafter = CountingDrafter()
    curve = StepCostProfile((1, 2, 64), (0.010, 0.0105, 0.640))
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(4, 128, 100), drafter, curve)
    engine._draft_cost(1, 0.05)  # drafting timed once at 5 decode steps: it does not pay
    engine.submit([1, 2, 3], SamplingParams(max_tokens=60), lambda c: None, spec=SpeculationParams("dspark", 3))
    engine.step()  # prefill
    for _ in range(DRAFT_PROBE_EVERY - 1):
        engine.step()
    assert drafter.calls == []
    engine.step()
    assert len(drafter.calls) == 1


def test_drafting_is_priced_on_its_latest_timings():
    """The first calls of a drafter are slow (kernel set-up): its price is the fastest of its latest
    timings, so those calls neither set it nor stay in it."""
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(4, 128, 100), CountingDrafter(),
                    StepCostProfile((1, 2), (0.010, 0.0105)))
    for seconds in [0.02] * 4 + [0.002] * 8:
        engine._draft_cost(1, seconds)
    assert engine._draft_cost(1) == pytest.approx(0.002)


def test_a_prompt_prefilled_beside_does_not_make_drafting_look_cheap():
    """A long prefill makes the step slow and its plain output rate low (2 tokens in 0.6 s), so any
    drafting that yields tokens faster than that looks like a gain for the step, while it delays every
    request by its drafting time. Drafting must beat the decode rate: where it does not pay in a decode
    step, it does not pay beside a prefill either."""
    drafter = CountingDrafter()
    curve = StepCostProfile((1, 2, 64), (0.010, 0.0105, 0.640))
    engine = Engine(_tiny_model(), _Tok(), EngineConfig(4, 128, 100), drafter, curve)
    engine._draft_cost(1, 0.05)  # drafting timed at 5 decode steps: it does not pay
    engine.submit([1, 2, 3], SamplingParams(max_tokens=30), lambda c: None, spec=SpeculationParams("dspark", 3))
    engine.step()  # prefill
    engine.step()  # decode, not drafted
    assert drafter.calls == []
    engine.submit(list(range(1, 61)), SamplingParams(max_tokens=4), lambda c: None, spec=SpeculationParams("off"))
    engine.step()  # the 60-token prompt's prefill beside the dspark request's decode
    engine.step()
    assert drafter.calls == []


def test_observed_calibration_moves_confidences_to_the_acceptance_verification_sees():
    """Synthetic rounds: a drafter says 0.9 where its tokens survive 30% of the time once reached, and 0.5
    where they survive 50%. The corrected confidence must reach the observed rates, leave the honest bin
    where it was, and be the drafter's own value before any outcome."""
    import random

    from orchestrator.scheduler import ObservedCalibration

    calibration = ObservedCalibration()
    assert calibration.correct([0.9, 0.5, 0.05]) == pytest.approx([0.9, 0.5, 0.05])
    rng = random.Random(0)
    truth = {0.9: 0.3, 0.5: 0.5}
    for _ in range(3000):
        confidences = [rng.choice([0.9, 0.5]) for _ in range(rng.randint(1, 4))]
        accepted = 0
        while accepted < len(confidences) and rng.random() < truth[confidences[accepted]]:
            accepted += 1
        calibration.record(confidences, accepted)
    assert calibration.correct([0.9])[0] == pytest.approx(0.3, abs=0.05)
    assert calibration.correct([0.5])[0] == pytest.approx(0.5, abs=0.05)


def test_an_overconfident_drafter_is_no_longer_verified_once_its_acceptance_is_seen():
    """Four requests and a drafter that claims 0.95 for tokens the target never emits: on this curve a
    0.95 token pays its place in the forward and a rejected one does not. The first drafted step
    verifies the drafts; once the server has seen them rejected, the steps that draft (probes of the
    price) verify none of them, while sampled requests, calibrated apart, still see the drafter's 0.95."""
    model = _tiny_model()
    params = SamplingParams(max_tokens=200, end_ids=(63,))
    prompts = [[2 + i, 2, 4] for i in range(4)]
    plain = {}
    engine = Engine(model, _Tok(), EngineConfig(4, 256, 200), None, None)
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, params, lambda c, i=i: plain.setdefault(i, []).extend(c.token_ids))
    while engine.step():
        pass
    never = min(set(range(1, 63)) - {t for out in plain.values() for t in out})
    curve = StepCostProfile((1, 4, 8, 64), (0.010, 0.011, 0.013, 0.300))
    drafter = CountingDrafter()
    drafter.tokens, drafter.confidences = [never] * 4, [0.95] * 4
    engine = Engine(model, _Tok(), EngineConfig(4, 256, 200), drafter, curve)
    engine.step_cost.observe = lambda *args: None  # priced as profiled: the tiny model runs 10x faster
    out = {}
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, params, lambda c, i=i: out.setdefault(i, []).extend(c.token_ids),
                      spec=SpeculationParams("dspark", 4))
    verified = []
    while engine.step():
        if drafter.calls and len(drafter.calls) > len(verified):
            verified.append(engine.stats.last_step_draft_tokens)
    assert out == plain
    assert verified[0] > 0 and len(verified) >= 8 and verified[-3:] == [0, 0, 0], verified
    sampled = engine._survival(SimpleNamespace(params=SamplingParams(temperature=1.0)), Draft([never], None, [0.95]))
    assert engine._survival(SimpleNamespace(params=params), Draft([never], None, [0.95]))[0] < 0.5 < sampled[0]


def test_copied_drafts_are_planned_without_the_drafting_price():
    """Prompt lookup first: a model draft costing 20 steps never pays, a copied one costs nothing. The
    plan drafts the copied request alone, where pricing every draft as the model's drafted none."""
    survival = [[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]]
    flat = StepCostProfile((1, 64), (0.05, 0.06))
    assert plan_drafting(survival, 2, 2, flat, 1.0) == [0, 0]
    assert plan_drafting(survival, 2, 2, flat, 1.0, copied=[True, False]) == [3, 0]
    assert plan_drafting(survival, 2, 2, flat, 0.0, copied=[True, False]) == [3, 3]  # cheap drafting: both


def test_a_copied_draft_pays_no_drafting_steps_beside_a_model_draft():
    """A small LM drafting token by token pays a step per position of its longest draft; a copied draft
    beside it pays none, so it keeps its 7 tokens while the model drafts the 2 that pay. Pricing the
    copied draft's length as drafting steps gave [7, 0]."""
    survival = [[0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65], [0.95, 0.6, 0.3, 0.1, 0.05, 0.02, 0.01]]
    flat = StepCostProfile((1, 64), (0.3, 0.3))
    assert plan_drafting(survival, 2, 2, flat, 0.0, draft_step_s=0.02, copied=[True, False]) == [7, 2]
