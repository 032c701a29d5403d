"""The generation engine: continuous batching over one target model, Triton-free.

Each step runs ONE batched forward over every active request: newly admitted requests bring
their whole prompt (prefill), running ones their last sampled token (decode). Requests join and
leave between steps; a cancelled request frees its cache slot before the next step.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from models.kv_cache import KVCache
from models.transformer import Transformer
from orchestrator.detokenizer import IncrementalDetokenizer
from orchestrator.errors import InvalidRequestError
from orchestrator.sampling import SamplingParams, make_generator, next_token
from orchestrator.stop_strings import StopStringMatcher

log = logging.getLogger(__name__)

CANCEL_POLL_INTERVAL_S = 0.05  # asking the frontend whether a client left costs an IPC round trip


@dataclass
class GenerationChunk:
    """What one request gets after a step: new tokens, the text they completed, and the end."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error"; None while running
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


EmitFn = Callable[[GenerationChunk], None]


@dataclass
class EngineConfig:
    max_batch_size: int = 16      # cache slots = requests decoded together
    max_context: int = 2048       # prompt + generated tokens per request
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for


@dataclass
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    emit: EmitFn
    is_cancelled: Callable[[], bool]
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    pending_token: int | None = None  # sampled, streamed, not yet in the KV cache
    cancel_checked_at: float = 0.0


@dataclass
class EngineStats:
    """Cumulative counters, read by the serving layer to export metrics."""

    steps: int = 0
    tokens_generated: int = 0
    forward_seconds: float = 0.0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests


class Engine:
    """Owns the model, its KV cache and the request lifecycle. Thread-safe `submit`/`cancel`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.cache: KVCache = model.new_cache(config.max_batch_size, config.max_context)
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self._incoming: queue.SimpleQueue[_Request] = queue.SimpleQueue()
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
    ) -> int:
        """Queues a request; raises InvalidRequestError at once for bad input."""
        params.validate(self.config.max_tokens_limit)
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty")
        if len(prompt_ids) >= self.config.max_context:
            raise InvalidRequestError(
                f"prompt is {len(prompt_ids)} tokens; the context holds {self.config.max_context} "
                "(prompt plus at least one generated token)"
            )
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequestError(f"input_ids must be in [0, {vocab})")
        request = _Request(
            request_id=next(self._ids),
            prompt_ids=list(prompt_ids),
            params=params,
            emit=emit,
            is_cancelled=is_cancelled,
            generator=make_generator(params.seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop=StopStringMatcher(params.stop),
        )
        self._incoming.put(request)
        self._wakeup.set()
        return request.request_id

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)
        self._wakeup.set()

    @property
    def num_active(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._incoming.qsize()

    # --- engine thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dspark-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        for request in self._running + list(self._waiting):
            self._finish(request, "cancelled", error="server is shutting down")
        self._running.clear()
        self._waiting.clear()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            if not self.step():
                self._wakeup.wait(timeout=0.1)
                self._wakeup.clear()

    def step(self) -> bool:
        """One engine step; returns False when there was nothing to do."""
        self._take_incoming()
        self._drop_cancelled()
        admitted = self._admit()
        if not self._running:
            return False
        try:
            self._decode_step(admitted)
        except Exception as exc:  # a failed step must not take the server down
            log.exception("engine step failed")
            for request in list(self._running):
                self._finish(request, "error", error=f"internal error: {exc}")
        self.stats.steps += 1
        return True

    def _take_incoming(self) -> None:
        while True:
            try:
                self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        for request in self._running + list(self._waiting):
            if request.request_id in cancelled:
                self._finish(request, "cancelled")
            elif now - request.cancel_checked_at >= CANCEL_POLL_INTERVAL_S:
                request.cancel_checked_at = now
                if request.is_cancelled():
                    self._finish(request, "cancelled")

    def _admit(self) -> list[_Request]:
        admitted = []
        while self._waiting and self.cache.num_free() > 0:
            request = self._waiting.popleft()
            request.slot = self.cache.allocate()
            self._running.append(request)
            admitted.append(request)
        return admitted

    def _decode_step(self, admitted: list[_Request]) -> None:
        """One forward: prompts of newly admitted requests, the pending token of the others."""
        new_tokens = [r.prompt_ids if r in admitted else [r.pending_token] for r in self._running]
        num_new = [len(t) for t in new_tokens]
        input_ids = torch.tensor([t for seq in new_tokens for t in seq], dtype=torch.long)
        last_rows = torch.tensor(list(itertools.accumulate(num_new)), dtype=torch.long) - 1
        started = time.perf_counter()
        out = self.model(input_ids, [r.slot for r in self._running], num_new, self.cache, logits_indices=last_rows)
        self.stats.forward_seconds += time.perf_counter() - started
        for request, logits in zip(list(self._running), out.logits):
            token = next_token(logits, request.params, request.generator)
            self._append_tokens(request, [token])

    def _append_tokens(self, request: _Request, tokens: list[int]) -> None:
        """Streams accepted tokens to the client and finishes the request when it is done."""
        reason = None
        emitted: list[int] = []
        for token in tokens:
            if token in self.eos_token_ids:
                reason = "stop"
                break
            emitted.append(token)
            request.output_ids.append(token)
            if len(request.output_ids) >= request.params.max_tokens:
                reason = "length"
                break
        self.stats.tokens_generated += len(emitted)
        text = request.stop.feed(request.detokenizer.push(emitted)) if emitted else ""
        if request.stop.stopped:
            reason = "stop"
        elif reason is None and len(request.prompt_ids) + len(request.output_ids) >= self.config.max_context:
            reason = "length"
        if reason is not None:
            if not request.stop.stopped:
                text += request.stop.feed(request.detokenizer.flush())
                text += request.stop.flush()
            self._finish(request, reason, token_ids=emitted, text=text)
            return
        request.pending_token = emitted[-1]
        self._send(request, GenerationChunk(emitted, text))

    def _send(self, request: _Request, chunk: GenerationChunk) -> bool:
        chunk.num_prompt_tokens = len(request.prompt_ids)
        chunk.num_output_tokens = len(request.output_ids)
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
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if notify:
            self._send(request, GenerationChunk(token_ids or [], text, finish_reason=reason, error=error))
