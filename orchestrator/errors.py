"""Error types shared by the engine and the Triton adapters."""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A client error: the message is sent back to that client verbatim."""


def prompt_too_long(tokens: int, limit: int, at_least: bool = False) -> InvalidRequestError:
    """The one wording of an over-long prompt, whichever layer counts it (text, chat, or ids); `limit`
    is the longest prompt that fits (a server's: its context less one generated token). ``at_least``:
    ``tokens`` is a bound from the text's length, the text too long to be worth tokenizing."""
    return InvalidRequestError(f"prompt is {'at least ' if at_least else ''}{tokens} tokens; at most {limit} fit, "
                               "leaving room for the answer")


def brief(value: object) -> str:
    """A refused value as a message quotes it: floats as sent (a float32 input's 0.1, not 0.10000000149011612),
    anything long cut, so a refusal never echoes megabytes back."""
    text = f"{value:.7g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
