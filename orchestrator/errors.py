"""Error types shared by the engine and the Triton adapters."""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A client error: the message is sent back to that client verbatim."""
