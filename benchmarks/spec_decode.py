"""Speculative decoding, in-process: AR vs each drafter/draft length on one prompt set.

Every configuration runs every prompt one request at a time (per-user latency), interleaved
per prompt with the order rotating, so that machine noise falls on all of them alike.
Tokens/s counts generated tokens over wall time including prefill; decode tokens/s counts the tokens
after the first over the time after it (the prefill step, identical for every column, left out: it is
what speculation speeds up). The wall time of our engine is split into the target forward, drafting
(proposals and the drafter's context updates) and the rest.
``hf_assisted=NAME[:K]`` adds Hugging Face ``transformers`` assisted generation with the same target
and drafter model (same dtype and threads) as a column: its own greedy loop, its own draft-length
rule (HF's defaults, or a constant K).
A draft length of ``dspark`` (``dspark=MAX`` for drafters without a block size) runs the server's
dspark mode instead of a constant K: each round verifies the tokens the load-aware scheduler admits
from the drafter's confidences and the target's measured step cost (paper Algorithm 1, at batch 1).
"""
from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from models.transformer import Transformer
from orchestrator.drafting import (LOOKUP_FIRST_SUFFIX, Drafter, FeatureDrafter, LookupFirstDrafter, PromptLookupDrafter,
                                   split_lookup_first)
from orchestrator.engine import Engine, EngineConfig
from orchestrator.policies import MAX_DRAFT_TOKENS, SpeculationParams
from orchestrator.sampling import SamplingParams
from orchestrator.step_cost import StepCostProfile
from runtimes.loading import load_feature_drafter

CONFIG_FORMS = ("off | prompt_lookup:K | model=NAME:K | checkpoint=DIR:K | hf_assisted=NAME[:K]; K may be dspark[=MAX]; "
                "a model drafter may end in +prompt_lookup (lookup first where the context repeats itself)")


@dataclass
class DecodeConfig:
    """One column of the comparison: a drafter (None = AR) and its draft length."""

    label: str
    drafter: Drafter | None
    spec: SpeculationParams


@dataclass
class HFAssistedConfig:
    """A column run by transformers' assisted generation instead of our engine."""

    label: str
    target: object      # transformers PreTrainedModel
    assistant: object   # transformers PreTrainedModel
    num_draft_tokens: int | None  # None: transformers' defaults (20, cut by its confidence threshold)


