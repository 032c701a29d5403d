"""Greedy decode tokens/s of the same model on several runtimes (torch, onnxruntime, tensorrt).

All runtimes are loaded in one process with the same thread count and decode the same prompts,
interleaved per prompt (the order rotates) so that machine noise falls on all alike. Each decodes
exactly ``new_tokens`` tokens (EOS masked, as in the AR benchmark); timings include the prefill.
The greedy tokens are compared with the first runtime's (the reference).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from benchmarks.ar_decode import _eos_ids, _num_threads, encode_prompts, greedy_ours
from runtimes.loading import load_runner


def run_runtimes_benchmark(model_dir: Path, runtimes: Sequence[str], dtype: str, prompts: list[str],
                           new_tokens: int, threads: int | None, device: str = "cpu") -> dict:
    """Per-runtime tokens/s, ratio to the first runtime, and greedy-token agreement with it."""
    model_dir = Path(model_dir)
    if not prompts or new_tokens < 1 or not runtimes:
        raise ValueError("need at least one prompt, one runtime and new_tokens >= 1")
    encoded = encode_prompts(model_dir, prompts)

    with _num_threads(threads) as n_threads:
        # TensorRT: load_runner's default profile, the one `cli.py export --to tensorrt` builds (reused).
        runners = {rt: load_runner(model_dir, rt, dtype, num_threads=n_threads, device=device) for rt in runtimes}
        suppress = _eos_ids(model_dir, next(iter(runners.values())))
        for runner in runners.values():  # warm-up: allocations, kernel selection, lazy init
            greedy_ours(runner, encoded[0], min(new_tokens, 8), suppress)
        seconds = {rt: 0.0 for rt in runtimes}
        rows = []
        for i, (text, ids) in enumerate(tqdm(list(zip(prompts, encoded)), desc="prompts", unit="prompt")):
            order = list(runtimes[i % len(runtimes):]) + list(runtimes[:i % len(runtimes)])
            tokens, row = {}, {"prompt": text, "prompt_tokens": len(ids)}
            for rt in order:
                tokens[rt], elapsed = greedy_ours(runners[rt], ids, new_tokens, suppress)
                seconds[rt] += elapsed
                row[f"{rt}_tok_s"] = new_tokens / elapsed
            row["match"] = all(tokens[rt] == tokens[runtimes[0]] for rt in runtimes)
            rows.append(row)

    total = new_tokens * len(rows)
    tok_s = {rt: total / seconds[rt] for rt in runtimes}
    return {
        "model": model_dir.name,
        "dtype": dtype,
        "torch_device": device,
        "threads": n_threads,
        "new_tokens": new_tokens,
        "num_prompts": len(rows),
        "runtimes": list(runtimes),
        "tok_s": tok_s,
        "ratio_to_first": {rt: tok_s[rt] / tok_s[runtimes[0]] for rt in runtimes},
        "all_match": all(r["match"] for r in rows),
        "per_prompt": rows,
        "torch_version": torch.__version__,
    }


def format_runtimes_table(result: dict) -> str:
    """Plain-text side-by-side table of a `run_runtimes_benchmark` result."""
    rts = result["runtimes"]
    lines = [
        f"greedy decode, {result['model']} {result['dtype']}, {result['threads']} thread(s), torch on "
        f"{result['torch_device']}, "
        f"{result['new_tokens']} new tokens per prompt; ratio = tok/s relative to {rts[0]}",
        f"{'prompt':<34} {'len':>4} " + " ".join(f"{rt + ' tok/s':>17}" for rt in rts) + "  greedy match",
    ]
    for r in result["per_prompt"]:
        text = r["prompt"].replace("\n", " ")
        text = text if len(text) <= 32 else text[:31] + "…"
        lines.append(f"{text:<34} {r['prompt_tokens']:>4} " + " ".join(f"{r[f'{rt}_tok_s']:>17.1f}" for rt in rts)
                     + f"  {'yes' if r['match'] else 'NO'}")
    lines.append(f"{'total':<34} {'':>4} " + " ".join(f"{result['tok_s'][rt]:>17.1f}" for rt in rts)
                 + f"  {'all match' if result['all_match'] else 'MISMATCH'}")
    lines.append(f"{'ratio':<34} {'':>4} " + " ".join(f"{result['ratio_to_first'][rt]:>17.2f}" for rt in rts))
    fastest = max(rts, key=lambda rt: result["tok_s"][rt])
    lines.append(f"fastest: {fastest}")
    return "\n".join(lines)
