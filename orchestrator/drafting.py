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

from models.config import TransformerConfig
from models.drafters import Drafter as DrafterModule
from models.drafters import DrafterConfig, DrafterMismatchError
from models.kv_cache import KVCache
from models.projection import KernelPlan, Linear
from models.transformer import Transformer
from orchestrator.prompt_lookup import propose_ngram_draft
from orchestrator.sampling import SamplingParams, draw_rows, warp_logits


@dataclass
class DraftRequest:
    """One request's view for drafting: its whole context and how many tokens to propose."""

    key: int
    context: list[int]  # prompt + generated tokens; the last one is not yet in the target's cache
    num_tokens: int
    params: SamplingParams
    generator: torch.Generator
    # forbidden ids after a prefix of this draft (the request's min_tokens / bad_words rule, as its
    # target rows get it); None when the request has no such rule
    banned: Callable[[Sequence[int]], list[int]] | None = None


@dataclass
class Draft:
    tokens: list[int]
    # [k, V] distribution each token was drawn from (already warped by the request's params);
    # None means a deterministic proposal, i.e. a one-hot q.
    probs: torch.Tensor | None = None
    confidences: list[float] | None = None
    # "lookup": copied from the context without a model forward (its acceptance is its own, and it is
    # no drafting price); "model" otherwise
    source: str = "model"

    def truncate(self, count: int) -> None:
        """Keep the first `count` proposals (what the scheduler chose to verify)."""
        self.tokens = self.tokens[:count]
        self.probs = self.probs[:count] if self.probs is not None else None
        self.confidences = self.confidences[:count] if self.confidences is not None else None


class Drafter(Protocol):
    name: str
    tap_layers: tuple[int, ...]  # target layers whose hidden states `observe` needs (empty: none)
    # True where drafting k tokens costs k drafter steps (a small LM): the scheduler then drafts only
    # as many as it plans to verify. False where a block costs the same at any length (lookup, DSpark).
    sequential: bool

    def admit(self, key: int) -> None: ...

    def release(self, key: int) -> None: ...

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]: ...

    def commit(self, key: int, num_committed: int) -> None:
        """The first num_committed tokens of the request's context are final: drop any state beyond."""

    def uncached(self, key: int, context_length: int) -> int:
        """Tokens of the request's context (`context_length` long) the drafter has yet to read before it
        can draft: a small LM that skipped steps reads them in its first drafting forward, which the
        scheduler prices (consulted for sequential drafters). 0 for drafters that keep up every step."""

    def observe(self, keys: Sequence[int], token_ids: Sequence[Sequence[int]], hidden: dict[int, torch.Tensor]) -> None:
        """Newly committed tokens of several requests (one list per key) and the target's tapped hidden
        states for them, rows packed in the same order ([sum of lengths, H] per layer): one call per step."""


def check_drafter_fits(drafter_name: str, drafter: DrafterConfig | TransformerConfig, target_name: str,
                       target: TransformerConfig) -> None:
    """Raises DrafterMismatchError naming both models unless the drafter shares the target's vocabulary
    and, for a drafter reading the target's features, its hidden size and existing tap layers."""
    problems = []
    if drafter.vocab_size != target.vocab_size:
        problems.append(f"vocabulary {drafter.vocab_size} != {target.vocab_size}")
    if isinstance(drafter, DrafterConfig):
        if drafter.hidden_size != target.hidden_size:
            problems.append(f"hidden size {drafter.hidden_size} != {target.hidden_size}")
        bad = [t for t in drafter.tap_layers if not 0 <= t <= target.num_layers]
        if bad:
            problems.append(f"tap layers {bad} out of range 0..{target.num_layers}")
    if problems:
        raise DrafterMismatchError(f"drafter {drafter_name} does not fit target {target_name}: {'; '.join(problems)}")


class _NoFeatures:
    """For drafters that do not look at the target's hidden states."""

    tap_layers: tuple[int, ...] = ()

    def observe(self, keys: Sequence[int], token_ids: Sequence[Sequence[int]], hidden: dict[int, torch.Tensor]) -> None:
        pass


def _allowed_prefix(tokens: list[int], banned: Callable[[Sequence[int]], list[int]] | None) -> list[int]:
    """A deterministic proposal up to its first token the request's rule forbids (the target would reject it)."""
    if banned is None:
        return tokens
    for i, token in enumerate(tokens):
        if token in banned(tokens[:i]):
            return tokens[:i]
    return tokens


class PromptLookupDrafter(_NoFeatures):
    """Copies the continuation of the latest earlier match of the context's last n-gram."""

    name = "prompt_lookup"
    sequential = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def admit(self, key: int) -> None:
        pass

    def release(self, key: int) -> None:
        pass

    def commit(self, key: int, num_committed: int) -> None:
        pass

    def uncached(self, key: int, context_length: int) -> int:
        return 0  # reads the context afresh at no cost

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [
            Draft(_allowed_prefix(propose_ngram_draft(r.context, r.num_tokens, self.max_ngram, self.min_ngram), r.banned),
                  source="lookup")
            for r in requests
        ]


