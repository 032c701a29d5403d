"""Training and benchmark prompts, answered by the target itself, with its tapped features cached.

Prompts come from what every machine here has: functions of the Python standard library
(explain / complete / document / review them), plus templated chat and arithmetic questions so
the chat and math domains are not wholly unseen. Files are split by a hash of their path, so the
held-out benchmark never sees a training file. The target answers with the chat template, and
the hidden states it produced on the way (the drafter's taps and the final norm, for target
distributions) are stored in float16 next to the tokens.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models.transformer import Transformer

CODE_TEMPLATES = (
    "Explain what this Python function does:\n```python\n{code}\n```",
    "Write a short docstring for this function:\n```python\n{code}\n```",
    "Point out one possible bug or edge case in this code:\n```python\n{code}\n```",
    "Rewrite this function in a more readable way:\n```python\n{code}\n```",
    "Complete this Python code:\n```python\n{head}",
)
CHAT_TOPICS = (
    "learning a new language", "keeping houseplants alive", "planning a weekend trip", "writing a cover letter",
    "improving sleep", "starting to run", "saving money", "cooking rice", "time management", "public speaking",
    "choosing a laptop", "the history of the printing press", "how rainbows form", "why the sky is blue",
    "the water cycle", "how vaccines work", "volcanoes", "the moon's phases", "photosynthesis", "black holes",
    "recycling", "remote work", "team meetings", "reading more books", "learning to draw", "caring for a cat",
)
CHAT_TEMPLATES = (
    "Give me three tips about {topic}.", "Explain {topic} to a ten-year-old.", "Write a short paragraph about {topic}.",
    "What are the pros and cons of {topic}?", "Summarize the key ideas of {topic} in a few sentences.",
)
HELD_OUT_TOPICS = ("learning to swim", "how tides work", "organizing a closet", "how airplanes fly", "making tea")


@dataclass
class Prompt:
    domain: str  # "code" | "chat" | "math"
    text: str


def _held_out(key: str, fraction: float = 0.1) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


@functools.lru_cache(maxsize=4)
def stdlib_functions(max_chars: int = 700, min_lines: int = 4, max_files: int = 40) -> tuple[tuple[str, str], ...]:
    """(file key, source) of functions from the standard library's top-level modules (the first
    ``max_files`` by a hash order: parsing them all takes minutes on a busy 2-core machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())[:max_files]
    found = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                src = ast.get_source_segment(text, node)
                if src and len(src) <= max_chars and src.count("\n") + 1 >= min_lines:
                    found.append((rel, src))
    return tuple(found)


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 40), rng.randint(2, 12)
    item = rng.choice(["apples", "books", "pencils", "tickets", "boxes", "stamps"])
    name = rng.choice(["Anna", "Ben", "Chen", "Dana", "Omar", "Lena"])
    return rng.choice([
        f"{name} has {a} {item} and buys {b} more, then gives away {c}. How many {item} are left? Explain step by step.",
        f"What is {a} times {b}, plus {c}? Show your work.",
        f"A shop sells {item} at {c} dollars each. How much do {b} {item} cost? Answer step by step.",
        f"Solve for x: {c}x + {b} = {b + c * a}. Explain each step.",
        f"{name} reads {b} pages a day. How many days to read a {a * b}-page book? Explain.",
    ])


