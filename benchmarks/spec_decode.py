"""Speculative decoding, in-process: AR vs each drafter/draft length on one prompt set.

Every configuration runs every prompt one request at a time (per-user latency), interleaved
per prompt with the order rotating, so that machine noise falls on all of them alike.
Tokens/s counts generated tokens over wall time including prefill.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from models.transformer import Transformer
from models.drafters import load_drafter
from orchestrator.drafting import Drafter, FeatureDrafter, ModelDrafter, PromptLookupDrafter
from orchestrator.engine import Engine, EngineConfig
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams


@dataclass
class DecodeConfig:
    """One column of the comparison: a drafter (None = AR) and its draft length."""

    label: str
    drafter: Drafter | None
    spec: SpeculationParams


@dataclass
class DecodeResult:
    label: str
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    accepted: int = 0
    drafted: int = 0
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_round(self) -> float | None:
        return 1 + self.accepted / self.rounds if self.rounds else None


def parse_configs(
    specs: list[str], load_drafter_model: Callable[[str], Transformer], target: Transformer, max_context: int
) -> list[DecodeConfig]:
    """'off', 'prompt_lookup:K', 'model=NAME:K', 'checkpoint=DIR:K' -> configurations (drafters loaded once)."""
    configs = [DecodeConfig("off", None, SpeculationParams("off"))]
    models: dict[str, Drafter] = {}
    for spec in specs:
        if spec == "off":
            continue
        kind, _, k = spec.rpartition(":")
        if kind == "prompt_lookup":
            drafter: Drafter = PromptLookupDrafter()
        elif kind.startswith("model="):
            name = kind[len("model="):]
            if name not in models:
                models[name] = ModelDrafter(load_drafter_model(name), 1, max_context)
            drafter = models[name]
        elif kind.startswith("checkpoint="):
            directory = kind[len("checkpoint="):]
            if directory not in models:
                models[directory] = FeatureDrafter(load_drafter(directory, target), 1, max_context)
            drafter = models[directory]
        else:
            raise ValueError(f"unknown configuration {spec!r} (off | prompt_lookup:K | model=NAME:K | checkpoint=DIR:K)")
        configs.append(DecodeConfig(spec, drafter, SpeculationParams("static", int(k))))
    return configs


def _run_one(engine: Engine, prompt_ids: list[int], params: SamplingParams, spec: SpeculationParams):
    chunks: list = []
    engine.submit(prompt_ids, params, chunks.append, spec=spec)
    start = time.perf_counter()
    while engine.step():
        pass
    seconds = time.perf_counter() - start
    return [t for c in chunks for t in c.token_ids], seconds, chunks[-1]


def run_spec_decode_benchmark(
    target: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    configs: list[DecodeConfig],
    new_tokens: int,
    max_context: int = 2048,
) -> list[DecodeResult]:
    params = SamplingParams(max_tokens=new_tokens)
    engines = [Engine(target, tokenizer, EngineConfig(1, max_context, new_tokens), c.drafter) for c in configs]
    results = [DecodeResult(c.label) for c in configs]
    warmup = prompts[0][:16]
    for engine, config in zip(engines, configs):
        _run_one(engine, warmup, SamplingParams(max_tokens=8), config.spec)
    with torch.inference_mode():
        for p, prompt_ids in enumerate(prompts):
            order = list(range(len(configs)))
            order = order[p % len(order):] + order[: p % len(order)]
            for i in order:
                tokens, seconds, last = _run_one(engines[i], prompt_ids, params, configs[i].spec)
                r = results[i]
                r.tokens += len(tokens)
                r.seconds += seconds
                r.rounds += last.num_draft_rounds
                r.drafted += last.num_draft_tokens
                r.accepted += last.num_accepted_tokens
                r.outputs.append(tokens)
    return results


def summarize(results: list[DecodeResult]) -> dict:
    base = results[0]
    rows = []
    for r in results:
        rows.append({
            "config": r.label,
            "tokens": r.tokens,
            "seconds": round(r.seconds, 3),
            "tokens_per_s": round(r.tokens_per_s, 2),
            "speedup_vs_ar": round(r.tokens_per_s / base.tokens_per_s, 3) if base.tokens_per_s else None,
            "tokens_per_round": round(r.tokens_per_round, 3) if r.tokens_per_round else None,
            "acceptance_rate": round(r.accepted / r.drafted, 3) if r.drafted else None,
            "identical_to_ar": r.outputs == base.outputs,
        })
    return {"rows": rows}


def format_table(summary: dict) -> str:
    header = f"{'config':<28}{'tok/s':>9}{'vs AR':>8}{'tok/round':>11}{'accept':>8}{'same as AR':>12}"
    lines = [header, "-" * len(header)]
    for row in summary["rows"]:
        tpr = f"{row['tokens_per_round']:.2f}" if row["tokens_per_round"] else "-"
        acc = f"{row['acceptance_rate']:.2f}" if row["acceptance_rate"] is not None else "-"
        lines.append(
            f"{row['config']:<28}{row['tokens_per_s']:>9.2f}{row['speedup_vs_ar']:>7.2f}x{tpr:>11}{acc:>8}"
            f"{str(row['identical_to_ar']):>12}"
        )
    return "\n".join(lines)
