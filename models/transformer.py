"""Llama / Qwen2 / Qwen3 decoder with a static KV cache and a packed variable-length forward.

One call processes the new tokens of several sequences packed back to back (prefill, AR decode
and speculative verification are the same call with different ``num_new``). Projections and the
MLP run on the packed ``[total_tokens, hidden]`` rows; attention runs once per group of sequences with
the same number of new tokens, unpadded (``scaled_dot_product_attention`` with a causal boolean mask
where positions differ), so a prefill or a long draft never pads the other sequences' queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.projection import KernelPlan, Linear, measure_kernel_plan

# RoPE tables are built up to this many positions at first and grown on demand.
_INITIAL_ROPE_LEN = 8192


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # float32 [num_selected, vocab]
    # layer index -> [total_tokens, hidden]: output of that decoder layer (residual stream);
    # index num_layers is the output of the final norm (what the LM head reads).
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)


def rope_inv_freq(config: TransformerConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32) and the attention scaling applied to cos/sin."""
    dim = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = float(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor")
        factor = float(factor) if factor is not None else config.max_position_embeddings / orig

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = scaling.get("attention_factor")
        if attn is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        extrap = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        return inv, float(attn)
    raise ValueError(f"unsupported rope scaling {scaling!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm normalised in float32, cast back, then scaled (same rounding order as the HF models)."""
    if x.dtype == torch.float32:
        if weight is None or weight.dim() == 1:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return weight * F.rms_norm(x, (x.shape[-1],), None, eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return y if weight is None else weight * y


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos / sin_signed: [T, 1, D], sin_signed = cat(-sin, sin) over the two halves.

    Same as x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) = roll(x) * sign.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed  # products rounded as in HF (matters in bf16)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.eps = c.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.attn_norm = nn.Parameter(torch.ones(c.hidden_size))
        # q, k, v fused into one matmul; gate and up fused into another.
        self.qkv_proj = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, c.hidden_size))
        self.qkv_bias = nn.Parameter(torch.zeros(self.q_size + 2 * self.kv_size)) if c.attention_bias else None
        self.o_proj = nn.Parameter(torch.empty(c.hidden_size, self.q_size))
        self.o_bias = nn.Parameter(torch.zeros(c.hidden_size)) if c.o_proj_bias else None
        self.q_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.mlp_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * c.intermediate_size, c.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(c.hidden_size, c.intermediate_size))
        self.intermediate_size = c.intermediate_size
        self.linears: dict[str, Linear] | None = None  # set by Transformer.use_kernel_plan

    def use_kernel_plan(self, plan: KernelPlan | None) -> None:
        self.linears = None if plan is None else {
            "qkv": Linear(self.qkv_proj, self.qkv_bias, plan),
            "o": Linear(self.o_proj, self.o_bias, plan),
            "gate_up": Linear(self.gate_up_proj, None, plan),
            "down": Linear(self.down_proj, None, plan),
        }

    def _project(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias) if self.linears is None else self.linears[name](x)

    def _attend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, group: "_AttentionGroup") -> torch.Tensor:
        """Attention of one group's queries ``[Bg * Lq, H, D]`` (row-major: sequence, then new token) over
        their slots' caches; returns ``[Bg * Lq, H * D]``."""
        if group.slot_range is not None:
            s0, s1 = group.slot_range
            keys, values = kc[s0:s1, :, : group.kv_len], vc[s0:s1, :, : group.kv_len]
        else:
            # slice before gathering: copy the live kv_len positions of each slot, not its whole max_len
            keys = kc[:, :, : group.kv_len].index_select(0, group.slots)
            values = vc[:, :, : group.kv_len].index_select(0, group.slots)
        # GQA without repeating K/V: the G query heads sharing a KV head are folded into the query
        # length, giving SDPA [Bg, Hkv, G*Lq, D] queries against [Bg, Hkv, Lk, D] keys.
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        B, Lq, G = group.batch, group.q_len, H // Hkv
        if Lq == 1:
            qg = q.view(B, Hkv, G, D)
        else:
            qg = q.view(B, Lq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Lq, D)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=group.mask)
        if Lq == 1:
            return o.reshape(B, self.q_size)
        return o.view(B, Hkv, G, Lq, D).permute(0, 3, 1, 2, 4).reshape(B * Lq, self.q_size)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, meta: "_BatchMeta") -> torch.Tensor:
        T = x.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        h = rms_norm(x, self.attn_norm, self.eps)
        qkv = self._project("qkv", h, self.qkv_proj, self.qkv_bias)
        # q and k heads side by side: one norm and one RoPE for both
        qk = qkv[:, : self.q_size + self.kv_size].view(T, H + Hkv, D)
        v = qkv[:, self.q_size + self.kv_size :].view(T, Hkv, D)
        if self.q_norm is not None:
            w = torch.cat((self.q_norm.expand(H, D), self.k_norm.expand(Hkv, D)))
            qk = rms_norm(qk, w, self.eps)
        qk = apply_rope(qk, meta.cos, meta.sin)
        q, k = qk[:, :H], qk[:, H:]

        kc, vc = cache.k[layer], cache.v[layer]
        kc[meta.tok_slots, :, meta.positions] = k
        vc[meta.tok_slots, :, meta.positions] = v
        if len(meta.groups) == 1:
            o = self._attend(q, kc, vc, meta.groups[0])
        else:
            o = q.new_empty(T, self.q_size)
            for group in meta.groups:
                o.index_copy_(0, group.tokens, self._attend(q.index_select(0, group.tokens), kc, vc, group))
        x = x + self._project("o", o, self.o_proj, self.o_bias)

        h = rms_norm(x, self.mlp_norm, self.eps)
        gate, up = self._project("gate_up", h, self.gate_up_proj).split(self.intermediate_size, dim=-1)
        return x + self._project("down", F.silu(gate) * up, self.down_proj)


