"""What the graph runtimes share: a packed engine call laid out for the exported packed step graph.

The ONNX Runtime and TensorRT runners run the exported graph (see export.onnx_export): around
each call they split the sequences into the graph's attention groups (ONNX Runtime: one call of the
one-group graph per group), point the graph at the cached keys it may read, and write the new K/V
rows it returns into the cache, so every runtime shares our KVCache and the engine cannot tell
them apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from export.onnx_export import PAGE_SIZE
from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.loading import load_token_matrices
from models.transformer import ForwardOutput


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one [B, L] block in the graph (CPU tensors)."""

    rows: torch.Tensor  # int64 [B, L] packed row of each query (padding repeats the sequence's last)
    mask: torch.Tensor  # bool [B, L, C + L] cached keys first, then the group's new keys
    cache_pages: torch.Tensor  # int64 [B, kv_heads, C / PAGE_SIZE] pages of the cache each sequence reads
    dummy: bool = False  # no sequence: one masked query whose output no token reads

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows, self.mask, self.cache_pages


@dataclass
class PackedBatch:
    """One engine call laid out for the packed graph (all CPU tensors)."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    logit_rows: torch.Tensor  # int64 [N]
    token_rows: torch.Tensor  # int64 [T] row of each packed token in the groups' concatenated outputs
    groups: list[AttentionGroup]
    slots: torch.Tensor  # int64 [B]
    num_new: torch.Tensor  # int64 [B]
    tok_slots: torch.Tensor  # int64 [T]

    def inputs(self, skip_dummy: bool = False) -> list[torch.Tensor]:
        """The graph's leading inputs, in io_names order (the caches follow); ``skip_dummy``: without the
        dummy groups' (for the one-group graph)."""
        out = [self.input_ids, self.positions, self.logit_rows, self.token_rows]
        for group in self.groups:
            if not (skip_dummy and group.dummy):
                out += group.tensors()
        return out


