"""Drafters: what proposes tokens for the target to verify.

A drafter keeps its own per-request state (a KV cache for a model drafter, nothing for prompt
lookup). The engine tells it which prefix of each request is committed after every
verification, so it can roll back what the target rejected.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from models.kv_cache import KVCache
from models.transformer import Transformer
from orchestrator.prompt_lookup import propose_ngram_draft
from orchestrator.sampling import SamplingParams, sample_from_uniform, warp_logits


@dataclass
class DraftRequest:
    """One request's view for drafting: its whole context and how many tokens to propose."""

    key: int
    context: list[int]  # prompt + generated tokens; the last one is not yet in the target's cache
    num_tokens: int
    params: SamplingParams
    generator: torch.Generator


@dataclass
class Draft:
    tokens: list[int]
    # [k, V] distribution each token was drawn from (already warped by the request's params);
    # None means a deterministic proposal, i.e. a one-hot q.
    probs: torch.Tensor | None = None
    confidences: list[float] | None = None


class Drafter(Protocol):
    name: str

    def admit(self, key: int) -> None: ...

    def release(self, key: int) -> None: ...

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]: ...

    def commit(self, key: int, num_committed: int) -> None:
        """The first num_committed tokens of the request's context are final: drop any state beyond."""


class PromptLookupDrafter:
    """Copies the continuation of the latest earlier match of the context's last n-gram."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def admit(self, key: int) -> None:
        pass

    def release(self, key: int) -> None:
        pass

    def commit(self, key: int, num_committed: int) -> None:
        pass

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [
            Draft(propose_ngram_draft(r.context, r.num_tokens, self.max_ngram, self.min_ngram))
            for r in requests
        ]


class ModelDrafter:
    """A small LM with the target's tokenizer, drafting autoregressively, batched over requests."""

    name = "model"

    def __init__(self, model: Transformer, max_batch_size: int, max_context: int) -> None:
        self.model = model
        self.cache: KVCache = model.new_cache(max_batch_size, max_context)
        self._slots: dict[int, int] = {}

    def admit(self, key: int) -> None:
        self._slots[key] = self.cache.allocate()

    def release(self, key: int) -> None:
        self.cache.free(self._slots.pop(key))

    def commit(self, key: int, num_committed: int) -> None:
        slot = self._slots[key]
        if int(self.cache.lengths[slot]) > num_committed:
            self.cache.truncate(slot, num_committed)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """k rounds of one batched forward each; round 1 also catches up on uncached context."""
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        feeds = [r.context[int(self.cache.lengths[self._slots[r.key]]):] for r in requests]
        active = [i for i, r in enumerate(requests) if r.num_tokens > 0]
        while active:
            num_new = [len(feeds[i]) for i in active]
            logits = self.model(
                torch.tensor([t for i in active for t in feeds[i]], dtype=torch.long),
                [self._slots[requests[i].key] for i in active],
                num_new,
                self.cache,
                logits_indices=self.model.last_token_indices(num_new),
            ).logits
            for row, i in enumerate(active):
                request = requests[i]
                q = warp_logits(logits[row], request.params)
                if request.params.greedy:
                    token = int(q.argmax())
                else:
                    uniform = torch.rand((), generator=request.generator, dtype=torch.float64)
                    token = int(sample_from_uniform(q, uniform))
                tokens[i].append(token)
                probs[i].append(q)
                feeds[i] = [token]
            active = [i for i in active if len(tokens[i]) < requests[i].num_tokens]
        return [Draft(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs)]
