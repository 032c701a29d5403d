"""Where a generation ends must not depend on how many tokens a step accepts.

Greedy, fp32, default model. A scripted drafter proposes the target's own continuation (known
from a plain run) with seeded misses, so accepted blocks of every length land on the boundaries;
the boundaries themselves (stop strings, max_tokens, max_context, end-of-generation ids from
either config file) are drawn at random with a fixed seed. Every spec mode and K must give the
`output_ids`, text, finish reason and counts of spec off, exactly.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from models.loading import load_transformer
from orchestrator.drafting import Draft, DraftRequest, PromptLookupDrafter
from orchestrator.engine import Engine, EngineConfig, GenerationChunk
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams
from orchestrator.step_cost import StepCostProfile

SEED = 20261130
PROMPTS = [
    "Write one sentence about the sea.",
    "def fibonacci(n):",
    "Explain in a few words what a compiler does, for a child who likes trains, robots and long words.",
]
REFERENCE_TOKENS = 24
FLAT_COST = StepCostProfile((1, 256), (0.05, 0.051))  # verification nearly free: dspark mode verifies long drafts


class OracleDrafter:
    """Proposes the target's greedy continuation, replacing each proposal by a wrong token with
    probability `miss` (seeded): drafts of known quality at no model cost."""

    name = "oracle"
    tap_layers: tuple[int, ...] = ()
    sequential = False

    def __init__(self, prompts: Sequence[list[int]], continuations: Sequence[list[int]], miss: float = 0.1) -> None:
        self.known = list(zip(prompts, continuations))
        self.miss = miss
        self.rng = random.Random(SEED)

    def admit(self, key: int) -> None:
        pass

    def release(self, key: int) -> None:
        pass

    def commit(self, key: int, num_committed: int) -> None:
        pass

    def observe(self, keys, token_ids, hidden) -> None:
        pass

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [Draft(self._continue(r.context)[: r.num_tokens]) for r in requests]

    def _continue(self, context: list[int]) -> list[int]:
        for prompt, continuation in self.known:
            if context[: len(prompt)] == prompt:
                done = len(context) - len(prompt)
                return [t if self.rng.random() > self.miss else (t + 1) % 49152 for t in continuation[done:]]
        raise AssertionError("a context the oracle does not know")


@dataclass
class Outcome:
    ids: list[int]
    text: str
    finish: str | None
    num_prompt_tokens: int
    num_output_tokens: int


def generate(model, tokenizer, prompts, params, spec, drafter=None, max_context=512, slots=8) -> list[Outcome]:
    """All requests through one engine; more requests than slots, so some join mid-generation."""
    engine = Engine(model, tokenizer, EngineConfig(slots, max_context, 256, spec_batch_limit=6), drafter, FLAT_COST)
    chunks: list[list[GenerationChunk]] = [[] for _ in prompts]
    for prompt, p, out in zip(prompts, params, chunks):
        engine.submit(prompt, p, out.append, spec=spec)
    while engine.step():
        pass
    assert engine.cache.num_free() == slots
    return [Outcome([t for c in out for t in c.token_ids], "".join(c.text for c in out), out[-1].finish_reason,
                    out[-1].num_prompt_tokens, out[-1].num_output_tokens) for out in chunks]


@pytest.fixture(scope="module")
def prompts(smollm2_encoder):
    return [smollm2_encoder.encode(p, True) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(smollm2_fp32, smollm2_encoder, prompts):
    """Each prompt's greedy continuation and its text, from plain decoding."""
    outcomes = generate(smollm2_fp32, smollm2_encoder.tokenizer, prompts,
                        [SamplingParams(max_tokens=REFERENCE_TOKENS)] * len(prompts), SpeculationParams("off"))
    return [o.ids for o in outcomes], [o.text for o in outcomes]


@pytest.fixture(scope="module")
def added_eos(prompts, reference) -> tuple[int, int]:
    """The end-of-generation ids the test model's config.json and generation_config.json each add: tokens
    that occur once in the reference outputs, at seeded random positions, each from another prompt's
    output (ids drawn from one output would leave the later one unreached, its file untested)."""
    ids, _ = reference
    counts = Counter(t for out in ids for t in out)
    short = [out for prompt, out in zip(prompts, ids) if len(prompt) < max(map(len, prompts))]  # not cut by max_context
    rng = random.Random(SEED + 1)
    config_id, generation_id = (rng.choice([t for t in out if counts[t] == 1]) for out in short[:2])
    return config_id, generation_id


@pytest.fixture(scope="module")
def eos_model(smollm2_dir, tmp_path_factory, added_eos):
    """The default model from a directory whose config.json and generation_config.json each add an
    end-of-generation id (as Llama-3 instruct lists <|eot_id|> only in the latter)."""
    config_id, generation_id = added_eos
    directory = tmp_path_factory.mktemp("eos-model")
    for item in smollm2_dir.iterdir():
        if item.is_file() and item.name not in ("config.json", "generation_config.json"):
            (directory / item.name).symlink_to(item)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], config_id]
    (directory / "config.json").write_text(json.dumps(config))
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = list(generation["eos_token_id"]) + [generation_id]
    (directory / "generation_config.json").write_text(json.dumps(generation))
    model = load_transformer(directory, torch.float32)
    assert {config_id, generation_id} <= set(model.config.eos_token_ids)
    return model


