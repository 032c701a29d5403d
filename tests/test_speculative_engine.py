"""Speculative decoding in the engine, on the real default model in fp32: lossless, rolls back, isolates requests."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.drafters import load_drafter
from models.transformer import Transformer
from orchestrator.drafting import DraftRequest, FeatureDrafter, LookupFirstDrafter, ModelDrafter, PromptLookupDrafter
from orchestrator.engine import Engine, EngineConfig
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams
from orchestrator.step_cost import StepCostProfile
from tests.conftest import PROJECT_ROOT

DSPARK_CHECKPOINT = PROJECT_ROOT / "models" / "checkpoints" / "smollm2-135m-instruct-dspark"

TOPICS = ["the sea", "a cat", "Paris", "winter", "coffee", "robots", "music", "rivers", "the moon", "bread"]
PROMPTS = (
    [f"Write one sentence about {t}." for t in TOPICS[:7]]
    + [f"def {name}(xs):" for name in ("total", "reverse_list", "max_value", "is_sorted", "mean")]
    + ["Repeat exactly: red green blue red green blue red green blue",
       "List the numbers 1, 2, 3, 4, 5, 6, 7, 8.",
       "What is 12 times 12?",
       "Name three planets.",
       "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):",
       "Translate 'thank you' into French.",
       "Spell the word banana letter by letter.",
       "Write the alphabet in capitals."]
)
NEW_TOKENS = 16
SLOTS = 8


@pytest.fixture(scope="module")
def target(smollm2_fp32):
    return smollm2_fp32


@pytest.fixture(scope="module")
def encoder(smollm2_encoder):
    return smollm2_encoder


def shallow_copy(target: Transformer, num_layers: int) -> Transformer:
    """A cheap drafter with the target's tokenizer: its first layers, embeddings and head."""
    drafter = Transformer(dataclasses.replace(target.config, num_layers=num_layers))
    drafter.embed = target.embed
    drafter.norm = target.norm
    drafter.lm_head = target.lm_head
    drafter.layers = torch.nn.ModuleList(target.layers[:num_layers])
    return drafter.eval()


def run(target, encoder, drafter, spec, params=None, prompts=PROMPTS, arrive_every=2, step_cost=None):
    """All prompts through one engine, newcomers arriving while others are mid-generation."""
    engine = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, max_context=256, max_tokens_limit=64), drafter,
                    step_cost)
    outputs: dict[int, list] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.num_active or engine.num_waiting:
        if pending and step % arrive_every == 0:
            i, prompt = pending.pop(0)
            outputs[i] = []
            engine.submit(encoder.encode(prompt, True), params or SamplingParams(max_tokens=NEW_TOKENS),
                          outputs[i].append, spec=spec)
        engine.step()
        step += 1
    assert engine.cache.num_free() == SLOTS
    return engine, [[t for chunk in outputs[i] for t in chunk.token_ids] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def reference(target, encoder):
    return run(target, encoder, None, SpeculationParams("off"))[1]


def dspark_drafter(target):
    """The trained DSpark drafter shipped for the default target."""
    return FeatureDrafter(load_drafter(DSPARK_CHECKPOINT, target), SLOTS, 256)


def small_draft_vocab(encoder, target, size: int = 2048) -> torch.Tensor:
    from orchestrator.draft_vocab import frequent_tokens, stdlib_corpus

    return frequent_tokens(encoder.tokenizer, target.config.vocab_size, size, stdlib_corpus(1 << 18),
                           always=target.config.eos_token_ids)


@pytest.fixture(scope="module", params=["prompt_lookup", "shallow_model", "shallow_model_draft_vocab", "dspark",
                                        "dspark+prompt_lookup"])
def drafter(request, target, encoder):
    if request.param == "prompt_lookup":
        return PromptLookupDrafter()
    if request.param == "dspark":
        return dspark_drafter(target)
    if request.param == "dspark+prompt_lookup":
        return LookupFirstDrafter(dspark_drafter(target))
    vocab = small_draft_vocab(encoder, target) if request.param == "shallow_model_draft_vocab" else None
    return ModelDrafter(shallow_copy(target, 6), SLOTS, 256, vocab)


def test_a_draft_vocabulary_bounds_the_proposals_and_keeps_them_exact_distributions(target, encoder):
    from orchestrator.drafting import DraftRequest

    vocab = small_draft_vocab(encoder, target, 512)
    drafter = ModelDrafter(shallow_copy(target, 6), 2, 256, vocab)
    drafter.admit(1)
    ids = encoder.encode("def total(xs):", apply_chat_template=True)
    (draft,) = drafter.propose([DraftRequest(1, ids, 5, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))])
    outside = torch.ones(target.config.vocab_size, dtype=torch.bool)
    outside[vocab] = False
    assert all(not outside[t] for t in draft.tokens)
    assert draft.probs[:, outside].abs().max() == 0
    torch.testing.assert_close(draft.probs.sum(-1), torch.ones(5))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_speculation_equals_target_alone(target, encoder, reference, drafter, k):
    engine, outputs = run(target, encoder, drafter, SpeculationParams("static", k))
    for prompt, got, want in zip(PROMPTS, outputs, reference):
        assert got == want, prompt
    stats = engine.stats.speculation
    assert stats.rounds > 0 and stats.drafted >= stats.rounds
    assert 0 < stats.accepted < stats.drafted, "the test must see both acceptances and rejections"


