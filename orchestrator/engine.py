"""The generation engine: speculative decoding with continuous batching, Triton-free.

Each step: the drafter proposes tokens for every running request that speculates; then ONE
batched target forward covers every active request: newly admitted ones bring their whole prompt
(prefill), running ones their last emitted token plus their draft (verification). Accepted tokens
are streamed, the target and drafter caches are rolled back to what was accepted. Requests join
and leave between steps; a cancelled request frees its slots before the next step.

One rule decides where a generation ends (end-of-generation id, stop string, max_tokens, a full
context), applied after every token, so a step that accepts eight tokens ends a request exactly
where eight one-token steps would. Faults are isolated: a fault in one request's own work
(drafting, verifying, sampling, detokenizing) fails that request alone; a fault of the shared
target forward fails that step's requests; the engine thread goes on serving either way.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from models.kv_cache import KVCache
from models.transformer import Transformer
from orchestrator.constraints import banned_tokens, constrain_rows, is_constrained
from orchestrator.detokenizer import IncrementalDetokenizer
from orchestrator.drafting import Draft, Drafter, DraftRequest, expected_source
from orchestrator.errors import InvalidRequestError, prompt_too_long
from orchestrator.policies import MAX_DRAFT_TOKENS, SpeculationParams, draft_length, next_adaptive_length
from orchestrator.sampling import SamplingParams, make_generator, next_token, warp_logits
from orchestrator.scheduler import (
    BatchPlan, ObservedCalibration, PrefixAcceptance, plan_drafting, plan_verification, survival_probabilities,
)
from orchestrator.step_cost import BatchShape, OnlineStepCost, StepCostProfile
from orchestrator.stop_strings import StopStringMatcher
from orchestrator.verification import VerifyResult, verify_greedy, verify_sampling

log = logging.getLogger(__name__)

CANCEL_POLL_INTERVAL_S = 0.05  # asking the frontend whether a client left costs an IPC round trip
DRAFT_COST_SAMPLES = 8  # latest drafting steps timed per batch size; the fastest prices drafting
# dspark mode's drafting decision: the mean calibrated survival of the blocks drafted so far (the
# measured prefix acceptance before BLOCK_SURVIVAL_MIN_BLOCKS), then a moving average of this weight
BLOCK_SURVIVAL_MIN_BLOCKS = 8
BLOCK_SURVIVAL_WEIGHT = 0.05
# dspark mode drafts at least once in this many steps: a plan that keeps drafting out learns nothing
# new of its cost or survival, so one slow first measurement could otherwise keep it out for good
DRAFT_PROBE_EVERY = 16


@dataclass
class GenerationChunk:
    """What one request gets after a step: new tokens, the text they completed, and the end."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error"; None while running
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_draft_rounds: int = 0     # verification rounds with at least one draft token
    num_draft_tokens: int = 0     # draft tokens the target verified
    num_accepted_tokens: int = 0  # draft tokens it accepted


EmitFn = Callable[[GenerationChunk], None]


SHUTDOWN_MESSAGE = "server is shutting down"  # the error of requests a stopping engine refuses or ends


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class EngineConfig:
    max_batch_size: int = 16      # cache slots = requests decoded together
    max_context: int = 2048       # prompt + generated tokens per request
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    default_spec: SpeculationParams = field(default_factory=lambda: SpeculationParams(mode="off"))
    spec_batch_limit: int = 4     # batch_limited mode: no drafts above this many running requests


@dataclass
class SpeculationStats:
    """Draft/accept counters; mean tokens per round = 1 + accepted / rounds."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT_TOKENS)   # verified at position k
    accepted_at: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT_TOKENS)  # accepted at position k

    def record(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        self.rounds += 1
        self.drafted += num_drafted
        self.accepted += num_accepted
        for k in range(num_drafted):
            self.drafted_at[k] += 1
            self.accepted_at[k] += k < num_accepted


@dataclass
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    spec: SpeculationParams
    emit: EmitFn
    is_cancelled: Callable[[], bool]
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    end_ids: frozenset[int]  # the request's end_id, else the model's end-of-generation ids
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    cancel_checked_at: float = 0.0
    spec_stats: SpeculationStats = field(default_factory=SpeculationStats)
    adaptive_length: int = 1  # adaptive mode's current draft length
    in_drafter: bool = False  # the drafter holds state for it (released when it finishes)

    @property
    def context(self) -> list[int]:
        """Prompt and output so far; the last output token is not yet in the target's cache."""
        return self.prompt_ids + self.output_ids


