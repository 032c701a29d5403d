"""Starting a block drafter's layers from weights other than the paper's random initialisation.

From the target's top layers: drafter layer i takes target layer N - L + i: norms, query/key/value
and output projections, and the FFN. A drafter FFN narrower than the target's keeps the target's
units whose down-projection columns have the largest norms (the units that write the most into the
residual stream).

From a trained drafter without per-head q/k norms: the same weights with the norms added, their
gains fitted so that the normed queries and keys (and so the attention) start close to the old ones.

From a trained DSpark drafter with a narrower Markov head: the same function, the head widened.
"""
from __future__ import annotations

from typing import Iterable, Protocol

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


class _Inputs(Protocol):
    features: torch.Tensor
    tokens: torch.Tensor
    anchors: torch.Tensor


@torch.no_grad()
def qk_norm_gains(plain: BlockDrafter, batches: Iterable[_Inputs]) -> dict[str, torch.Tensor]:
    """Gains [head_dim] for q/k norms added to ``plain`` (a drafter without them) as
    {"layers.{i}.q_norm": ..., "layers.{i}.k_norm": ...}: per channel c, the least-squares fit of
    the raw projection q_c by its normed form n_c = q_c / rms(q) over the queries (keys: context and
    block keys) of ``plain``'s training forward on ``batches``, w_c = sum(n_c q_c) / sum(n_c^2).
    A norm with these gains leaves a query whose rms is the typical one unchanged. The projections
    must run unfused (no kernel plan: ``plain.use_kernel_plan(None)``), where the hooks see them."""
    if plain.config.qk_norm:
        raise ValueError("the drafter already has q/k norms")
    sums: dict[str, list[torch.Tensor]] = {}  # name -> [sum(n_c q_c), sum(n_c^2)] per channel

    def fit(name: str, head_dim: int, eps: float):
        acc = sums.setdefault(name, [torch.zeros(head_dim), torch.zeros(head_dim)])

        def hook(_module, _inputs, out: torch.Tensor) -> None:
            raw = out.detach().float().unflatten(-1, (-1, head_dim)).flatten(0, -2)  # [rows, D]
            normed = raw * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + eps)
            acc[0] += (normed * raw).sum(0).to(acc[0].device)
            acc[1] += normed.pow(2).sum(0).to(acc[1].device)
        return hook

    handles = []
    for i, layer in enumerate(plain.layers):
        handles.append(layer.q_proj.register_forward_hook(fit(f"layers.{i}.q_norm", layer.head_dim, layer.eps)))
        handles.append(layer.k_proj.register_forward_hook(fit(f"layers.{i}.k_norm", layer.head_dim, layer.eps)))
    seen = 0
    try:
        for batch in batches:
            plain.train_forward(batch.features, batch.tokens, batch.anchors)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError("no batches to fit the q/k norm gains on")
    return {name: num / den.clamp_min(1e-12) for name, (num, den) in sums.items()}


def widened_markov(state: dict[str, torch.Tensor], rank: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A DSpark drafter's weights ``state`` with its Markov head widened to ``rank`` (ValueError when
    narrower). The new columns of W1 [vocab, rank] are random as a fresh head's, those of W2
    [draft vocab, rank] and of the confidence head's weights on W1[x] are zero: the drafter computes
    what it did, and W2's new columns get gradients from the first step."""
    w1, w2, conf = state["markov_w1.weight"], state["markov_w2.weight"], state["confidence_head.weight"]
    old = w1.shape[1]
    if rank < old:
        raise ValueError(f"a Markov head of rank {old} cannot be narrowed to {rank}")
    extra = rank - old
    return {**state,
            "markov_w1.weight": torch.cat([w1, torch.randn(w1.shape[0], extra, dtype=w1.dtype) * std], dim=1),
            "markov_w2.weight": torch.cat([w2, w2.new_zeros(w2.shape[0], extra)], dim=1),
            "confidence_head.weight": torch.cat([conf, conf.new_zeros(conf.shape[0], extra)], dim=1)}