def test_dspark_scheduler_stays_lossless_and_follows_the_cost_curve(target, encoder, reference):
    verified_per_round = {}
    for name, cost in [("flat", StepCostProfile((1, 64), (0.05, 0.052))), ("steep", StepCostProfile((1, 64), (0.01, 0.64)))]:
        engine, outputs = run(target, encoder, dspark_drafter(target), SpeculationParams("dspark", 7), step_cost=cost)
        assert outputs == reference, name
        stats = engine.stats.speculation
        verified_per_round[name] = stats.drafted / max(stats.rounds, 1)
    # Nearly free verification admits longer drafts than a cost that grows with every token.
    assert verified_per_round["flat"] > verified_per_round["steep"]


def test_dspark_mode_with_a_small_lm_drafter_stays_lossless(target, encoder, reference):
    """The plan sizes a token-by-token drafter's drafts (priced per drafting step); greedy output is unchanged."""
    drafter = ModelDrafter(shallow_copy(target, 6), SLOTS, 256)
    engine, outputs = run(target, encoder, drafter, SpeculationParams("dspark", 7),
                          step_cost=StepCostProfile((1, 64), (0.05, 0.052)))
    assert outputs == reference
    assert engine.stats.speculation.rounds > 0


def test_full_acceptance_with_the_target_as_its_own_drafter(target, encoder, reference):
    engine, outputs = run(target, encoder, ModelDrafter(target, SLOTS, 256), SpeculationParams("static", 3),
                          prompts=PROMPTS[:6])
    assert outputs == reference[:6]
    stats = engine.stats.speculation
    assert stats.accepted == stats.drafted  # identical models: every draft survives, bonus tokens included


def test_speculative_and_plain_requests_share_a_batch(target, encoder, reference):
    engine = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, 256, 64), PromptLookupDrafter())
    outs = {i: [] for i in range(4)}
    for i in range(4):
        spec = SpeculationParams("static", 3) if i % 2 else SpeculationParams("off")
        engine.submit(encoder.encode(PROMPTS[i], True), SamplingParams(max_tokens=NEW_TOKENS), outs[i].append, spec=spec)
    while engine.step():
        pass
    assert [[t for c in outs[i] for t in c.token_ids] for i in range(4)] == reference[:4]
    assert outs[0][-1].num_draft_rounds == 0 and outs[1][-1].num_draft_rounds > 0


def test_rollback_leaves_the_cache_as_a_fresh_prefill_would(target, encoder):
    drafter = ModelDrafter(shallow_copy(target, 4), 2, 256)
    engine = Engine(target, encoder.tokenizer, EngineConfig(2, 256, 64), drafter)
    engine.submit(encoder.encode(PROMPTS[0], True), SamplingParams(max_tokens=40), lambda c: None,
                  spec=SpeculationParams("static", 5))
    rejected = 0
    for _ in range(6):
        engine.step()
        rejected = engine.stats.speculation.drafted - engine.stats.speculation.accepted
    assert rejected > 0
    request = engine._running[0]
    context = request.context
    assert int(engine.cache.lengths[request.slot]) == len(context) - 1
    with torch.inference_mode():
        last = torch.tensor([len(context) - 1])
        after_rollback = target(torch.tensor(context[-1:]), [request.slot], [1], engine.cache,
                                logits_indices=torch.tensor([0])).logits
        fresh_cache = target.new_cache(1, 256)
        fresh = target(torch.tensor(context), [fresh_cache.allocate()], [len(context)], fresh_cache,
                       logits_indices=last).logits
    torch.testing.assert_close(after_rollback, fresh, atol=1e-4, rtol=1e-4)


