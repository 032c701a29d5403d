"""DeepSpec losses: 0.1*CE + 0.9*TV + 1.0*BCE(confidence, 1 - TV), position weight exp(-k/4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
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


def total_variation(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """TV(p_draft, p_target) over the last dimension, in [0, 1]."""
    return 0.5 * (torch.softmax(draft_logits.float(), -1) - torch.softmax(target_logits.float(), -1)).abs().sum(-1)


def drafter_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                 confidence_logits: torch.Tensor | None, weights: LossWeights) -> LossOutput:
    """draft/target logits [N, W, V], labels [N, W] (the target's own tokens), confidence logits [N, W] or None."""
    W = labels.shape[-1]
    pos_w = torch.exp(-torch.arange(W, dtype=torch.float32, device=labels.device) / weights.decay).expand_as(labels)
    norm = pos_w.sum()
    ce = (F.cross_entropy(draft_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels) * pos_w).sum() / norm
    tv = total_variation(draft_logits, target_logits)
    tv_loss = (tv * pos_w).sum() / norm
    loss = weights.ce * ce + weights.tv * tv_loss
    conf_loss = torch.zeros(())
    if confidence_logits is not None:
        target = (1.0 - tv).detach().clamp(0.0, 1.0)
        conf_loss = (F.binary_cross_entropy_with_logits(confidence_logits, target, reduction="none") * pos_w).sum() / norm
        loss = loss + weights.confidence * conf_loss
    accept = (1.0 - tv.detach())
    tau = 1.0 + accept.cumprod(-1).sum(-1).mean()
    return LossOutput(loss=loss, ce=ce.item(), tv=tv_loss.item(), confidence=conf_loss.item(),
                      accept=accept.mean(0), tau=float(tau))
