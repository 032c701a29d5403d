"""Fault injection: one request's fault fails that request alone, and the engine thread is never stranded."""
from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from orchestrator.drafting import Draft, DraftRequest, PromptLookupDrafter
from orchestrator.engine import Engine, EngineConfig, EngineStoppedError, GenerationChunk
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams

PROMPTS = ["Repeat exactly: red green blue red green blue", "List the numbers 1, 2, 3, 4, 5, 6.",
           "def total(xs):", "Name three planets."]
STATIC = SpeculationParams("static", 3)
NEW_TOKENS = 12
TIMEOUT_S = 60


class Request:
    """A client's view of one request: its chunks, and an event set by the final one."""

    def __init__(self) -> None:
        self.chunks: list[GenerationChunk] = []
        self.done = threading.Event()

    def __call__(self, chunk: GenerationChunk) -> None:
        self.chunks.append(chunk)
        if chunk.finish_reason is not None:
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def finish(self) -> str | None:
        return self.chunks[-1].finish_reason if self.chunks else None


class FaultyDrafter(PromptLookupDrafter):
    """Prompt lookup that fails on one poisoned token in a request's context, in the chosen way."""

    def __init__(self, poison: int, fault: str) -> None:
        super().__init__()
        self.poison = poison
        self.fault = fault
        self.admitted: list[int] = []

    def admit(self, key: int) -> None:
        if self.fault == "admit" and key == 2:  # the second request submitted
            raise RuntimeError("drafter has no room for this request")
        self.admitted.append(key)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        drafts = super().propose(requests)
        for r, draft in zip(requests, drafts):
            if self.poison in r.context:
                if self.fault == "raise":
                    raise RuntimeError("drafter crashed on this context")
                draft.tokens = [10**9] * r.num_tokens  # "garbage": would break the whole batch's forward
        return drafts


@pytest.fixture(scope="module")
def prompts(smollm2_encoder):
    return [smollm2_encoder.encode(p, True) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(smollm2_fp32, smollm2_encoder, prompts):
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(4, 256, 64))
    outs = [Request() for _ in prompts]
    for prompt, out in zip(prompts, outs):
        engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS), out)
    while engine.step():
        pass
    return [o.ids for o in outs]


def poisoned(prompts):
    """A token of the second prompt only (a fault tied to one request's own content)."""
    return next(t for t in prompts[1] if all(t not in p for i, p in enumerate(prompts) if i != 1))


@pytest.mark.parametrize("fault", ["raise", "garbage", "admit"])
def test_a_drafter_fault_fails_only_that_request(smollm2_fp32, smollm2_encoder, prompts, reference, fault):
    drafter = FaultyDrafter(poisoned(prompts), fault)
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(4, 256, 64), drafter)
    outs = [Request() for _ in prompts]
    for prompt, out in zip(prompts, outs):
        engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS), out, spec=STATIC)
    while engine.step():
        pass
    assert outs[1].finish == "error" and "internal error" in outs[1].chunks[-1].error
    for i in (0, 2, 3):
        assert outs[i].finish in ("length", "stop") and outs[i].ids == reference[i], i
    assert engine.stats.speculation.rounds > 0
    assert engine.cache.num_free() == 4


def served(engine: Engine, prompt: list[int], reference: list[int]) -> None:
    out = Request()
    engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS), out)
    assert out.done.wait(TIMEOUT_S), "the engine stopped serving"
    assert out.ids == reference


def test_a_failing_cancellation_poll_fails_that_request_and_the_engine_serves_on(
        smollm2_fp32, smollm2_encoder, prompts, reference):
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(4, 256, 64))
    engine.start()
    try:
        broken = Request()

        def is_cancelled() -> bool:
            raise ConnectionError("frontend went away")

        engine.submit(prompts[0], SamplingParams(max_tokens=NEW_TOKENS), broken, is_cancelled=is_cancelled)
        assert broken.done.wait(TIMEOUT_S) and broken.finish == "error"
        served(engine, prompts[2], reference[2])
    finally:
        engine.shutdown()


def test_an_admission_fault_leaves_the_engine_thread_serving(smollm2_fp32, smollm2_encoder, prompts, reference):
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(4, 256, 64), FaultyDrafter(-1, "admit"))
    engine.start()
    try:
        first, second = Request(), Request()
        engine.submit(prompts[0], SamplingParams(max_tokens=NEW_TOKENS), first)
        engine.submit(prompts[1], SamplingParams(max_tokens=NEW_TOKENS), second)  # its admission fails
        assert second.done.wait(TIMEOUT_S) and second.finish == "error"
        assert first.done.wait(TIMEOUT_S) and first.ids == reference[0]
        served(engine, prompts[3], reference[3])
        assert engine.cache.num_free() == 4
    finally:
        engine.shutdown()


def test_shutdown_answers_every_running_and_queued_request(smollm2_fp32, smollm2_encoder, prompts):
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(1, 256, 64))
    outs = [Request() for _ in range(3)]
    engine.submit(prompts[0], SamplingParams(max_tokens=40), outs[0])
    engine.step()  # running
    engine.submit(prompts[1], SamplingParams(max_tokens=40), outs[1])
    engine.step()  # waiting for the one slot
    engine.submit(prompts[2], SamplingParams(max_tokens=40), outs[2])  # submitted, not yet taken by the engine
    engine.shutdown()
    assert [o.finish for o in outs] == ["cancelled"] * 3
    assert all(o.chunks[-1].error == "server is shutting down" for o in outs)
    with pytest.raises(EngineStoppedError):
        engine.submit(prompts[0], SamplingParams(max_tokens=4), Request())


