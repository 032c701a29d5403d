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

import functools
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
FORWARD_REVISION = 6  # 5: batch-shape terms (attention, cache gather) beside SPS(N); 6: attention per group


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

    @functools.cached_property
    def _groups(self) -> dict[int, tuple[int, int]]:
        """new-token count -> (sequences, longest context) of its attention group."""
        groups: dict[int, tuple[int, int]] = {}
        for new, context in self.rows:
            count, longest = groups.get(new, (0, 0))
            groups[new] = (count + 1, max(longest, context))
        return groups

    @property
    def attention_pairs(self) -> int:
        return sum(count * new * longest for new, (count, longest) in self._groups.items())

    @property
    def gathered_positions(self) -> int:
        return sum(count * longest for count, longest in self._groups.values())

    @property
    def attention_groups(self) -> int:
        """Attention calls per layer (each with its own cache gather, query gather and output scatter)."""
        return len(self._groups)


class StepCost(Protocol):
    """What the scheduler reads: seconds of one target forward over N tokens (of this batch shape)."""

    def step_seconds(self, n: int, shape: BatchShape | None = None) -> float: ...


def reference_shape(n: int, context: int) -> BatchShape:
    """The shape SPS(N) is measured on: N tokens as sequences of TOKENS_PER_SEQUENCE new tokens."""
    full, rest = divmod(n, TOKENS_PER_SEQUENCE)
    return BatchShape(((TOKENS_PER_SEQUENCE, context + TOKENS_PER_SEQUENCE),) * full + (((rest, context + rest),) if rest else ()))


@functools.lru_cache(maxsize=1024)
def _reference_terms(n: int, context: int) -> tuple[int, int, int]:
    """The shape terms of reference_shape(n, context): the scheduler prices hundreds of candidate
    batches a step against the same few references."""
    ref = reference_shape(n, context)
    return ref.attention_pairs, ref.gathered_positions, ref.attention_groups


@dataclass(frozen=True)
class StepCostProfile:
    tokens: tuple[int, ...]     # N: tokens in one target forward, increasing
    seconds: tuple[float, ...]  # fastest wall time of that forward, on reference_shape(N, context)
    attention_s: float = 0.0    # seconds per query-key pair (BatchShape.attention_pairs)
    gather_s: float = 0.0       # seconds per gathered cache position (BatchShape.gathered_positions)
    group_s: float = 0.0        # seconds per attention group beyond the first (BatchShape.attention_groups)
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
            pairs, gathered, groups = _reference_terms(n, self.context)
            base += self.attention_s * (shape.attention_pairs - pairs)
            base += self.gather_s * (shape.gathered_positions - gathered)
            base += self.group_s * (shape.attention_groups - groups)
        return max(base, 1e-9)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "StepCostProfile":
        data = json.loads(path.read_text())
        return cls(tuple(data["tokens"]), tuple(data["seconds"]), data.get("attention_s", 0.0),
                   data.get("gather_s", 0.0), data.get("group_s", 0.0), data.get("context", 128))


class OnlineStepCost:
    """The profiled cost, scaled by how fast the machine runs now: a moving average of measured /
    predicted time over the engine's forwards, each predicted for its own N and batch shape. Other
    models or processes on the same machine make every step slower alike.

    One ratio for all steps. Steps that verify drafts do run somewhat above their prediction (masks,
    mixed draft lengths: 1.13-1.28x at c=8 while plain steps ran 1.08x), but a ratio of their own
    priced the first draft token as the jump between the two ratios: after slow first steps
    (kernel set-up) it stood at 4.2 against 1.9 for plain steps, so a lone request stopped verifying
    drafted tokens that survive 58% of the time. Pooled, the two kinds err by a few percent each.
    """

    def __init__(self, profile: StepCostProfile, weight: float = 0.1) -> None:
        self.profile = profile
        self.weight = weight
        self.ratio = 1.0
        self.measured = False  # the first observation sets the ratio outright (1.0 is a guess)

    def observe(self, tokens: int, seconds: float, shape: BatchShape | None = None) -> None:
        ratio = min(max(seconds / self.profile.step_seconds(tokens, shape), 0.1), 10.0)  # one outlier cannot run away
        self.ratio = self.ratio + self.weight * (ratio - self.ratio) if self.measured else ratio
        self.measured = True

    def step_seconds(self, n: int, shape: BatchShape | None = None) -> float:
        return self.profile.step_seconds(n, shape) * self.ratio


