"""EAGLE-3-style baseline: one autoregressive decoder layer over fused target features.

Pair i feeds the layer [norm(embed(x_{i+1})) ; norm(h_i)] where h_i is the fused low/mid/high
target feature of position i (projected to H). Drafting continues autoregressively with h
replaced by the layer's own output, which training reproduces by unrolling the same steps
("training-time test"). Its context cache therefore needs each committed token's id as well.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.drafters.common import (
    DraftBlock,
    DraftVocabMixin,
    DrafterConfig,
    DrafterLayer,
    DrafterState,
    PlannedLinear,
    SampleFn,
    fused_features,
    gather_context,
    packed_positions,
)
from models.projection import project
from models.transformer import rms_norm


class Eagle3Drafter(DraftVocabMixin, nn.Module):
    def __init__(self, config: DrafterConfig, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        super().__init__()
        if config.kind != "eagle3" or config.num_layers != 1:
            raise ValueError("Eagle3Drafter needs an eagle3 config with num_layers == 1")
        c = self.config = config
        self.embed, self.lm_head = embed, lm_head  # shared with the target, frozen, not saved
        self.fc = PlannedLinear(len(c.tap_layers) * c.hidden_size, c.hidden_size, bias=False)
        self.embed_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.feature_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.layer = DrafterLayer(c, attn_in=2 * c.hidden_size)
        self.norm = nn.Parameter(torch.ones(c.hidden_size))

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return self.config.tap_layers

    def new_state(self, num_slots: int, max_len: int) -> DrafterState:
        p = self.fc.weight
        return DrafterState(self.config, num_slots, max_len, p.dtype, p.device, keep_features=True)

    def pair_input(self, h: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        e = F.embedding(next_tokens, self.embed).to(h.dtype)
        return torch.cat([rms_norm(e, self.embed_norm, eps), rms_norm(h, self.feature_norm, eps)], dim=-1)

    def logits(self, h: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the full vocabulary, or over the rows of ``head`` (the draft vocabulary)."""
        head = self.lm_head if head is None else head
        return project(rms_norm(h, self.norm, self.config.rms_norm_eps), head.to(h.dtype)).float()

    @torch.no_grad()
    def extend_context(self, state: DrafterState, slots: Sequence[int], num_new: Sequence[int],
                       target_hidden: dict[int, torch.Tensor], input_ids: torch.Tensor | None = None) -> None:
        """Append committed tokens: input_ids [T_total] are the tokens the target just ran (packed)."""
        if input_ids is None:
            raise ValueError("the EAGLE-3 drafter needs the committed token ids (input_ids)")
        tok_slot, pos = packed_positions(state.lengths, slots, num_new)
        if int(pos.max()) >= state.max_len:
            raise ValueError(f"drafter context would exceed max_len {state.max_len}")
        dev = self.fc.weight.device
        feats = self.fc(fused_features(target_hidden, self.tap_layers).to(self.fc.weight.dtype))
        state.features[tok_slot, pos] = feats
        # Pair p = (h_p, x_{p+1}) becomes known once x_{p+1} is committed: pairs pos-1 for pos >= 1.
        has_pair = pos >= 1
        pair_slot, pair_pos = tok_slot[has_pair], pos[has_pair] - 1
        if pair_pos.numel():
            a = self.pair_input(state.features[pair_slot, pair_pos], input_ids.to(dev)[has_pair.to(dev)])
            k, v = self.layer.key_values(a, pair_pos.to(dev), normed=False)
            state.k[0][pair_slot, :, pair_pos] = k
            state.v[0][pair_slot, :, pair_pos] = v
        state.lengths.index_add_(0, torch.tensor([int(s) for s in slots]), torch.tensor([int(n) for n in num_new]))

    @torch.no_grad()
    def draft(self, state: DrafterState, slots: Sequence[int], anchor_tokens: torch.Tensor, num_tokens: int,
              sample_fn: SampleFn, greedy: bool = False) -> DraftBlock:
        """Draft num_tokens tokens autoregressively after each slot's anchor (``greedy`` is part of the
        drafter protocol; this drafter has no confidences to calibrate per regime)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        slot_t = torch.tensor([int(s) for s in slots], dtype=torch.int64)
        lengths = state.lengths.index_select(0, slot_t)
        if int(lengths.min()) < 1:
            raise ValueError("every slot needs at least one committed token before drafting")
        dev = self.fc.weight.device
        B, n_ctx = len(slots), int(lengths.max()) - 1  # pairs 0 .. length-2 are cached
        slot_d, lengths_d = slot_t.to(dev), lengths.to(dev)
        ctx_k, ctx_v = gather_context(state, 0, slot_d, n_ctx)
        ctx_mask = torch.arange(n_ctx, device=dev)[None, :] < (lengths_d - 1)[:, None]
        h = state.features[slot_d, lengths_d - 1].unsqueeze(1)  # [B, 1, H]
        prev = anchor_tokens.to(dev, torch.int64)
        tokens, probs = [], []
        for j in range(num_tokens):
            mask = torch.cat([ctx_mask, ctx_mask.new_ones(B, 1)], dim=1).view(B, 1, 1, -1)
            positions = (lengths_d - 1 + j).unsqueeze(1)
            h, k, v = self.layer(h, self.pair_input(h, prev.unsqueeze(1)), positions, ctx_k, ctx_v, mask)
            ctx_k, ctx_v = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
            ctx_mask = torch.cat([ctx_mask, ctx_mask.new_ones(B, 1)], dim=1)
            prev, p = self.sample_draft(self.logits(h[:, 0], self.draft_head()), sample_fn)
            tokens.append(prev)
            probs.append(p)
        return DraftBlock(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1).float(), confidences=None)

    def train_forward(self, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Training-time-test unroll over whole sequences. features [B, S, taps*H], tokens [B, S],
        anchors [B, A] (anchor + block_size < S). Returns logits [B, A, W, Vd] over the draft vocabulary for tokens
        anchor+1..anchor+W, each step fed the previous step's own output as in drafting."""
        B, S = tokens.shape
        W = self.config.block_size
        P = S - 1  # pair i = (h_i, x_{i+1}) for i < S-1
        dev = tokens.device
        h = self.fc(features[:, :P].to(self.fc.weight.dtype))
        idx = torch.arange(P, device=dev)
        causal = idx[None, :] <= idx[:, None]
        diag = torch.eye(P, dtype=torch.bool, device=dev)
        ctx_k = h.new_zeros(B, self.config.num_kv_heads, 0, self.config.head_dim)
        ctx_v = ctx_k
        pair_of_anchor = (anchors - 1).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        out = []
        for s in range(W):
            nxt = tokens[:, (idx + 1 + s).clamp(max=S - 1)]
            # Step 0 keys are causal over pairs; the keys of later unroll steps only on the diagonal.
            mask = torch.cat([causal] + [diag] * s, dim=1).expand(B, 1, P, P * (s + 1))
            h, k, v = self.layer(h, self.pair_input(h, nxt), idx.expand(B, P) + s, ctx_k, ctx_v, mask)
            ctx_k, ctx_v = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
            out.append(self.logits(h.gather(1, pair_of_anchor), self.draft_head()))
        return torch.stack(out, dim=2), None
