"""Prompt-lookup drafting: which earlier n-gram is copied, and how much of what followed it."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from orchestrator.prompt_lookup import propose_ngram_draft


def test_copies_the_continuation_of_a_repeated_ngram() -> None:
    context = [5, 6, 7, 8, 9, 10, 1, 2, 5, 6, 7]
    assert propose_ngram_draft(context, 3) == [8, 9, 10]


def test_prefers_the_longest_ngram_over_a_more_recent_shorter_one() -> None:
    # Suffix (1, 2, 3): the trigram occurs at the start; only "3" occurs again later.
    context = [1, 2, 3, 40, 41, 9, 3, 50, 51, 1, 2, 3]
    assert propose_ngram_draft(context, 2) == [40, 41]
    assert propose_ngram_draft(context, 2, max_ngram=1) == [50, 51]


def test_prefers_the_most_recent_match_of_equal_length() -> None:
    context = [0, 1, 2, 30, 31, 0, 1, 2, 40, 41, 0, 1, 2]  # (0, 1, 2) twice before the suffix
    assert propose_ngram_draft(context, 2) == [40, 41]


def test_no_match_gives_empty_draft() -> None:
    assert propose_ngram_draft([1, 2, 3, 4, 5], 4) == []
    assert propose_ngram_draft([7], 4) == []
    assert propose_ngram_draft([], 4) == []


def test_min_ngram_rules_out_short_matches() -> None:
    context = [9, 1, 2, 8, 7, 1]  # only the unigram "1" repeats
    assert propose_ngram_draft(context, 2) == [2, 8]
    assert propose_ngram_draft(context, 2, min_ngram=2) == []


def test_respects_num_tokens() -> None:
    context = list(range(10)) + [0, 1]
    assert propose_ngram_draft(context, 1) == [2]
    assert propose_ngram_draft(context, 5) == [2, 3, 4, 5, 6]
    assert propose_ngram_draft(context, 0) == []


def test_match_near_the_end_stops_at_the_context_end() -> None:
    # The latest earlier "7" is two from the end: only [4, 7] follow it, not 5 tokens.
    assert propose_ngram_draft([1, 7, 2, 3, 7, 4, 7], 5) == [4, 7]
    # Overlapping repeats: the earlier (7, 7, 7) ends at index 2, followed only by the final 7.
    assert propose_ngram_draft([7, 7, 7, 7], 5) == [7]


def test_the_suffix_itself_is_not_a_match() -> None:
    assert propose_ngram_draft([4, 5, 6], 3) == []
    assert propose_ngram_draft([4, 4], 3) == [4]


def test_accepts_numpy_and_torch_contexts() -> None:
    context = [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4]
    expected = propose_ngram_draft(context, 3)
    assert expected == [1, 5, 9]
    assert propose_ngram_draft(np.array(context), 3) == expected
    assert propose_ngram_draft(torch.tensor(context), 3) == expected


def test_rejects_bad_ngram_bounds() -> None:
    with pytest.raises(ValueError, match="min_ngram"):
        propose_ngram_draft([1, 2, 1], 2, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="min_ngram"):
        propose_ngram_draft([1, 2, 1], 2, min_ngram=0)


def _reference(context: list[int], num_tokens: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Direct transcription of the rule, quadratic on purpose."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= len(context):
            continue
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + num_tokens]
    return []


def test_matches_a_direct_transcription_on_random_contexts() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        context = rng.integers(0, 4, size=int(rng.integers(0, 30))).tolist()
        num_tokens = int(rng.integers(1, 6))
        max_ngram = int(rng.integers(1, 5))
        min_ngram = int(rng.integers(1, max_ngram + 1))
        got = propose_ngram_draft(context, num_tokens, max_ngram, min_ngram)
        assert got == _reference(context, num_tokens, max_ngram, min_ngram), context


def test_fast_on_long_contexts() -> None:
    """4k tokens: vectorised comparisons take well under a millisecond per call on one core."""
    rng = np.random.default_rng(1)
    context = rng.integers(0, 32_000, size=4096).tolist()
    context[1000:1003] = context[-3:]
    started = time.perf_counter()
    for _ in range(20):
        draft = propose_ngram_draft(context, 8, max_ngram=3)
    elapsed = time.perf_counter() - started
    assert draft == context[1003:1011]
    assert elapsed < 1.0, f"20 proposals took {elapsed:.2f}s"
