"""Tokens accepted per round for trained drafters: the engine's draft -> verify -> accept loop
without the serving machinery, batched over a domain's held-out prompts.

Each round drafts ``block`` tokens from the current anchor, verifies them with one target forward
using the lossless rule (greedy match at T=0, rejection sampling at T=1), rolls the target's KV
cache back to the accepted length, and extends the drafter's context with the accepted tokens'
target features: exactly what the serving engine does per request.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from models.drafters import greedy_sample
from models.transformer import Transformer
from orchestrator.prompt_lookup import propose_ngram_draft
from orchestrator.verification import verify_sampling_batched


@torch.no_grad()
def simulate(target: Transformer, drafter, prompts: list[list[int]], temperature: float, block: int,
             new_tokens: int, seed: int = 0) -> dict:
    """Run speculative rounds for all prompts at once: tokens per round, per-position conditional
    acceptance, and the emitted tokens ("outputs", the target's own output by losslessness)."""
    B = len(prompts)
    gen = torch.Generator().manual_seed(seed)
    taps = drafter.tap_layers
    max_len = max(len(p) for p in prompts) + new_tokens + block + 2
    cache = target.new_cache(B, max_len)
    state = drafter.new_state(B, max_len)
    eos = set(target.config.eos_token_ids)

    def probs_of(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return greedy_sample(logits)[1]
        return torch.softmax(logits.float() / temperature, -1)

    def sample_fn(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if temperature == 0:
            return greedy_sample(logits)
        p = probs_of(logits)
        return torch.multinomial(p, 1, generator=gen).squeeze(-1), p

    slots = list(range(B))
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    res = target(ids, slots, lens, cache, logits_indices=target.last_token_indices(lens), tap_layers=taps)
    drafter.extend_context(state, slots, lens, res.hidden_states, ids)
    anchors = sample_fn(res.logits)[0]
    outputs = [[int(t)] for t in anchors.tolist()]
    accepted: list[int] = []
    attempts = torch.zeros(block)
    successes = torch.zeros(block)
    active = list(range(B))
    while active:
        anc = anchors[active]
        blk = drafter.draft(state, active, anc, block, sample_fn, greedy=temperature == 0)
        ver_ids = torch.cat([anc.unsqueeze(1), blk.tokens], 1)
        n_act = len(active)
        out = target(ver_ids.flatten(), active, [block + 1] * n_act, cache, tap_layers=taps)
        p = probs_of(out.logits).view(n_act, block + 1, -1)
        result = verify_sampling_batched(blk.tokens, blk.probs, p, gen)
        rows, keep_counts = [], []
        for i, slot in enumerate(active):
            n = int(result.num_accepted[i])
            accepted.append(n)
            attempts[: min(n + 1, block)] += 1
            successes[:n] += 1
            cache.truncate(slot, int(cache.lengths[slot]) - block + n)
            rows.extend(range(i * (block + 1), i * (block + 1) + n + 1))
            keep_counts.append(n + 1)
            anchors[slot] = result.tokens[i, n]
        rows_t = torch.tensor(rows)
        hidden = {k: v.index_select(0, rows_t) for k, v in out.hidden_states.items()}
        drafter.extend_context(state, active, keep_counts, hidden, ver_ids.flatten().index_select(0, rows_t))
        still = []
        for i, slot in enumerate(active):
            n = int(result.num_accepted[i])
            toks = result.tokens[i, : n + 1].tolist()
            outputs[slot].extend(toks)
            if len(outputs[slot]) < new_tokens and not eos.intersection(toks):
                still.append(slot)
        active = still
    return {"rounds": len(accepted), "tokens_per_round": 1 + sum(accepted) / max(len(accepted), 1),
            "position_acceptance": (successes / attempts.clamp_min(1)).tolist(), "outputs": outputs}


@torch.no_grad()
def simulate_prompt_lookup(target: Transformer, prompts: list[list[int]], num_tokens: int, new_tokens: int,
                           max_ngram: int = 3) -> dict:
    """Greedy rounds with prompt-lookup drafts of up to ``num_tokens`` tokens: tokens per target
    forward, counting rounds where nothing matched (a plain step) as 1."""
    B = len(prompts)
    cache = target.new_cache(B, max(len(p) for p in prompts) + new_tokens + num_tokens + 2)
    lens = [len(p) for p in prompts]
    res = target(torch.tensor([t for p in prompts for t in p]), list(range(B)), lens, cache,
                 logits_indices=target.last_token_indices(lens))
    outputs = [[int(t)] for t in res.logits.argmax(-1).tolist()]
    eos = set(target.config.eos_token_ids)
    emitted: list[int] = []
    active = [b for b in range(B) if outputs[b][-1] not in eos]
    while active:
        drafts = [propose_ngram_draft(prompts[b] + outputs[b], num_tokens, max_ngram) for b in active]
        feeds = [[outputs[b][-1]] + d for b, d in zip(active, drafts)]
        out = target(torch.tensor([t for f in feeds for t in f]), active, [len(f) for f in feeds], cache)
        preds = out.logits.argmax(-1).split([len(f) for f in feeds])
        still = []
        for b, draft, pred in zip(active, drafts, preds):
            pred = pred.tolist()
            n = next((i for i, t in enumerate(draft) if t != pred[i]), len(draft))
            cache.truncate(b, int(cache.lengths[b]) - (len(draft) - n))
            outputs[b].extend(pred[: n + 1])
            emitted.append(n + 1)
            if len(outputs[b]) < new_tokens and not eos.intersection(pred[: n + 1]):
                still.append(b)
        active = still
    return {"rounds": len(emitted), "tokens_per_round": sum(emitted) / max(len(emitted), 1), "outputs": outputs}


def format_table(results: dict) -> str:
    """Rows: domain x temperature; columns: tokens per round per drafter (prompt lookup at its best K,
    greedy rows only), plus DSpark's ratios."""
    drafters = list(results)
    keys = list(dict.fromkeys(k for d in drafters for k in results[d]))
    lines = ["| domain / T | " + " | ".join(drafters) + " | dspark/dflash | dspark/eagle3 |",
             "|---" * (len(drafters) + 3) + "|"]
    for key in keys:
        vals = {d: results[d][key]["tokens_per_round"] for d in drafters if key in results[d]}
        ratio = lambda a, b: f"{vals[a] / vals[b]:.2f}x" if a in vals and b in vals else "-"
        cells = [f"{vals[d]:.2f}" if d in vals else "-" for d in drafters]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {ratio('dspark', 'dflash')} | {ratio('dspark', 'eagle3')} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Left: tokens per round per drafter and setting; right: per-position conditional acceptance (mean over settings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drafters = [d for d in results if all("position_acceptance" in r for r in results[d].values())]
    keys = list(results[drafters[0]])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(drafters)
    for i, d in enumerate(drafters):
        ax1.bar([k + i * width for k in range(len(keys))], [results[d][key]["tokens_per_round"] for key in keys],
                width, label=d)
        acc = torch.tensor([results[d][key]["position_acceptance"] for key in keys]).mean(0)
        ax2.plot(range(1, len(acc) + 1), acc.tolist(), "o-", label=d)
    ax1.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys, rotation=30, ha="right")
    ax1.set_ylabel("tokens per round (incl. bonus)")
    ax1.legend()
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("conditional acceptance")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "acceptance.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    (out_dir / "acceptance.md").write_text(table + "\n")
    plot(results, out_dir / "acceptance.png")
    return table