@dataclass
class DecodeResult:
    label: str
    tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float = 0.0  # prefill up to the first token, summed over prompts
    forwards: int = 0                 # target forwards, prefill included
    rounds: int = 0
    accepted: int = 0
    drafted: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    forward_seconds: float = 0.0  # target forwards (our engine only)
    draft_seconds: float = 0.0    # drafting (our engine only)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode = self.seconds - self.first_token_seconds
        return (self.tokens - len(self.outputs)) / decode if decode > 0 else 0.0

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens per decode forward (after the prefill): what a flat verify step turns into speedup."""
        steps = self.forwards - len(self.outputs)
        return (self.tokens - len(self.outputs)) / steps if steps > 0 else None

    @property
    def tokens_per_round(self) -> float | None:
        return 1 + self.accepted / self.rounds if self.rounds else None


def parse_configs(
    specs: list[str], load_model_drafter: Callable[[str], Drafter], target: Transformer, max_context: int,
    load_hf_model: Callable[[str | None], object] | None = None, runtime: str = "torch",
) -> list[DecodeConfig | HFAssistedConfig]:
    """'off', 'prompt_lookup:K', 'model=NAME:K', 'checkpoint=DIR:K', 'hf_assisted=NAME[:K]' -> configurations
    (drafters loaded once). K is a constant draft length, or ``dspark`` / ``dspark=MAX`` for the dspark
    mode (MAX defaults to the drafter's block size). load_hf_model(None) loads the target in
    transformers, (NAME) a drafter.
    runtime: the target's; a trained drafter runs on it too (runtimes.loading.load_feature_drafter)."""
    configs: list[DecodeConfig | HFAssistedConfig] = [DecodeConfig("off", None, SpeculationParams("off"))]
    models: dict[str, Drafter] = {}
    hf: dict[str | None, object] = {}
    for spec in specs:
        if spec == "off":
            continue
        if spec.startswith("hf_assisted="):
            if load_hf_model is None:
                raise ValueError("hf_assisted needs a transformers loader")
            name, _, k = spec[len("hf_assisted="):].partition(":")
            for key in (None, name):
                if key not in hf:
                    hf[key] = load_hf_model(key)
            configs.append(HFAssistedConfig(spec, hf[None], hf[name], int(k) if k else None))
            continue
        kind, _, k = spec.rpartition(":")
        kind, lookup_first = split_lookup_first(kind)
        if kind == "prompt_lookup":
            drafter: Drafter = PromptLookupDrafter()
        elif kind.startswith("model="):
            name = kind[len("model="):]
            if name not in models:
                models[name] = load_model_drafter(name)
            drafter = models[name]
        elif kind.startswith("checkpoint="):
            directory = kind[len("checkpoint="):]
            if directory not in models:
                models[directory] = FeatureDrafter(load_feature_drafter(directory, target, runtime), 1, max_context)
            drafter = models[directory]
        else:
            raise ValueError(f"unknown configuration {spec!r} ({CONFIG_FORMS})")
        if lookup_first:
            if kind == "prompt_lookup":
                raise ValueError(f"{spec!r}: {LOOKUP_FIRST_SUFFIX} goes after a model drafter")
            drafter = LookupFirstDrafter(drafter)
        configs.append(DecodeConfig(spec, drafter, _speculation(spec, k, drafter)))
    return configs


def checkpoint_of(spec: str) -> Path | None:
    """The drafter directory a 'checkpoint=DIR[+prompt_lookup]:K' column names (None for other forms);
    ValueError for a column without its draft length or a directory that holds no drafter."""
    if spec == "off" or spec.startswith("hf_assisted="):
        return None
    kind, colon, k = spec.rpartition(":")
    if not colon or not kind or not k:
        raise ValueError(f"{spec!r}: expected a draft length after ':' ({CONFIG_FORMS})")
    if not kind.startswith("checkpoint="):
        return None
    directory = Path(split_lookup_first(kind[len("checkpoint="):])[0])
    if not (directory / "config.json").is_file():
        raise ValueError(f"{spec!r}: {directory} is not a drafter checkpoint (no config.json)")
    return directory


def _speculation(spec: str, k: str, drafter: Drafter) -> SpeculationParams:
    """A constant draft length K, or the dspark mode up to MAX tokens (default: the drafter's block size)."""
    mode, _, limit = k.partition("=")
    if mode != "dspark":
        if not k.isdigit() or not 1 <= int(k) <= MAX_DRAFT_TOKENS:
            raise ValueError(f"{spec!r}: the draft length must be a number in 1..{MAX_DRAFT_TOKENS} or dspark[=MAX] "
                             f"({CONFIG_FORMS})")
        return SpeculationParams("static", int(k))
    if limit:
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_DRAFT_TOKENS:
            raise ValueError(f"{spec!r}: MAX in dspark=MAX must be a number in 1..{MAX_DRAFT_TOKENS}")
        return SpeculationParams("dspark", int(limit))
    block_size = getattr(drafter, "block_size", None)
    if block_size is None:
        raise ValueError(f"{spec!r}: this drafter has no block size; give the longest draft as dspark=MAX")
    return SpeculationParams("dspark", block_size)


def needs_step_cost(configs: list[DecodeConfig | HFAssistedConfig]) -> bool:
    """Whether a column runs the dspark mode, which plans with the target's step-cost profile."""
    return any(isinstance(c, DecodeConfig) and c.spec.mode == "dspark" for c in configs)


def _run_one(engine: Engine, prompt_ids: list[int], params: SamplingParams, spec: SpeculationParams):
    """Tokens, seconds, seconds to the first token, target forwards, and the last chunk (its counters)."""
    chunks: list = []
    arrivals: list[float] = []

    def on_chunk(chunk) -> None:
        chunks.append(chunk)
        arrivals.append(time.perf_counter())

    engine.submit(prompt_ids, params, on_chunk, spec=spec)
    steps_before = engine.stats.steps
    start = time.perf_counter()
    while engine.step():
        pass
    seconds = time.perf_counter() - start
    if chunks[-1].finish_reason == "error":  # a benchmark of a failed request would time nothing
        raise RuntimeError(f"{spec.mode} request failed: {chunks[-1].error}")
    return ([t for c in chunks for t in c.token_ids], seconds, arrivals[0] - start, engine.stats.steps - steps_before,
            chunks[-1])


@torch.inference_mode()
def _run_hf_assisted(config: HFAssistedConfig, prompt_ids: list[int],
                     new_tokens: int) -> tuple[list[int], float, float, int, int]:
    """Greedy assisted generation; tokens, seconds, seconds to the end of the target's first forward
    (the prefill that yields the first token), and (rounds, accepted) read from its own counters."""
    ids = torch.tensor([prompt_ids])
    kwargs = {}
    if config.num_draft_tokens is not None:
        kwargs = dict(num_assistant_tokens=config.num_draft_tokens, num_assistant_tokens_schedule="constant",
                      assistant_confidence_threshold=0.0)
    calls = {"n": 0, "first_end": 0.0}
    forward = config.target.forward

    def counted(*args, **kw):
        calls["n"] += 1
        out = forward(*args, **kw)
        if calls["n"] == 1:
            calls["first_end"] = time.perf_counter()
        return out

    config.target.forward = counted
    try:
        start = time.perf_counter()
        seq = config.target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=config.assistant,
                                     do_sample=False, max_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        del config.target.forward
    tokens = seq[0, len(prompt_ids):].tolist()
    eos = config.target.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    while tokens and tokens[-1] in eos:  # our engine does not count the end token as output
        tokens.pop()
    rounds = calls["n"]  # each target forward verifies candidates (the first one with the prompt)
    return tokens, seconds, calls["first_end"] - start, rounds, max(len(tokens) - rounds, 0)


def run_spec_decode_benchmark(
    target: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    configs: list[DecodeConfig],
    new_tokens: int,
    max_context: int = 2048,
    progress: bool = False,
    step_cost: StepCostProfile | None = None,
) -> list[DecodeResult]:
    """``step_cost``: the target's profile, which dspark-mode columns plan with (required by them)."""
    if step_cost is None and needs_step_cost(configs):
        raise ValueError("dspark-mode configurations need the target's step-cost profile")
    params = SamplingParams(max_tokens=new_tokens)
    engines = [Engine(target, tokenizer, EngineConfig(1, max_context, new_tokens), c.drafter,
                      step_cost if c.spec.mode == "dspark" else None)
               if isinstance(c, DecodeConfig) else None for c in configs]
    results = [DecodeResult(c.label) for c in configs]
    warmup, warmup_tokens = prompts[0][:16], min(8, new_tokens)
    for engine, config in zip(engines, configs):
        if engine is None:
            _run_hf_assisted(config, warmup, warmup_tokens)
        else:
            _run_one(engine, warmup, SamplingParams(max_tokens=warmup_tokens), config.spec)
    with torch.inference_mode():
        for p, prompt_ids in enumerate(tqdm(prompts, desc="prompts", unit="prompt", disable=not progress)):
            order = list(range(len(configs)))
            order = order[p % len(order):] + order[: p % len(order)]
            for i in order:
                engine, r = engines[i], results[i]
                if engine is None:
                    tokens, seconds, first, rounds, accepted = _run_hf_assisted(configs[i], prompt_ids, new_tokens)
                    r.forwards += rounds
                    r.rounds += rounds
                    r.accepted += accepted
                else:
                    forward_before, draft_before = engine.stats.forward_seconds, engine.stats.draft_seconds
                    tokens, seconds, first, forwards, last = _run_one(engine, prompt_ids, params, configs[i].spec)
                    r.forwards += forwards
                    r.rounds += last.num_draft_rounds
                    r.drafted += last.num_draft_tokens
                    r.accepted += last.num_accepted_tokens
                    r.forward_seconds += engine.stats.forward_seconds - forward_before
                    r.draft_seconds += engine.stats.draft_seconds - draft_before
                r.tokens += len(tokens)
                r.seconds += seconds
                r.first_token_seconds += first
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
            "decode_tokens_per_s": round(r.decode_tokens_per_s, 2),
            "decode_speedup_vs_ar": (round(r.decode_tokens_per_s / base.decode_tokens_per_s, 3)
                                     if base.decode_tokens_per_s else None),
            "ttft_s": round(r.first_token_seconds / len(r.outputs), 3) if r.outputs else None,
            "tokens_per_round": round(r.tokens_per_round, 3) if r.tokens_per_round else None,
            "verified_per_round": round(r.drafted / r.rounds, 3) if r.drafted else None,
            "tokens_per_step": round(r.tokens_per_step, 3) if r.tokens_per_step else None,
            "acceptance_rate": round(r.accepted / r.drafted, 3) if r.drafted else None,
            "identical_to_ar": r.outputs == base.outputs,
            "forward_share": round(r.forward_seconds / r.seconds, 3) if r.forward_seconds else None,
            "draft_share": round(r.draft_seconds / r.seconds, 3) if r.forward_seconds else None,
        })
    return {"rows": rows}


