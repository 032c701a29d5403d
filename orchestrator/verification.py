"""Lossless accept/resample rules for speculative decoding, as pure functions.

Greedy: keep the draft while it equals the target's argmax. Sampling: the rejection rule of
Leviathan et al. / Chen et al. (accept x with probability min(1, p(x)/q(x)), resample a
rejection from the residual max(0, p - q)), which makes every emitted token follow the
target's distribution p whatever the drafter's q was.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from orchestrator.sampling import sample_from_uniform


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of one verification round for one request."""

    tokens: list[int]  # accepted draft tokens followed by one target token: always len >= 1
    num_accepted: int  # how many draft tokens were accepted (0..K)


class BatchVerifyResult(NamedTuple):
    """Outcome of B independent rounds with the same draft length K."""

    tokens: torch.Tensor  # [B, K+1] int64: emitted tokens, padded with -1 after num_accepted + 1
    num_accepted: torch.Tensor  # [B] int64


def verify_greedy(draft_tokens: Sequence[int], target_logits: torch.Tensor) -> VerifyResult:
    """Accept the longest draft prefix matching the target's argmax, then the target's own token.

    target_logits is [K+1, V]; row i is the target's prediction after the context and the
    first i draft tokens, so row K gives the bonus token when the whole draft survives.
    """
    k = len(draft_tokens)
    if target_logits.dim() != 2 or target_logits.shape[0] != k + 1:
        raise ValueError(
            f"target_logits must be [K+1, V] = [{k + 1}, V], got {tuple(target_logits.shape)}"
        )
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < k and int(draft_tokens[n]) == best[n]:
        n += 1
    return VerifyResult(tokens=[int(t) for t in draft_tokens[:n]] + [best[n]], num_accepted=n)


def verify_sampling_batched(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> BatchVerifyResult:
    """Rejection-sampling verification of B drafts at once; ``verify_sampling`` is the B = 1 case.

    draft_tokens [B, K]; draft_probs [B, K, V] (q, already warped; None: a deterministic proposal,
    a one-hot q); target_probs [B, K+1, V] (p, warped the same way). Exactly B * (K+1) uniforms are drawn, row-major, whatever gets
    accepted: column k < K tests draft token k, column K draws the final token. A fixed draw
    order keeps a seeded request reproducible.
    """
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be [B, K], got {tuple(draft_tokens.shape)}")
    b, k = draft_tokens.shape
    vocab = target_probs.shape[-1]
    if tuple(target_probs.shape) != (b, k + 1, vocab):
        raise ValueError(
            f"target_probs must be [B, K+1, V] = [{b}, {k + 1}, V], got {tuple(target_probs.shape)}"
        )
    if draft_probs is None:
        draft_probs = torch.zeros(b, k, vocab, device=draft_tokens.device).scatter_(
            -1, draft_tokens.to(torch.int64).unsqueeze(-1), 1.0)
    if tuple(draft_probs.shape) != (b, k, vocab):
        raise ValueError(
            f"draft_probs must be [B, K, V] = [{b}, {k}, {vocab}], got {tuple(draft_probs.shape)}"
        )
    device = target_probs.device
    uniforms = torch.rand(
        (b, k + 1), generator=generator, dtype=torch.float64, device=generator.device
    ).to(device)
    draft_tokens = draft_tokens.to(device=device, dtype=torch.int64)
    p = target_probs.to(torch.float64)
    q = draft_probs.to(device=device, dtype=torch.float64)

    p_draft = p[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    q_draft = q.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    # u < min(1, p/q) written without the division, so q(x) = 0 needs no special case.
    accepted = uniforms[:, :k] * q_draft < p_draft
    num_accepted = accepted.to(torch.int64).cumprod(-1).sum(-1)

    # Final token from the residual max(0, p_n - q_n) at the first rejection n. Padding q with a
    # zero row makes the same expression give the bonus token p_K when everything was accepted.
    q_padded = torch.cat([q, q.new_zeros(b, 1, vocab)], dim=1)
    row = num_accepted.view(b, 1, 1).expand(b, 1, vocab)
    p_n = p.gather(1, row).squeeze(1)
    residual = (p_n - q_padded.gather(1, row).squeeze(1)).clamp_min(0.0)
    # If p_n <= q_n everywhere (equal up to rounding), the residual is empty: sample p_n itself.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    final = sample_from_uniform(residual, uniforms[:, k])

    positions = torch.arange(k + 1, device=device)
    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(b, 1)], dim=1)
    tokens = tokens.masked_fill(positions >= num_accepted.unsqueeze(1), -1)
    tokens.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
    return BatchVerifyResult(tokens=tokens, num_accepted=num_accepted)


def verify_sampling(
    draft_tokens: Sequence[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> VerifyResult:
    """Lossless rejection-sampling verification of one draft.

    draft_probs [K, V] is the distribution each draft token was drawn from (q; None for a
    deterministic proposal), target_probs [K+1, V] the target's (p), both from ``warp_logits``
    with the request's params. K = 0 is plain sampling from p_0.
    """
    draft = torch.as_tensor(list(draft_tokens), dtype=torch.int64, device=target_probs.device)
    result = verify_sampling_batched(
        draft.view(1, -1), None if draft_probs is None else draft_probs.unsqueeze(0), target_probs.unsqueeze(0),
        generator,
    )
    n = int(result.num_accepted[0])
    return VerifyResult(tokens=result.tokens[0, : n + 1].tolist(), num_accepted=n)
