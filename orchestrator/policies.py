"""Draft-length policies: how many draft tokens each request verifies this step.

Interchangeable so they can be compared in one server (per request `spec_mode`).
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import InvalidRequestError

SPEC_MODES = ("off", "static")
MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class SpeculationParams:
    """Per-request speculation choice: mode and the draft length it may use."""

    mode: str = "static"
    num_draft_tokens: int = 4

    def validate(self) -> None:
        if self.mode not in SPEC_MODES:
            raise InvalidRequestError(f"spec_mode must be one of {', '.join(SPEC_MODES)}, got {self.mode!r}")
        if not 0 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidRequestError(
                f"num_draft_tokens must be in [0, {MAX_DRAFT_TOKENS}], got {self.num_draft_tokens}"
            )

    def draft_length(self) -> int:
        """Tokens to draft (and verify) this step, before the engine's room limits."""
        return 0 if self.mode == "off" else self.num_draft_tokens
