"""Initialising a block drafter's layers from the target's top layers, an alternative to the
paper's random initialisation.

Drafter layer i takes target layer N - L + i: norms, query/key/value and output projections, and
the FFN. A drafter FFN narrower than the target's keeps the target's units whose down-projection
columns have the largest norms (the units that write the most into the residual stream).
"""
from __future__ import annotations

import torch

from models.drafters import BlockDrafter, DrafterConfig
from models.config import TransformerConfig
from models.transformer import Transformer


def check_layers_fit(config: DrafterConfig, target: TransformerConfig) -> None:
    """Raise ValueError when the target's top layers cannot start this drafter's: not a block drafter,
    another head geometry or hidden size, a wider FFN or more layers than the target's, attention
    terms the drafter layer lacks (biases, q/k norms), or q/k norms the target's layers lack."""
    if config.kind not in ("dspark", "dflash"):
        raise ValueError(f"only block drafters (dspark, dflash) take the target's layers, not {config.kind}")
    if (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) != (
            target.hidden_size, target.num_heads, target.num_kv_heads, target.head_dim):
        raise ValueError("the drafter's attention geometry differs from the target's")
    if config.intermediate_size > target.intermediate_size:
        raise ValueError(f"drafter FFN {config.intermediate_size} is wider than the target's {target.intermediate_size}")
    if config.num_layers > target.num_layers:
        raise ValueError(f"the target has only {target.num_layers} layers for {config.num_layers} drafter layers")
    if target.attention_bias or target.o_proj_bias or target.qk_norm:
        raise ValueError("the target's attention has biases or q/k norms, which the drafter layer lacks")
    if config.qk_norm:
        raise ValueError("the drafter's layers have q/k norms, which the target's lack (build it with qk_norm off)")


@torch.no_grad()
def init_layers_from_target(drafter: BlockDrafter, target: Transformer) -> list[int]:
    """Copy the target's top layers into ``drafter.layers`` in place; returns the target layers used.
    Raises ValueError where ``check_layers_fit`` does."""
    d, t = drafter.config, target.config
    check_layers_fit(d, t)
    used = list(range(t.num_layers - d.num_layers, t.num_layers))
    q_size, kv_size = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    for mine, index in zip(drafter.layers, used):
        theirs = target.layers[index]
        q, k, v = theirs.qkv_proj.split([q_size, kv_size, kv_size])
        for param, value in ((mine.attn_norm, theirs.attn_norm), (mine.q_proj.weight, q), (mine.k_proj.weight, k),
                             (mine.v_proj.weight, v), (mine.o_proj.weight, theirs.o_proj),
                             (mine.mlp_norm, theirs.mlp_norm)):
            param.copy_(value)
        gate, up = theirs.gate_up_proj.split(t.intermediate_size)
        keep = theirs.down_proj.float().norm(dim=0).topk(d.intermediate_size).indices.sort().values
        mine.gate_up.weight.copy_(torch.cat([gate[keep], up[keep]]))
        mine.down.weight.copy_(theirs.down_proj[:, keep])
    return used
