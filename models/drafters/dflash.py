"""DFlash-style baseline: the same parallel backbone as DSpark with neither sequential head.

Each block position's distribution depends only on the anchor and the context, never on the
tokens drafted before it inside the block; that is the gap DSpark's Markov head closes.
"""
from __future__ import annotations

import torch

from models.drafters.common import DrafterConfig
from models.drafters.dspark import BlockDrafter


class DFlashDrafter(BlockDrafter):
    """Parallel backbone alone (config.kind == "dflash"); draft() returns confidences=None."""

    def __init__(self, config: DrafterConfig, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        if config.kind != "dflash":
            raise ValueError(f"DFlashDrafter needs a dflash config, got {config.kind!r}")
        super().__init__(config, embed, lm_head)