def boundary_cases(reference) -> list[SamplingParams]:
    """Per prompt: a short stop string (often inside one token), a long one (spanning tokens and
    steps), a max_tokens, and none (the context limit or an end-of-generation id ends it); all at
    seeded random positions of the reference."""
    rng = random.Random(SEED)
    ids, texts = reference
    cases = []
    for out, text in zip(ids, texts):
        for length in (rng.randint(1, 2), rng.randint(4, 10)):
            start = rng.randrange(max(len(text) - length, 1))
            cases.append(SamplingParams(max_tokens=REFERENCE_TOKENS, stop=(text[start:start + length],)))
        cases.append(SamplingParams(max_tokens=rng.randint(1, len(out))))
        cases.append(SamplingParams(max_tokens=REFERENCE_TOKENS))
    return cases


# Every mode at K=3, and static at 1 and 7, in the fast suite; the other lengths are slow (DSPARK_SLOW_TESTS=1).
SLOW = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("DSPARK_SLOW_TESTS") != "1", reason="set DSPARK_SLOW_TESTS=1")]
SPECS = [
    pytest.param(SpeculationParams(mode, k), id=f"{mode}-{k}", marks=[] if k == 3 or mode == "static" else SLOW)
    for mode in ("static", "batch_limited", "adaptive", "dspark") for k in (1, 3, 7)
]


