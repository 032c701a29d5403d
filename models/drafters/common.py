"""Pieces every drafter shares: config, the per-slot context cache, one decoder layer, sampling hooks.

The drafters never own the target's embedding matrix or LM head: they receive the target's
frozen tensors at construction, so checkpoints hold only what training changed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.projection import KernelPlan, Linear, project
from models.transformer import apply_rope, rms_norm

# sample_fn(logits [B, V]) -> (tokens [B], probs [B, V]): the engine's own warping and draw.
SampleFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

DRAFTER_KINDS = ("dspark", "dflash", "eagle3")


@dataclass(frozen=True)
class DrafterConfig:
    """Architecture of a drafter; saved next to its weights as config.json."""

    kind: str  # "dspark" | "dflash" | "eagle3"
    vocab_size: int
    hidden_size: int  # equals the target's (shared embeddings and LM head)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tap_layers: tuple[int, ...]  # target layers whose outputs are fused into the context features
    block_size: int = 7
    markov_rank: int = 0  # 0 = no Markov head
    confidence: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    target: str = ""  # name of the target this drafter was trained for
    # > 0: trained inside a draft vocabulary of this many tokens (its ids ship with the weights,
    # the Markov head's output rows cover only them); 0: trained on the full vocabulary.
    draft_vocab_size: int = 0
    extra: dict = field(default_factory=dict)  # training provenance, not used by the model
    # "standard": rotary positions; "unsigned_sin": the first drafters' transform, which added
    # rotate_half(x) * sin without its sign (not a rotation: scores depended on absolute positions
    # and some key pairs collapsed). Checkpoints saved before this field load as "unsigned_sin".
    rope: str = "standard"
    # Per-head RMSNorm on queries and keys before RoPE, as the DSpark paper's Qwen3 drafters have. On
    # Qwen2.5-Coder-1.5B it added +0.11 held-out greedy tokens per round at step 300 (1.243 -> 1.355,
    # CE weight 1). Checkpoints saved before this field load with it off.
    qk_norm: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"unknown drafter kind {self.kind!r}; expected one of {DRAFTER_KINDS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.kind == "dspark" and (self.markov_rank < 1 or not self.confidence):
            raise ValueError("a dspark drafter needs markov_rank >= 1 and the confidence head")
        if self.kind != "dspark" and (self.markov_rank or self.confidence):
            raise ValueError(f"a {self.kind} drafter has no Markov or confidence head")
        if self.rope not in ("standard", "unsigned_sin"):
            raise ValueError(f"rope must be 'standard' or 'unsigned_sin', got {self.rope!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DrafterConfig":
        data = json.loads(text)
        data["tap_layers"] = tuple(data["tap_layers"])
        data.setdefault("rope", "unsigned_sin")  # saved before the field: trained with that transform
        data.setdefault("qk_norm", False)  # saved before the field: trained without
        return cls(**data)


@dataclass
class DraftBlock:
    """What one draft call proposes for B requests."""

    tokens: torch.Tensor  # int64 [B, k]
    probs: torch.Tensor | None  # float32 [B, k, V]: the distribution each token was drawn from (None: greedy)
    confidences: torch.Tensor | None  # float32 [B, k] in (0, 1); None for the baselines


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax with one-hot probabilities: the T=0 sample_fn."""
    tokens = logits.argmax(-1)
    return tokens, torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, tokens.unsqueeze(-1), 1.0)