def format_table(summary: dict) -> str:
    w = max([34] + [len(row["config"]) + 2 for row in summary["rows"]])  # long checkpoint paths keep columns aligned
    header = (f"{'config':<{w}}{'tok/s':>9}{'vs AR':>8}{'TTFT s':>8}{'decode tok/s':>13}{'vs AR':>8}{'tok/step':>9}"
              f"{'tok/round':>10}{'verify':>8}{'accept':>8}{'same as AR':>12}{'forward':>9}{'draft':>7}{'rest':>6}")
    lines = [header, "-" * len(header)]
    for row in summary["rows"]:
        tpr = f"{row['tokens_per_round']:.2f}" if row["tokens_per_round"] else "-"
        tps = f"{row['tokens_per_step']:.2f}" if row["tokens_per_step"] else "-"
        acc = f"{row['acceptance_rate']:.2f}" if row["acceptance_rate"] is not None else "-"
        ver = f"{row['verified_per_round']:.2f}" if row["verified_per_round"] else "-"
        split = "" if row["forward_share"] is None else (
            f"{row['forward_share']:>8.0%}{row['draft_share']:>7.0%}{1 - row['forward_share'] - row['draft_share']:>6.0%}")
        lines.append(
            f"{row['config']:<{w}}{row['tokens_per_s']:>9.2f}{row['speedup_vs_ar']:>7.2f}x{row['ttft_s']:>8.2f}"
            f"{row['decode_tokens_per_s']:>13.2f}{row['decode_speedup_vs_ar']:>7.2f}x{tps:>9}{tpr:>10}{ver:>8}{acc:>8}"
            f"{str(row['identical_to_ar']):>12}{split}"
        )
    lines.append("(tok/s: wall time with prefill; decode: after the first token; tok/step: tokens per decode forward "
                 "of the target, what a flat verify step turns into speedup; tok/round: per round that verified a draft; "
                 "verify: draft tokens verified per such round; forward / draft / rest: shares of our engine's wall time; hf_assisted rows: transformers' own loop)")
    return "\n".join(lines)