def pages_read(cached: int) -> int:
    """Pages a sequence with ``cached`` keys reads (at least one: zero-sized dims trouble TensorRT)."""
    return max(1, -(-cached // PAGE_SIZE))


def whole_pages(max_len: int) -> int:
    """max_len rounded up to whole pages: the length of every cache a graph reads."""
    return -(-max_len // PAGE_SIZE) * PAGE_SIZE


def page_rows(slots: torch.Tensor, kv_heads: int, max_len: int, pages: int) -> torch.Tensor:
    """int64 [B, kv_heads, pages]: row of each read page in a [slots, kv_heads, max_len, D] cache seen as
    [pages, PAGE_SIZE * D] (see paged_views)."""
    return ((slots[:, None, None] * kv_heads + torch.arange(kv_heads)[None, :, None]) * (max_len // PAGE_SIZE)
            + torch.arange(pages)[None, None, :])


def paged_views(k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], head_dim: int) -> list[torch.Tensor]:
    """Each layer's K and V [slots, kv_heads, max_len, D] as the graphs read them, K then V per layer:
    [pages, PAGE_SIZE * D] views of the cache's own memory (no copy)."""
    row = PAGE_SIZE * head_dim
    return [t.view(-1, row) for pair in zip(k, v) for t in pair]


def cache_views(cache: KVCache) -> list[torch.Tensor]:
    """A KVCache as a graph reads it, in io_names order: per layer K and V as paged_views, then for an
    int8 cache their scales as [pages, PAGE_SIZE] views (no copy)."""
    kv = paged_views(cache.k, cache.v, cache.config.head_dim)
    if cache.dtype != torch.int8:
        return kv
    scales = paged_views(cache.k_scale, cache.v_scale, 1)
    return [t for i in range(cache.config.num_layers) for t in (*kv[2 * i:2 * i + 2], *scales[2 * i:2 * i + 2])]


def _attention_cost(new: list[int], past: list[int]) -> int:
    """Score entries of one group's padded attention: B * L * (C + L)."""
    L, C = max(new), pages_read(max(past)) * PAGE_SIZE
    return len(new) * L * (C + L)


def split_groups(num_new: list[int], starts: list[int]) -> list[list[int]]:
    """Sequences (indices) of the graph's two attention groups, cut where padded attention costs least.

    Attention pads each group's sequences to its longest query run and cached length; sorting by
    (new tokens, cached length) and cutting once puts a prompt's prefill apart from the one-token
    decodes and short verifies beside it. On a tie everything stays in the first group (the second
    is then empty).
    """
    order = sorted(range(len(num_new)), key=lambda b: (num_new[b], starts[b]))
    best_cost, best_cut = None, len(order)
    for cut in range(len(order), 0, -1):
        parts = [p for p in (order[:cut], order[cut:]) if p]
        cost = sum(_attention_cost([num_new[b] for b in p], [starts[b] for b in p]) for p in parts)
        if best_cost is None or cost < best_cost:
            best_cost, best_cut = cost, cut
    return [order[:best_cut], order[best_cut:]]


def check_call(input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int],
               cache: KVCache) -> tuple[list[int], list[int], list[int]]:
    """Check a packed call like the Transformer does (ValueError naming what is wrong); returns the
    slots, new-token counts and cached lengths as lists. The cache's max_len must be a multiple of
    PAGE_SIZE (the graph runners' new_cache rounds it up)."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D packed tokens, got shape {tuple(input_ids.shape)}")
    B = len(slots)
    slots_l, new_l = [int(s) for s in slots], [int(n) for n in num_new]
    if B == 0 or len(new_l) != B:
        raise ValueError(f"need one num_new per slot, got slots={slots_l} num_new={new_l}")
    if len(set(slots_l)) != B:
        raise ValueError(f"duplicate slots in {slots_l}")
    if min(new_l) < 1:
        raise ValueError(f"every sequence needs at least one new token, got num_new={new_l}")
    T = int(input_ids.shape[0])
    if sum(new_l) != T:
        raise ValueError(f"input_ids has {T} tokens but sum(num_new) = {sum(new_l)}")
    starts_l = cache.lengths[slots_l].tolist()
    if max(s + n for s, n in zip(starts_l, new_l)) > cache.max_len:
        raise ValueError(f"sequence would reach {max(s + n for s, n in zip(starts_l, new_l))} tokens; "
                         f"cache max_len is {cache.max_len}")
    if cache.max_len % PAGE_SIZE:
        raise ValueError(f"the graph reads the cache in pages of {PAGE_SIZE}; max_len {cache.max_len} is not a multiple")
    return slots_l, new_l, starts_l


def pack_batch(input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
               logits_indices: torch.Tensor | None) -> PackedBatch:
    """Check a packed call (check_call) and lay it out for the packed graph (layout_batch), its
    sequences in the attention groups split_groups chooses."""
    return layout_batch(input_ids, *check_call(input_ids, slots, num_new, cache), cache, logits_indices)


def layout_batch(input_ids: torch.Tensor, slots_l: list[int], new_l: list[int], starts_l: list[int], cache: KVCache,
                 logits_indices: torch.Tensor | None, one_group: bool = False) -> PackedBatch:
    """A call that check_call passed (its slots, new-token counts and cached lengths) laid out for the
    packed graph: its sequences in the attention groups split_groups chooses, or all in the first with
    ``one_group``.

    An attention group reads at least one page of cached keys (masked when the sequences are
    new) and an empty group is a one-query dummy whose output no token reads: TensorRT profiles
    and some kernels dislike zero-sized dimensions, and one masked page costs nothing.
    """
    B, T = len(slots_l), int(input_ids.shape[0])
    slots_t = torch.tensor(slots_l, dtype=torch.int64)
    new_t = torch.tensor(new_l, dtype=torch.int64)
    starts = torch.tensor(starts_l, dtype=torch.int64)
    first = torch.cumsum(new_t, 0) - new_t
    batch_of_tok = torch.arange(B).repeat_interleave(new_t)
    offset = torch.arange(T) - first[batch_of_tok]
    hkv = cache.config.num_kv_heads

    groups: list[AttentionGroup] = []
    token_rows = torch.empty(T, dtype=torch.int64)
    base = 0
    for members in [list(range(B)), []] if one_group else split_groups(new_l, starts_l):
        if not members:  # dummy: one query over the first cached page of slot 0, read by no token
            mask = torch.zeros(1, 1, PAGE_SIZE + 1, dtype=torch.bool)
            mask[0, 0, 0] = True
            groups.append(AttentionGroup(rows=torch.zeros(1, 1, dtype=torch.int64), mask=mask,
                                         cache_pages=page_rows(torch.zeros(1, dtype=torch.int64), hkv, cache.max_len, 1),
                                         dummy=True))
            base += 1
            continue
        idx = torch.tensor(members, dtype=torch.int64)
        g_new, g_start, g_first = new_t[idx], starts[idx], first[idx]
        L, P = int(g_new.max()), pages_read(int(g_start.max()))
        C = P * PAGE_SIZE
        q_off = torch.minimum(torch.arange(L)[None, :], (g_new - 1)[:, None])  # padding repeats the last row
        rows = g_first[:, None] + q_off
        past_mask = (torch.arange(C)[None, :] < g_start[:, None])[:, None, :].expand(len(members), L, C)
        new_mask = torch.ones(L, L, dtype=torch.bool).tril().expand(len(members), L, L)
        groups.append(AttentionGroup(rows=rows, mask=torch.cat((past_mask, new_mask), dim=2),
                                     cache_pages=page_rows(slots_t[idx], hkv, cache.max_len, P)))
        for local, b in enumerate(members):
            n = new_l[b]
            token_rows[int(first[b]):int(first[b]) + n] = base + local * L + torch.arange(n)
        base += len(members) * L
    rows = torch.arange(T) if logits_indices is None else logits_indices.cpu().to(torch.int64)
    return PackedBatch(
        input_ids=input_ids.to(torch.int64).cpu(), positions=starts[batch_of_tok] + offset, logit_rows=rows.contiguous(),
        token_rows=token_rows, groups=groups, slots=slots_t, num_new=new_t, tok_slots=slots_t[batch_of_tok],
    )


def _check_taps(tap_layers: Sequence[int], exported: Sequence[int]) -> list[int]:
    taps = sorted(set(int(t) for t in tap_layers))
    missing = [t for t in taps if t not in exported]
    if missing:
        raise ValueError(f"tap layers {missing} were not exported (graph has {list(exported)}); "
                         "export again with --tap-layers")
    return taps


class _GraphRunner:
    """Shared part of the graph runtimes: padding, cache gather/scatter, output unpacking."""

    config: TransformerConfig
    dtype: torch.dtype
    kv_dtype: torch.dtype  # the KV cache's: dtype, or int8 for graphs exported with an int8 cache
    device: torch.device
    tap_layers: tuple[int, ...]
    model_dir: Path | None = None  # set by load_runner; where the shared token matrices are read from
    _token_matrices: tuple[torch.Tensor, torch.Tensor] | None = None

    def _shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._token_matrices is None:
            if self.model_dir is None:
                raise RuntimeError("this runner was not loaded from a model directory")
            embed, head = load_token_matrices(self.model_dir, self.dtype)
            self._token_matrices = embed.to(self.device), head.to(self.device)
        return self._token_matrices

    @property
    def embed(self) -> torch.Tensor:
        """The target's input embedding (read on first use): trained drafters share it, as with the torch runtime."""
        return self._shared()[0]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._shared()[1]

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        """A KVCache whose max_len is rounded up to whole pages (the graph reads it in pages)."""
        return KVCache(self.config, num_slots, whole_pages(max_len), dtype=self.kv_dtype, device=self.device)

    def last_token_indices(self, num_new: Sequence[int]) -> torch.Tensor:
        """Packed row of each sequence's last new token (as Transformer.last_token_indices)."""
        return torch.tensor(num_new, dtype=torch.int64).cumsum(0) - 1

    def _finish(self, cache: KVCache, batch: PackedBatch, logits: torch.Tensor, new_kv: Sequence[torch.Tensor],
                hidden: dict[int, torch.Tensor], taps: list[int]) -> ForwardOutput:
        """Write the new K/V rows (and an int8 cache's scales: new_kv in io_names order) into the cache,
        advance lengths, return logits and taps [T, hidden]."""
        tok_slots = batch.tok_slots.to(self.device)
        tok_pos = batch.positions.to(self.device)
        stores = [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if cache.dtype == torch.int8 else [])
        for layer in range(self.config.num_layers):
            for j, store in enumerate(stores):
                store[layer][tok_slots, :, tok_pos] = new_kv[len(stores) * layer + j].to(store[layer].dtype)
        cache.lengths.index_add_(0, batch.slots, batch.num_new)
        return ForwardOutput(logits=logits.float(), hidden_states={t: hidden[t] for t in taps})
