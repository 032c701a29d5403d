"""Prompt-lookup (n-gram) drafting: propose what followed the last time the context's tail appeared.

It costs no model forward, and it is strong wherever the output copies its input: code edits,
summaries that quote, retrieval answers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram_draft(
    context: Sequence[int], num_tokens: int, max_ngram: int = 3, min_ngram: int = 1
) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the latest earlier copy of the context's suffix.

    The longest suffix n-gram (``max_ngram`` down to ``min_ngram``) with an earlier occurrence
    wins; among its occurrences the most recent one does. The proposal stops at the end of the
    context, so it may be shorter than ``num_tokens``; [] when nothing matches.
    """
    if min_ngram < 1 or max_ngram < min_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
    tokens = np.asarray(context, dtype=np.int64).reshape(-1)
    length = tokens.shape[0]
    if num_tokens <= 0 or length < 2:
        return []
    # ends[e] is a candidate end of an earlier n-gram; e <= length - 2 so a token follows it.
    ends = np.arange(length - 1)
    alive = np.ones(length - 1, dtype=bool)
    best_end = -1
    # Grow the n-gram one token leftwards per pass: `alive` marks ends whose last n tokens
    # equal the context's last n tokens, so each pass costs one vectorised comparison.
    for n in range(1, min(max_ngram, length - 1) + 1):
        back = ends - (n - 1)
        alive &= back >= 0
        alive &= tokens[np.maximum(back, 0)] == tokens[length - n]
        hits = np.flatnonzero(alive)
        if hits.size == 0:
            break
        if n >= min_ngram:
            best_end = int(hits[-1])
    if best_end < 0:
        return []
    return tokens[best_end + 1 : best_end + 1 + num_tokens].tolist()
