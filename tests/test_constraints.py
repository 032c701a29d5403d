"""min_tokens, bad_words and end_id in the engine: they shape the target's distribution, so every drafter
must give exactly what the constrained target alone gives (greedy), at every draft length."""
from __future__ import annotations

import pytest
import torch

from orchestrator.constraints import banned_tokens
from orchestrator.drafting import FeatureDrafter, ModelDrafter, PromptLookupDrafter
from orchestrator.engine import Engine, EngineConfig
from orchestrator.errors import InvalidRequestError
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams
from tests.test_speculative_engine import DSPARK_CHECKPOINT, shallow_copy, small_draft_vocab

PROMPTS = ["What is 2+2?", "Name the capital of Italy."]
MAX_TOKENS = 24


def target_alone(target, prompt: list[int], max_tokens: int, min_tokens=0, bad_words=(), end_ids=None) -> list[int]:
    """Plain greedy decoding with the rules written out directly: full recompute each token, no engine."""
    end_ids = set(target.config.eos_token_ids if end_ids is None else end_ids)
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < max_tokens:
            ids = prompt + out
            cache = target.new_cache(1, len(ids) + 1)
            logits = target(torch.tensor(ids), [cache.allocate()], [len(ids)], cache,
                            logits_indices=torch.tensor([len(ids) - 1])).logits[0].clone()
            if len(out) < min_tokens:
                logits[list(end_ids)] = float("-inf")
            for word in bad_words:
                if list(ids[len(ids) - len(word) + 1:]) == list(word[:-1]) or len(word) == 1:
                    logits[word[-1]] = float("-inf")
            token = int(logits.argmax())
            if token in end_ids:
                break
            out.append(token)
    return out


def engine_run(target, encoder, drafter, spec, params_list, prompts):
    engine = Engine(target, encoder.tokenizer, EngineConfig(4, max_context=256, max_tokens_limit=64), drafter)
    outs = [[] for _ in prompts]
    for prompt, params, out in zip(prompts, params_list, outs):
        engine.submit(prompt, params, out.append, spec=spec)
    while engine.step():
        pass
    return [[t for c in out for t in c.token_ids] for out in outs], [out[-1].finish_reason for out in outs]


@pytest.fixture(scope="module")
def prompts(smollm2_encoder):
    return [smollm2_encoder.encode(p, True) for p in PROMPTS]


@pytest.fixture(scope="module")
def plain(smollm2_fp32, smollm2_encoder, prompts):
    return engine_run(smollm2_fp32, smollm2_encoder, None, SpeculationParams("off"),
                      [SamplingParams(max_tokens=MAX_TOKENS)] * len(prompts), prompts)[0]


@pytest.fixture(scope="module")
def rules(plain):
    """Per prompt: min_tokens past its natural end, and two bad words taken from its own answer
    (a single token and a two-token sequence), so every rule must change what the target says."""
    assert all(len(out) < MAX_TOKENS - 4 for out in plain), "the prompts must end on their own"
    return [dict(min_tokens=len(out) + 4, bad_words=((out[1],), (out[2], out[3]))) for out in plain]


@pytest.fixture(scope="module")
def expected(smollm2_fp32, prompts, rules):
    return [target_alone(smollm2_fp32, p, MAX_TOKENS, **r) for p, r in zip(prompts, rules)]


@pytest.fixture(scope="module", params=["none", "prompt_lookup", "shallow_model_draft_vocab", "dspark"])
def drafter(request, smollm2_fp32, smollm2_encoder):
    from models.drafters import load_drafter

    if request.param == "none":
        return None
    if request.param == "prompt_lookup":
        return PromptLookupDrafter()
    if request.param == "dspark":
        return FeatureDrafter(load_drafter(DSPARK_CHECKPOINT, smollm2_fp32), 4, 256)
    return ModelDrafter(shallow_copy(smollm2_fp32, 6), 4, 256, small_draft_vocab(smollm2_encoder, smollm2_fp32))


def test_rules_change_the_answer_and_speculation_keeps_it_exact(smollm2_fp32, smollm2_encoder, prompts, plain, rules,
                                                                expected, drafter):
    for out, rule, want in zip(plain, rules, expected):
        assert len(want) >= rule["min_tokens"] and want != out
        assert all(w[0] not in want for w in rule["bad_words"] if len(w) == 1)
    spec = SpeculationParams("off") if drafter is None else SpeculationParams("static", 4)
    params = [SamplingParams(max_tokens=MAX_TOKENS, **r) for r in rules]
    proposals = []
    if drafter is not None:  # record what the real drafter proposes, to check it follows the same rule
        propose = drafter.propose
        drafter.propose = lambda asks: [proposals.append((a, d)) or d for a, d in zip(asks, propose(asks))]
    try:
        got, _ = engine_run(smollm2_fp32, smollm2_encoder, drafter, spec, params, prompts)
    finally:
        if drafter is not None:
            del drafter.propose
    assert got == expected
    for ask, draft in proposals:
        for i, token in enumerate(draft.tokens):
            banned = ask.banned(draft.tokens[:i])
            assert token not in banned
            if draft.probs is not None and banned:
                assert float(draft.probs[i, banned].sum()) == 0.0
    assert drafter is None or any(ask.banned(d.tokens[:0]) for ask, d in proposals), "the drafts must meet the rule"


def test_end_id_replaces_the_models_end_tokens(smollm2_fp32, smollm2_encoder, prompts, plain):
    end = plain[0][3]
    params = [SamplingParams(max_tokens=MAX_TOKENS, end_ids=(end,))]
    got, finish = engine_run(smollm2_fp32, smollm2_encoder, PromptLookupDrafter(), SpeculationParams("static", 4),
                             params, prompts[:1])
    assert got[0] == target_alone(smollm2_fp32, prompts[0], MAX_TOKENS, end_ids=(end,)) == plain[0][:3]
    assert finish == ["stop"]


def test_banned_tokens_follow_the_history():
    params = SamplingParams(max_tokens=8, min_tokens=2, bad_words=((5,), (7, 8)))
    assert sorted(banned_tokens(params, [0], [1, 2], num_output=1)) == [0, 5]
    assert sorted(banned_tokens(params, [0], [1, 7], num_output=2)) == [5, 8]


@pytest.mark.parametrize(("params", "message"), [
    (SamplingParams(max_tokens=4, min_tokens=5), r"min_tokens \(min_length\) must be an integer in \[0, max_tokens=4\]"),
    (SamplingParams(max_tokens=4, end_ids=(10**7,)), "end_id must be in"),
    (SamplingParams(max_tokens=4, bad_words=((10**7,),)), "bad_words token ids must be in"),
])
def test_bad_rules_are_refused_by_name(smollm2_fp32, smollm2_encoder, params, message):
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(1, 64, 8))
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit([1, 2], params, lambda c: None)
