"""The verify step's cost: one target forward of N new tokens of one sequence, by N, context and dtype.

Speculative decoding pays only where verifying N tokens costs about what one costs; on a CPU a
decode step streams every weight from memory, so the floor for any N is weight bytes / read
bandwidth. Configurations (dtype x thread count) are measured interleaved, repeat by repeat, and
every N of a configuration back to back within a repeat, so a noisy neighbour slows them alike:
a ratio cost(N) / cost(1) is the median over repeats of that repeat's own ratio (a shared host's
slow phases last seconds and would otherwise skew single N), the absolute figures are medians.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.hardware import cpu_flags, machine_id
from models.transformer import Transformer
from runtimes.loading import load_runner


@dataclass
class StepGrid:
    dtype: str
    threads: int
    kernels: str                 # the kernel plan the model ran with
    weight_bytes: int
    read_gb_per_s: float         # measured streaming read bandwidth at this thread count
    ms: dict[tuple[int, int], float] = field(default_factory=dict)  # (context, N) -> median ms
    ratio: dict[tuple[int, int], float] = field(default_factory=dict)  # (context, N) -> median of cost(N)/cost(N=1)
    spread: dict[int, float] = field(default_factory=dict)  # context -> interquartile range / median of N=1

    @property
    def floor_ms(self) -> float:
        """Memory floor of a step: every weight read once."""
        return self.weight_bytes / (self.read_gb_per_s * 1e9) * 1e3


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of summing a tensor far larger than the caches, at `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * 2**30) // 4)
        x.sum()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - started)
        return x.numel() * 4 / sorted(times)[repeats // 2] / 1e9
    finally:
        torch.set_num_threads(before)


def _weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads: every weight, and the token embedding only where it is the LM head."""
    return sum(w.numel() * w.element_size() for w, _ in model.weight_matrices())


@torch.inference_mode()
def profile_verify_step(
    model_dir: Path,
    dtypes: Sequence[str],
    threads: Sequence[int],
    token_counts: Sequence[int],
    contexts: Sequence[int],
    repeats: int = 7,
) -> list[StepGrid]:
    """Median ms of a forward of N new tokens after `context` cached ones, for every dtype x threads."""
    models = {dtype: load_runner(model_dir, "torch", dtype) for dtype in dtypes}
    grids = {(d, t): StepGrid(d, t, " ".join(models[d].layers[0].linears["qkv"].plan.kernels)
                               if models[d].layers[0].linears else "F.linear",
                               _weight_bytes(models[d]), read_bandwidth(t))
             for d in dtypes for t in threads}
    vocab = next(iter(models.values())).config.vocab_size
    caches = {}
    for dtype, model in models.items():
        cache = model.new_cache(1, max(contexts) + max(token_counts))
        caches[dtype] = (cache, cache.allocate())
    for context in contexts:
        prompt = torch.randint(0, vocab, (context,))
        for dtype, model in models.items():
            cache, slot = caches[dtype]
            cache.truncate(slot, 0)
            model(prompt, [slot], [context], cache, logits_indices=torch.tensor([context - 1]))
        samples: dict[tuple[str, int, int], list[float]] = {}
        for rep in range(repeats + 1):  # the first round warms every shape up
            for dtype, t in grids:
                torch.set_num_threads(t)
                model, (cache, slot) = models[dtype], caches[dtype]
                # one untimed step after switching dtype or threads: the first one after the other
                # dtype's kernels ran measured up to 1.4x slower (bf16 after fp32, one thread)
                for timed, n in ((False, token_counts[0]), *((True, n) for n in token_counts)):
                    ids = torch.randint(0, vocab, (n,))
                    started = time.perf_counter()
                    model(ids, [slot], [n], cache, logits_indices=torch.arange(n))
                    elapsed = time.perf_counter() - started
                    cache.truncate(slot, context)
                    if rep and timed:
                        samples.setdefault((dtype, t, n), []).append(elapsed)
        for (dtype, t, n), times in samples.items():
            grid, base = grids[(dtype, t)], samples[(dtype, t, token_counts[0])]
            grid.ms[(context, n)] = float(np.median(times)) * 1e3
            grid.ratio[(context, n)] = float(np.median(np.array(times) / np.array(base)))
        for (dtype, t), grid in grids.items():
            q1, q2, q3 = np.percentile(samples[(dtype, t, token_counts[0])], [25, 50, 75])
            grid.spread[context] = (q3 - q1) / q2
    return list(grids.values())


def format_grids(grids: Sequence[StepGrid]) -> str:
    lines = [f"machine: {machine_id()}   cpu flags: {cpu_flags()}   torch {torch.__version__}"]
    for g in grids:
        contexts = sorted({c for c, _ in g.ms})
        counts = sorted({n for _, n in g.ms})
        lines.append("")
        lines.append(f"{g.dtype}, {g.threads} thread(s), kernels by rows {g.kernels}: weights {g.weight_bytes / 2**20:.0f} MiB, "
                     f"read {g.read_gb_per_s:.1f} GB/s, memory floor {g.floor_ms:.1f} ms")
        lines.append(f"{'context':>8} {'N=1 ms':>8} {'IQR':>5} {'/floor':>7}  "
                     + " ".join(f"{'N=' + str(n):>6}" for n in counts[1:]) + "   (cost / cost at N=1)")
        for c in contexts:
            base = g.ms[(c, counts[0])]
            lines.append(f"{c:>8} {base:>8.1f} {g.spread[c]:>4.0%} {base / g.floor_ms:>6.2f}x  "
                         + " ".join(f"{g.ratio[(c, n)]:>6.2f}" for n in counts[1:]))
    return "\n".join(lines)
