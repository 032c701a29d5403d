"""Error types shared by the engine and the Triton adapters."""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A client error: the message is sent back to that client verbatim."""


def prompt_too_long(tokens: int, max_context: int) -> InvalidRequestError:
    """The one wording of an over-long prompt, whichever layer counts it (text, chat, or ids)."""
    return InvalidRequestError(f"prompt is {tokens} tokens; the context holds {max_context} "
                               "(prompt plus at least one generated token)")
