"""Stop-string matching on streamed text, holding back only what could still become a stop string."""
from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feeds text deltas; releases text that can no longer be part of a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self._inert = 0  # the held text's first characters came before stops counted: no stop string ends in them
        self.stopped = False

    def feed(self, delta: str, can_stop: bool = True) -> str:
        """Returns the text safe to emit now. Sets `stopped` once a stop string ends in text fed with
        ``can_stop`` (the stop string is not emitted; it may begin in earlier text still held back).
        Before a request's min_tokens, ``can_stop`` is False: stop strings ending there do not count,
        as vLLM's ``min_tokens`` rule has it."""
        if self.stopped:
            return ""
        if not self._stop:
            return delta
        self._held += delta
        if can_stop:
            cut = min((i for i in (self._held.find(s, max(self._inert - len(s) + 1, 0)) for s in self._stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.stopped = True
                released, self._held = self._held[:cut], ""
                return released
        keep = self._longest_partial_suffix()
        released = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep:]
        self._inert = 0 if can_stop else len(self._held)
        return released

    def flush(self) -> str:
        """At the end: the held-back text was not a stop string after all."""
        released, self._held = ("" if self.stopped else self._held), ""
        return released

    def _longest_partial_suffix(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best