def monotone_envelope(seconds: Sequence[float]) -> list[float]:
    """The cheapest non-decreasing curve under measured times: cost(N) = min over M >= N of cost(M).

    A step never costs less with more tokens, so a time above a later one is noise (a shared host's
    slow phase hits single shapes); carrying the max forward instead would spread one spike over
    every larger N and make the scheduler refuse drafts it should verify.
    """
    out, low = [], float("inf")
    for value in reversed(seconds):
        low = min(low, value)
        out.append(low)
    return out[::-1]


# Batch shapes timed beside the N sweep to price the shape terms, as (new tokens, cached tokens) per
# sequence: groups of equal N, so differences inside a group cancel N's own cost and the fit never leans
# on the curve; uniform shapes vary attention and gathers, mixed ones the number of attention groups.
def _uniform(sequences: int, new: int, cached: int) -> tuple[tuple[int, int], ...]:
    return ((new, cached),) * sequences


def _rows(new: Sequence[int], cached: int) -> tuple[tuple[int, int], ...]:
    return tuple((n, cached) for n in new)


SHAPE_PROBES: tuple[tuple[tuple[int, int], ...], ...] = (
    _uniform(8, 1, 512), _uniform(2, 4, 512), _uniform(1, 8, 512), _uniform(8, 1, 128),
    _uniform(16, 1, 512), _uniform(4, 4, 512), _uniform(2, 8, 512), _uniform(16, 1, 128),
    _uniform(8, 4, 512), _uniform(4, 8, 512), _uniform(16, 2, 512), _uniform(8, 4, 128),
    # the same 8 sequences and tokens in 1 to 7 attention groups: only the group count differs
    _uniform(8, 2, 512), _rows([1, 3] * 4, 512), _rows([1, 1, 2, 2, 2, 2, 3, 3], 512), _rows([1, 2, 3, 5, 1, 1, 2, 1], 512),
    _rows([1, 7] * 4, 512), _rows([1, 2, 3, 4, 5, 6, 7, 4], 512),
)
SHAPE_TERMS = ("attention_pairs", "gathered_positions", "attention_groups")


def fit_shape_terms(samples: Sequence[tuple[BatchShape, float]]) -> tuple[float, ...]:
    """(attention_s, gather_s, group_s) >= 0 from measured (shape, seconds): least squares with one free
    constant per N (the forwards of equal N differ only by the shape terms)."""
    groups: dict[int, list[tuple[BatchShape, float]]] = {}
    for shape, seconds in samples:
        groups.setdefault(shape.tokens, []).append((shape, seconds))
    rows = []
    for members in groups.values():
        if len(members) < 2:
            continue
        terms = [[float(getattr(s, t)) for t in SHAPE_TERMS] for s, _ in members]
        means = [sum(col) / len(members) for col in zip(*terms)]
        mean_t = sum(t for _, t in members) / len(members)
        rows += [([x - m for x, m in zip(xs, means)], t - mean_t) for xs, (_, t) in zip(terms, members)]
    return _nonnegative_least_squares(rows) if rows else (0.0,) * len(SHAPE_TERMS)


def _nonnegative_least_squares(rows: Sequence[tuple[Sequence[float], float]]) -> tuple[float, ...]:
    """min ||A x - y|| over x >= 0 for a few unknowns: the best unconstrained solution over each subset
    of terms (the others held at 0) that comes out nonnegative."""
    A = torch.tensor([list(xs) for xs, _ in rows], dtype=torch.float64)
    y = torch.tensor([v for _, v in rows], dtype=torch.float64)
    k = A.shape[1]
    best: tuple[float, list[float]] = (float(y.square().sum()), [0.0] * k)
    for subset in range(1, 2 ** k):
        cols = [j for j in range(k) if subset >> j & 1]
        solution = torch.linalg.lstsq(A[:, cols], y[:, None]).solution[:, 0]
        if float(solution.min()) < 0:
            continue
        fit = [0.0] * k
        for j, x in zip(cols, solution.tolist()):
            fit[j] = x
        residual = float((A @ torch.tensor(fit, dtype=torch.float64) - y).square().sum())
        if residual < best[0]:
            best = (residual, fit)
    return tuple(best[1])


