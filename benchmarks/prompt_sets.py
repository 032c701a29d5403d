"""Prompt sets the benchmarks and load tests run on.

A set is named by one string: a JSONL file with a ``prompt`` field, a shipped set (``code``,
``mixed``: ``benchmarks/prompts/<name>.jsonl``), ``heldout:N``: N prompts of each domain
(code, chat, math) from the training sources' held-out split, which no drafter was trained or
calibrated on (``training/sources.py``), or ``heldout:DOMAIN:N`` for one domain.
"""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "prompts"
HELDOUT_DOMAINS = ("code", "chat", "math")


def read_prompts(path: Path) -> list[str]:
    """The ``prompt`` field of each line of a JSONL file; ValueError if there is none, or a line is not a JSON
    object with a string ``prompt``."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number} has no string 'prompt' field")
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def heldout_prompts(per_domain: int, domains: tuple[str, ...] = HELDOUT_DOMAINS) -> list[str]:
    """``per_domain`` held-out prompts of each domain, interleaved (code, chat, math by default)."""
    from training.sources import domain_prompts

    pools = [domain_prompts("heldout", d, per_domain, seed=1) for d in domains]
    if any(len(pool) < per_domain for pool in pools):
        raise ValueError(f"the held-out split has only {[len(p) for p in pools]} prompts for {domains}")
    return [p.text for group in zip(*pools) for p in group]


def load_prompt_set(spec: str) -> list[str]:
    """The prompts a set name stands for (see the module docstring); ValueError for an unknown name."""
    if spec.startswith("heldout:"):
        *domain, count = spec.split(":")[1:]
        if domain and domain[0] not in HELDOUT_DOMAINS:
            raise ValueError(f"unknown domain in {spec!r}; expected one of {HELDOUT_DOMAINS}")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{spec!r}: the count per domain must be a whole number >= 1")
        return heldout_prompts(int(count), tuple(domain) or HELDOUT_DOMAINS)
    if "/" not in spec and (SHIPPED / f"{spec}.jsonl").exists():  # a path names its own file, never a shipped set
        return read_prompts(SHIPPED / f"{spec}.jsonl")
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"prompt set {spec!r} is a directory; expected a .jsonl file")
    if not path.exists():
        raise ValueError(f"prompt set {spec!r} is neither a file, a shipped set {sorted(p.stem for p in SHIPPED.glob('*.jsonl'))} "
                         "nor heldout:[DOMAIN:]N")
    return read_prompts(path)
