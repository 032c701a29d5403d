"""Drafters: what proposes tokens for the target to verify.

A drafter keeps its own per-request state (a KV cache for a model drafter, nothing for prompt
lookup). The engine tells it which prefix of each request is committed after every
verification, so it can roll back what the target rejected.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from models.drafters import Drafter as DrafterModule
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

    def truncate(self, count: int) -> None:
        """Keep the first `count` proposals (what the scheduler chose to verify)."""
        self.tokens = self.tokens[:count]
        self.probs = self.probs[:count] if self.probs is not None else None
        self.confidences = self.confidences[:count] if self.confidences is not None else None


class Drafter(Protocol):
    name: str
    tap_layers: tuple[int, ...]  # target layers whose hidden states `observe` needs (empty: none)

    def admit(self, key: int) -> None: ...

    def release(self, key: int) -> None: ...

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]: ...

    def commit(self, key: int, num_committed: int) -> None:
        """The first num_committed tokens of the request's context are final: drop any state beyond."""

    def observe(self, key: int, token_ids: Sequence[int], hidden: dict[int, torch.Tensor]) -> None:
        """Newly committed tokens and the target's tapped hidden states for them ([n, H] per layer)."""


class _NoFeatures:
    """For drafters that do not look at the target's hidden states."""

    tap_layers: tuple[int, ...] = ()

    def observe(self, key: int, token_ids: Sequence[int], hidden: dict[int, torch.Tensor]) -> None:
        pass


class PromptLookupDrafter(_NoFeatures):
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


class ModelDrafter(_NoFeatures):
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


def _row_sampler(requests: Sequence[DraftRequest]) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """sample_fn for a group sharing params: warp like the target, draw each row with its request's RNG."""
    params = requests[0].params

    def sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = warp_logits(logits, params)
        if params.greedy:
            return probs.argmax(-1), probs
        uniforms = torch.stack([torch.rand((), generator=r.generator, dtype=torch.float64) for r in requests])
        return sample_from_uniform(probs, uniforms), probs

    return sample


class FeatureDrafter:
    """Drafters conditioned on the target's hidden states (DSpark, DFlash- and EAGLE-3-style).

    The drafter module keeps projected target features of each request's committed tokens; the
    block is anchored at the last token the target emitted (not yet committed).
    """

    def __init__(self, module: DrafterModule, max_batch_size: int, max_context: int) -> None:
        self.module = module
        self.name = module.config.kind
        self.tap_layers = tuple(module.tap_layers)
        self.block_size = module.config.block_size
        self.state = module.new_state(max_batch_size, max_context)
        self._free = list(range(max_batch_size))
        self._slots: dict[int, int] = {}

    def admit(self, key: int) -> None:
        self._slots[key] = self._free.pop()

    def release(self, key: int) -> None:
        slot = self._slots.pop(key)
        self.state.free(slot)
        self._free.append(slot)

    def commit(self, key: int, num_committed: int) -> None:
        slot = self._slots[key]
        if int(self.state.lengths[slot]) > num_committed:
            self.state.truncate(slot, num_committed)

    def observe(self, key: int, token_ids: Sequence[int], hidden: dict[int, torch.Tensor]) -> None:
        self.module.extend_context(
            self.state, [self._slots[key]], [len(token_ids)], hidden, torch.tensor(list(token_ids), dtype=torch.long)
        )

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """One batched draft call per group of requests sharing draft length and sampling params."""
        drafts: list[Draft | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((min(r.num_tokens, self.block_size), r.params), []).append(i)
        for (k, params), members in groups.items():
            group = [requests[i] for i in members]
            block = self.module.draft(
                self.state,
                [self._slots[r.key] for r in group],
                torch.tensor([r.context[-1] for r in group], dtype=torch.long),
                k,
                _row_sampler(group),
                greedy=params.greedy,  # picks the confidence calibration of the request's regime
            )
            for row, i in enumerate(members):
                drafts[i] = Draft(
                    block.tokens[row].tolist(),
                    block.probs[row],
                    block.confidences[row].tolist() if block.confidences is not None else None,
                )
        return drafts