def test_a_small_lm_drafter_reports_the_context_it_has_not_read(target, encoder):
    """What the scheduler prices before a skipped request drafts again: context not yet in its cache."""
    drafter = ModelDrafter(shallow_copy(target, 2), 2, 256)
    drafter.admit(7)
    context = encoder.encode(PROMPTS[0], True)
    assert drafter.uncached(7, len(context)) == len(context)
    drafter.propose([DraftRequest(7, context, 3, SamplingParams(max_tokens=8), torch.Generator())])
    assert drafter.uncached(7, len(context) + 5) == 3  # it read the context and its first two drafts
    drafter.commit(7, len(context))  # only the context survived verification
    assert drafter.uncached(7, len(context) + 4) == 4


def test_seeded_speculative_sampling_is_reproducible(target, encoder):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_k=50, seed=11)
    spec = SpeculationParams("static", 3)
    drafter = ModelDrafter(shallow_copy(target, 6), SLOTS, 256)
    _, a = run(target, encoder, drafter, spec, params, prompts=PROMPTS[:3])
    _, b = run(target, encoder, drafter, spec, params, prompts=PROMPTS[:3])
    assert a == b
    assert all(len(x) > 0 for x in a)


def test_cancelling_a_speculating_request_leaves_others_unchanged(target, encoder, reference):
    engine = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, 256, 64), PromptLookupDrafter())
    outs = {i: [] for i in range(3)}
    ids = [engine.submit(encoder.encode(PROMPTS[i], True), SamplingParams(max_tokens=NEW_TOKENS), outs[i].append,
                         spec=SpeculationParams("static", 3)) for i in range(3)]
    engine.step()
    engine.step()
    engine.cancel(ids[1])
    while engine.step():
        pass
    assert outs[1][-1].finish_reason == "cancelled"
    for i in (0, 2):
        assert [t for c in outs[i] for t in c.token_ids] == reference[i]
    assert engine.cache.num_free() == SLOTS


def test_spec_params_are_validated(target, encoder, reference):
    from orchestrator.errors import InvalidRequestError

    engine = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, 256, 64))
    with pytest.raises(InvalidRequestError, match="needs a drafter"):
        engine.submit([1, 2], SamplingParams(max_tokens=8), lambda c: None, spec=SpeculationParams("static", 3))
    with pytest.raises(InvalidRequestError, match="spec_mode"):
        engine.submit([1, 2], SamplingParams(max_tokens=8), lambda c: None, spec=SpeculationParams("turbo", 3))
    with pytest.raises(InvalidRequestError, match="num_draft_tokens"):
        engine.submit([1, 2], SamplingParams(max_tokens=8), lambda c: None, spec=SpeculationParams("off", 99))
    # a server without a drafter whose configured default speculates serves requests that do not choose plainly
    plain = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, 256, 64, default_spec=SpeculationParams("dspark", 7)))
    chunks: list = []
    plain.submit(encoder.encode(PROMPTS[0], True), SamplingParams(max_tokens=NEW_TOKENS), chunks.append)
    while plain.step():
        pass
    assert [t for c in chunks for t in c.token_ids] == reference[0] and chunks[-1].finish_reason is not None
    with pytest.raises(InvalidRequestError, match="needs a drafter"):
        plain.submit([1, 2], SamplingParams(max_tokens=8), lambda c: None, spec=SpeculationParams("dspark", 7))


def test_drafting_is_priced_per_number_of_drafting_sequences(target, encoder):
    """A small LM drafting for 16 sequences costs more than for 1: each sequence count keeps its own
    timed cost, and a count not timed yet is scaled from the nearest timed one as the target's profiled
    step grows, instead of reusing the one-sequence time at any load."""
    profile = StepCostProfile((1, 16), (0.010, 0.030))
    engine = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, max_context=256, max_tokens_limit=64),
                    ModelDrafter(shallow_copy(target, 2), SLOTS, 256), profile)
    assert engine._draft_cost(1) == 0.0  # nothing timed: drafting is free until measured
    engine._draft_cost(1, 0.004, positions=2)  # a sequential drafter: per drafted position
    assert engine._draft_cost(1) == pytest.approx(0.002)
    assert engine._draft_cost(16) == pytest.approx(0.002 * 3)  # the profile triples from 1 to 16 tokens
    for _ in range(3):
        engine._draft_cost(16, 0.008, positions=1)
    assert engine._draft_cost(16) == pytest.approx(0.008)  # timed at 16: its own price
    assert engine._draft_cost(1) == pytest.approx(0.002)   # and 1 keeps its own
    assert engine._draft_cost(12) == pytest.approx(0.008 * profile.step_seconds(12) / profile.step_seconds(16))