@dataclass
class EngineStats:
    """Cumulative counters, read by the serving layer to export metrics."""

    steps: int = 0
    tokens_generated: int = 0
    forward_seconds: float = 0.0  # target forwards
    draft_seconds: float = 0.0    # drafter proposals and context updates
    last_step_tokens: int = 0          # tokens in the last target forward, prompt prefills included
    last_step_draft_tokens: int = 0    # draft tokens it verified
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    speculation: SpeculationStats = field(default_factory=SpeculationStats)


class Engine:
    """Owns the model, its KV cache and the request lifecycle. Thread-safe `submit`/`cancel`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig,
        drafter: Drafter | None = None,
        step_cost: StepCostProfile | None = None,
    ) -> None:
        self.model = model
        self.drafter = drafter
        # SPS(N) as profiled, corrected online by the measured forwards (dspark mode plans on it)
        self.step_cost = OnlineStepCost(step_cost) if step_cost is not None else None
        self.external_waiting = 0  # requests queued in front of the engine (Triton's pending count): shown, not planned
        self._acceptance = PrefixAcceptance(MAX_DRAFT_TOKENS)  # survival estimate without a confidence head
        # the same per draft source: a lookup draft and a model's draft of one drafter survive differently
        self._acceptance_by_source: dict[str, PrefixAcceptance] = {}
        # confidences corrected by observed acceptance, per regime (greedy, sampled) as the drafter calibrates
        self._calibration = {greedy: ObservedCalibration() for greedy in (True, False)}
        self._block_survival: list[float] = []  # running mean of calibrated survival per draft position
        self._block_counts: list[int] = []  # blocks drafted at each position
        self._steps_without_drafting = 0  # dspark mode's steps since it last drafted (see DRAFT_PROBE_EVERY)
        self._draft_timings: dict[int, deque[float]] = {}  # drafting sequences -> latest timed drafting steps
        self.tokenizer = tokenizer
        self.config = config
        self.cache: KVCache = model.new_cache(config.max_batch_size, config.max_context)
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        # Submitted requests and cancel ids, both under one lock: the engine takes them together, so a
        # cancel can never arrive between taking a request and reading the cancels (and be lost).
        self._incoming: deque[_Request] = deque()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- client side -------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        emit: EmitFn,
        is_cancelled: Callable[[], bool] = lambda: False,
        spec: SpeculationParams | None = None,
    ) -> int:
        """Queues a request; raises InvalidRequestError at once for bad input."""
        params.validate(self.config.max_tokens_limit)
        if spec is None:  # the server's default; without a drafter (serve --drafter none) that is plain decoding
            spec = self.config.default_spec if self.drafter is not None else SpeculationParams("off")
        spec.validate()
        if spec.mode != "off" and self.drafter is None:
            raise InvalidRequestError(f"spec_mode {spec.mode!r} needs a drafter; this server has none (use 'off')")
        if spec.mode == "dspark" and self.step_cost is None:
            raise InvalidRequestError("spec_mode 'dspark' needs the step-cost profile, which this server lacks")
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        if len(prompt_ids) >= self.config.max_context:
            raise prompt_too_long(len(prompt_ids), self.config.max_context - 1)
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequestError(f"input_ids must be in [0, {vocab})")
        if params.end_ids is not None and not all(0 <= t < vocab for t in params.end_ids):
            raise InvalidRequestError(f"end_id must be in [0, {vocab}), got {list(params.end_ids)}")
        if not all(0 <= t < vocab for word in params.bad_words for t in word):
            raise InvalidRequestError(f"bad_words token ids must be in [0, {vocab})")
        request = _Request(
            request_id=next(self._ids),
            prompt_ids=list(prompt_ids),
            params=params,
            spec=spec,
            emit=emit,
            is_cancelled=is_cancelled,
            generator=make_generator(params.seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop=StopStringMatcher(params.stop),
            end_ids=self.eos_token_ids if params.end_ids is None else frozenset(params.end_ids),
            adaptive_length=spec.num_draft_tokens,
        )
        with self._lock:
            if self._stopping:  # shutdown has answered the queue already; nobody would answer this one
                raise EngineStoppedError(SHUTDOWN_MESSAGE)
            self._incoming.append(request)
        self._wakeup.set()
        return request.request_id

    def cancel(self, request_id: int) -> None:
        """Cancels a submitted request (a finished or unknown id is ignored)."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wakeup.set()

    @property
    def num_active(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    # --- engine thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dspark-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stops the engine thread and gives every request, running or queued, its final response."""
        with self._lock:
            self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        self._take_incoming()
        for request in self._running + list(self._waiting):
            self._finish(request, "cancelled", error=SHUTDOWN_MESSAGE)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
            except Exception:  # a bug outside any one request's work: the thread must not die with it
                log.exception("engine step failed")
                self._fail_all(self._running, "internal error in the engine step")
                busy = False
            if not busy:
                self._wakeup.wait(timeout=0.1)
                self._wakeup.clear()

    @torch.inference_mode()
    def step(self) -> bool:
        """One engine step; returns False when there was nothing to do."""
        self._drop_cancelled(self._take_incoming())
        admitted = self._admit()
        if not self._running:
            return False
        try:
            self._decode_step(admitted)
        except Exception as exc:  # the shared target forward failed: fail this step's requests, keep serving
            log.exception("engine step failed")
            self._fail_all(self._running, f"internal error: {exc}")
        self.stats.steps += 1
        return True

    def _take_incoming(self) -> set[int]:
        """Moves submitted requests to the waiting queue; returns the ids cancelled since the last call."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            cancelled, self._cancelled = self._cancelled, set()
        return cancelled

    def _drop_cancelled(self, cancelled: set[int]) -> None:
        """Finishes the requests cancelled by id, and those whose client the frontend reports gone."""
        now = time.monotonic()
        for request in self._running + list(self._waiting):
            if request.request_id in cancelled:
                self._finish(request, "cancelled")
            elif now - request.cancel_checked_at >= CANCEL_POLL_INTERVAL_S:
                request.cancel_checked_at = now
                try:
                    gone = request.is_cancelled()
                except Exception as exc:  # the frontend cannot tell: this request cannot be served
                    log.exception("request %d: cancellation check failed", request.request_id)
                    self._finish(request, "error", error=f"internal error: cancellation check failed: {exc}")
                    continue
                if gone:
                    self._finish(request, "cancelled")

    def _admit(self) -> list[_Request]:
        admitted = []
        while self._waiting and self.cache.num_free() > 0:
            request = self._waiting.popleft()
            request.slot = self.cache.allocate()
            self._running.append(request)
            if self.drafter is not None:
                try:
                    self.drafter.admit(request.request_id)
                except Exception as exc:
                    self._fail(request, f"drafter admission: {exc}")
                    continue
                request.in_drafter = True
            admitted.append(request)
        return admitted

    def _draft_length(self, request: _Request) -> int:
        """The request's draft length, cut so the accepted tokens and the bonus token fit max_tokens and the context."""
        room_tokens = request.params.max_tokens - len(request.output_ids) - 1
        room_context = self.config.max_context - len(request.context) - 1
        wanted = draft_length(request.spec, request.adaptive_length, len(self._running), self.config.spec_batch_limit)
        return max(0, min(wanted, room_tokens, room_context))

    def _propose(self, admitted: list[_Request]) -> tuple[dict[int, Draft], bool]:
        """Drafts for the running requests that speculate this step, each checked before it joins the batch,
        and whether the call also read a backlog (context beyond the pending token and the last draft).

        If the batched drafter call fails, each request is drafted alone to find the one at fault;
        only the requests whose drafting fails (or whose draft is malformed) are failed."""
        lengths = {r.request_id: self._draft_length(r) for r in self._running if r not in admitted}
        self._decide_drafting(admitted, lengths)
        by_key = {r.request_id: r for r in self._running}
        asks = [
            DraftRequest(r.request_id, r.context, lengths[r.request_id], r.params, r.generator, self._draft_rule(r))
            for r in self._running
            if lengths.get(r.request_id, 0) > 0
        ]
        if not asks:
            return {}, False
        backlog = self.drafter.sequential and any(
            self.drafter.uncached(ask.key, len(ask.context)) > 2 for ask in asks)
        try:
            proposed = list(zip(asks, self._drafter_call(asks)))
        except Exception:
            log.exception("batched drafting failed; drafting each request alone")
            proposed = []
            for ask in asks:
                try:
                    self.drafter.commit(ask.key, len(ask.context) - 1)  # drop what the failed call left behind
                    proposed.append((ask, self._drafter_call([ask])[0]))
                except Exception as exc:
                    self._fail(by_key[ask.key], f"drafting: {exc}")
        drafts = {}
        for ask, draft in proposed:
            problem = self._draft_problem(ask, draft)
            if problem:
                self._fail(by_key[ask.key], f"drafter returned {problem}")
            else:
                drafts[ask.key] = draft
        return drafts, backlog

    @staticmethod
    def _draft_rule(request: _Request) -> Callable[[Sequence[int]], list[int]] | None:
        """The request's forbidden tokens after a draft prefix: the rule its target rows get (None: no rule)."""
        if not is_constrained(request.params):
            return None
        return lambda drafted: banned_tokens(request.params, request.end_ids, request.context + list(drafted),
                                             len(request.output_ids) + len(drafted))

    def _drafter_call(self, asks: list[DraftRequest]) -> list[Draft]:
        drafts = self.drafter.propose(asks)
        if len(drafts) != len(asks):
            raise RuntimeError(f"drafter returned {len(drafts)} drafts for {len(asks)} requests")
        return drafts

    def _draft_problem(self, ask: DraftRequest, draft: Draft) -> str | None:
        """What is wrong with a draft (it would break the batched forward or verification), or None."""
        vocab = self.model.config.vocab_size
        n = len(draft.tokens)
        if n > ask.num_tokens:
            return f"{n} tokens where {ask.num_tokens} were asked"
        if any(not 0 <= t < vocab for t in draft.tokens):
            return f"token ids outside [0, {vocab})"
        if draft.probs is not None and tuple(draft.probs.shape) != (n, vocab):
            return f"probabilities of shape {tuple(draft.probs.shape)} for {n} tokens over {vocab}"
        if draft.confidences is not None and len(draft.confidences) != n:
            return f"{len(draft.confidences)} confidences for {n} tokens"
        return None

    def _survival(self, request: _Request, draft: Draft) -> list[float]:
        """P(draft tokens 1..k all accepted): the drafter's calibrated confidences corrected by the acceptance
        observed in the request's regime (scheduler.ObservedCalibration), else the measured rates."""
        if draft.confidences:
            return survival_probabilities(self._calibration[request.params.greedy].correct(draft.confidences))
        return self._source_acceptance(draft.source).survival(len(draft.tokens))

    def _source_acceptance(self, source: str) -> PrefixAcceptance:
        return self._acceptance_by_source.setdefault(source, PrefixAcceptance(MAX_DRAFT_TOKENS))

    def _decide_drafting(self, admitted: list[_Request], lengths: dict[int, int]) -> None:
        """dspark mode: draft this step only where it is expected to pay (sets the others' lengths to 0),
        and with a sequential drafter only as many tokens as the plan expects to verify.

        Decided before drafting, from what is known already: the survival a block is expected to have
        (`_expected_survival`; for a draft prompt lookup will copy, lookup's own acceptance), this step's
        active batch, and the measured drafting cost of the drafts the model makes (for a small LM, also
        the context it must read first after skipped steps). A request's last block does not
        predict its next one: with the shipped SmolLM2 drafter, the first token of a block that follows
        one calibrated below 0.1 at its first position survived 47% of the time (60 blocks), as often as
        any other; its own calibrated confidence is what predicts it, and that the schedule uses once
        the block is drafted.
        """
        dspark = [r for r in self._running if r.spec.mode == "dspark" and lengths.get(r.request_id, 0) > 0]
        if not dspark or self.step_cost is None:
            return
        copied = [expected_source(self.drafter, r.context, self._draft_rule(r)) == "lookup" for r in dspark]
        predicted = [self._source_acceptance("lookup").survival(lengths[r.request_id]) if copy
                     else self._expected_survival(lengths[r.request_id]) for r, copy in zip(dspark, copied)]
        batch = self._batch_plan(dspark, admitted, lambda r: 1 + lengths.get(r.request_id, 0))
        modelled = len(dspark) - sum(copied)  # a copied draft is no drafting price (as _decode_step times it)
        unit = self._draft_cost(modelled) if modelled else 0.0
        if self.drafter.sequential:  # paid per drafted position: the plan chooses the length too
            catch_up = [0.0 if copy else cost for copy, cost in zip(copied, self._catch_up_costs(dspark, unit))]
            counts = plan_drafting(predicted, batch.tokens, batch.sequences, self.step_cost, 0.0, unit, batch, catch_up,
                                   copied)
        else:
            counts = plan_drafting(predicted, batch.tokens, batch.sequences, self.step_cost, unit, batch=batch,
                                   copied=copied)
        if any(counts):
            self._steps_without_drafting = 0
        else:
            self._steps_without_drafting += 1
            if self._steps_without_drafting >= DRAFT_PROBE_EVERY:  # a probe: remeasure what the plan prices
                self._steps_without_drafting = 0
                return
        for r, count in zip(dspark, counts):
            if count == 0 or self.drafter.sequential:  # a small LM drafts only what will be verified
                lengths[r.request_id] = count

    def _expected_survival(self, positions: int) -> list[float]:
        """Survival a block not yet drafted is expected to have at each of its first `positions`: the
        running mean of the calibrated survival of drafted blocks (every drafted position counts,
        verified or not, so the schedule's cuts do not bias it); until enough blocks were drafted at
        each position (one pessimistic first block must not keep drafting out), the measured prefix
        acceptance."""
        # a block drafted at a position was drafted at every earlier one: the last count is the least
        if len(self._block_counts) >= positions and self._block_counts[positions - 1] >= BLOCK_SURVIVAL_MIN_BLOCKS:
            return self._block_survival[:positions]
        return self._acceptance.survival(positions)

    def _record_block_survival(self, survival: list[float]) -> None:
        for k, p in enumerate(survival):
            if k == len(self._block_survival):
                self._block_survival.append(0.0)
                self._block_counts.append(0)
            self._block_counts[k] += 1
            weight = max(1.0 / self._block_counts[k], BLOCK_SURVIVAL_WEIGHT)
            self._block_survival[k] += weight * (p - self._block_survival[k])

    def _catch_up_costs(self, requests: list[_Request], unit: float) -> list[float]:
        """Seconds each request adds to the first drafting forward by the context it has yet to read (a
        small LM skips the steps it does not draft, then reads them all at once). That forward feeds
        each drafting sequence one token besides; the rest are priced as the target's profile grows
        with extra tokens, the same scaling `_draft_cost` uses between batch sizes."""
        profile = self.step_cost.profile
        n = len(requests)
        base = profile.step_seconds(n)
        costs = []
        for r in requests:
            extra = max(self.drafter.uncached(r.request_id, len(r.prompt_ids) + len(r.output_ids)) - 1, 0)
            costs.append(unit * (profile.step_seconds(n + extra) / base - 1.0))
        return costs

    def _draft_cost(self, sequences: int, seconds: float | None = None, positions: int = 1) -> float:
        """The drafting time the scheduler plans with, per drafting step of `sequences` sequences (a
        sequential drafter: per drafted position, `seconds` having drafted `positions`).

        A drafting step over 16 sequences costs several times one over 1 (a small LM's forward grows with
        its batch), so the cost is kept per sequence count: the fastest of the latest steps timed at that
        count (steps that also read a backlog are not timed). A drafter's first calls at each shape run
        several times slower than its steady state (kernel set-up: 240 ms against 5 ms for the fp32
        SmolLM2 drafter), as do steps a neighbour process slows; a median over so few samples kept
        such a price, and with it drafting out, until DRAFT_PROBE_EVERY probes had outvoted it. A count
        not timed yet is priced from the nearest timed one, scaled as the target's own profiled step
        grows between those token counts (a forward of the same kind, and one it will then time)."""
        per = None if seconds is None else seconds / (max(positions, 1) if self.drafter.sequential else 1)
        if per is not None:
            self._draft_timings.setdefault(sequences, deque(maxlen=DRAFT_COST_SAMPLES)).append(per)
        known = {n: min(t) for n, t in self._draft_timings.items() if t}
        if not known:
            return per or 0.0
        if sequences in known:
            return known[sequences]
        n = min(known, key=lambda m: (abs(m - sequences), m))
        if self.step_cost is None:  # nothing is planned with it
            return known[n]
        profile = self.step_cost.profile
        return known[n] * profile.step_seconds(sequences) / profile.step_seconds(n)

    def _schedule(self, admitted: list[_Request], drafts: dict[int, Draft], draft_seconds: float) -> None:
        """Cuts the drafts of dspark-mode requests to what the load-aware scheduler admits (Algorithm 1).

        The load is this step's active batch: every decoding request's tokens in the forward (pending
        tokens, other modes' drafts). Requests still queued are not tokens of this forward, and prompts
        prefilled in it are left out too (see `_batch_plan`).
        """
        planned = [r for r in self._running if r.spec.mode == "dspark" and r.request_id in drafts]
        if not planned:
            return
        survival = [self._survival(r, drafts[r.request_id]) for r in planned]
        for r, row in zip(planned, survival):
            if drafts[r.request_id].confidences:
                self._record_block_survival(row)
        batch = self._batch_plan(planned, admitted, lambda r: len(self._step_tokens(r, admitted, drafts)))
        counts = plan_verification(survival, batch.tokens, batch.sequences, self.step_cost, draft_seconds,
                                   batch=batch)
        for r, count in zip(planned, counts):
            drafts[r.request_id].truncate(count)

    def _batch_plan(self, planned: list[_Request], admitted: list[_Request],
                    new_tokens: Callable[[_Request], int]) -> BatchPlan:
        """The active batch as the plan prices it: every other decoding request with the tokens it feeds
        anyway (`new_tokens`), and the `planned` ones' contexts after their pending token.

        Prompts prefilled in the same forward (`admitted`) are left out. A prefill makes the step slow and
        its plain output rate low, so against that step any drafting that yields tokens faster than it
        would look like a gain, while its time delays every request; drafting must beat the decode rate,
        which is the step without them."""
        cached = self.cache.lengths
        skipped = {r.request_id for r in planned} | {r.request_id for r in admitted}
        others = [(n, int(cached[r.slot]) + n) for r in self._running if r.request_id not in skipped
                  for n in (new_tokens(r),)]
        return BatchPlan(others, [int(cached[r.slot]) + 1 for r in planned])

    @staticmethod
    def _step_tokens(request: _Request, admitted: list[_Request], drafts: dict[int, Draft]) -> list[int]:
        """What the request feeds this step's target forward: its prompt, or its pending token and draft."""
        if request in admitted:
            return request.prompt_ids
        draft = drafts.get(request.request_id)
        return [request.output_ids[-1]] + (draft.tokens if draft else [])

    def _decode_step(self, admitted: list[_Request]) -> None:
        """Draft, schedule, then one target forward: prompts of new requests, pending token + draft of the others."""
        started = time.perf_counter()
        drafts, read_backlog = self._propose(admitted)
        draft_seconds = time.perf_counter() - started
        self.stats.draft_seconds += draft_seconds
        if not self._running:  # drafting failed every request
            return
        # only a model's drafts are a drafting price: copied ones (prompt lookup) cost no forward
        modelled = [d for d in drafts.values() if d.source != "lookup"]
        longest = max((len(d.tokens) for d in modelled), default=0)
        timed = None if read_backlog else draft_seconds  # a backlog is priced apart (_catch_up_costs)
        paid = (self._draft_cost(len(modelled), timed, longest) * (longest if self.drafter.sequential else 1)
                if modelled else draft_seconds)
        self._schedule(admitted, drafts, paid)
        new_tokens, logits_rows, offset = [], [], 0
        for r in self._running:
            tokens = self._step_tokens(r, admitted, drafts)
            first_row = offset + len(tokens) - (1 if r in admitted else len(tokens))
            logits_rows.extend(range(first_row, offset + len(tokens)))
            new_tokens.append(tokens)
            offset += len(tokens)
        shape = BatchShape(tuple((len(t), int(self.cache.lengths[r.slot]) + len(t))
                                 for r, t in zip(self._running, new_tokens)))
        started = time.perf_counter()
        out = self.model(
            torch.tensor([t for seq in new_tokens for t in seq], dtype=torch.long),
            [r.slot for r in self._running],
            [len(t) for t in new_tokens],
            self.cache,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long),
            tap_layers=self.drafter.tap_layers if self.drafter is not None else (),
        )
        forward_seconds = time.perf_counter() - started
        self.stats.forward_seconds += forward_seconds
        self.stats.last_step_tokens = offset
        self.stats.last_step_draft_tokens = sum(len(d.tokens) for d in drafts.values())
        if self.step_cost is not None and not admitted:  # a prompt's prefill is no point of the plan's curve
            self.step_cost.observe(offset, forward_seconds, shape)
        observed: list[tuple[_Request, list[int], int]] = []  # (request, committed tokens, first packed row)
        row = 0
        packed_offset = 0
        for request, tokens in zip(list(self._running), new_tokens):
            first_packed, packed_offset = packed_offset, packed_offset + len(tokens)
            draft = drafts.get(request.request_id) if request not in admitted else None
            num_rows = 1 + (len(draft.tokens) if draft else 0)
            logits = out.logits[row:row + num_rows]
            row += num_rows
            try:
                self._accept(request, tokens, draft, logits, observed, first_packed)
            except Exception as exc:  # this request's own work failed (verify, sample, drafter, detokenize)
                log.exception("request %d failed", request.request_id)
                self._fail(request, str(exc))
        self._observe(observed, out.hidden_states)

    def _accept(self, request: _Request, tokens: list[int], draft: Draft | None, logits: torch.Tensor,
                observed: list[tuple[_Request, list[int], int]], first_packed: int) -> None:
        """One request's share of the step: verify its draft (or sample one token), roll back, stream;
        what it committed joins `observed` for the drafter's one batched update."""
        logits = constrain_rows(logits, request.params, request.end_ids, request.context, len(request.output_ids),
                                draft.tokens if draft is not None else [])
        if draft is None or not draft.tokens:
            if draft is not None:  # drafted, but the scheduler verified none: drop the drafter's lookahead
                self.drafter.commit(request.request_id, len(request.context))
            observed.append((request, tokens, first_packed))
            self._append_tokens(request, [next_token(logits[0], request.params, request.generator)])
            return
        result = self._verify(request, draft, logits)
        self._roll_back(request, len(draft.tokens), result.num_accepted)
        observed.append((request, tokens[: 1 + result.num_accepted], first_packed))
        self._acceptance.record(len(draft.tokens), result.num_accepted)
        self._source_acceptance(draft.source).record(len(draft.tokens), result.num_accepted)
        if draft.confidences:
            self._calibration[request.params.greedy].record(draft.confidences, result.num_accepted)
        request.adaptive_length = next_adaptive_length(
            request.adaptive_length, len(draft.tokens), result.num_accepted, request.spec.num_draft_tokens
        )
        self.stats.speculation.record(len(draft.tokens), result.num_accepted)  # the drafter's record
        self._append_tokens(request, result.tokens, len(draft.tokens), result.num_accepted)

    def _observe(self, observed: list[tuple[_Request, list[int], int]], hidden: dict[int, torch.Tensor]) -> None:
        """Hands the drafter the target's hidden states of the tokens this forward committed: one batched call.

        If it fails, each request is updated alone (from its state before the call) to find the one at fault."""
        if self.drafter is None or not self.drafter.tap_layers:
            return
        live = [(r, tokens, first) for r, tokens, first in observed if r.in_drafter]  # finished ones are released
        if not live:
            return
        started = time.perf_counter()
        try:
            self._drafter_observe(live, hidden)
        except Exception:
            log.exception("batched drafter update failed; updating each request alone")
            for entry in live:
                request, tokens, _ = entry
                try:
                    self.drafter.commit(request.request_id, len(request.context) - 1 - len(tokens))
                    self._drafter_observe([entry], hidden)
                except Exception as exc:
                    self._fail(request, f"drafter update: {exc}")
        self.stats.draft_seconds += time.perf_counter() - started

    def _drafter_observe(self, entries: list[tuple[_Request, list[int], int]], hidden: dict[int, torch.Tensor]) -> None:
        rows = torch.cat([torch.arange(first, first + len(tokens)) for _, tokens, first in entries])
        self.drafter.observe([r.request_id for r, _, _ in entries], [tokens for _, tokens, _ in entries],
                             {layer: h.index_select(0, rows.to(h.device)) for layer, h in hidden.items()})

    @staticmethod
    def _verify(request: _Request, draft: Draft, logits: torch.Tensor) -> VerifyResult:
        if request.params.greedy:
            return verify_greedy(draft.tokens, logits)
        return verify_sampling(draft.tokens, draft.probs, warp_logits(logits, request.params), request.generator)

    def _roll_back(self, request: _Request, num_drafted: int, num_accepted: int) -> None:
        """Drop rejected draft tokens from the target cache; tell the drafter what is final."""
        committed = len(request.context) + num_accepted  # context (pending included) + accepted drafts
        if num_accepted < num_drafted:
            self.cache.truncate(request.slot, committed)
        self.drafter.commit(request.request_id, committed)

    def _append_tokens(self, request: _Request, tokens: list[int], num_drafted: int = 0, num_accepted: int = 0) -> None:
        """Streams accepted tokens to the client, one at a time through the rule that ends a generation,
        so a block of accepted tokens ends exactly where one-token steps would. ``tokens`` are the
        ``num_accepted`` accepted draft tokens (of ``num_drafted``) and the target's own next one."""
        reason = None
        emitted: list[int] = []
        text = ""
        for token in tokens:
            if token in request.end_ids:
                reason = "stop"
                break
            emitted.append(token)
            request.output_ids.append(token)
            text += request.stop.feed(request.detokenizer.push([token]), self._stops_count(request))
            reason = self._end_reason(request)
            if reason is not None:
                break
        self.stats.tokens_generated += len(emitted)
        # the request's counters (its usage) count the accepted drafts its answer kept: an end inside the block cuts it
        request.spec_stats.record(num_drafted, min(num_accepted, len(emitted)))
        if reason is None:
            self._send(request, GenerationChunk(emitted, text))
            return
        if not request.stop.stopped:  # the text held back (an unfinished character) may still complete a stop string
            text += request.stop.feed(request.detokenizer.flush(), self._stops_count(request))
            if request.stop.stopped:
                reason = "stop"
            text += request.stop.flush()
        self._finish(request, reason, token_ids=emitted, text=text)

    @staticmethod
    def _stops_count(request: _Request) -> bool:
        """Whether a stop string ending in the latest token's text ends the answer: not before min_tokens."""
        return len(request.output_ids) >= request.params.min_tokens

    def _end_reason(self, request: _Request) -> str | None:
        """Whether the request ends after its latest token: a stop string, max_tokens, or a full context."""
        if request.stop.stopped:
            return "stop"
        if len(request.output_ids) >= request.params.max_tokens or len(request.context) >= self.config.max_context:
            return "length"
        return None

    def _send(self, request: _Request, chunk: GenerationChunk) -> bool:
        chunk.num_prompt_tokens = len(request.prompt_ids)
        chunk.num_output_tokens = len(request.output_ids)
        chunk.num_draft_rounds = request.spec_stats.rounds
        chunk.num_draft_tokens = request.spec_stats.drafted
        chunk.num_accepted_tokens = request.spec_stats.accepted
        try:
            request.emit(chunk)
            return True
        except Exception:  # the client is gone: stop spending compute on it
            log.info("request %d: client unreachable, cancelling", request.request_id)
            if chunk.finish_reason is None:
                self._finish(request, "cancelled", notify=False)
            return False

    def _finish(
        self,
        request: _Request,
        reason: str,
        token_ids: list[int] | None = None,
        text: str = "",
        error: str | None = None,
        notify: bool = True,
    ) -> None:
        if request in self._running:
            self._running.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        if request.slot is not None:
            self.cache.free(request.slot)
            request.slot = None
        if request.in_drafter:
            request.in_drafter = False
            try:
                self.drafter.release(request.request_id)
            except Exception:  # the request ends either way; its drafter state is what failed
                log.exception("request %d: drafter release failed", request.request_id)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if notify:
            self._send(request, GenerationChunk(token_ids or [], text, finish_reason=reason, error=error))

    def _fail(self, request: _Request, message: str) -> None:
        """Ends one request with an error; the others go on."""
        self._finish(request, "error", error=f"internal error: {message}")

    def _fail_all(self, requests: list[_Request], message: str) -> None:
        for request in list(requests):
            self._finish(request, "error", error=message)
