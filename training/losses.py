"""DeepSpec losses: 0.1*CE + 0.9*L1 + 1.0*BCE(confidence, 1 - TV), position weight exp(-k/4).

L1 is the paper's full distance |p_draft - p_target|_1 = 2 TV. Everything is computed inside the
draft vocabulary: the drafter proposes nothing outside it, so the target's mass outside (known
from the full-vocabulary log-partition) enters TV as a constant and TV stays exact while the
training step scores 8k tokens instead of 49k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    l1: float = 0.9  # on |p_draft - p_target|_1 = 2 TV
    confidence: float = 1.0
    decay: float = 4.0  # position k (0-based) weighs exp(-k / decay)


@dataclass
class LossOutput:
    loss: torch.Tensor
    ce: float
    tv: float
    confidence: float
    accept: torch.Tensor  # [W] mean 1 - TV per block position (the conditional acceptance at T=1)
    tau: float  # expected tokens per round at T=1 (teacher forced): 1 + sum_k prod_{j<=k} (1 - TV_j)
    tau_greedy: float  # the same at T=0: a position survives when the draft's argmax is the target's token


def subset_total_variation(draft_logits: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """TV(p_draft, p_target) over the last dimension, in [0, 1], for a draft distribution that lives on
    a vocabulary subset. target_logprobs are the target's log-probabilities of the subset's tokens
    normalised over the full vocabulary; the mass they miss is what lies outside the subset."""
    p_draft = torch.softmax(draft_logits.float(), -1)
    p_target = target_logprobs.float().exp()
    outside = (1.0 - p_target.sum(-1)).clamp_min(0.0)
    return 0.5 * ((p_draft - p_target).abs().sum(-1) + outside)


def drafter_loss(draft_logits: torch.Tensor, target_logprobs: torch.Tensor, labels: torch.Tensor,
                 confidence_logits: torch.Tensor | None, weights: LossWeights,
                 block_weight: torch.Tensor | None = None) -> LossOutput:
    """draft logits / target log-probs [N, W, Vd] over the draft vocabulary, labels [N, W] (the target's
    own tokens as draft-vocabulary ids, -1 outside it), confidence logits [N, W] or None, block_weight
    [N] (0 for padding blocks)."""
    N, W = labels.shape
    pos_w = torch.exp(-torch.arange(W, dtype=torch.float32, device=labels.device) / weights.decay).expand(N, W)
    if block_weight is not None:
        pos_w = pos_w * block_weight.float().unsqueeze(-1)
    norm = pos_w.sum().clamp_min(1e-6)
    in_vocab = labels >= 0
    ce_w = pos_w * in_vocab
    ce_all = F.cross_entropy(draft_logits.flatten(0, 1).float(), labels.clamp_min(0).flatten(), reduction="none")
    ce = (ce_all.view(N, W) * ce_w).sum() / ce_w.sum().clamp_min(1e-6)
    tv = subset_total_variation(draft_logits, target_logprobs)
    l1_loss = 2.0 * (tv * pos_w).sum() / norm
    loss = weights.ce * ce + weights.l1 * l1_loss
    conf_loss = torch.zeros(())
    if confidence_logits is not None:
        target = (1.0 - tv).detach().clamp(0.0, 1.0)
        conf_loss = (F.binary_cross_entropy_with_logits(confidence_logits, target, reduction="none") * pos_w).sum() / norm
        loss = loss + weights.confidence * conf_loss
    keep = pos_w[:, 0] > 0
    accept = (1.0 - tv.detach())[keep]
    greedy = (draft_logits.detach().argmax(-1) == labels)[keep].float()
    return LossOutput(loss=loss, ce=float(ce.detach()), tv=float(l1_loss.detach()) / 2, confidence=float(conf_loss.detach()),
                      accept=accept.mean(0), tau=float(1.0 + accept.cumprod(-1).sum(-1).mean()),
                      tau_greedy=float(1.0 + greedy.cumprod(-1).sum(-1).mean()))