@dataclass
class _AttentionGroup:
    """Sequences of one step with the same number of new tokens: their attention runs as one
    unpadded SDPA call, so a long prefill or draft does not pad every other sequence's queries."""

    batch: int
    q_len: int  # new tokens of each sequence in the group
    kv_len: int  # longest cached length in the group after this call
    slots: torch.Tensor  # [Bg] on the cache device
    slot_range: tuple[int, int] | None  # set when slots are consecutive ascending: slice instead of gather
    tokens: torch.Tensor  # [Bg * q_len] packed rows of the group's tokens, sequence by sequence
    # additive [Bg, 1, G * q_len, kv_len] in the model's dtype (0 seen, -inf hidden), built once per forward
    # (SDPA would convert a bool mask at every layer); None when every query sees every key
    mask: torch.Tensor | None


@dataclass
class _BatchMeta:
    slots_cpu: torch.Tensor  # [B]
    num_new_cpu: torch.Tensor  # [B]
    kv_len: int  # longest cached length after this call
    tok_slots: torch.Tensor  # [T] slot of each packed token
    positions: torch.Tensor  # [T] absolute position of each packed token
    groups: list[_AttentionGroup]
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D], first half negated (see apply_rope)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = None if config.tie_word_embeddings else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size)
        )
        with torch.device("cpu"):  # also when the module is built on the meta device
            self._inv_freq, self._attn_scaling = rope_inv_freq(config)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._lm_head: Linear | None = None

    def weight_matrices(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every (weight, bias) a step multiplies, in forward order: what a kernel plan is measured on."""
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for layer in self.layers:
            out += [(layer.qkv_proj, layer.qkv_bias), (layer.o_proj, layer.o_bias),
                    (layer.gate_up_proj, None), (layer.down_proj, None)]
        return [(w.detach(), None if b is None else b.detach()) for w, b in out] + [(self.lm_head_weight.detach(), None)]

    def use_kernel_plan(self, plan: KernelPlan | None) -> None:
        """Serve the projections through `plan` (inference only: kernels hold detached, possibly
        repacked copies, so call it again after the weights change); None = plain F.linear."""
        for layer in self.layers:
            layer.use_kernel_plan(plan)
        self._lm_head = None if plan is None else Linear(self.lm_head_weight, None, plan)

    @property
    def kernel_plan(self) -> KernelPlan | None:
        return None if self._lm_head is None else self._lm_head.plan

    def measure_kernel_plan(self) -> KernelPlan:
        return measure_kernel_plan(self.weight_matrices())

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        """A KV cache with the weights' dtype and device."""
        self._rope_tables(max_len)
        return KVCache(self.config, num_slots, max_len, dtype=self.dtype, device=self.device)

    def _rope_tables(self, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self._cos
        if cos is None or cos.shape[0] < needed or cos.dtype != self.dtype or cos.device != self.device:
            n = max(needed, min(self.config.max_position_embeddings, _INITIAL_ROPE_LEN))
            if cos is not None and cos.shape[0] < needed:
                n = max(n, 2 * cos.shape[0])
            pos = torch.arange(n, dtype=torch.float32, device="cpu")
            freqs = torch.outer(pos, self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * self._attn_scaling).to(device=self.device, dtype=self.dtype)
            sin = freqs.sin() * self._attn_scaling
            self._sin = torch.cat((-sin, sin), dim=-1).to(device=self.device, dtype=self.dtype)
        return self._cos, self._sin

    def _batch_meta(self, slots: Sequence[int], num_new: Sequence[int], total: int, cache: KVCache) -> _BatchMeta:
        B = len(slots)
        if B == 0 or len(num_new) != B:
            raise ValueError(f"need one num_new per slot, got slots={list(slots)} num_new={list(num_new)}")
        slots_l = [int(s) for s in slots]
        new_l = [int(n) for n in num_new]
        if len(set(slots_l)) != B:
            raise ValueError(f"duplicate slots in {slots_l}")
        if min(new_l) < 1:
            raise ValueError(f"every sequence needs at least one new token, got num_new={new_l}")
        if sum(new_l) != total:
            raise ValueError(f"input_ids has {total} tokens but sum(num_new) = {sum(new_l)}")
        slots_cpu = torch.tensor(slots_l, dtype=torch.int64)
        starts_l = cache.lengths.index_select(0, slots_cpu).tolist()
        ends = [s + n for s, n in zip(starts_l, new_l)]
        kv_len = max(ends)
        if kv_len > cache.max_len:
            raise ValueError(f"sequence would reach {kv_len} tokens; cache max_len is {cache.max_len}")
        new_cpu = torch.tensor(new_l, dtype=torch.int64)
        first = torch.cumsum(new_cpu, 0) - new_cpu
        batch_of_tok = torch.arange(B).repeat_interleave(new_cpu)
        starts = torch.tensor(starts_l, dtype=torch.int64)
        positions = starts[batch_of_tok] + torch.arange(total) - first[batch_of_tok]
        dev = self.device

        rows_by_len: dict[int, list[int]] = {}
        for row, n in enumerate(new_l):
            rows_by_len.setdefault(n, []).append(row)
        groups = []
        g = self.config.num_queries_per_kv
        for q_len, rows in rows_by_len.items():
            group_slots = [slots_l[r] for r in rows]
            group_starts = torch.tensor([starts_l[r] for r in rows], dtype=torch.int64)
            group_kv = max(ends[r] for r in rows)
            if q_len == 1 and min(ends[r] for r in rows) == group_kv:
                mask = None
            else:
                # query i of sequence b sees keys 0 .. start_b + i
                q_pos = group_starts[:, None] + torch.arange(q_len)[None, :]  # [Bg, q_len]
                mask = torch.arange(group_kv)[None, None, :] <= q_pos[:, :, None]  # [Bg, q_len, kv]
                # queries are laid out [G * q_len] per KV head (see DecoderLayer._attend)
                mask = mask[:, None, None].expand(len(rows), 1, g, q_len, group_kv).reshape(
                    len(rows), 1, g * q_len, group_kv)
                mask = torch.zeros(mask.shape, dtype=self.dtype).masked_fill_(~mask, float("-inf")).to(dev)
            tokens = (first[rows][:, None] + torch.arange(q_len)[None, :]).reshape(-1)
            consecutive = group_slots == list(range(group_slots[0], group_slots[0] + len(rows)))
            groups.append(_AttentionGroup(
                batch=len(rows), q_len=q_len, kv_len=group_kv, slots=torch.tensor(group_slots).to(dev),
                slot_range=(group_slots[0], group_slots[0] + len(rows)) if consecutive else None,
                tokens=tokens.to(dev), mask=mask))

        cos_t, sin_t = self._rope_tables(kv_len)
        positions_d = positions.to(dev)
        return _BatchMeta(
            slots_cpu=slots_cpu,
            num_new_cpu=new_cpu,
            kv_len=kv_len,
            tok_slots=slots_cpu[batch_of_tok].to(dev),
            positions=positions_d,
            groups=groups,
            cos=cos_t[positions_d].unsqueeze(1),
            sin=sin_t[positions_d].unsqueeze(1),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        slots: Sequence[int],
        num_new: Sequence[int],
        cache: KVCache,
        logits_indices: torch.Tensor | None = None,
        tap_layers: Sequence[int] = (),
    ) -> ForwardOutput:
        """Run the new tokens of several cached sequences packed back to back.

        input_ids: int64 [sum(num_new)]; the first num_new[0] tokens extend slot slots[0], and so on.
        logits_indices: packed rows that get LM-head logits (None = all rows).
        tap_layers: layer indices whose outputs are returned in ``hidden_states``
        (``num_layers`` = after the final norm).
        """
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D packed tokens, got shape {tuple(input_ids.shape)}")
        n_layers = self.config.num_layers
        taps = set(int(t) for t in tap_layers)
        bad = [t for t in taps if not 0 <= t <= n_layers]
        if bad:
            raise ValueError(f"tap layers {bad} out of range 0..{n_layers}")
        meta = self._batch_meta(slots, num_new, input_ids.shape[0], cache)

        hidden: dict[int, torch.Tensor] = {}
        x = F.embedding(input_ids.to(self.device), self.embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache, meta)
            if i in taps:
                hidden[i] = x
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        if n_layers in taps:
            hidden[n_layers] = x
        cache.lengths.index_add_(0, meta.slots_cpu, meta.num_new_cpu)

        if logits_indices is not None:
            x = x.index_select(0, logits_indices.to(self.device))
        logits = (F.linear(x, self.lm_head_weight) if self._lm_head is None else self._lm_head(x)).float()
        return ForwardOutput(logits=logits, hidden_states=hidden)

    def last_token_indices(self, num_new: Sequence[int]) -> torch.Tensor:
        """Packed row of each sequence's last new token (for logits_indices in prefill / AR decode)."""
        return torch.tensor(num_new, dtype=torch.int64).cumsum(0) - 1
