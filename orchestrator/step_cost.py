"""The target's measured verify-step cost: seconds for one forward over N tokens (SPS(N) = 1/that).

The load-aware scheduler needs the real curve of this model, runtime, dtype and machine: on a
memory-bound CPU verifying 8 tokens costs little more than 1, on a compute-bound kernel it grows
almost linearly, and the right number of draft tokens to verify differs accordingly.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from models.hardware import measurement_path
from models.transformer import Transformer

DEFAULT_TOKEN_COUNTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
TOKENS_PER_SEQUENCE = 4  # a verify batch: several requests, each its pending token plus a few drafts
# Part of a saved profile's key: bump when the forward's kernels change (2: few-row projections,
# 3: measured kernel plans; 4: round-robin timing, lower monotone envelope), so profiles measured the old
# way are not reused.
FORWARD_REVISION = 4


class StepCost(Protocol):
    """What the scheduler reads: seconds of one target forward over N tokens."""

    def step_seconds(self, n: int) -> float: ...


@dataclass(frozen=True)
class StepCostProfile:
    tokens: tuple[int, ...]     # N: tokens in one target forward, increasing
    seconds: tuple[float, ...]  # median wall time of that forward

    def step_seconds(self, n: int) -> float:
        """Piecewise-linear in N; extrapolated from the last segment beyond the measured range."""
        xs, ys = self.tokens, self.seconds
        n = max(n, xs[0])
        for i in range(1, len(xs)):
            if n <= xs[i] or i == len(xs) - 1:
                slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
                return max(ys[i - 1] + slope * (n - xs[i - 1]), 1e-9)
        return ys[0]

    def steps_per_second(self, n: int) -> float:
        return 1.0 / self.step_seconds(n)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "StepCostProfile":
        data = json.loads(path.read_text())
        return cls(tuple(data["tokens"]), tuple(data["seconds"]))


class OnlineStepCost:
    """The profiled curve, corrected by the engine's measured forward times.

    Other models or processes on the same machine, longer contexts than the profile's, or a warm
    or cold cache make real steps slower or faster than profiled, and not uniformly in N. Each
    measured step updates a moving average of measured / profiled time at the profile's nearest
    measured token count; predictions scale the profile by that bucket's ratio (the overall ratio
    where a bucket has no samples yet).
    """

    def __init__(self, profile: StepCostProfile, weight: float = 0.1) -> None:
        self.profile = profile
        self.weight = weight
        self.ratio = 1.0
        self._bucket_ratio: dict[int, float] = {}

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.profile.tokens

    def _bucket(self, n: int) -> int:
        return min(self.profile.tokens, key=lambda t: abs(t - n))

    def observe(self, tokens: int, seconds: float) -> None:
        ratio = min(max(seconds / self.profile.step_seconds(tokens), 0.1), 10.0)  # one outlier cannot run away
        self.ratio += self.weight * (ratio - self.ratio)
        bucket = self._bucket(tokens)
        old = self._bucket_ratio.get(bucket, self.ratio)
        self._bucket_ratio[bucket] = old + self.weight * (ratio - old)

    def step_seconds(self, n: int) -> float:
        return self.profile.step_seconds(n) * self._bucket_ratio.get(self._bucket(n), self.ratio)

    def steps_per_second(self, n: int) -> float:
        return 1.0 / self.step_seconds(n)


def monotone_envelope(seconds: Sequence[float]) -> list[float]:
    """The cheapest non-decreasing curve under measured medians: cost(N) = min over M >= N of cost(M).

    A step never costs less with more tokens, so a median above a later one is noise (a shared host's
    slow phase hits single shapes); carrying the max forward instead would spread one spike over
    every larger N and make the scheduler refuse drafts it should verify.
    """
    out, low = [], float("inf")
    for value in reversed(seconds):
        low = min(low, value)
        out.append(low)
    return out[::-1]


@torch.inference_mode()
def measure_step_cost(
    model: Transformer,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    context: int = 128,
    repeats: int = 5,
) -> StepCostProfile:
    """Times real forwards: N tokens spread over ceil(N / 4) sequences with `context` cached tokens each.
    Token counts are measured round-robin, repeat by repeat, so a slow phase hits them alike."""
    max_seqs = -(-max(token_counts) // TOKENS_PER_SEQUENCE)
    cache = model.new_cache(max_seqs, context + TOKENS_PER_SEQUENCE)
    slots = [cache.allocate() for _ in range(max_seqs)]
    vocab = model.config.vocab_size
    model(torch.randint(0, vocab, (context * max_seqs,)), slots, [context] * max_seqs, cache)
    times: dict[int, list[float]] = {n: [] for n in token_counts}
    for rep in range(repeats + 1):  # the first round warms every shape up
        for n in token_counts:
            num_new = [TOKENS_PER_SEQUENCE] * (n // TOKENS_PER_SEQUENCE) + (
                [n % TOKENS_PER_SEQUENCE] if n % TOKENS_PER_SEQUENCE else [])
            used = slots[: len(num_new)]
            started = time.perf_counter()
            model(torch.randint(0, vocab, (n,)), used, num_new, cache)
            if rep:
                times[n].append(time.perf_counter() - started)
            for slot in used:
                cache.truncate(slot, context)
    medians = [sorted(times[n])[len(times[n]) // 2] for n in token_counts]
    return StepCostProfile(tuple(token_counts), tuple(monotone_envelope(medians)))


def profile_path(root: Path, model_dir: Path, runtime: str, dtype: str, threads: int) -> Path:
    """Where the profile of this model, runtime, dtype, thread count and machine is kept."""
    return measurement_path(root, model_dir, f"{runtime}-{dtype}-{threads}t", f"rev {FORWARD_REVISION}")


def load_or_measure(path: Path, model: Transformer) -> StepCostProfile:
    """The saved profile, or a fresh measurement saved for next time."""
    if path.exists():
        return StepCostProfile.load(path)
    profile = measure_step_cost(model)
    profile.save(path)
    return profile
