"""DSpark drafter: a parallel block backbone plus a Markov head and a confidence head.

The backbone drafts a whole block in one pass (anchor token + W-1 mask slots, bidirectional
inside the block, every layer also attending to projected target features of the context).
The Markov head then walks the block left to right adding a low-rank bias W2·W1[x_{k-1}] from
the previous token, so each drafted token has an exact softmax distribution (rejection sampling
stays lossless) while still seeing what was drafted before it. The confidence head predicts
how likely each token is to survive verification, for the scheduler.
"""
from __future__ import annotations

from typing import Callable, Sequence

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
from models.projection import KernelPlan, Linear
from models.transformer import rms_norm

# observe(layer index, attention weights [B, heads, queries, context + queries]): see BlockDrafter.backbone
AttentionObserver = Callable[[int, torch.Tensor], None]
GREEDY, SAMPLED = 0, 1  # rows of the confidence temperatures: the two regimes the server verifies in


class BlockDrafter(DraftVocabMixin, nn.Module):
    """The parallel backbone; DSpark switches on the Markov and confidence heads, DFlash does not."""

    def __init__(self, config: DrafterConfig, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        super().__init__()
        c = self.config = config
        # Shared with the target and frozen: plain attributes, so they stay out of state_dict.
        self.embed, self.lm_head = embed, lm_head
        self.fc = PlannedLinear(len(c.tap_layers) * c.hidden_size, c.hidden_size, bias=False)
        self.context_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.mask_embed = nn.Parameter(torch.randn(c.hidden_size) * 0.02)
        self.layers = nn.ModuleList(DrafterLayer(c) for _ in range(c.num_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        if c.markov_rank:
            self.markov_w1 = nn.Embedding(c.vocab_size, c.markov_rank)
            self.markov_w2 = nn.Linear(c.markov_rank, c.draft_vocab_size or c.vocab_size, bias=False)
            nn.init.normal_(self.markov_w1.weight, std=0.02)
            nn.init.zeros_(self.markov_w2.weight)  # start as the plain backbone
        if c.confidence:
            self.confidence_head = nn.Linear(c.hidden_size + c.markov_rank, 1)
            # Sequential calibration (training.calibration), per regime (row GREEDY: T=0 requests,
            # row SAMPLED: T>0) and block position: sigmoid(z / temperature + bias); 1 and 0 = uncalibrated.
            self.register_buffer("confidence_temperature", torch.ones(2, c.block_size))
            self.register_buffer("confidence_bias", torch.zeros(2, c.block_size))

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return self.config.tap_layers

    def new_state(self, num_slots: int, max_len: int) -> DrafterState:
        p = self.fc.weight
        return DrafterState(self.config, num_slots, max_len, p.dtype, p.device, keep_features=False)

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """Fused target features [..., taps*H] -> the drafter's context vectors [..., H]."""
        return rms_norm(self.fc(features.to(self.fc.weight.dtype)), self.context_norm, self.config.rms_norm_eps)

    @torch.no_grad()
    def extend_context(self, state: DrafterState, slots: Sequence[int], num_new: Sequence[int],
                       target_hidden: dict[int, torch.Tensor], input_ids: torch.Tensor | None = None) -> None:
        """Append the committed tokens' projected features (packed like the target's forward).

        input_ids is part of the shared drafter protocol (EAGLE-3 needs it); the block drafter
        conditions on target features only.
        """
        tok_slot, pos = packed_positions(state.lengths, slots, num_new)
        if int(pos.max()) >= state.max_len:
            raise ValueError(f"drafter context would exceed max_len {state.max_len}")
        ctx = self.context(fused_features(target_hidden, self.tap_layers))
        for i, layer in enumerate(self.layers):
            k, v = layer.key_values(ctx, pos.to(ctx.device))
            state.k[i][tok_slot, :, pos] = k
            state.v[i][tok_slot, :, pos] = v
        state.lengths.index_add_(0, torch.tensor([int(s) for s in slots]), torch.tensor([int(n) for n in num_new]))

    def backbone(self, anchor_tokens: torch.Tensor, anchor_pos: torch.Tensor, ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],
                 ctx_mask: torch.Tensor, observe: AttentionObserver | None = None) -> torch.Tensor:
        """Hidden states [B, A, W, H] of A blocks per row.

        anchor_tokens/anchor_pos: [B, A]; ctx_kv: per layer keys/values [B, kv_heads, S, D];
        ctx_mask: bool [B, A, S], which context positions each block may see. ``observe(layer index,
        attention weights [B, heads, A*W, S + A*W])`` sees each layer's attention (diagnostics).
        """
        B, A = anchor_tokens.shape
        W, H = self.config.block_size, self.config.hidden_size
        x = self.mask_embed.expand(B, A, W, H).clone()
        x[:, :, 0] = F.embedding(anchor_tokens, self.embed).to(x.dtype)
        x = x.view(B, A * W, H)
        positions = (anchor_pos.unsqueeze(-1) + torch.arange(W, device=anchor_pos.device)).view(B, A * W)
        if A == 1 and bool(ctx_mask.all()):
            mask = None  # one block per row and every context position visible (drafting, equal lengths)
        else:
            block_of = torch.arange(A * W, device=x.device) // W
            own = (block_of[:, None] == block_of[None, :]).expand(B, 1, A * W, A * W)
            mask = torch.cat([ctx_mask.repeat_interleave(W, dim=1).unsqueeze(1), own], dim=-1)
        for i, (layer, (k, v)) in enumerate(zip(self.layers, ctx_kv)):
            if observe is not None:
                observe(i, layer.attention_probs(x, positions, k, mask))
            x, _, _ = layer(x, x, positions, k, v, mask)
        return rms_norm(x, self.norm, self.config.rms_norm_eps).view(B, A, W, H)

    def markov_out(self) -> torch.Tensor:
        """W2's rows for the draft vocabulary (all of W2 when trained inside it)."""
        w2 = self.markov_w2.weight
        return w2 if self.config.draft_vocab_size else self.draft_rows(w2)

    def markov_bias(self, prev_tokens: torch.Tensor, w2_rows: torch.Tensor) -> torch.Tensor:
        """Low-rank bias W2·W1[x_{k-1}] over the draft vocabulary (``w2_rows`` = ``markov_out()``)."""
        return F.linear(self.markov_w1(prev_tokens), w2_rows)

    _markov_kernel: Linear | None = None

    def use_kernel_plan(self, plan: KernelPlan | None) -> None:
        super().use_kernel_plan(plan)
        if self.config.markov_rank:
            self._markov_kernel = None if plan is None else Linear(self.markov_out(), None, plan)

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        super().set_draft_vocab(token_ids)
        self._markov_kernel = None  # its rows were the old vocabulary's (as the draft head's kernel)

    def confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Uncalibrated confidence logits from [h_k ; W1[x_{k-1}]]."""
        feats = torch.cat([hidden, self.markov_w1(prev_tokens).to(hidden.dtype)], dim=-1)
        return self.confidence_head(feats).squeeze(-1).float()

    def block_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [..., W, Vd] over the draft vocabulary: backbone logits plus the
        Markov bias of the given previous tokens."""
        logits = F.linear(hidden, self.draft_head().to(hidden.dtype)).float()
        if self.config.markov_rank:
            logits = logits + self.markov_bias(prev_tokens, self.markov_out()).float()
        return logits

    def train_forward(self, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor,
                      observe: AttentionObserver | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training pass over whole sequences: features [B, S, taps*H], tokens [B, S], anchors [B, A]
        (each anchor + block_size < S). Returns logits [B, A, W, Vd] over the draft vocabulary for tokens anchor+1..anchor+W
        and confidence logits [B, A, W] (None without the head); ``observe`` as in ``backbone``."""
        B, S = tokens.shape
        W = self.config.block_size
        ctx = self.context(features)
        pos = torch.arange(S, device=ctx.device).expand(B, S)
        ctx_kv = [tuple(t.transpose(1, 2) for t in layer.key_values(ctx, pos)) for layer in self.layers]
        ctx_mask = torch.arange(S, device=ctx.device)[None, None, :] < anchors.unsqueeze(-1)
        hidden = self.backbone(tokens.gather(1, anchors), anchors, ctx_kv, ctx_mask, observe)
        prev = tokens.gather(1, (anchors.unsqueeze(-1) + torch.arange(W, device=anchors.device)).flatten(1)).view_as(hidden[..., 0])
        logits = self.block_logits(hidden, prev)
        conf = self.confidence_logits(hidden, prev) if self.config.confidence else None
        return logits, conf

    @torch.no_grad()
    def draft(self, state: DrafterState, slots: Sequence[int], anchor_tokens: torch.Tensor, num_tokens: int,
              sample_fn: SampleFn, greedy: bool = False) -> DraftBlock:
        """Propose num_tokens (<= block_size) tokens after each slot's anchor (the last token the target emitted).
        ``greedy`` says the requests verify at T=0: it picks the confidences' calibration, and the block
        then carries no probabilities (greedy verification does not read them)."""
        W = self.config.block_size
        if not 1 <= num_tokens <= W:
            raise ValueError(f"num_tokens must be in 1..{W}, got {num_tokens}")
        slot_t = torch.tensor([int(s) for s in slots], dtype=torch.int64)
        lengths = state.lengths.index_select(0, slot_t)
        if int(lengths.min()) < 1:
            raise ValueError("every slot needs at least one committed token before drafting")
        S = int(lengths.max())
        dev = self.fc.weight.device
        slot_d, lengths_d = slot_t.to(dev), lengths.to(dev)
        ctx_kv = [gather_context(state, i, slot_d, S) for i in range(len(self.layers))]
        ctx_mask = (torch.arange(S, device=dev)[None, :] < lengths_d[:, None]).unsqueeze(1)
        anchors = anchor_tokens.to(dev, torch.int64)
        hidden = self.backbone(anchors.unsqueeze(1), lengths_d.unsqueeze(1), ctx_kv, ctx_mask)[:, 0, :num_tokens]
        base = self.draft_logits(hidden)
        markov = None
        if self.config.markov_rank:
            if (kernel := self._markov_kernel) is not None:  # the planned kernel, W2's draft rows packed once
                markov = lambda logits, prev: logits + kernel(self.markov_w1(prev)).float()  # noqa: E731
            else:
                w2 = self.markov_out()
                markov = lambda logits, prev: logits + self.markov_bias(prev, w2).float()  # noqa: E731
        return self.walk_block(base, anchors, sample_fn, markov, lambda before: self.confidence_logits(hidden, before),
                               greedy)

    def walk_block(self, base: torch.Tensor, anchors: torch.Tensor, sample_fn: SampleFn,
                   markov: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                   confidence_logits: Callable[[torch.Tensor], torch.Tensor], greedy: bool) -> DraftBlock:
        """The left-to-right part of drafting, after the backbone: base logits [B, k, Vd] over the
        draft vocabulary, anchors [B]. ``markov(logits [B, Vd], previous [B])`` adds the Markov bias
        (None without the head); ``confidence_logits(previous [B, k])`` scores the drawn block.

        Only the Markov bias needs the token drawn just before: the loop is that and sampling; the
        confidences and the full-vocabulary probabilities are computed once for the whole block.
        """
        tokens, probs = [], []
        prev = anchors
        for j in range(base.shape[1]):
            logits = base[:, j]
            if markov is not None:
                logits = markov(logits, prev)
            drawn, p = sample_fn(logits)
            prev = self.full_vocab_ids(drawn)
            tokens.append(prev)
            probs.append(p)
        tokens_t = torch.stack(tokens, 1)
        confs = None
        if self.config.confidence:
            before = torch.cat([anchors.unsqueeze(1), tokens_t[:, :-1]], dim=1)  # x_{j-1} of each position
            regime, k = GREEDY if greedy else SAMPLED, tokens_t.shape[1]
            temps, biases = self.confidence_temperature[regime, :k], self.confidence_bias[regime, :k]
            confs = torch.sigmoid(confidence_logits(before) / temps + biases)
        # Greedy verification compares tokens with the target's argmax and never reads q: skip
        # spreading [B, k, V] probabilities over the full vocabulary (most of a round's non-GEMM time).
        full_probs = None if greedy else self.full_vocab_probs(torch.stack(probs, 1)).float()
        return DraftBlock(tokens=tokens_t, probs=full_probs, confidences=confs)


class DSparkDrafter(BlockDrafter):
    """Block drafter with the Markov head and the confidence head (config.kind == "dspark")."""

    def __init__(self, config: DrafterConfig, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        if config.kind != "dspark":
            raise ValueError(f"DSparkDrafter needs a dspark config, got {config.kind!r}")
        super().__init__(config, embed, lm_head)
