"""The draft vocabulary: the tokens the target actually emits, most frequent first.

Counted over the answers in the drafter's training data (the target's own regenerated outputs),
so it reflects what drafts must match; its coverage is measured on held-out answers.
"""
from __future__ import annotations

import torch

from training.data import Sequence


def answer_token_counts(seqs: list[Sequence], vocab_size: int, prompts: bool = False) -> torch.Tensor:
    """How often each token id appears in the answers (or, with ``prompts``, in the prompts)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in seqs:
        part = s.tokens[:s.prompt_len] if prompts else s.tokens[s.prompt_len:]
        counts += torch.bincount(part, minlength=vocab_size)
    return counts


def draft_vocabulary(train: list[Sequence], vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent answer tokens, sorted by id. Ties (above all the many tokens no
    answer used) go to the more frequent prompt token, as answers copy from prompts, then to the lower id."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in 1..{vocab_size}, got {size}")
    answers = answer_token_counts(train, vocab_size).tolist()
    prompts = answer_token_counts(train, vocab_size, prompts=True).tolist()
    order = sorted(range(vocab_size), key=lambda t: (-answers[t], -prompts[t], t))
    return torch.tensor(sorted(order[:size]), dtype=torch.int64)


def coverage(vocab: torch.Tensor, seqs: list[Sequence], vocab_size: int) -> float:
    """Fraction of the answer tokens in ``seqs`` that the vocabulary contains."""
    counts = answer_token_counts(seqs, vocab_size)
    total = int(counts.sum())
    return float(counts[vocab].sum()) / total if total else 0.0
