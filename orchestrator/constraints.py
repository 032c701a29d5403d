"""Tokens a request forbids at one position: end ids before min_tokens, and the last token of a bad word.

A forbidden token gets logit -inf before warping. The engine applies this to every row the target
scores and to every position the drafter proposes, each with that position's own history (context
plus the draft tokens before it), so the draft and target distributions are shaped by one rule and
the accept/resample step stays lossless with respect to the constrained target.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from orchestrator.sampling import SamplingParams


def is_constrained(params: SamplingParams) -> bool:
    """Whether any rule can forbid a token (the common case skips all the work)."""
    return params.min_tokens > 0 or bool(params.bad_words)


def banned_tokens(params: SamplingParams, end_ids: Sequence[int], history: Sequence[int],
                  num_output: int) -> list[int]:
    """Ids forbidden as the next token, after `history` (prompt and output) holding `num_output` output tokens."""
    banned = list(end_ids) if num_output < params.min_tokens else []
    for word in params.bad_words:
        prefix = len(word) - 1
        if prefix == 0 or (len(history) >= prefix and tuple(history[len(history) - prefix:]) == word[:-1]):
            banned.append(word[-1])
    return banned


def constrain_rows(logits: torch.Tensor, params: SamplingParams, end_ids: Sequence[int], context: Sequence[int],
                   num_output: int, draft: Sequence[int]) -> torch.Tensor:
    """[k+1, V] logits scored after the context and each draft prefix -> the same with forbidden ids at -inf.

    Row i follows `context + draft[:i]`, so it holds `num_output + i` output tokens."""
    if not is_constrained(params):
        return logits
    out = logits.clone()
    history = list(context)
    for i in range(out.shape[0]):
        banned = banned_tokens(params, end_ids, history, num_output + i)
        if banned:
            out[i, banned] = float("-inf")
        if i < len(draft):
            history.append(draft[i])
    return out