class DrafterState:
    """Per-slot cache of the drafter's context keys/values (and, for EAGLE-3, fused features).

    ``lengths[slot]`` counts the committed tokens whose target features are cached; positions
    beyond it are stale and masked, so ``truncate`` is just a length change.
    """

    def __init__(self, config: DrafterConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, keep_features: bool) -> None:
        c = config
        shape = (c.num_layers, num_slots, c.num_kv_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.features = torch.zeros(num_slots, max_len, c.hidden_size, dtype=dtype, device=device) if keep_features else None
        self.lengths = torch.zeros(num_slots, dtype=torch.int64)
        self.max_len = max_len

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` committed tokens of a slot (rollback after verification)."""
        current = int(self.lengths[slot])
        if not 0 <= length <= current:
            raise ValueError(f"cannot truncate slot {slot} of length {current} to {length}")
        self.lengths[slot] = length

    def free(self, slot: int) -> None:
        """Forget a finished request's context."""
        self.lengths[slot] = 0


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., head_dim] for integer positions of any shape, as models.transformer.apply_rope
    takes them: sin = cat(-sin, sin) over the two halves (``signed=False``: (sin, sin), see DrafterConfig.rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1) if signed else emb.sin()
    return emb.cos().to(dtype), sin.to(dtype)


def packed_positions(lengths: torch.Tensor, slots: Sequence[int], num_new: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot and absolute position of each packed new token (the target's packing order)."""
    counts = torch.tensor([int(n) for n in num_new], dtype=torch.int64)
    slot_t = torch.tensor([int(s) for s in slots], dtype=torch.int64)
    tok_slot = slot_t.repeat_interleave(counts)
    first = torch.cumsum(counts, 0) - counts
    offset = torch.arange(int(counts.sum())) - first.repeat_interleave(counts)
    return tok_slot, lengths[tok_slot] + offset


class PlannedLinear(nn.Linear):
    """``nn.Linear`` that serves inference through a kernel plan once one is set (see
    ``models.projection``): a drafter's few-row projections then take the target's fast kernels
    (oneDNN's prepacked bf16 GEMM is ~1.4x F.linear at 1-8 rows on AVX512-BF16 CPUs)."""

    kernel: Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.kernel is None else self.kernel(x)


class DrafterLayer(nn.Module):
    """Pre-norm decoder layer whose attention also sees precomputed context keys/values."""

    def __init__(self, config: DrafterConfig, attn_in: int | None = None) -> None:
        super().__init__()
        c = config
        attn_in = attn_in or c.hidden_size
        self.eps, self.theta, self.signed_rope = c.rms_norm_eps, c.rope_theta, c.rope == "standard"
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.attn_norm = nn.Parameter(torch.ones(attn_in))
        self.q_proj = PlannedLinear(attn_in, c.num_heads * c.head_dim, bias=False)
        self.k_proj = PlannedLinear(attn_in, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = PlannedLinear(attn_in, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = PlannedLinear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.mlp_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.gate_up = PlannedLinear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down = PlannedLinear(c.intermediate_size, c.hidden_size, bias=False)
        self._qkv: Linear | None = None  # q, k and v in one kernel call (set by fuse_projections)
        self._kv: Linear | None = None
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin for positions 0..n-1

    def fuse_projections(self, plan: KernelPlan | None) -> None:
        """q/k/v (and k/v for the context) as one fused weight through ``plan``, so a drafting round
        makes one kernel call where it made three. Inference only; None unfuses."""
        q, k, v = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        self._qkv = None if plan is None else Linear(torch.cat([q, k, v]), None, plan)
        self._kv = None if plan is None else Linear(torch.cat([k, v]), None, plan)

    def key_values(self, a: torch.Tensor, positions: torch.Tensor, normed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (RoPE applied) and values [..., kv_heads, D] for inputs a [..., attn_in] at positions [...]."""
        if not normed:
            a = rms_norm(a, self.attn_norm, self.eps)
        if self._kv is not None:
            k, v = self._kv(a).unflatten(-1, (2 * self.num_kv_heads, self.head_dim)).chunk(2, dim=-2)
        else:
            k = self.k_proj(a).unflatten(-1, (self.num_kv_heads, self.head_dim))
            v = self.v_proj(a).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm, self.eps)
        cos, sin = self.rope_cos_sin(positions, k.dtype)
        return apply_rope(k, cos, sin), v

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Positions applied to heads x [..., heads, D] at positions [...] (see DrafterConfig.rope),
        the tables computed from the positions (the form graph export traces)."""
        cos, sin = rope_tables(positions, self.head_dim, self.theta, x.dtype, self.signed_rope)
        return apply_rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2))

    def rope_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., 1, D] for positions [...], read from a table that grows by doubling:
        the same values as ``rope``'s, without recomputing them for every call of a drafting round."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        table = self._rope_table
        if table is None or table[0].shape[0] < needed or table[0].dtype != dtype or table[0].device != positions.device:
            size = max(256, 1 << (needed - 1).bit_length())
            table = self._rope_table = rope_tables(torch.arange(size, device=positions.device), self.head_dim, self.theta,
                                                   dtype, self.signed_rope)
        return table[0][positions].unsqueeze(-2), table[1][positions].unsqueeze(-2)

    def _heads(self, a: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, Q, H, D] and keys/values [B, kv_heads, Q, D] (RoPE applied) of attention inputs a [B, Q, attn_in]."""
        a = rms_norm(a, self.attn_norm, self.eps)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self._qkv is not None:
            q, k, v = self._qkv(a).unflatten(-1, (H + 2 * Hkv, D)).split([H, Hkv, Hkv], dim=-2)
        else:
            q = self.q_proj(a).unflatten(-1, (H, D))
            k = self.k_proj(a).unflatten(-1, (Hkv, D))
            v = self.v_proj(a).unflatten(-1, (Hkv, D))
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        cos, sin = self.rope_cos_sin(positions, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def attention_probs(self, a: torch.Tensor, positions: torch.Tensor, ctx_k: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """The attention weights forward() uses, [B, H, Q, S + Q] over context then own keys (float32);
        arguments as forward's. For diagnostics: where the drafter looks."""
        q, k, _ = self._heads(a, positions)
        keys = torch.cat([ctx_k, k], dim=2).repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scores = torch.einsum("bqhd,bhkd->bhqk", q.float(), keys.float()) / self.head_dim ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, x: torch.Tensor, a: torch.Tensor, positions: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: residual [B, Q, H]; a: attention input [B, Q, attn_in]; ctx_k/v: [B, kv_heads, S, D];
        mask: bool [B, 1, Q, S + Q] over context then these queries' own keys (None: all visible).
        Returns the new residual and this call's own keys/values [B, kv_heads, Q, D]."""
        B, Q = x.shape[:2]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self._heads(a, positions)
        keys = torch.cat([ctx_k, k], dim=2)
        values = torch.cat([ctx_v, v], dim=2)
        # GQA without repeating K/V: the G query heads sharing a KV head are folded into the query
        # length ([B, Hkv, G*Q, D] against [B, Hkv, S+Q, D]), measured ~1.6x SDPA's enable_gqa here.
        G = H // Hkv
        qg = q.view(B, Q, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Q, D)
        if mask is not None and G > 1:
            mask = mask.unsqueeze(2).expand(B, 1, G, Q, mask.shape[-1]).reshape(B, 1, G * Q, mask.shape[-1])
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        x = x + self.o_proj(o.view(B, Hkv, G, Q, D).permute(0, 3, 1, 2, 4).reshape(B, Q, H * D))
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up), k, v


def fused_features(target_hidden: dict[int, torch.Tensor], tap_layers: Sequence[int]) -> torch.Tensor:
    """Concatenate the tapped target layers [..., len(taps) * H] in tap order."""
    missing = [t for t in tap_layers if t not in target_hidden]
    if missing:
        raise KeyError(f"target hidden states lack tapped layers {missing}")
    return torch.cat([target_hidden[t] for t in tap_layers], dim=-1)


def gather_context(state: DrafterState, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Context keys/values [B, kv_heads, length, D] of the given slots (sliced before the gather, which
    then copies `length` positions per slot rather than the state's whole max_len)."""
    return (state.k[layer][:, :, :length].index_select(0, slots),
            state.v[layer][:, :, :length].index_select(0, slots))


class DraftVocabMixin:
    """Drafting over a subset of the vocabulary: the target's most frequent answer tokens.

    A drafter's LM head over SmolLM2's 49k tokens streams 113 MB of fp32 weights per draft on a
    CPU, which made drafting cost most of a target step; over the top 8k tokens it streams 19 MB.
    The proposal stays an exact distribution (zero outside the subset), so verification is still
    lossless; tokens outside the subset are simply never proposed. A drafter trained inside the
    subset (``config.draft_vocab_size``) scores exactly what it serves, and its training step
    skips 5/6 of the LM head.
    """

    config: DrafterConfig
    lm_head: torch.Tensor
    draft_vocab: torch.Tensor | None = None  # int64 token ids, sorted; None = the full vocabulary
    _draft_head: torch.Tensor | None = None

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        if token_ids is not None:
            token_ids = torch.unique(token_ids.to(torch.int64))  # sorted, no repeats
            if token_ids.numel() == 0 or int(token_ids[0]) < 0 or int(token_ids[-1]) >= self.config.vocab_size:
                raise ValueError(f"draft vocabulary ids must be in 0..{self.config.vocab_size - 1}")
        size = self.config.draft_vocab_size
        if size and (token_ids is None or token_ids.numel() != size):
            raise ValueError(f"this drafter was trained inside a draft vocabulary of {size} tokens; it needs exactly that many")
        self.draft_vocab, self._draft_head, self._head_kernel = token_ids, None, None

    def draft_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of a [vocab, ...] weight that drafting scores."""
        return weight if self.draft_vocab is None else weight.index_select(0, self.draft_vocab.to(weight.device))

    def draft_head(self) -> torch.Tensor:
        """The LM head restricted to the draft vocabulary (cached; the target's head is frozen)."""
        head = self._draft_head
        if head is None or head.dtype != self.lm_head.dtype or head.device != self.lm_head.device:
            head = self._draft_head = self.draft_rows(self.lm_head)
        return head

    _head_kernel: Linear | None = None

    def use_kernel_plan(self, plan: KernelPlan | None) -> None:
        """Serve drafting's projections (layers, context, draft head) through ``plan``, the target's
        measured few-row kernels. Inference only (kernels hold detached copies): call again after
        the weights or the draft vocabulary change; None returns to F.linear."""
        for module in self.modules():
            if isinstance(module, PlannedLinear):
                module.kernel = None if plan is None else Linear(module.weight, module.bias, plan)
            elif isinstance(module, DrafterLayer):
                module.fuse_projections(plan)
        self._head_kernel = None if plan is None else Linear(self.draft_head(), None, plan)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the draft vocabulary [..., Vd] for drafting's hidden states [..., H]."""
        if self._head_kernel is not None:
            return self._head_kernel(hidden).float()
        return project(hidden, self.draft_head().to(hidden.dtype)).float()

    def to_draft_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> their index in the draft vocabulary, -1 for tokens outside it."""
        if self.draft_vocab is None:
            return token_ids
        vocab = self.draft_vocab.to(token_ids.device)
        idx = torch.searchsorted(vocab, token_ids).clamp(max=vocab.numel() - 1)
        return torch.where(vocab[idx] == token_ids, idx, torch.full_like(idx, -1))

    def sample_draft(self, logits: torch.Tensor, sample_fn: SampleFn) -> tuple[torch.Tensor, torch.Tensor]:
        """sample_fn over draft-vocabulary logits [B, Vd] -> token ids and probabilities over the full vocabulary."""
        tokens, probs = sample_fn(logits)
        return self.full_vocab_ids(tokens), self.full_vocab_probs(probs)

    def full_vocab_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> full-vocabulary token ids (any shape)."""
        return tokens if self.draft_vocab is None else self.draft_vocab.to(tokens.device)[tokens]

    def full_vocab_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities over the draft vocabulary [..., Vd] -> over the full vocabulary [..., V] (zero outside)."""
        if self.draft_vocab is None:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.config.vocab_size)
        return full.index_copy_(-1, self.draft_vocab.to(probs.device), probs)