@torch.inference_mode()
def measure_step_cost(
    model: Transformer,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    context: int = 128,
    repeats: int = 7,
    shape_probes: Sequence[Sequence[tuple[int, int]]] = SHAPE_PROBES,
) -> StepCostProfile:
    """Times real forwards: SPS(N) on reference shapes (N tokens spread over ceil(N / 4) sequences with
    `context` cached tokens each), then `shape_probes` to price attention, cache gathers and attention
    groups. Each context's sequences are prefilled once; shapes are timed round-robin, repeat by repeat,
    so a slow phase hits them alike."""
    ref_seqs = -(-max(token_counts) // TOKENS_PER_SEQUENCE)
    # one pool of sequences per context, filled once; used in descending slot order so the forward
    # gathers their caches, as in a server whose requests come and go
    needed = {context: ref_seqs}
    for probe in shape_probes:
        for c in {c for _, c in probe}:
            needed[c] = max(needed.get(c, 0), sum(1 for _, cc in probe if cc == c))
    longest = max(needed) + max([TOKENS_PER_SEQUENCE] + [q for probe in shape_probes for q, _ in probe])
    cache = model.new_cache(sum(needed.values()), longest)
    vocab = model.config.vocab_size
    pools: dict[int, list[int]] = {}
    for c, count in needed.items():
        pools[c] = [cache.allocate() for _ in range(count)]
        model(torch.randint(0, vocab, (c * count,)), pools[c], [c] * count, cache)

    def shapes_of(n: int) -> list[int]:
        return [TOKENS_PER_SEQUENCE] * (n // TOKENS_PER_SEQUENCE) + (
            [n % TOKENS_PER_SEQUENCE] if n % TOKENS_PER_SEQUENCE else [])

    def rows_of(n: int) -> tuple[tuple[int, int], ...]:
        return tuple((q, context) for q in shapes_of(n))

    def slots_for(rows: Sequence[tuple[int, int]]) -> list[int]:
        """A pooled sequence of the right context for each row, in descending slot order."""
        taken: dict[int, int] = {}
        used = []
        for _, c in rows:
            used.append(pools[c][taken.get(c, 0)])
            taken[c] = taken.get(c, 0) + 1
        return used

    jobs: list[tuple[object, tuple[tuple[int, int], ...]]] = [(n, rows_of(n)) for n in token_counts]
    jobs += [(tuple(probe), tuple(probe)) for probe in shape_probes]
    times: dict[object, list[float]] = {key: [] for key, _ in jobs}
    for rep in range(repeats + 1):  # the first round warms every shape up
        for key, rows in jobs:
            used, new = slots_for(rows)[::-1], [q for q, _ in rows][::-1]
            started = time.perf_counter()
            model(torch.randint(0, vocab, (sum(new),)), used, new, cache)
            if rep:
                times[key].append(time.perf_counter() - started)
            for slot, (_, c) in zip(used, rows[::-1]):
                cache.truncate(slot, c)

    def fastest(key: object) -> float:
        # a shared host's slow phases (2x for seconds at a time here) only ever add time, and may cover
        # some shapes' repeats but not others': the fastest repeat is the forward's own cost
        return min(times[key])

    curve = StepCostProfile(tuple(token_counts), tuple(monotone_envelope([fastest(n) for n in token_counts])),
                            context=context)
    terms = fit_shape_terms([(BatchShape(tuple((q, c + q) for q, c in probe)), fastest(tuple(probe)))
                             for probe in shape_probes])
    return StepCostProfile(curve.tokens, curve.seconds, *terms, context=context)


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