def build_prompts(split: str, num_per_domain: dict[str, int], seed: int = 0) -> list[Prompt]:
    """Prompts of one split ("train" or "heldout"); held-out code comes from files never trained on."""
    rng = random.Random(f"{split}-{seed}")
    want_held = split == "heldout"
    prompts: list[Prompt] = []
    funcs = [src for key, src in stdlib_functions() if _held_out(key) == want_held]
    rng.shuffle(funcs)
    for src in funcs[: num_per_domain.get("code", 0)]:
        lines = src.splitlines()
        template = rng.choice(CODE_TEMPLATES)
        prompts.append(Prompt("code", template.format(code=src, head="\n".join(lines[: max(2, len(lines) // 2)]))))
    topics = HELD_OUT_TOPICS if want_held else CHAT_TOPICS
    for _ in range(num_per_domain.get("chat", 0)):
        prompts.append(Prompt("chat", rng.choice(CHAT_TEMPLATES).format(topic=rng.choice(topics))))
    math_rng = random.Random(f"math-{split}-{seed}")
    for _ in range(num_per_domain.get("math", 0)):
        prompts.append(Prompt("math", _math_prompt(math_rng)))
    return prompts


@dataclass
class Sequence:
    """One prompt + target answer with the target's hidden states at every fed position."""

    tokens: torch.Tensor  # int64 [S]
    prompt_len: int
    features: torch.Tensor  # float16 [S-1, taps * H]: fused taps of positions 0..S-2 (the last token was never fed)
    final_hidden: torch.Tensor  # float16 [S-1, H]: final-norm output, for the target's next-token distributions


@torch.no_grad()
def generate_with_features(target: Transformer, prompts: list[list[int]], tap_layers: tuple[int, ...],
                           max_new_tokens: int, batch_size: int = 16, temperature: float = 0.0,
                           seed: int = 0, progress: bool = True) -> list[Sequence]:
    """Batched answers from the target (greedy or sampled), keeping the tapped states of every fed token."""
    final_layer = target.config.num_layers
    taps = tuple(tap_layers) + (final_layer,)
    eos = set(target.config.eos_token_ids)
    gen = torch.Generator().manual_seed(seed)
    out: list[Sequence] = []
    bar = tqdm(total=len(prompts), desc="target answers", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        B = len(batch)
        cache = target.new_cache(B, max(len(p) for p in batch) + max_new_tokens + 1)
        slots = list(range(B))
        feats: list[list[torch.Tensor]] = [[] for _ in range(B)]
        finals: list[list[torch.Tensor]] = [[] for _ in range(B)]
        new_tokens: list[list[int]] = [[] for _ in range(B)]
        num_new = [len(p) for p in batch]
        ids = torch.tensor([t for p in batch for t in p])
        done = [False] * B
        for _ in range(max_new_tokens):
            res = target(ids, slots, num_new, cache, logits_indices=target.last_token_indices(num_new), tap_layers=taps)
            fused = torch.cat([res.hidden_states[t] for t in tap_layers], -1).half()
            final = res.hidden_states[final_layer].half()
            for b, chunk in enumerate(torch.split(torch.arange(fused.shape[0]), num_new)):
                feats[slots[b]].append(fused[chunk])
                finals[slots[b]].append(final[chunk])
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(res.logits / temperature, -1), 1, generator=gen).squeeze(-1)
            else:
                nxt = res.logits.argmax(-1)
            keep = []
            for b, tok in zip(slots, nxt.tolist()):
                new_tokens[b].append(tok)
                if tok in eos:
                    done[b] = True
                else:
                    keep.append((b, tok))
            if not keep:
                break
            slots = [b for b, _ in keep]
            num_new = [1] * len(slots)
            ids = torch.tensor([t for _, t in keep])
        for b in range(B):
            out.append(Sequence(tokens=torch.tensor(batch[b] + new_tokens[b]), prompt_len=len(batch[b]),
                                features=torch.cat(feats[b])[: len(batch[b]) + len(new_tokens[b]) - 1],
                                final_hidden=torch.cat(finals[b])[: len(batch[b]) + len(new_tokens[b]) - 1]))
        bar.update(B)
    bar.close()
    return out


def load_or_build_dataset(path: Path, target: Transformer, encode, prompts: list[Prompt], tap_layers: tuple[int, ...],
                          max_new_tokens: int, temperature: float = 0.0, batch_size: int = 16) -> list[Sequence]:
    """The cached dataset at ``path`` (a torch file), generating and saving it on first use."""
    if path.exists():
        return [Sequence(**d) for d in torch.load(path)]
    seqs = generate_with_features(target, [encode(p.text) for p in prompts], tap_layers, max_new_tokens,
                                  batch_size=batch_size, temperature=temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save([s.__dict__ for s in seqs], tmp)
    tmp.replace(path)
    return seqs
