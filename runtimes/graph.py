"""What the graph runtimes share: a packed engine call laid out for the exported padded-batch graph.

The ONNX Runtime and TensorRT runners run the exported padded-batch graph (see export.onnx_export):
around each call they gather the slots' cached K/V into [B, kv_heads, P, head_dim], build the mask,
and scatter the new K/V rows back, so every runtime shares our KVCache and the engine cannot tell
them apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.loading import load_token_matrices
from models.transformer import ForwardOutput


@dataclass
class PaddedBatch:
    """One engine call laid out for the padded graph (all CPU tensors)."""

    input_ids: torch.Tensor  # int64 [B, L]
    positions: torch.Tensor  # int64 [B, L]
    mask: torch.Tensor  # bool [B, L, P + L]
    logit_rows: torch.Tensor  # int64 [N] rows of [B * L]
    slots: torch.Tensor  # int64 [B]
    past_len: int  # P
    pad_index: torch.Tensor  # int64 [T] row of each packed token in [B * L]
    tok_slots: torch.Tensor  # int64 [T]
    tok_positions: torch.Tensor  # int64 [T]
    num_new: torch.Tensor  # int64 [B]


def pad_batch(input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
              logits_indices: torch.Tensor | None) -> PaddedBatch:
    """Check a packed call like the Transformer does and lay it out as a padded batch.

    P is at least 1 (a masked dummy key when every sequence is new): TensorRT profiles and some
    kernels dislike zero-sized dimensions, and one masked key costs nothing.
    """
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
    slots_t = torch.tensor(slots_l, dtype=torch.int64)
    new_t = torch.tensor(new_l, dtype=torch.int64)
    starts = cache.lengths.index_select(0, slots_t)
    if int((starts + new_t).max()) > cache.max_len:
        raise ValueError(f"sequence would reach {int((starts + new_t).max())} tokens; cache max_len is {cache.max_len}")
    L = max(new_l)
    P = max(1, int(starts.max()))
    batch_of_tok = torch.arange(B).repeat_interleave(new_t)
    offset = torch.arange(T) - (torch.cumsum(new_t, 0) - new_t)[batch_of_tok]
    pad_index = batch_of_tok * L + offset

    ids = torch.zeros(B * L, dtype=torch.int64)
    ids[pad_index] = input_ids.to(torch.int64).cpu()
    # padded queries repeat the last real position: finite everywhere, their outputs are dropped
    q_off = torch.minimum(torch.arange(L)[None, :], (new_t - 1)[:, None])
    positions = starts[:, None] + q_off  # [B, L]
    past_mask = torch.arange(P)[None, None, :] < starts[:, None, None]  # [B, 1, P]
    new_mask = torch.ones(L, L, dtype=torch.bool).tril()  # query i sees new keys 0..i
    mask = torch.cat((past_mask.expand(B, L, P), new_mask.expand(B, L, L)), dim=2)
    rows = pad_index if logits_indices is None else pad_index.index_select(0, logits_indices.cpu().to(torch.int64))
    return PaddedBatch(
        input_ids=ids.view(B, L), positions=positions, mask=mask, logit_rows=rows.contiguous(), slots=slots_t,
        past_len=P, pad_index=pad_index, tok_slots=slots_t[batch_of_tok], tok_positions=starts[batch_of_tok] + offset,
        num_new=new_t,
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
        return KVCache(self.config, num_slots, max_len, dtype=self.dtype, device=self.device)

    def last_token_indices(self, num_new: Sequence[int]) -> torch.Tensor:
        """Packed row of each sequence's last new token (as Transformer.last_token_indices)."""
        return torch.tensor(num_new, dtype=torch.int64).cumsum(0) - 1

    def _past(self, cache: KVCache, batch: PaddedBatch) -> list[torch.Tensor]:
        """[B, kv_heads, P, D] per layer, K then V, contiguous (a copy: the graph reads dense tensors)."""
        slots = batch.slots.to(self.device)
        P = batch.past_len
        past: list[torch.Tensor] = []
        for layer in range(self.config.num_layers):
            past.append(cache.k[layer].index_select(0, slots)[:, :, :P].contiguous())
            past.append(cache.v[layer].index_select(0, slots)[:, :, :P].contiguous())
        return past

    def _finish(self, cache: KVCache, batch: PaddedBatch, logits: torch.Tensor, new_kv: Sequence[torch.Tensor],
                hidden: dict[int, torch.Tensor], taps: list[int]) -> ForwardOutput:
        """Scatter the new K/V rows into the cache, advance lengths, pack taps back to [T, hidden]."""
        B, L = batch.input_ids.shape
        pad_index = batch.pad_index.to(self.device)
        tok_slots, tok_pos = batch.tok_slots.to(self.device), batch.tok_positions.to(self.device)
        for layer in range(self.config.num_layers):
            for store, new in ((cache.k[layer], new_kv[2 * layer]), (cache.v[layer], new_kv[2 * layer + 1])):
                rows = new.transpose(1, 2).reshape(B * L, self.config.num_kv_heads, self.config.head_dim)
                store[tok_slots, :, tok_pos] = rows.index_select(0, pad_index).to(store.dtype)
        cache.lengths.index_add_(0, batch.slots, batch.num_new)
        packed = {t: hidden[t].reshape(B * L, -1).index_select(0, pad_index) for t in taps}
        return ForwardOutput(logits=logits.float(), hidden_states=packed)
