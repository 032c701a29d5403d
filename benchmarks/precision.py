"""What a precision costs in quality: next-token loss and argmax agreement, per runtime and dtype.

Each runtime/dtype scores the same texts in one prefill each (teacher forcing): mean negative
log-likelihood per token (perplexity) and the share of positions whose argmax equals the
reference's (the first runtime/dtype given, float32 torch by default). The texts are written by
people, not by the model: slices of Python's own standard-library sources and of its reference
documentation (pydoc topics), so every machine with Python has them and no precision is favoured
by scoring its own output.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.ar_decode import _num_threads
from export.quantize import python_texts
from runtimes.loading import load_runner

SOURCE_MODULES = ("argparse", "textwrap", "json.decoder", "dataclasses")
DOC_TOPICS = ("assignment", "exceptions", "for", "import")
TEXT_CHARS = 6000  # per text: ~1,500 tokens, cut to max_tokens


def reference_texts() -> list[str]:
    """Four slices of standard-library source and four documentation topics."""
    return python_texts(SOURCE_MODULES, DOC_TOPICS, TEXT_CHARS, skip=3)


def _text_logits(runner, ids: torch.Tensor, step_tokens: int | None) -> torch.Tensor:
    """float32 logits [len(ids) - 1, vocab] of each position but the last: the text in one prefill, or fed
    ``step_tokens`` at a time over the cache (1: one-token steps, as serving decodes)."""
    cache = runner.new_cache(1, len(ids) + 1)
    slot = cache.allocate()
    with torch.inference_mode():
        if step_tokens is None:
            return runner(ids, [slot], [len(ids)], cache, logits_indices=torch.arange(len(ids) - 1)).logits.float()
        fed = ids[:-1]
        return torch.cat([runner(chunk, [slot], [len(chunk)], cache).logits.float()
                          for chunk in fed.split(step_tokens)])


def run_precision_benchmark(model_dir: Path, specs: Sequence[tuple[str, str]], texts: Sequence[str],
                            max_tokens: int = 1024, threads: int | None = None, step_tokens: int | None = None) -> dict:
    """{"rows": [{"runtime", "dtype", "nll", "perplexity", "agreement"}], "tokens": scored positions}.

    specs: (runtime, dtype) pairs; the first is the reference for agreement. ValueError without one.
    step_tokens: feed each text that many tokens per step instead of one prefill: what a cache read
    back costs (an int8 KV cache is attended differently once cached).
    """
    from tokenizers import Tokenizer

    if not specs or not texts:
        raise ValueError("need at least one runtime/dtype and one text")
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    encoded = [torch.tensor(tokenizer.encode(t).ids[:max_tokens]) for t in texts]
    rows, reference = [], None
    with _num_threads(threads) as n_threads:
        for runtime, dtype in tqdm(specs, desc="runtimes", unit="runtime"):
            runner = load_runner(model_dir, runtime, dtype, num_threads=n_threads)
            nll, argmax = 0.0, []
            for ids in tqdm(encoded, desc=f"{runtime}/{dtype}", unit="text", leave=False):
                logits = _text_logits(runner, ids, step_tokens)
                nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
                argmax.append(logits.argmax(-1))
            argmax_all = torch.cat(argmax)
            reference = argmax_all if reference is None else reference
            n = len(argmax_all)
            rows.append({"runtime": runtime, "dtype": dtype, "nll": nll / n, "perplexity": math.exp(nll / n),
                         "agreement": (argmax_all == reference).float().mean().item()})
            del runner
    return {"rows": rows, "tokens": n, "texts": len(encoded), "threads": n_threads, "step_tokens": step_tokens}


def format_precision_table(result: dict) -> str:
    ref = result["rows"][0]
    fed = "in one prefill each" if result.get("step_tokens") is None else f"{result['step_tokens']} token(s) per step"
    lines = [f"{result['tokens']} positions of {result['texts']} texts (Python sources and docs, {fed}), teacher-forced; "
             f"agreement: argmax equal to {ref['runtime']}/{ref['dtype']}'s",
             f"{'runtime/dtype':<22} {'nll/token':>10} {'perplexity':>11} {'vs ref':>8} {'agreement':>10}"]
    for row in result["rows"]:
        lines.append(f"{row['runtime'] + '/' + row['dtype']:<22} {row['nll']:>10.4f} {row['perplexity']:>11.3f} "
                     f"{row['perplexity'] / ref['perplexity'] - 1:>+8.2%} {row['agreement']:>10.2%}")
    return "\n".join(lines)
