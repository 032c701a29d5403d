"""The engine in-process on the real default model: continuous batching must not change outputs."""
from __future__ import annotations

import pytest

from orchestrator.engine import Engine, EngineConfig, GenerationChunk
from orchestrator.errors import InvalidRequestError
from orchestrator.sampling import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "def fibonacci(n):",
           "Name three colours.", "Explain gravity to a child.", "Translate 'good morning' to Spanish."]


@pytest.fixture(scope="module")
def model(smollm2_fp32):
    return smollm2_fp32


@pytest.fixture(scope="module")
def encoder(smollm2_encoder):
    return smollm2_encoder


def make_engine(model, encoder, slots=4):
    return Engine(model, encoder.tokenizer, EngineConfig(max_batch_size=slots, max_context=512, max_tokens_limit=256))


class Collector:
    def __init__(self):
        self.chunks: list[GenerationChunk] = []

    def __call__(self, chunk):
        self.chunks.append(chunk)

    @property
    def ids(self):
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def finish(self):
        return self.chunks[-1].finish_reason if self.chunks else None


def run_alone(model, encoder, prompt, params):
    engine = make_engine(model, encoder, slots=1)
    out = Collector()
    engine.submit(encoder.encode(prompt, True), params, out)
    while engine.step():
        pass
    return out


@pytest.fixture(scope="module")
def solo(model, encoder):
    params = SamplingParams(max_tokens=20)
    return {p: run_alone(model, encoder, p, params).ids for p in PROMPTS}


def test_batched_requests_joining_at_different_steps_match_solo_runs(model, encoder, solo):
    engine = make_engine(model, encoder, slots=4)  # 6 requests, 4 slots: some wait for a free slot
    outs = {p: Collector() for p in PROMPTS}
    for step, prompt in enumerate(PROMPTS):
        engine.submit(encoder.encode(prompt, True), SamplingParams(max_tokens=20), outs[prompt])
        engine.step()  # each newcomer joins a batch already mid-generation
    while engine.step():
        pass
    for prompt in PROMPTS:
        assert outs[prompt].ids == solo[prompt], prompt
        assert outs[prompt].finish in ("length", "stop")
    assert engine.cache.num_free() == 4


def test_cancelling_one_request_leaves_the_others_unchanged(model, encoder, solo):
    engine = make_engine(model, encoder)
    outs = [Collector() for _ in PROMPTS[:3]]
    ids = [engine.submit(encoder.encode(p, True), SamplingParams(max_tokens=20), o) for p, o in zip(PROMPTS, outs)]
    for _ in range(3):
        engine.step()
    engine.cancel(ids[1])
    while engine.step():
        pass
    assert outs[1].finish == "cancelled" and len(outs[1].ids) < 20
    assert outs[0].ids == solo[PROMPTS[0]] and outs[2].ids == solo[PROMPTS[2]]
    assert engine.cache.num_free() == 4


def test_client_that_disappears_is_dropped_and_its_slot_freed(model, encoder, solo):
    engine = make_engine(model, encoder)

    def broken(chunk):
        raise ConnectionError("client went away")

    good = Collector()
    engine.submit(encoder.encode(PROMPTS[0], True), SamplingParams(max_tokens=20), broken)
    engine.submit(encoder.encode(PROMPTS[2], True), SamplingParams(max_tokens=20), good)
    while engine.step():
        pass
    assert good.ids == solo[PROMPTS[2]]
    assert engine.cache.num_free() == 4


def test_polled_cancellation_is_honoured(model, encoder):
    engine = make_engine(model, encoder)
    out = Collector()
    engine.submit(encoder.encode(PROMPTS[0], True), SamplingParams(max_tokens=50), out, is_cancelled=lambda: True)
    while engine.step():
        pass
    assert out.finish == "cancelled" and out.ids == []


def test_max_tokens_and_context_limit_end_with_length(model, encoder):
    out = run_alone(model, encoder, PROMPTS[4], SamplingParams(max_tokens=5))
    assert len(out.ids) == 5 and out.finish == "length"
    engine = Engine(model, encoder.tokenizer, EngineConfig(max_batch_size=1, max_context=40, max_tokens_limit=256))
    prompt = encoder.encode(PROMPTS[4], True)
    long_out = Collector()
    engine.submit(prompt, SamplingParams(max_tokens=200), long_out)
    while engine.step():
        pass
    assert long_out.finish == "length" and len(prompt) + len(long_out.ids) == 40


def test_seeded_sampling_reproducible_and_seed_dependent(model, encoder):
    def sample(seed):
        return run_alone(model, encoder, PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0, seed=seed)).ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.mark.parametrize(("prompt_ids", "params", "message"), [
    ([], SamplingParams(), "prompt is empty"),
    ([1] * 512, SamplingParams(), "prompt is 512 tokens; at most 511 fit"),
    ([1, 10**6], SamplingParams(), "input_ids must be in"),
    ([1, -3], SamplingParams(), "input_ids must be in"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(max_tokens=257), "max_tokens"),
    ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
])
def test_bad_requests_are_refused_at_submit(model, encoder, prompt_ids, params, message):
    engine = make_engine(model, encoder)
    with pytest.raises(InvalidRequestError, match=message):
        engine.submit(prompt_ids, params, Collector())
    assert not engine.step()
