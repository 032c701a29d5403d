"""Prompts answered by the target itself, with the target's tapped features kept for training.

The target answers in large batches with our own batched forward (on this CPU, bf16, one thread:
411 answer tokens/s at batch 128, against 147 for transformers' batched ``generate`` at batch 64),
greedily or sampled per answer, and its generating forwards keep everything training needs, so no
target forward runs while training: the fused taps of every fed position (the drafter's context),
and for the answer positions the final-norm output and the log-partition of the full-vocabulary
logits, which make the target's probabilities over any draft vocabulary exact (see ``training.losses``).

Generation writes one shard per batch and skips shards already on disk, so an interrupted build
resumes; a fixed prompt order and per-shard sampling seeds make a rebuilt shard the same. Several
workers may build one directory at once (one per core): each claims a shard before answering it.
"""
from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from models.transformer import ForwardOutput, Transformer
from training.sources import Prompt


@dataclass
class Sequence:
    """One prompt + target answer with the target's hidden states."""

    tokens: torch.Tensor  # int64 [S]
    prompt_len: int
    features: torch.Tensor  # float16 [S-1, taps * H]: fused taps of positions 0..S-2 (the last token was never fed)
    final_hidden: torch.Tensor  # float16 [S - prompt_len, H]: final-norm output at positions prompt_len-1..S-2
    target_lse: torch.Tensor  # float32 [S - prompt_len]: logsumexp of the full target logits at those positions

    def answer_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of final_hidden / target_lse for absolute positions (>= prompt_len - 1)."""
        return positions - (self.prompt_len - 1)

    def to(self, device: str | torch.device) -> "Sequence":
        return Sequence(self.tokens.to(device), self.prompt_len, self.features.to(device),
                        self.final_hidden.to(device), self.target_lse.to(device))


@dataclass(frozen=True)
class AnswerSpec:
    """How the target answers each prompt: one answer per temperature (0 = greedy), at most
    ``max_new_tokens`` long, ``batch_size`` prompts per generation batch (one shard each). Sampled
    answers draw from a generator seeded by ``seed`` and the shard, so a rebuilt shard is the same."""

    max_new_tokens: int
    temperatures: tuple[float, ...] = (0.0,)
    batch_size: int = 128
    seed: int = 0


StepHook = Callable[[list[int], list[int], ForwardOutput], None]


@torch.no_grad()
def generate_answers(target: Transformer, prompts: list[list[int]], temperatures: list[float], max_new_tokens: int,
                     generator: torch.Generator | None = None, tap_layers: tuple[int, ...] = (),
                     on_forward: StepHook | None = None) -> list[list[int]]:
    """Answer all prompts in one batch: row i greedy when temperatures[i] is 0, else sampled at that
    temperature (``generator`` on the target's device). Each answer ends at EOS (kept) or at
    ``max_new_tokens``. ``on_forward(rows, num_new, output)`` sees every forward (the prefill, then one
    token per unfinished row), its logits at each row's last fed token and the ``tap_layers`` outputs."""
    B = len(prompts)
    if len(temperatures) != B:
        raise ValueError(f"need one temperature per prompt, got {len(temperatures)} for {B}")
    eos = torch.tensor(sorted(target.config.eos_token_ids), device=target.device)
    temps = torch.tensor(temperatures, dtype=torch.float32, device=target.device)
    cache = target.new_cache(B, max(len(p) for p in prompts) + max_new_tokens + 1)
    answers: list[list[int]] = [[] for _ in range(B)]
    rows = torch.arange(B)
    num_new = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    for _ in range(max_new_tokens):
        fed_rows = rows.tolist()
        out = target(ids, fed_rows, num_new, cache, logits_indices=target.last_token_indices(num_new),
                     tap_layers=tap_layers)
        if on_forward is not None:
            on_forward(fed_rows, num_new, out)
        logits = out.logits
        t = temps[rows.to(temps.device)]
        nxt = logits.argmax(-1)
        hot = t > 0
        if bool(hot.any()):
            probs = torch.softmax(logits[hot] / t[hot, None], -1)
            nxt[hot] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        going = ~torch.isin(nxt, eos)
        for row, tok in zip(rows.tolist(), nxt.tolist()):
            answers[row].append(tok)
        if not bool(going.any()):
            break
        rows, ids = rows[going.cpu()], nxt[going]
        num_new = [1] * len(rows)
    return answers


def generate_with_features(target: Transformer, prompts: list[list[int]], tap_layers: tuple[int, ...],
                           max_new_tokens: int, temperatures: list[float] | None = None,
                           generator: torch.Generator | None = None) -> list[Sequence]:
    """Answer the prompts in one batch (greedy unless ``temperatures`` say otherwise), keeping what
    training needs of every sequence from the generating forwards themselves: the fused taps of every
    fed position and, at each row's last fed token (the answer positions), the final-norm output and
    the log-partition of the full logits (tensors on the CPU). A second, teacher-forced pass over the
    finished sequences recomputed all of it: a shard of 64 Qwen2.5-Coder-1.5B answers (~12k answer
    tokens, bf16, one thread) took 10-10.5 minutes with it and 5.6-6.4 without."""
    final_layer = target.config.num_layers
    feats: list[list[torch.Tensor]] = [[] for _ in prompts]
    finals: list[list[torch.Tensor]] = [[] for _ in prompts]
    lses: list[list[torch.Tensor]] = [[] for _ in prompts]

    def keep(rows: list[int], num_new: list[int], out: ForwardOutput) -> None:
        fused = torch.cat([out.hidden_states[t] for t in tap_layers], -1).half().cpu()
        last = target.last_token_indices(num_new).to(target.device)
        final = out.hidden_states[final_layer].index_select(0, last).half().cpu()
        lse = torch.logsumexp(out.logits.float(), -1).cpu()
        for row, f, h, z in zip(rows, torch.split(fused, num_new), final, lse):
            feats[row].append(f)
            finals[row].append(h)
            lses[row].append(z)

    answers = generate_answers(target, prompts, temperatures or [0.0] * len(prompts), max_new_tokens, generator,
                               tuple(tap_layers) + (final_layer,), keep)
    # the last answer token is never fed: its forward did not run, so nothing of it is kept
    return [Sequence(tokens=torch.tensor(p + a), prompt_len=len(p), features=torch.cat(f),
                     final_hidden=torch.stack(h), target_lse=torch.stack(z))
            for p, a, f, h, z in zip(prompts, answers, feats, finals, lses)]


def _shards(directory: Path, count: int, batch_size: int) -> tuple[list[list[int]], list[Path]]:
    """Item indices of each shard (a fixed shuffle) and the shard files."""
    order = list(range(count))
    random.Random(0).shuffle(order)
    shards = [order[i:i + batch_size] for i in range(0, count, batch_size)]
    return shards, [Path(directory) / f"shard-{i:05d}.pt" for i in range(len(shards))]


UNNAMED_CLAIM_STALE_S = 60  # a worker names itself right after creating its claim: an unnamed one this old is dead


def _holder(claim: Path) -> tuple[str, int] | None:
    """(host, pid) a claim file names; None when it names no worker (unreadable, empty or malformed)."""
    try:
        host, _, pid = claim.read_text().partition(" ")
    except OSError:
        return None
    return (host, int(pid)) if host and pid.isdigit() else None


def _claim(shard: Path) -> Path | None:
    """Claim a shard for this process (None when another worker holds it). The claim file names host
    and pid, so a claim left by a worker that died on this host is taken over, and so is one naming no
    worker once it is stale; a claim of another host is left to that host."""
    claim = shard.with_suffix(".claim")
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(claim)
            if holder is None:
                try:
                    if time.time() - claim.stat().st_mtime < UNNAMED_CLAIM_STALE_S:
                        return None  # just created: its worker is writing its name
                except FileNotFoundError:
                    continue
            elif holder[0] != socket.gethostname() or Path(f"/proc/{holder[1]}").exists():
                return None
            claim.unlink(missing_ok=True)  # its worker is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return claim
    return None


def _waiting_message(paths: list[Path], waiting: bool = True) -> str:
    """Which shards a worker waits for, who holds them, and how to free a dead host's claim."""
    held = []
    for path in paths:
        claim = path.with_suffix(".claim")
        holder = _holder(claim)
        held.append(f"{path.stem} (claimed by {holder[0]} pid {holder[1]})" if holder else f"{path.stem} (claimed)")
    return (f"{'waiting for' if waiting else 'leaving'} {len(paths)} shard(s) other workers hold: {', '.join(held[:4])}"
            f"{' ...' if len(held) > 4 else ''}; if such a worker is gone (another host cannot be checked from "
            f"here), delete {paths[0].with_suffix('.claim')} and the like")


def generated_prompts(directory: Path, prompts: list[Prompt], spec: AnswerSpec) -> list[Prompt]:
    """The prompts (once per answer) whose answers are on disk."""
    shards, paths = _shards(directory, len(prompts) * len(spec.temperatures), spec.batch_size)
    return [prompts[j % len(prompts)] for shard, path in zip(shards, paths) if path.exists() for j in shard]


def build_dataset(directory: Path, target: Transformer | None, encode: Callable[[str], list[int]] | None,
                  prompts: list[Prompt], tap_layers: tuple[int, ...], spec: AnswerSpec, progress: bool = True,
                  generate: bool = True, wait: bool = True) -> list[Sequence]:
    """The dataset in ``directory`` (one torch file per batch of answers), generating missing shards
    and waiting for those other workers hold (or, with ``generate`` False, just the shards already there).
    With ``wait`` False it answers the shards no one holds and returns the shards done so far, so a
    worker can start on another set while the others finish this one.

    Item j answers prompt j % P at temperature ``spec.temperatures[j // P]``; items are shuffled
    with a fixed seed first, so any finished prefix of shards is a fair sample of the whole mix.
    ``target`` and ``encode`` may be None when no shard is generated.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    P = len(prompts)
    total = P * len(spec.temperatures)
    shards, paths = _shards(directory, total, spec.batch_size)
    pending = [i for i, p in enumerate(paths) if not p.exists()] if generate else []
    if pending and (target is None or encode is None):
        raise ValueError(f"{paths[pending[0]]} is missing and no target was given to generate it")
    (directory / "prompts.json").write_text(json.dumps([p.__dict__ for p in prompts]) + "\n")
    bar = tqdm(total=total, initial=total - sum(len(shards[i]) for i in pending), desc="target answers",
               disable=not progress or not pending)

    def show_done() -> None:  # other workers' shards count too
        bar.n = total - sum(len(shards[j]) for j in pending if not paths[j].exists())
        bar.refresh()

    told: list[int] = []
    while pending:
        for i in pending:
            claim = _claim(paths[i])
            if claim is None:  # being done by another worker
                continue
            try:
                if paths[i].exists():  # done already
                    continue
                generator = torch.Generator(target.device).manual_seed(spec.seed * 1_000_003 + i)
                started = time.perf_counter()
                seqs = generate_with_features(target, [encode(prompts[j % P].text) for j in shards[i]], tap_layers,
                                              spec.max_new_tokens, [spec.temperatures[j // P] for j in shards[i]],
                                              generator)
                answered = sum(len(s.tokens) - s.prompt_len for s in seqs)
                bar.set_postfix_str(f"{answered / (time.perf_counter() - started):.1f} answer tokens/s", refresh=False)
                tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")
                torch.save([s.__dict__ for s in seqs], tmp)
                tmp.replace(paths[i])
            finally:
                if _holder(claim) == (socket.gethostname(), os.getpid()):  # not another's that took a stale one over
                    claim.unlink(missing_ok=True)
            show_done()
        show_done()
        waiting = [i for i in pending if not paths[i].exists()]
        if waiting and waiting != told:  # say so, again whenever the set waited for changes
            tqdm.write(_waiting_message([paths[i] for i in waiting], wait), file=sys.stderr)
            told = waiting
        if waiting and not wait:
            break
        if waiting:  # other workers hold them; a dead worker's claim is taken over on the next pass
            time.sleep(5)
        pending = waiting
    bar.close()
    # memory-mapped: a million answer tokens' features are ~10 GB, read a few sequences per step
    return [Sequence(**d) for p in paths if p.exists() for d in torch.load(p, mmap=True)]