@pytest.fixture(scope="module")
def boundary_run(eos_model, smollm2_encoder, prompts, reference):
    """All boundary cases in one engine whose context ends, for the longest prompt, at a seeded
    random point of its reference, and whose model has the extra end-of-generation ids."""
    cases = boundary_cases(reference)
    case_prompts = [p for p in prompts for _ in range(len(cases) // len(prompts))]
    longest = max(len(p) for p in prompts)
    max_context = longest + random.Random(SEED + 2).randint(1, REFERENCE_TOKENS - 1)

    def run(spec: SpeculationParams) -> list[Outcome]:
        drafter = None if spec.mode == "off" else OracleDrafter(prompts, reference[0])
        return generate(eos_model, smollm2_encoder.tokenizer, case_prompts, cases, spec, drafter, max_context)

    run.max_context = max_context
    return run


@pytest.fixture(scope="module")
def plain(boundary_run, reference, added_eos, smollm2_encoder):
    """Spec off: the truth. The seeded draws must reach every kind of end, and the added end-of-generation
    id of each config file, so check that they do."""
    cases = boundary_cases(reference)
    outcomes = boundary_run(SpeculationParams("off"))
    per_prompt = len(cases) // len(reference[0])
    ends = set()
    for i, (case, o) in enumerate(zip(cases, outcomes)):
        if o.finish == "stop" and case.stop and case.stop[0] in smollm2_encoder.tokenizer.decode(o.ids):
            ends.add("stop string")
        elif o.finish == "stop":  # the next token of the plain continuation ended it
            ended_by = reference[0][i // per_prompt][len(o.ids)]
            ends.add({added_eos[0]: "config.json id", added_eos[1]: "generation_config.json id"}.get(ended_by, "other id"))
        elif o.num_prompt_tokens + o.num_output_tokens == boundary_run.max_context:
            ends.add("max_context")
        elif o.num_output_tokens == case.max_tokens < REFERENCE_TOKENS:
            ends.add("max_tokens")
    assert {"stop string", "config.json id", "generation_config.json id", "max_context", "max_tokens"} <= ends
    return outcomes


@pytest.mark.parametrize("spec", SPECS)
def test_every_boundary_ends_where_plain_decoding_ends(boundary_run, plain, spec):
    for i, (got, want) in enumerate(zip(boundary_run(spec), plain)):
        assert got == want, f"case {i}"


FLUSH_PROMPT = "Ship it 🚀, ship it 🚀, ship it"


@pytest.mark.parametrize("spec", [SpeculationParams("off"), SpeculationParams("static", 3)], ids=["off", "static-3"])
def test_a_stop_string_completed_by_the_final_flush_ends_with_stop(smollm2_fp32, smollm2_encoder, spec):
    # max_tokens ends on a token that is a space plus the first bytes of an emoji: the detokenizer holds
    # that text back until the final flush, and only the flushed space completes the stop string. The
    # text is cut there, so the finish reason is "stop", not "length".
    tokenizer = smollm2_encoder.tokenizer
    prompt = smollm2_encoder.encode(FLUSH_PROMPT, False)
    ids = generate(smollm2_fp32, tokenizer, [prompt], [SamplingParams(max_tokens=REFERENCE_TOKENS)],
                   SpeculationParams("off"))[0].ids
    j = next(j for j in range(1, len(ids)) if tokenizer.decode(ids[j:j + 1]) == " \ufffd")
    before = tokenizer.decode(ids[:j])
    stop = before[-2:] + " "
    assert stop not in before, "the stop string must complete only with the held-back space"
    drafter = None if spec.mode == "off" else PromptLookupDrafter()
    got = generate(smollm2_fp32, tokenizer, [prompt], [SamplingParams(max_tokens=j + 1, stop=(stop,))], spec, drafter)[0]
    assert got == Outcome(ids[:j + 1], before[:-2], "stop", len(prompt), j + 1)


@pytest.mark.parametrize("end", ["stop string", "end_id"])
def test_a_request_counts_only_the_accepted_drafts_its_answer_keeps(smollm2_fp32, smollm2_encoder, prompts, reference,
                                                                     end):
    """A drafter that is always right drafts 7 tokens a round and all are accepted; the answer ends at its
    3rd token, inside the first round's block. Its counters (what OpenAI's usage reports) count the 2
    drafted tokens the answer kept, not the 7 accepted (the server's metrics measure the drafter)."""
    ids, _ = reference
    out = ids[0]
    decode = smollm2_encoder.tokenizer.decode
    assert out[3] not in out[:3] and decode(out[2:3]) not in decode(out[:2]), "the end must be the 3rd token's"
    params = {"stop string": SamplingParams(max_tokens=REFERENCE_TOKENS, stop=(decode(out[2:3]),)),
              "end_id": SamplingParams(max_tokens=REFERENCE_TOKENS, end_ids=(out[3],))}[end]
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(1, 512, 256),
                    OracleDrafter(prompts[:1], ids[:1], miss=0.0), FLAT_COST)
    chunks: list[GenerationChunk] = []
    engine.submit(prompts[0], params, chunks.append, spec=SpeculationParams("static", 7))
    while engine.step():
        pass
    last = chunks[-1]
    assert (last.finish_reason, last.num_output_tokens) == ("stop", 3)
    assert (last.num_draft_rounds, last.num_draft_tokens, last.num_accepted_tokens) == (1, 7, 2)
    assert (engine.stats.speculation.drafted, engine.stats.speculation.accepted) == (7, 7)


@pytest.mark.parametrize("k", [0, 2])
def test_adaptive_mode_drafts_at_most_num_draft_tokens(smollm2_fp32, smollm2_encoder, prompts, reference, k):
    """`num_draft_tokens` is the adaptive schedule's ceiling (0: no drafts), even when every draft is
    accepted and the schedule would grow."""
    ids, _ = reference
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(1, 512, 256),
                    OracleDrafter(prompts[:1], ids[:1], miss=0.0), FLAT_COST)
    chunks: list[GenerationChunk] = []
    engine.submit(prompts[0], SamplingParams(max_tokens=REFERENCE_TOKENS), chunks.append,
                  spec=SpeculationParams("adaptive", k))
    while engine.step():
        pass
    drafted_at = engine.stats.speculation.drafted_at
    assert [t for c in chunks for t in c.token_ids] == ids[0]
    assert sum(drafted_at[k:]) == 0 and (k == 0 or drafted_at[k - 1] > 1)


def stop_rule(decode, out: list[int], stop: str, min_tokens: int) -> tuple[list[int], str, str]:
    """Where plain decoding of ``out`` ends under the rule written out directly: the first token k >=
    min_tokens whose text completes ``stop`` after the text of the first min_tokens - 1 tokens."""
    inert = len(decode(out[:max(min_tokens - 1, 0)]))
    for k in range(max(min_tokens, 1), len(out) + 1):
        text = decode(out[:k])
        i = text.find(stop, max(inert - len(stop) + 1, 0))
        if i >= 0:
            return out[:k], text[:i], "stop"
    return out, decode(out), "length"


@pytest.mark.parametrize("spec", [SpeculationParams("off"), SpeculationParams("static", 3),
                                  SpeculationParams("dspark", 7)], ids=["off", "static-3", "dspark-7"])
def test_a_stop_string_ends_the_answer_only_once_min_tokens_are_out(smollm2_fp32, smollm2_encoder, prompts, reference,
                                                                   spec):
    """vLLM's min_tokens rule: a stop string that ends before the answer holds min_tokens tokens does not
    end it; its next occurrence does. A 2-character stop string that occurs twice in the reference."""
    ids, texts = reference
    decode = smollm2_encoder.tokenizer.decode
    out, text = ids[0], texts[0]
    stop = next(text[i:i + 2] for i in range(len(text) - 2) if text.count(text[i:i + 2]) >= 2 and text[i:i + 2].strip())
    first_end = text.find(stop) + 2
    min_tokens = next(k for k in range(1, len(out) + 1) if len(decode(out[:k])) >= first_end) + 1  # just past it
    want = stop_rule(decode, out, stop, min_tokens)
    assert want[2] == "stop" and len(want[0]) > min_tokens - 1 and want != stop_rule(decode, out, stop, 0)
    drafter = None if spec.mode == "off" else OracleDrafter(prompts[:1], ids[:1])
    got = generate(smollm2_fp32, smollm2_encoder.tokenizer, prompts[:1],
                   [SamplingParams(max_tokens=REFERENCE_TOKENS, stop=(stop,), min_tokens=min_tokens)], spec, drafter)[0]
    assert (got.ids, got.text, got.finish) == want
