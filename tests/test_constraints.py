"""min_tokens, bad_words and end_id in the engine: they shape the target's distribution, so with every
drafter the engine must give exactly what the constrained target alone gives (greedy), and sampled
answers must follow the constrained target's distribution (chi-square)."""
from __future__ import annotations

import pytest
import torch

from orchestrator.constraints import banned_tokens
from orchestrator.drafting import FeatureDrafter, ModelDrafter, PromptLookupDrafter
from orchestrator.engine import Engine, EngineConfig
from orchestrator.errors import InvalidRequestError
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams
from tests.test_speculative_engine import DSPARK_CHECKPOINT, shallow_copy

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


RULES = {
    # three single-token bans and a pair taken from each prompt's own answer: the answer changes early
    "bad_words": lambda out: dict(bad_words=((out[1],), (out[4],), (out[6],), (out[2], out[3]))),
    # a pair late in the answer: it binds where a block of accepted drafts is running
    "bad_pair": lambda out: dict(bad_words=((out[-3], out[-2]),)),
    # the end of the answer pushed back by one token
    "min_tokens": lambda out: dict(min_tokens=len(out) + 1),
}


@pytest.fixture(scope="module", params=list(RULES))
def rules(request, plain):
    """Per prompt: a rule taken from its own answer, so it must change what the target says."""
    assert all(7 <= len(out) < MAX_TOKENS - 4 for out in plain), "the prompts must end on their own"
    return [RULES[request.param](out) for out in plain]


@pytest.fixture(scope="module")
def expected(smollm2_fp32, prompts, plain, rules):
    want = [target_alone(smollm2_fp32, p, MAX_TOKENS, **r) for p, r in zip(prompts, rules)]
    assert all(w != out for w, out in zip(want, plain))
    return want


@pytest.fixture(scope="module", params=["none", "prompt_lookup", "dspark", "target_itself"])
def drafter(request, smollm2_fp32):
    """No drafter, prompt lookup, the DSpark drafter (its own draft vocabulary), and the target drafting
    for itself as a model drafter: every draft it proposes is accepted, so the rule must hold at every
    position inside a verified block."""
    from models.drafters import load_drafter

    if request.param == "none":
        return None
    if request.param == "prompt_lookup":
        return PromptLookupDrafter()
    if request.param == "dspark":
        return FeatureDrafter(load_drafter(DSPARK_CHECKPOINT, smollm2_fp32), 4, 256)
    return ModelDrafter(smollm2_fp32, 4, 256)


def test_rules_change_the_answer_and_speculation_keeps_it_exact(smollm2_fp32, smollm2_encoder, prompts, rules,
                                                                expected, drafter):
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


def test_sequences_given_as_lists_work_as_tuples():
    """The in-process API takes lists where it documents tuples (as JSON gives them): the same rules."""
    listed = SamplingParams(max_tokens=8, stop=["x"], end_ids=[3], bad_words=[[5], [7, 8]])
    assert listed == SamplingParams(max_tokens=8, stop=("x",), end_ids=(3,), bad_words=((5,), (7, 8)))
    assert sorted(banned_tokens(listed, [0], [1, 7], num_output=2)) == [5, 8]


@pytest.mark.parametrize(("params", "message"), [
    (SamplingParams(max_tokens=4, min_tokens=5), r"min_tokens \(min_length\) must be an integer in \[0, max_tokens=4\]"),
    (SamplingParams(max_tokens=4, end_ids=(10**7,)), "end_id must be in"),
    (SamplingParams(max_tokens=4, bad_words=((10**7,),)), "bad_words token ids must be in"),
])
def test_bad_rules_are_refused_by_name(smollm2_fp32, smollm2_encoder, params, message):
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(1, 64, 8))
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit([1, 2], params, lambda c: None)



def exact_second_token(target, prompt: list[int], rule: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact P(t1) and P(t2) under the rule, written out: mask the forbidden ids, then warp, at both positions."""
    from orchestrator.sampling import warp_logits

    def masked(logits: torch.Tensor, history: list[int], num_output: int) -> torch.Tensor:
        banned = banned_tokens(rule, [], history, num_output)
        return logits.index_fill(0, torch.tensor(banned, dtype=torch.long), float("-inf")) if banned else logits

    with torch.inference_mode():
        cache = target.new_cache(1, 64)
        slot = cache.allocate()
        logits = target(torch.tensor(prompt), [slot], [len(prompt)], cache,
                        logits_indices=torch.tensor([len(prompt) - 1])).logits[0]
        p1 = warp_logits(masked(logits, prompt, 0), rule)
        marginal = torch.zeros_like(p1, dtype=torch.float64)
        for t1 in torch.nonzero(p1).flatten().tolist():
            cache.truncate(slot, len(prompt))
            logits = target(torch.tensor([t1]), [slot], [1], cache, logits_indices=torch.tensor([0])).logits[0]
            marginal += float(p1[t1]) * warp_logits(masked(logits, prompt + [t1], 1), rule).double()
    return p1, marginal


def test_constrained_speculative_sampling_draws_from_the_constrained_target(smollm2_fp32, smollm2_encoder):
    """Sampling (T=1, top-k, top-p) with a banned token and a banned pair: the second output token follows
    the exact constrained distribution, and the same test rejects the unconstrained one."""
    from tests.test_engine_sampling import ALPHA, PARAMS, SAMPLES, chi2_critical, chi2_statistic

    target = smollm2_fp32
    prompt = smollm2_encoder.encode("My favourite animal is the", False)
    p1, free = exact_second_token(target, prompt, SamplingParams(max_tokens=3, **PARAMS))
    t1 = int(p1.argmax())
    ranked = [t for t in free.argsort(descending=True).tolist() if t != t1]
    bad_words = ((ranked[0],), (t1, ranked[1]))  # the likeliest 2nd token anywhere; the next one after t1
    _, exact = exact_second_token(target, prompt, SamplingParams(max_tokens=3, bad_words=bad_words, **PARAMS))
    assert exact[ranked[0]] == 0 and free[ranked[0]] > 0.05

    engine = Engine(target, smollm2_encoder.tokenizer, EngineConfig(SAMPLES, 32, 8),
                    ModelDrafter(shallow_copy(target, 4), SAMPLES, 32))
    outs = [[] for _ in range(SAMPLES)]
    for seed, out in enumerate(outs):
        engine.submit(prompt, SamplingParams(max_tokens=3, seed=seed, bad_words=bad_words, **PARAMS), out.append,
                      spec=SpeculationParams("static", 3))
    while engine.step():
        pass
    assert engine.stats.speculation.rounds > SAMPLES // 2, "most second tokens must come from verification"
    second = torch.tensor([[t for c in out for t in c.token_ids][1] for out in outs])
    counts = torch.bincount(second, minlength=exact.numel()).double()
    statistic, df = chi2_statistic(counts, SAMPLES * exact)
    assert statistic < chi2_critical(df, ALPHA), f"chi2 {statistic:.1f} (df {df})"
    unconstrained, df_free = chi2_statistic(counts, SAMPLES * free)
    assert unconstrained >= chi2_critical(df_free, ALPHA)
