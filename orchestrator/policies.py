"""Draft-length policies: how many draft tokens each request drafts and verifies this step.

Interchangeable per request (`spec_mode`), so they can be compared in one server:
- off: plain autoregressive decoding;
- static: always K;
- batch_limited: K while the batch is small, none above a batch-size threshold (vLLM's rule);
- adaptive: per request, +2 after a fully accepted draft, -1 otherwise, up to K (Hugging Face's heuristic);
- dspark: draft K, then the load-aware scheduler picks how many to verify across all requests.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import InvalidRequestError

SPEC_MODES = ("off", "static", "batch_limited", "adaptive", "dspark")
MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class SpeculationParams:
    """Per-request speculation choice: mode and the (maximum) draft length it may use."""

    mode: str = "static"
    num_draft_tokens: int = 4

    def validate(self) -> None:
        if self.mode not in SPEC_MODES:
            raise InvalidRequestError(f"spec_mode must be one of {', '.join(SPEC_MODES)}, got {self.mode!r}")
        if not 0 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidRequestError(
                f"num_draft_tokens must be in [0, {MAX_DRAFT_TOKENS}], got {self.num_draft_tokens}"
            )


def draft_length(spec: SpeculationParams, adaptive_length: int, batch_size: int, batch_limit: int) -> int:
    """Tokens to draft this step, before the engine's room limits and the DSpark scheduler's cut."""
    if spec.mode == "off":
        return 0
    if spec.mode == "batch_limited" and batch_size > batch_limit:
        return 0
    if spec.mode == "adaptive":
        return min(adaptive_length, spec.num_draft_tokens)
    return spec.num_draft_tokens


def next_adaptive_length(length: int, num_drafted: int, num_accepted: int, max_length: int) -> int:
    """Hugging Face's schedule: grow by 2 after a fully accepted draft, up to ``max_length`` (the request's
    num_draft_tokens), shrink by 1 otherwise."""
    if num_drafted == 0:
        return length
    if num_accepted == num_drafted:
        return min(length + 2, max_length)
    return max(length - 1, 1)
