"""Autoregressive greedy decoding: our Transformer + KVCache against transformers' generate().

Both run in the same process, same dtype and thread count, interleaved per prompt (the order
alternates) so that machine noise falls on both alike. Each engine decodes exactly
``new_tokens`` tokens per prompt; like ``generate(min_new_tokens=...)`` our loop masks the EOS
ids, so the two greedy outputs are comparable token for token. Timings include the prefill.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from models.transformer import Transformer
from runtimes.loading import load_runner


@contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _eos_ids(model_dir: Path, model: Transformer) -> list[int]:
    """The ids that end a generation (config.json and generation_config.json, merged by load_config)."""
    return sorted(i for i in set(model.config.eos_token_ids) if 0 <= i < model.config.vocab_size)


@torch.inference_mode()
def greedy_ours(model: Transformer, prompt_ids: list[int], new_tokens: int, suppress: list[int]) -> tuple[list[int], float]:
    """Greedy tokens and seconds taken (prefill + decode, cache allocation excluded)."""
    cache = model.new_cache(1, len(prompt_ids) + new_tokens)
    slot = cache.allocate()
    suppress_t = torch.tensor(suppress, dtype=torch.int64)
    last = torch.tensor([len(prompt_ids) - 1])
    out: list[int] = []
    start = time.perf_counter()
    logits = model(torch.tensor(prompt_ids), [slot], [len(prompt_ids)], cache, logits_indices=last).logits
    for step in range(new_tokens):
        if len(suppress):
            logits[:, suppress_t] = float("-inf")
        nxt = logits.argmax(-1)
        out.append(int(nxt))
        if step + 1 < new_tokens:
            logits = model(nxt, [slot], [1], cache).logits
    return out, time.perf_counter() - start


@torch.inference_mode()
def greedy_transformers(hf_model, prompt_ids: list[int], new_tokens: int, pad_id: int) -> tuple[list[int], float]:
    ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    seq = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
    )
    elapsed = time.perf_counter() - start
    return seq[0, len(prompt_ids):].tolist(), elapsed


@torch.inference_mode()
def top2_margin(model: Transformer, ids: list[int], suppress: list[int]) -> float:
    """Gap between the two best next-token logits after `ids` (small = a near-tie, where bf16
    rounding differences between two implementations may legitimately pick different tokens)."""
    cache = model.new_cache(1, len(ids))
    logits = model(torch.tensor(ids), [0], [len(ids)], cache, logits_indices=torch.tensor([len(ids) - 1])).logits[0]
    if suppress:
        logits[suppress] = float("-inf")
    top = logits.topk(2).values
    return float(top[0] - top[1])


def encode_prompts(model_dir: Path, prompts: list[str]) -> list[list[int]]:
    """Raw prompt ids with the model's own tokenizer; a prompt that encodes to nothing is an error."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    encoded = [tokenizer.encode(p).ids for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt tokenized to nothing")
    return encoded


def run_ar_decode_benchmark(
    model_dir: Path, dtype: torch.dtype, prompts: list[str], new_tokens: int, threads: int | None
) -> dict:
    """Greedy AR decode of each prompt by ours and by transformers; tokens/s, ratio, token match."""
    import transformers
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not prompts or new_tokens < 1:
        raise ValueError("need at least one prompt and new_tokens >= 1")
    encoded = encode_prompts(model_dir, prompts)

    with _num_threads(threads) as n_threads:
        ours = load_runner(model_dir, "torch", str(dtype).removeprefix("torch."))  # with this machine's kernel plan
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        suppress = _eos_ids(model_dir, ours)
        pad_id = suppress[0] if suppress else 0

        # warm-up: first-call allocations, kernel selection, lazy init on both sides
        warm = min(new_tokens, 8)
        greedy_ours(ours, encoded[0], warm, suppress)
        greedy_transformers(hf, encoded[0], warm, pad_id)

        rows = []
        for i, (text, ids) in enumerate(tqdm(list(zip(prompts, encoded)), desc="prompts", unit="prompt")):
            if i % 2 == 0:
                ours_tokens, ours_s = greedy_ours(ours, ids, new_tokens, suppress)
                hf_tokens, hf_s = greedy_transformers(hf, ids, new_tokens, pad_id)
            else:
                hf_tokens, hf_s = greedy_transformers(hf, ids, new_tokens, pad_id)
                ours_tokens, ours_s = greedy_ours(ours, ids, new_tokens, suppress)
            mismatch = next((k for k, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b), None)
            if mismatch is None and len(ours_tokens) != len(hf_tokens):
                mismatch = min(len(ours_tokens), len(hf_tokens))
            margin = None if mismatch is None else top2_margin(ours, ids + ours_tokens[:mismatch], suppress)
            rows.append(
                {
                    "prompt": text,
                    "prompt_tokens": len(ids),
                    "ours_s": ours_s,
                    "transformers_s": hf_s,
                    "ours_tok_s": new_tokens / ours_s,
                    "transformers_tok_s": new_tokens / hf_s,
                    "match": mismatch is None,
                    "first_mismatch": mismatch,
                    "mismatch_top2_margin": margin,  # our logit gap at the first departure
                    "ours_tokens": ours_tokens,
                    "transformers_tokens": hf_tokens,
                }
            )

    total_tokens = new_tokens * len(rows)
    ours_total = sum(r["ours_s"] for r in rows)
    hf_total = sum(r["transformers_s"] for r in rows)
    return {
        "model_dir": str(model_dir),
        "model_type": ours.config.model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": n_threads,
        "new_tokens": new_tokens,
        "num_prompts": len(rows),
        "ours_tok_s": total_tokens / ours_total,
        "transformers_tok_s": total_tokens / hf_total,
        "ratio": hf_total / ours_total,  # = ours tok/s / transformers tok/s
        "all_match": all(r["match"] for r in rows),
        "per_prompt": rows,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def format_ar_decode_table(result: dict) -> str:
    """Plain-text table of a `run_ar_decode_benchmark` result."""
    head = (
        f"AR greedy decode, {result['model_type']} {Path(result['model_dir']).name}, {result['dtype']}, "
        f"{result['threads']} thread(s), {result['new_tokens']} new tokens per prompt "
        f"(torch {result['torch_version']}, transformers {result['transformers_version']})"
    )
    lines = [head, f"{'prompt':<42} {'len':>4} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6}  greedy match"]
    for r in result["per_prompt"]:
        text = r["prompt"].replace("\n", " ")
        text = text if len(text) <= 40 else text[:39] + "…"
        match = "yes" if r["match"] else (
            f"no: from token {r['first_mismatch']}, top-2 logit gap {r['mismatch_top2_margin']:.3f}"
        )
        lines.append(
            f"{text:<42} {r['prompt_tokens']:>4} {r['ours_tok_s']:>11.1f} {r['transformers_tok_s']:>9.1f} "
            f"{r['ours_tok_s'] / r['transformers_tok_s']:>6.2f}  {match}"
        )
    lines.append(
        f"{'total':<42} {'':>4} {result['ours_tok_s']:>11.1f} {result['transformers_tok_s']:>9.1f} "
        f"{result['ratio']:>6.2f}  {'all match' if result['all_match'] else 'MISMATCH'}"
    )
    return "\n".join(lines)