LOOKUP_FIRST_SUFFIX = "+prompt_lookup"


def split_lookup_first(choice: str) -> tuple[str, bool]:
    """A drafter setting -> (the model drafter's setting, whether prompt lookup goes first):
    ``checkpoint:DIR+prompt_lookup`` -> (``checkpoint:DIR``, True)."""
    if choice.endswith(LOOKUP_FIRST_SUFFIX) and len(choice) > len(LOOKUP_FIRST_SUFFIX):
        return choice[: -len(LOOKUP_FIRST_SUFFIX)], True
    return choice, False


class LookupFirstDrafter:
    """Prompt lookup for the requests whose context ends in an n-gram (``min_ngram`` tokens or more) seen
    earlier in it, the model drafter for the others, in the same step.

    A trained drafter predicts what the target says, not what it repeats: along the shipped SmolLM2
    DSpark drafter's greedy rounds (24 held-out prompts, 4-token drafts), where the context's last
    3 tokens had occurred before, lookup's draft kept 2.1 tokens and DSpark's 0.9; with only a 2-token
    match 1.3 and 1.2; with only a 1-token match 0.6 and 0.9. A copied draft also costs no forward, so
    a step where every drafting request copies skips the drafter (its context cache still advances
    through ``observe``, which the engine calls every step).
    """

    def __init__(self, model: Drafter, min_ngram: int = 2, max_ngram: int = 3) -> None:
        self.model = model
        self.lookup = PromptLookupDrafter(max_ngram, min_ngram)
        self.name = model.name + LOOKUP_FIRST_SUFFIX
        self.tap_layers = model.tap_layers
        self.sequential = model.sequential

    @property
    def block_size(self) -> int | None:
        return getattr(self.model, "block_size", None)

    def admit(self, key: int) -> None:
        self.model.admit(key)

    def release(self, key: int) -> None:
        self.model.release(key)

    def commit(self, key: int, num_committed: int) -> None:
        self.model.commit(key, num_committed)

    def uncached(self, key: int, context_length: int) -> int:
        return self.model.uncached(key, context_length)

    def observe(self, keys: Sequence[int], token_ids: Sequence[Sequence[int]], hidden: dict[int, torch.Tensor]) -> None:
        self.model.observe(keys, token_ids, hidden)

    def copies(self, context: Sequence[int], banned: Callable[[Sequence[int]], list[int]] | None = None) -> bool:
        """Whether this context's next draft is copied rather than the model's: lookup finds a match whose
        first token the request's rule (``banned``, as in DraftRequest) allows, as `propose` decides."""
        return bool(_allowed_prefix(propose_ngram_draft(context, 1, self.lookup.max_ngram, self.lookup.min_ngram),
                                    banned))

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        drafts: list[Draft | None] = list(self.lookup.propose(requests))
        rest = [i for i, d in enumerate(drafts) if not d.tokens]
        if rest:
            for i, draft in zip(rest, self.model.propose([requests[i] for i in rest])):
                drafts[i] = draft
        return drafts


def expected_source(drafter: Drafter, context: Sequence[int],
                    banned: Callable[[Sequence[int]], list[int]] | None = None) -> str:
    """Where `drafter`'s next draft for this context (under the request's rule ``banned``) comes from,
    known before drafting: "lookup" (copied from the context: no forward, lookup's own acceptance) or
    "model"."""
    if isinstance(drafter, LookupFirstDrafter):
        return "lookup" if drafter.copies(context, banned) else "model"
    return "lookup" if isinstance(drafter, PromptLookupDrafter) else "model"


