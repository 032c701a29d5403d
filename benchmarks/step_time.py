"""Step times of the target and its trained drafter against context length, per runtime, at a batch.

What a serving step costs once B requests each hold C tokens of context: a decode step (one
token each), a verify step (k tokens each), the drafter's context extension (one committed
token each) and one drafted block; and the prefill of B prompts of C tokens in one step (what
B requests arriving together cost before their first token). Caches are filled by setting
lengths over finite values, not by prefilling (the cost of a step depends on how much it reads,
not on what). Runtimes take turns
per measurement so machine noise falls on all alike; each figure is the median of ``repeats``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from benchmarks.ar_decode import _num_threads
from models.drafters.common import DrafterConfig, greedy_sample
from runtimes.loading import load_feature_drafter, load_runner

PHASES = ("prefill", "decode", "verify", "extend", "draft")


def _timed(fn, device: str) -> float:
    """Wall seconds of fn(), GPU work included (synchronised before and after on CUDA)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_step_time_benchmark(model_dir: Path, checkpoint: Path, runtimes: Sequence[str], dtypes: Sequence[str],
                            contexts: Sequence[int], batch: int = 16, verify_tokens: int = 8, repeats: int = 5,
                            threads: int | None = None, device: str = "cpu") -> dict:
    """{"rows": [{"context", "phase", "<runtime>": ms}], ...}: median milliseconds per step.

    device: where the torch runtime runs (the graph runtimes fix theirs)."""
    if len(runtimes) != len(dtypes) or not runtimes:
        raise ValueError("one dtype per runtime, at least one runtime")
    max_len = max(contexts) + verify_tokens + 8
    labels = [f"{rt}/{dt}" for rt, dt in zip(runtimes, dtypes)]
    rows = []
    with _num_threads(threads) as n_threads:
        setups = {}
        taps = DrafterConfig.from_json((Path(checkpoint) / "config.json").read_text()).tap_layers
        for label, rt, dt in zip(labels, runtimes, dtypes):
            target = load_runner(model_dir, rt, dt, tap_layers=taps, num_threads=n_threads,
                                 device=device if rt == "torch" else "cpu")
            drafter = load_feature_drafter(checkpoint, target, rt)
            cache = target.new_cache(batch, max_len)
            slots = [cache.allocate() for _ in range(batch)]
            state = drafter.new_state(batch, max_len)
            hidden_size = target.config.hidden_size
            setups[label] = (target, drafter, cache, slots, state, hidden_size)
        gen = torch.Generator().manual_seed(0)
        for context in tqdm(contexts, desc="contexts", unit="context"):
            times = {(phase, label): [] for phase in PHASES for label in labels}
            for _ in range(repeats):
                for label in labels:
                    target, drafter, cache, slots, state, hidden = setups[label]
                    cache.lengths[slots] = context
                    state.lengths[slots] = context
                    ids = torch.randint(0, 1000, (batch * verify_tokens,), generator=gen)
                    dev = str(cache.k_all.device)
                    cache.lengths[slots] = 0
                    prompts = torch.randint(0, 1000, (batch * context,), generator=gen)
                    times["prefill", label].append(_timed(lambda: target(
                        prompts, slots, [context] * batch, cache, logits_indices=torch.arange(1, batch + 1) * context - 1,
                        tap_layers=taps), dev))
                    cache.lengths[slots] = context
                    times["decode", label].append(_timed(lambda: target(
                        ids[:batch], slots, [1] * batch, cache, logits_indices=torch.arange(batch), tap_layers=taps), dev))
                    cache.lengths[slots] = context
                    times["verify", label].append(_timed(lambda: target(
                        ids, slots, [verify_tokens] * batch, cache, tap_layers=taps), dev))
                    feats = {t: torch.randn(batch, hidden, generator=gen).to(target.device, target.dtype) for t in taps}
                    times["extend", label].append(_timed(lambda: drafter.extend_context(
                        state, slots, [1] * batch, feats, ids[:batch]), dev))
                    state.lengths[slots] = context
                    times["draft", label].append(_timed(lambda: drafter.draft(
                        state, slots, ids[:batch], drafter.config.block_size, greedy_sample, greedy=True), dev))
            for phase in PHASES:
                rows.append({"context": context, "phase": phase,
                             **{label: 1e3 * statistics.median(times[phase, label]) for label in labels}})
    return {"rows": rows, "runtimes": labels, "batch": batch, "verify_tokens": verify_tokens, "repeats": repeats,
            "threads": n_threads}


def format_table(result: dict) -> str:
    labels = result["runtimes"]
    ref = labels[0]
    head = f"{'context':>7} {'phase':7}" + "".join(f" {label:>20}" for label in labels) + \
        "".join(f" {label + ' vs ' + ref:>28}" for label in labels[1:])
    lines = [f"ms per step, batch {result['batch']}, verify {result['verify_tokens']} tokens each, "
             f"{result['threads']} thread(s), median of {result['repeats']}", head]
    for row in result["rows"]:
        line = f"{row['context']:>7} {row['phase']:7}" + "".join(f" {row[label]:20.1f}" for label in labels)
        line += "".join(f" {row[ref] / row[label]:27.2f}x" for label in labels[1:])
        lines.append(line)
    return "\n".join(lines)