def test_a_drafting_step_that_reads_a_backlog_does_not_set_the_drafting_price(target, encoder):
    """A small LM's first drafting step also reads the prompt (later ones, whatever was skipped), which
    `_catch_up_costs` prices apart: timing that step as a drafting step would overprice every later one."""
    engine = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, max_context=256, max_tokens_limit=64),
                    ModelDrafter(shallow_copy(target, 2), SLOTS, 256))
    engine.submit(encoder.encode(PROMPTS[0], True), SamplingParams(max_tokens=16), lambda c: None,
                  spec=SpeculationParams("static", 3))
    engine.step()  # prefill
    engine.step()  # drafts after reading the whole prompt
    assert engine.stats.draft_seconds > 0 and not any(engine._draft_timings.values())
    engine.step()  # drafts with the context already read
    assert [len(t) for t in engine._draft_timings.values()] == [1]


def test_lookup_first_copies_where_the_context_repeats_and_asks_the_model_elsewhere(target):
    """A context ending in a 2-gram seen earlier gets lookup's continuation (no model forward); one
    without gets the model's draft; both in one call, in the callers' order."""
    model = ModelDrafter(shallow_copy(target, 2), 2, 256)
    drafter = LookupFirstDrafter(model)
    for key in (1, 2):
        drafter.admit(key)
    repeating = [100, 200, 300, 400, 500, 100, 200]  # ends in (100, 200): continues with 300, 400, 500
    fresh = [100, 200, 300, 400, 500, 600, 700]  # no suffix 2-gram occurs earlier
    params = SamplingParams()
    asks = [DraftRequest(1, repeating, 3, params, torch.Generator()), DraftRequest(2, fresh, 3, params, torch.Generator())]
    assert drafter.copies(repeating) and not drafter.copies(fresh)
    assert not drafter.copies(repeating, banned=lambda prefix: [300]), "a forbidden continuation: the model drafts"
    copied, modelled = drafter.propose(asks)
    assert (copied.tokens, copied.source) == ([300, 400, 500], "lookup")
    assert modelled.source == "model" and len(modelled.tokens) == 3
    assert int(model.cache.lengths[model._slots[1]]) == 0, "a copied draft runs no model forward"
    assert int(model.cache.lengths[model._slots[2]]) > 0


class _CopiesWhereThePromptStartsWith100(LookupFirstDrafter):
    def copies(self, context, banned=None):
        return context[0] == 100


def test_the_drafting_plan_knows_which_drafts_lookup_will_copy(target, encoder):
    """Before drafting, the dspark plan asks the drafter which requests lookup serves: their drafts cost
    no forward and are predicted from lookup's own verify rounds. With the model's drafting timed at
    10 s and every lookup draft accepted so far, the copying request drafts and the other does not."""
    drafter = _CopiesWhereThePromptStartsWith100(ModelDrafter(shallow_copy(target, 2), SLOTS, 256))
    engine = Engine(target, encoder.tokenizer, EngineConfig(SLOTS, max_context=256, max_tokens_limit=64), drafter,
                    StepCostProfile((1, 64), (0.05, 0.06)))
    ids = [engine.submit(prompt, SamplingParams(max_tokens=16), lambda c: None, spec=SpeculationParams("dspark", 4))
           for prompt in ([100, 7, 8, 9], [101, 7, 8, 9])]
    engine.step()  # prefill
    for sequences in (1, 2):
        engine._draft_cost(sequences, 10.0)
    for _ in range(20):
        engine._source_acceptance("lookup").record(4, 4)
    lengths = dict.fromkeys(ids, 4)
    engine._decide_drafting([], lengths)
    assert lengths == {ids[0]: 4, ids[1]: 0}


def test_copied_drafts_never_set_the_drafting_price(target, encoder):
    """Prompt lookup costs no forward: its steps must not teach the scheduler that a model's drafting is
    free, and a lookup draft's survival comes from lookup's own verify rounds."""
    engine, _ = run(target, encoder, PromptLookupDrafter(), SpeculationParams("static", 4), prompts=PROMPTS[:4])
    assert engine.stats.speculation.rounds > 0
    assert not any(engine._draft_timings.values())
    assert set(engine._acceptance_by_source) == {"lookup"}
    assert engine._acceptance_by_source["lookup"].reached == engine._acceptance.reached
