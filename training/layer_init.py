"""Initialising a block drafter's layers from the target's top layers (issue: "try initialising
drafter layers from the target's top layers"), instead of the paper's random initialisation.

Drafter layer i takes target layer N - L + i: norms, query/key/value and output projections, and
the FFN. A drafter FFN narrower than the target's keeps the target's units whose down-projection
columns have the largest norms (the units that write the most into the residual stream).
"""
from __future__ import annotations

import torch

from models.drafters import BlockDrafter
from models.transformer import Transformer


@torch.no_grad()
def init_layers_from_target(drafter: BlockDrafter, target: Transformer) -> list[int]:
    """Copy the target's top layers into ``drafter.layers`` in place; returns the target layers used.

    Raises ValueError when the shapes cannot match: another head geometry or hidden size, a wider
    drafter FFN than the target's, or attention terms the drafter layer lacks (biases, q/k norms)."""
    d, t = drafter.config, target.config
    if not isinstance(drafter, BlockDrafter):
        raise ValueError(f"only block drafters (dspark, dflash) take the target's layers, not {d.kind}")
    if (d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim) != (t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim):
        raise ValueError("the drafter's attention geometry differs from the target's")
    if d.intermediate_size > t.intermediate_size:
        raise ValueError(f"drafter FFN {d.intermediate_size} is wider than the target's {t.intermediate_size}")
    if d.num_layers > t.num_layers:
        raise ValueError(f"the target has only {t.num_layers} layers for {d.num_layers} drafter layers")
    used = list(range(t.num_layers - d.num_layers, t.num_layers))
    q_size, kv_size = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    for mine, index in zip(drafter.layers, used):
        theirs = target.layers[index]
        if theirs.qkv_bias is not None or theirs.o_bias is not None or theirs.q_norm is not None:
            raise ValueError("the target's attention has biases or q/k norms, which the drafter layer lacks")
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