class SwitchBeforeTheEngineLocks:
    """The engine's lock, with the one thread switch that can lose a cancel forced to happen.

    The first time the engine thread goes for the lock (to read the cancels, alone or together with
    taking new requests), `switch` runs first, on another thread, to its end: a client submits a
    request and cancels it at the last moment before the engine reads the cancels. If the engine
    took new requests earlier in that step and reads the cancels separately, the cancel names a
    request it has not taken yet, is discarded, and the request runs to its end."""

    def __init__(self, lock, switch) -> None:
        self.lock, self.switch = lock, switch
        self.engine_thread: threading.Thread | None = None
        self.switched = threading.Event()

    def acquire(self, *args, **kwargs) -> bool:
        if threading.current_thread() is self.engine_thread and not self.switched.is_set():
            self.switched.set()
            client = threading.Thread(target=self.switch)
            client.start()
            client.join(TIMEOUT_S)
        return self.lock.acquire(*args, **kwargs)

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def test_concurrent_submit_and_cancel_loses_no_cancel(smollm2_fp32, smollm2_encoder):
    # A client thread submits and cancels while the engine thread runs its loop, with the thread
    # switch placed where a cancel could fall between taking requests and reading cancels (not left
    # to chance). A lost cancel runs to max_tokens and ends with "length".
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(4, 64, 32))
    prompt = smollm2_encoder.encode("Hi", False)
    out = Request()
    client_error: list[BaseException] = []

    def submit_and_cancel() -> None:
        try:
            engine.cancel(engine.submit(prompt, SamplingParams(max_tokens=8), out))
        except BaseException as exc:  # reported by the test thread
            client_error.append(exc)

    lock = SwitchBeforeTheEngineLocks(engine._lock, submit_and_cancel)
    engine._lock = lock
    engine.start()
    lock.engine_thread = engine._thread  # armed from here: the engine's next step takes the switch
    try:
        assert lock.switched.wait(TIMEOUT_S), "the engine thread never read the cancels"
        assert out.done.wait(TIMEOUT_S), "the request was never answered"
    finally:
        engine.shutdown()
    assert not client_error, client_error
    assert out.finish == "cancelled" and out.ids == [], (out.finish, out.ids)


def test_a_drafter_failing_every_request_fails_them_and_the_engine_serves_on(smollm2_fp32, smollm2_encoder, prompts,
                                                                            reference):
    """When drafting fails for every running request, the step has nothing left to forward: it must end
    there (not run the target on an empty batch), and the next request is served normally."""
    everyone = prompts[0][0]  # a token every chat-templated prompt contains
    engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(4, 256, 64), FaultyDrafter(everyone, "raise"))
    failed = [Request() for _ in prompts[:2]]
    for prompt, out in zip(prompts, failed):
        engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS), out, spec=STATIC)
    while engine.step():
        pass
    assert [o.finish for o in failed] == ["error", "error"]
    plain = Request()
    engine.submit(prompts[2], SamplingParams(max_tokens=NEW_TOKENS), plain, spec=SpeculationParams("off"))
    while engine.step():
        pass
    assert plain.ids == reference[2] and plain.finish in ("length", "stop")


class FaultyTarget:
    """The target model, except that its forward raises on one chosen call: before running (nothing
    written) or after (the KV cache written and advanced, as a fault late in the forward leaves it)."""

    def __init__(self, model, failing_call: int, after: bool) -> None:
        self.model, self.failing_call, self.after = model, failing_call, after
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        failing = self.calls == self.failing_call
        if failing and not self.after:
            raise RuntimeError("target forward failed")
        out = self.model(*args, **kwargs)
        if failing:
            raise RuntimeError("target forward failed")
        return out


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_target_forward_fault_fails_that_steps_requests_and_the_engine_serves_on(
        smollm2_fp32, smollm2_encoder, prompts, reference, when):
    # Two slots: requests 0 and 1 run (prefill, one verification step, then the failing forward),
    # request 2 waits for a slot through the fault and must not be touched by it.
    target = FaultyTarget(smollm2_fp32, failing_call=3, after=when == "after")
    engine = Engine(target, smollm2_encoder.tokenizer, EngineConfig(2, 256, 64), PromptLookupDrafter())
    outs = [Request() for _ in prompts[:3]]
    for prompt, out in zip(prompts, outs):
        engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS), out, spec=STATIC)
    while engine.step():
        pass
    assert target.calls > 3  # the fault came mid-generation and the engine went on
    for i in (0, 1):
        assert outs[i].finish == "error", i
        assert "internal error" in outs[i].chunks[-1].error and "target forward failed" in outs[i].chunks[-1].error
        assert 0 < len(outs[i].ids) < len(reference[i]) and outs[i].ids == reference[i][:len(outs[i].ids)], i
    assert outs[2].finish in ("length", "stop") and outs[2].ids == reference[2]
    assert engine.cache.num_free() == 2
    after = Request()
    engine.submit(prompts[3], SamplingParams(max_tokens=NEW_TOKENS), after, spec=STATIC)
    while engine.step():
        pass
    assert after.finish in ("length", "stop") and after.ids == reference[3]
    assert engine.cache.num_free() == 2
