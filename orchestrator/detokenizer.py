"""Incremental detokenization: stream text deltas that never split a UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character, and many tokenizers
decode a token differently depending on what precedes it (leading spaces). Decoding a short
sliding window and emitting only the stable suffix handles both.
"""
from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens kept as left context so the first delta decodes as in the full text


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        if self._decode(0).endswith(_REPLACEMENT):
            # The prompt ends inside a character: its bytes would merge with the first output bytes and
            # shift every later delta. The output's text is its own decode, so start without context.
            self._ids = []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text that is now final (possibly '')."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # incomplete character (or nothing new): wait for more tokens
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, even an incomplete character."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]
