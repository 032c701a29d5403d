"""The target's measured verify-step cost: seconds for one forward over N tokens (SPS(N) = 1/that).

The load-aware scheduler needs the real curve of this model, runtime, dtype and machine: on a
memory-bound CPU verifying 8 tokens costs little more than 1, on a compute-bound kernel it grows
almost linearly, and the right number of draft tokens to verify differs accordingly.

N alone does not set a step's cost. Attention runs per group of sequences with equal new-token
counts, over keys padded to the group's longest context (``B x q x kv`` query-key pairs per group),
and gathering each sequence's cache reads ``B x kv`` positions; eight requests 300 tokens into their answers cost 2-3x what eight new tokens
of short sequences cost. So the profile is SPS(N) measured on a reference shape plus two measured
coefficients for those terms, and the scheduler prices the batch it is actually planning.
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
FORWARD_REVISION = 6  # 5: batch-shape terms (attention, cache gather) beside SPS(N); 6: attention grouped by new tokens


@dataclass(frozen=True)
class BatchShape:
    """What sets a forward's cost besides N: each sequence's new tokens and its context after the step
    (cached + new). Attention runs once per group of sequences with equal new-token counts
    (models.transformer), over keys padded to the group's longest context, after gathering those
    positions of each sequence's cache."""

    rows: tuple[tuple[int, int], ...]  # (new tokens, context after the step) per sequence

    @staticmethod
    def uniform(sequences: int, new: int, context: int) -> "BatchShape":
        """`sequences` sequences of `new` new tokens each, `context` positions after the step."""
        return BatchShape(((new, context),) * sequences)

    @property
    def sequences(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        return sum(new for new, _ in self.rows)

    @property
    def longest_new(self) -> int:
        return max((new for new, _ in self.rows), default=0)

    def _groups(self) -> dict[int, tuple[int, int]]:
        """new-token count -> (sequences, longest context) of its attention group."""
        groups: dict[int, tuple[int, int]] = {}
        for new, context in self.rows:
            count, longest = groups.get(new, (0, 0))
            groups[new] = (count + 1, max(longest, context))
        return groups

    @property
    def attention_pairs(self) -> int:
        return sum(count * new * longest for new, (count, longest) in self._groups().items())

    @property
    def gathered_positions(self) -> int:
        return sum(count * longest for count, longest in self._groups().values())


class StepCost(Protocol):
    """What the scheduler reads: seconds of one target forward over N tokens (of this batch shape)."""

    def step_seconds(self, n: int, shape: BatchShape | None = None) -> float: ...


def reference_shape(n: int, context: int) -> BatchShape:
    """The shape SPS(N) is measured on: N tokens as sequences of TOKENS_PER_SEQUENCE new tokens."""
    full, rest = divmod(n, TOKENS_PER_SEQUENCE)
    return BatchShape(((TOKENS_PER_SEQUENCE, context + TOKENS_PER_SEQUENCE),) * full + (((rest, context + rest),) if rest else ()))


@dataclass(frozen=True)
class StepCostProfile:
    tokens: tuple[int, ...]     # N: tokens in one target forward, increasing
    seconds: tuple[float, ...]  # median wall time of that forward, on reference_shape(N, context)
    attention_s: float = 0.0    # seconds per query-key pair (BatchShape.attention_pairs)
    gather_s: float = 0.0       # seconds per gathered cache position (BatchShape.gathered_positions)
    context: int = 128          # cached tokens per sequence of the reference shapes

    def step_seconds(self, n: int, shape: BatchShape | None = None) -> float:
        """Piecewise-linear in N (extrapolated from the last segment beyond the measured range), moved
        by the shape terms where `shape` differs from the reference shape of N."""
        xs, ys = self.tokens, self.seconds
        m = max(n, xs[0])
        base = ys[0]
        for i in range(1, len(xs)):
            if m <= xs[i] or i == len(xs) - 1:
                slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
                base = ys[i - 1] + slope * (m - xs[i - 1])
                break
        if shape is not None:
            ref = reference_shape(n, self.context)
            base += self.attention_s * (shape.attention_pairs - ref.attention_pairs)
            base += self.gather_s * (shape.gathered_positions - ref.gathered_positions)
        return max(base, 1e-9)

    def steps_per_second(self, n: int) -> float:
        return 1.0 / self.step_seconds(n)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "StepCostProfile":
        data = json.loads(path.read_text())
        return cls(tuple(data["tokens"]), tuple(data["seconds"]), data.get("attention_s", 0.0),
                   data.get("gather_s", 0.0), data.get("context", 128))


class OnlineStepCost:
    """The profiled cost, scaled by how fast the machine runs now: moving averages of measured /
    predicted time over the engine's forwards (each predicted for its own N and batch shape), one for
    plain steps (one new token per sequence) and one for steps that verify drafts.

    Other models or processes on the same machine make every step slower; the shape terms price most of
    what differs between steps, but multi-token steps carry costs the profile's uniform shapes do not
    show (masks, mixed draft lengths), so they get their own ratio. A ratio that is not observed
    (the plan stopped drafting) relaxes towards the other one, so a slow phase that priced drafting out
    cannot keep it out once the machine is fast again.
    """

    RELAX = 0.1  # per observation of the other kind, as a fraction of `weight`

    def __init__(self, profile: StepCostProfile, weight: float = 0.1) -> None:
        self.profile = profile
        self.weight = weight
        self.ratio = 1.0        # plain steps
        self.draft_ratio = 1.0  # steps with more than one new token in some sequence

    def observe(self, tokens: int, seconds: float, shape: BatchShape | None = None) -> None:
        ratio = min(max(seconds / self.profile.step_seconds(tokens, shape), 0.1), 10.0)  # one outlier cannot run away
        if shape is not None and shape.longest_new > 1:
            self.draft_ratio += self.weight * (ratio - self.draft_ratio)
            self.ratio += self.RELAX * self.weight * (self.draft_ratio - self.ratio)
        else:
            self.ratio += self.weight * (ratio - self.ratio)
            self.draft_ratio += self.RELAX * self.weight * (self.ratio - self.draft_ratio)

    def step_seconds(self, n: int, shape: BatchShape | None = None) -> float:
        drafted = shape.longest_new > 1 if shape is not None else n > 1
        return self.profile.step_seconds(n, shape) * (self.draft_ratio if drafted else self.ratio)

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


# (sequences, new tokens each, cached tokens) timed beside the N sweep to price the shape terms: groups
# of equal N, so differences inside a group cancel N's own cost and the fit never leans on the curve
SHAPE_PROBES = (
    (8, 1, 512), (2, 4, 512), (1, 8, 512), (8, 1, 128),
    (16, 1, 512), (4, 4, 512), (2, 8, 512), (16, 1, 128),
    (8, 4, 512), (4, 8, 512), (16, 2, 512), (8, 4, 128),
)


def fit_shape_terms(samples: Sequence[tuple[BatchShape, float]]) -> tuple[float, float]:
    """(attention_s, gather_s) >= 0 from measured (shape, seconds): least squares with one free constant
    per N (the forwards of equal N differ only by attention pairs and gathered positions)."""
    groups: dict[int, list[tuple[BatchShape, float]]] = {}
    for shape, seconds in samples:
        groups.setdefault(shape.tokens, []).append((shape, seconds))
    rows = []
    for members in groups.values():
        if len(members) < 2:
            continue
        mean_a = sum(s.attention_pairs for s, _ in members) / len(members)
        mean_g = sum(s.gathered_positions for s, _ in members) / len(members)
        mean_t = sum(t for _, t in members) / len(members)
        rows += [(s.attention_pairs - mean_a, s.gathered_positions - mean_g, t - mean_t) for s, t in members]
    return _nonnegative_least_squares(rows) if rows else (0.0, 0.0)


def _nonnegative_least_squares(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """min ||a x1 + b x2 - y|| over x >= 0, two unknowns: the unconstrained solution, else the best of
    each one alone (clipped at 0)."""
    A = torch.tensor([(a, b) for a, b, _ in rows], dtype=torch.float64)
    y = torch.tensor([v for _, _, v in rows], dtype=torch.float64)[:, None]
    both = torch.linalg.lstsq(A, y).solution[:, 0].tolist()
    if min(both) >= 0:
        return both[0], both[1]
    candidates = []
    for j in range(2):
        col = A[:, j]
        x = max(float(col @ y[:, 0]) / max(float(col @ col), 1e-30), 0.0)
        fit = [x if k == j else 0.0 for k in range(2)]
        candidates.append((float(((A @ torch.tensor(fit, dtype=torch.float64)) - y[:, 0]).square().sum()), fit))
    best = min(candidates)[1]
    return best[0], best[1]


@torch.inference_mode()
def measure_step_cost(
    model: Transformer,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    context: int = 128,
    repeats: int = 5,
    shape_probes: Sequence[tuple[int, int, int]] = SHAPE_PROBES,
) -> StepCostProfile:
    """Times real forwards: SPS(N) on reference shapes (N tokens spread over ceil(N / 4) sequences with
    `context` cached tokens each), then `shape_probes` to price attention and cache gathers. Each
    context's sequences are prefilled once; shapes are timed round-robin, repeat by repeat, so a slow
    phase hits them alike."""
    ref_seqs = -(-max(token_counts) // TOKENS_PER_SEQUENCE)
    # one pool of sequences per context, filled once; used in descending slot order so the forward
    # gathers their caches, as in a server whose requests come and go
    needed = {context: ref_seqs}
    for b, _, c in shape_probes:
        needed[c] = max(needed.get(c, 0), b)
    longest = max(c for c in needed) + max([TOKENS_PER_SEQUENCE] + [q for _, q, _ in shape_probes])
    cache = model.new_cache(sum(needed.values()), longest)
    vocab = model.config.vocab_size
    pools: dict[int, list[int]] = {}
    for c, count in needed.items():
        pools[c] = [cache.allocate() for _ in range(count)]
        model(torch.randint(0, vocab, (c * count,)), pools[c], [c] * count, cache)

    def shapes_of(n: int) -> list[int]:
        return [TOKENS_PER_SEQUENCE] * (n // TOKENS_PER_SEQUENCE) + (
            [n % TOKENS_PER_SEQUENCE] if n % TOKENS_PER_SEQUENCE else [])

    jobs: list[tuple[object, list[int], list[int], int]] = []  # (key, slots, new tokens, cached)
    for n in token_counts:
        new = shapes_of(n)
        jobs.append((n, pools[context][: len(new)][::-1], new, context))
    for probe in shape_probes:
        b, q, c = probe
        jobs.append((probe, pools[c][:b][::-1], [q] * b, c))
    times: dict[object, list[float]] = {key: [] for key, *_ in jobs}
    for rep in range(repeats + 1):  # the first round warms every shape up
        for key, used, new, length in jobs:
            started = time.perf_counter()
            model(torch.randint(0, vocab, (sum(new),)), used, new, cache)
            if rep:
                times[key].append(time.perf_counter() - started)
            for slot in used:
                cache.truncate(slot, length)

    def median(key: object) -> float:
        return sorted(times[key])[len(times[key]) // 2]

    curve = StepCostProfile(tuple(token_counts), tuple(monotone_envelope([median(n) for n in token_counts])),
                            context=context)
    attention_s, gather_s = fit_shape_terms([(BatchShape.uniform(b, q, c + q), median((b, q, c))) for b, q, c in shape_probes])
    return StepCostProfile(curve.tokens, curve.seconds, attention_s, gather_s, context)


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
