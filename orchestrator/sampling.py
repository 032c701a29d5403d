"""Per-request sampling: parameter checks, logit warping and seeded draws.

The same ``warp_logits`` is applied to the target's and the drafter's logits, so the
verifier compares two distributions shaped by identical rules; that is what keeps
speculative sampling lossless with temperature, top-k and top-p switched on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.errors import InvalidRequestError, brief

MAX_STOP_STRINGS = 16
MAX_BAD_WORDS = 64
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts 64-bit unsigned seeds


def _is_int(value: object) -> bool:
    """True for real integers; bool is excluded because JSON clients send true/false by mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class SamplingParams:
    """What a client may ask for; ``validate`` guards every field before the engine sees it."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 => greedy (argmax)
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 => off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # no end-of-generation id, and no stop string ending, before this many output tokens
    end_ids: tuple[int, ...] | None = None  # ids that end the generation; None = the model's own
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences the output must never contain

    def __post_init__(self) -> None:
        # lists (as JSON gives them) become the tuples the rules compare with; other types are left to validate
        object.__setattr__(self, "stop", _tupled(self.stop))
        object.__setattr__(self, "end_ids", _tupled(self.end_ids))
        if isinstance(self.bad_words, (list, tuple)):
            object.__setattr__(self, "bad_words", tuple(_tupled(word) for word in self.bad_words))

    @property
    def greedy(self) -> bool:
        """Temperature 0 means deterministic argmax decoding."""
        return self.temperature == 0.0

    def validate(self, max_tokens_limit: int) -> None:
        """Raise InvalidRequestError naming the first bad parameter and its allowed range."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must be an integer in [1, {max_tokens_limit}], got {brief(self.max_tokens)}"
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {brief(self.temperature)}"
            )
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0.0 < self.top_p <= 1.0
        ):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {brief(self.top_p)}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be an integer >= 0 (0 = off), got {brief(self.top_k)}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer in [0, 2**64 - 1] or unset, got {brief(self.seed)}"
            )
        if not isinstance(self.stop, (tuple, list)) or len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop must be a list of at most {MAX_STOP_STRINGS} strings, got "
                + (f"{len(self.stop)}" if isinstance(self.stop, (tuple, list)) else brief(self.stop))
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {brief(s)}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens (min_length) must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {brief(self.min_tokens)}"
            )
        if self.end_ids is not None and (not self.end_ids or not all(_is_int(t) for t in self.end_ids)):
            raise InvalidRequestError(f"end_id must be a token id, got {brief(self.end_ids)}")
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise InvalidRequestError(f"bad_words holds at most {MAX_BAD_WORDS} words, got {len(self.bad_words)}")
        if any(not word or not all(_is_int(t) for t in word) for word in self.bad_words):
            raise InvalidRequestError("bad_words must be non-empty token sequences")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per request: a seeded one draws the same numbers every time (its request replays
    exactly where draft lengths do not follow the load), an unseeded one fresh entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature, top-k and top-p.

    Greedy params give a one-hot of the argmax, so greedy verification is the special case
    of the rejection-sampling rule.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if params.greedy:
        return torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    # Subtract the row max before dividing, and keep the divisor a normal float, so tiny
    # temperatures give -inf and 0 (a one-hot after softmax) rather than inf - inf or 0 / 0.
    temperature = max(params.temperature, torch.finfo(x.dtype).tiny)
    x = (x - x.amax(-1, keepdim=True)) / temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Drop a token once the more likely ones already reach top_p; the top token always stays.
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from_uniform(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from [..., V] unnormalised probabilities, given [...] uniforms in [0, 1).

    Taking the uniforms from the caller lets it fix the order of random draws, which keeps
    results reproducible for a given generator state and independent of the tensor's device.
    Zero-probability tokens are never returned.
    """
    cdf = probs.to(torch.float64).cumsum(-1)
    target = uniform.to(device=cdf.device, dtype=torch.float64) * cdf[..., -1]
    index = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can push u * total onto the total; fall back to the last token with mass.
    vocab = probs.shape[-1]
    last_positive = vocab - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(index, last_positive)


def draw_rows(probs: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """[R, V] warped probabilities -> [R] token ids: the argmax when greedy, else one draw per row,
    consuming exactly one uniform from that row's generator (none when greedy)."""
    if params.greedy:
        return probs.argmax(-1)
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device) for g in generators])
    return sample_from_uniform(probs, uniforms)


def sample_token(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from a [V] distribution, consuming exactly one uniform from ``generator``."""
    if probs.dim() != 1:
        raise ValueError(f"sample_token expects a [V] distribution, got shape {tuple(probs.shape)}")
    uniform = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device)
    return int(sample_from_uniform(probs, uniform).item())


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Next token from [V] logits: argmax when greedy, else a draw from the warped distribution."""
    if params.greedy:
        return int(logits.argmax(-1).item())
    return sample_token(warp_logits(logits, params), generator)