class ModelDrafter(_NoFeatures):
    """A small LM with the target's tokenizer, drafting autoregressively, batched over requests.

    draft_vocab: token ids the drafter may propose (int64 [V']); its LM head then scores only those
    rows (see orchestrator.draft_vocab). None = the whole vocabulary.
    """

    name = "model"
    sequential = True

    def __init__(self, model: Transformer, max_batch_size: int, max_context: int,
                 draft_vocab: torch.Tensor | None = None) -> None:
        self.model = model
        self.cache: KVCache = model.new_cache(max_batch_size, max_context)
        self._slots: dict[int, int] = {}
        self.draft_vocab = draft_vocab
        self._head = None if draft_vocab is None else Linear(
            model.lm_head_weight.index_select(0, draft_vocab.to(model.device)), None,
            model.kernel_plan or KernelPlan((), ()))

    def admit(self, key: int) -> None:
        self._slots[key] = self.cache.allocate()

    def release(self, key: int) -> None:
        self.cache.free(self._slots.pop(key))

    def commit(self, key: int, num_committed: int) -> None:
        slot = self._slots[key]
        if int(self.cache.lengths[slot]) > num_committed:
            self.cache.truncate(slot, num_committed)

    def uncached(self, key: int, context_length: int) -> int:
        return context_length - int(self.cache.lengths[self._slots[key]])

    def _logits(self, ids: torch.Tensor, slots: list[int], num_new: list[int]) -> torch.Tensor:
        """[len(slots), vocab] float32 logits of each sequence's last new token (-inf outside the draft vocabulary)."""
        last = self.model.last_token_indices(num_new)
        if self._head is None:
            return self.model(ids, slots, num_new, self.cache, logits_indices=last).logits
        final = self.model.config.num_layers
        out = self.model(ids, slots, num_new, self.cache, logits_indices=last[:0], tap_layers=(final,))
        sub = self._head(out.hidden_states[final].index_select(0, last.to(self.model.device))).float()
        logits = torch.full((len(slots), self.model.config.vocab_size), float("-inf"), device=sub.device)
        return logits.index_copy_(1, self.draft_vocab.to(sub.device), sub)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """k rounds of one batched forward each; round 1 also catches up on uncached context."""
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        feeds = [r.context[int(self.cache.lengths[self._slots[r.key]]):] for r in requests]
        active = [i for i, r in enumerate(requests) if r.num_tokens > 0]
        while active:
            logits = self._logits(
                torch.tensor([t for i in active for t in feeds[i]], dtype=torch.long),
                [self._slots[requests[i].key] for i in active],
                [len(feeds[i]) for i in active],
            )
            for row, i in enumerate(active):
                request = requests[i]
                row_logits = logits[row]
                if request.banned is not None and (banned := request.banned(tokens[i])):
                    row_logits = row_logits.clone()
                    row_logits[banned] = float("-inf")
                q = warp_logits(row_logits, request.params)
                token = int(draw_rows(q[None], request.params, [request.generator])[0])
                tokens[i].append(token)
                probs[i].append(q)
                feeds[i] = [token]
            active = [i for i in active if len(tokens[i]) < requests[i].num_tokens]
        return [Draft(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs)]


def _row_sampler(requests: Sequence[DraftRequest],
                 module: DrafterModule) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """sample_fn for a group sharing params: forbid what each request's rule forbids at this position,
    warp like the target, draw each row with its request's RNG. Called once per draft position."""
    params = requests[0].params
    constrained = any(r.banned is not None for r in requests)
    drafted: list[list[int]] = [[] for _ in requests]  # full-vocabulary ids drawn so far, per row

    def sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if constrained:
            logits = logits.clone()
            for row, r in enumerate(requests):
                if r.banned is not None and (banned := r.banned(drafted[row])):
                    idx = module.to_draft_ids(torch.tensor(banned, dtype=torch.int64))
                    logits[row, idx[idx >= 0].to(logits.device)] = float("-inf")
        probs = warp_logits(logits, params)
        tokens = draw_rows(probs, params, [r.generator for r in requests])
        if constrained:
            full = tokens if module.draft_vocab is None else module.draft_vocab.to(tokens.device)[tokens]
            for row, token in enumerate(full.tolist()):
                drafted[row].append(token)
        return tokens, probs

    return sample


class FeatureDrafter:
    """Drafters conditioned on the target's hidden states (DSpark, DFlash- and EAGLE-3-style).

    The drafter module keeps projected target features of each request's committed tokens; the
    block is anchored at the last token the target emitted (not yet committed).
    """

    sequential = False  # one block forward (and a cheap left-to-right head) at any length

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

    def uncached(self, key: int, context_length: int) -> int:
        return 0  # `observe` extends the feature cache every step, drafting or not

    def observe(self, keys: Sequence[int], token_ids: Sequence[Sequence[int]], hidden: dict[int, torch.Tensor]) -> None:
        self.module.extend_context(
            self.state, [self._slots[k] for k in keys], [len(t) for t in token_ids], hidden,
            torch.tensor([t for tokens in token_ids for t in tokens], dtype=torch.long),
        )

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """One batched draft call per group of requests sharing draft length and warping (temperature,
        top-p, top-k): the only things that change the maths; seeds, stops and limits do not split groups."""
        drafts: list[Draft | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            warping = (r.params.temperature, r.params.top_p, r.params.top_k)
            groups.setdefault((min(r.num_tokens, self.block_size), warping), []).append(i)
        for (k, (temperature, _, _)), members in groups.items():
            group = [requests[i] for i in members]
            block = self.module.draft(
                self.state,
                [self._slots[r.key] for r in group],
                torch.tensor([r.context[-1] for r in group], dtype=torch.long),
                k,
                _row_sampler(group, self.module),
                greedy=temperature == 0.0,  # picks the confidence calibration of the request's regime
            )
            for row, i in enumerate(members):
                drafts[i] = Draft(
                    block.tokens[row].tolist(),
                    block.probs[row] if block.probs is not None else None,
                    block.confidences[row].tolist() if block.confidences is not None else None,
                )
        return drafts
