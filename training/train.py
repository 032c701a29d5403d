"""The training loop: anchors drawn without replacement over target-regenerated sequences, frozen
target tensors, AdamW with warmup + cosine, resumable checkpoints (the learning-rate schedule and
the data order continue where they stopped), periodic held-out figures, and STS calibration."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models.drafters import BlockDrafter, DrafterConfig, build_drafter, save_drafter
from models.drafters.dspark import GREEDY, SAMPLED
from models.transformer import Transformer
from training.calibration import (
    cumulative_survival,
    expected_calibration_error,
    reliability_diagram,
    sequential_calibration,
)
from training.data import Sequence
from training.heap import release_free_heap
from training.layer_init import init_layers_from_target
from training.losses import LossWeights, drafter_loss, subset_total_variation

STATE_FILE = "training_state.pt"
RUN_MARKER = ".dspark-train"  # in every --out a run wrote: a directory train may write into (and resume)


def run_record(cfg: TrainConfig, data: list[str]) -> dict:
    """What makes a resumed run the same run: the options that set its schedule and batches, and its
    data (each training set by a name that hashes its content)."""
    fields = ("steps", "batch_size", "anchors", "lr", "weight_decay", "warmup", "max_len", "max_minutes", "seed", "loss")
    return {"train": {f: repr(getattr(cfg, f)) for f in fields}, "data": list(data)}


def saved_run(out_dir: Path) -> dict | None:
    """The drafter configuration (JSON), run record and draft vocabulary of the run saved in
    ``out_dir``; None when it holds none."""
    state_file = Path(out_dir) / STATE_FILE
    if not state_file.exists():
        return None
    saved = torch.load(state_file, weights_only=False, mmap=True)
    return {"config": saved["config"], "run": saved.get("run"), "draft_vocab": saved.get("draft_vocab")}


@dataclass
class TrainConfig:
    steps: int | None = 300  # None: until max_minutes runs out
    batch_size: int = 4  # sequences per step
    anchors: int = 48  # blocks per sequence per step, drawn without replacement
    lr: float = 1e-3
    weight_decay: float = 0.0  # the paper uses none
    warmup: int = 20
    max_len: int = 1024  # longer sequences are cropped (keeping the answer's start)
    checkpoint_every: int = 100
    eval_every: int = 0  # steps between held-out figures (0: none)
    max_minutes: float | None = None  # training time of the whole run, resumes included
    session_steps: int | None = None  # stop this process after so many steps (checkpointed); the run's schedule stays
    seed: int = 0
    device: str = "cpu"  # "cuda" trains under bf16 autocast
    bf16: bool = False  # bf16 autocast on the CPU too (1.3x faster per step on AVX512-BF16 cores)
    loss: LossWeights = LossWeights()


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [B, S]
    features: torch.Tensor  # [B, S, taps*H]
    anchors: torch.Tensor  # int64 [B, A]
    weight: torch.Tensor  # [B, A]: 0 for padding anchors of short answers
    final_hidden: torch.Tensor  # [B, A, W, H]: target final states at the block's positions
    target_lse: torch.Tensor  # [B, A, W]

    def to(self, device: str) -> "Batch":
        return Batch(*(t.to(device) for t in self.__dict__.values()))


def usable(seqs: list[Sequence], block: int) -> list[Sequence]:
    """Sequences whose answer holds at least one whole block."""
    return [s for s in seqs if len(s.tokens) - s.prompt_len >= block + 1]


def make_batch(seqs: list[Sequence], cfg: TrainConfig, block: int, gen: torch.Generator) -> Batch:
    """Pad sequences into a batch and draw up to ``cfg.anchors`` distinct anchors in each answer
    (on the sequences' device; ``gen`` is a CPU generator)."""
    B, A = len(seqs), cfg.anchors
    dev = seqs[0].tokens.device
    crops = []
    for s in seqs:
        n = min(len(s.tokens), cfg.max_len)
        start = max(0, min(s.prompt_len - 1, len(s.tokens) - n))
        crops.append((start, start + n))
    S = max(e - st for st, e in crops)
    feat_dim, hid = seqs[0].features.shape[1], seqs[0].final_hidden.shape[1]
    tokens = torch.zeros(B, S, dtype=torch.int64, device=dev)
    feats = torch.zeros(B, S, feat_dim, device=dev)
    anchors = torch.zeros(B, A, dtype=torch.int64)
    weight = torch.zeros(B, A)
    for b, (s, (st, e)) in enumerate(zip(seqs, crops)):
        n = e - st
        tokens[b, :n] = s.tokens[st:e]
        m = min(n, s.features.shape[0] - st)
        feats[b, :m] = s.features[st:st + m].float()
        lo = max(1, s.prompt_len - 1 - st)  # first anchor: the last prompt token (predicts the answer's start)
        hi = n - block - 1  # the block's labels anchor+1..anchor+W stay inside the sequence
        count = hi - lo + 1
        if count >= A:
            anchors[b] = torch.randperm(count, generator=gen)[:A] + lo
            weight[b] = 1.0
        else:
            anchors[b, :count] = torch.arange(lo, hi + 1)
            anchors[b, count:] = lo
            weight[b, :count] = 1.0
    anchors, weight = anchors.to(dev), weight.to(dev)
    offsets = torch.arange(block, device=dev)
    rows = [s.answer_rows(st + anchors[b].unsqueeze(-1) + offsets) for b, (s, (st, _)) in enumerate(zip(seqs, crops))]
    finals = torch.stack([s.final_hidden[r].float() for s, r in zip(seqs, rows)])
    lse = torch.stack([s.target_lse[r] for s, r in zip(seqs, rows)])
    return Batch(tokens, feats, anchors, weight, finals, lse)


def block_targets(drafter, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [B, A, W] as draft-vocabulary ids (-1 outside) and the target's log-probabilities of the
    draft vocabulary [B, A, W, Vd] (normalised over the full vocabulary), float32. Under bf16 autocast
    the head's product runs in bf16, as the target computed the logits its stored log-partitions
    come from (4x faster than float32 on an AVX512-BF16 core, a fifth of a 1.5B drafter's step)."""
    W = batch.final_hidden.shape[2]
    pos = batch.anchors.unsqueeze(-1) + torch.arange(W, device=batch.anchors.device)
    labels = batch.tokens.gather(1, (pos + 1).flatten(1)).view_as(pos)
    with torch.no_grad():
        head = drafter.draft_head().float()
        logprobs = (batch.final_hidden @ head.T).float() - batch.target_lse.unsqueeze(-1)
    return drafter.to_draft_ids(labels), logprobs


def learning_rate(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine decay to zero over the run; with a wall-clock budget the decay
    follows whichever of steps or time runs out first, so a timed run still ends annealed.
    ``elapsed_s`` counts the whole run's training time, so a resumed run continues its cosine."""
    done = 0.0 if cfg.steps is None else step / cfg.steps
    if cfg.max_minutes:
        done = max(done, elapsed_s / (60 * cfg.max_minutes))
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _autocast(cfg: TrainConfig):
    if cfg.device.startswith("cuda") or cfg.bf16:
        return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


RECENT_SPANS = (1, 16)  # context positions just before an anchor whose attention share evaluate() reports


@torch.no_grad()
def evaluate(drafter, batches: list[Batch], cfg: TrainConfig) -> dict:
    """Teacher-forced held-out figures: tokens per round at T=1 and T=0, per-position acceptance, and
    for block drafters the share of each layer's attention on the last 1 and 16 context positions
    before the anchor ("recent_attention"): a drafter that uses the target's features well looks
    there (the SmolLM2 drafter's second layer puts ~0.4 on the last one after 1,100 steps)."""
    drafter.eval()
    taus, greedy, accept = [], [], []
    block_drafter = isinstance(drafter, BlockDrafter)
    recent = RecentAttention(drafter.config.num_layers, drafter.config.block_size)
    for batch in batches:
        batch = batch.to(cfg.device)
        with _autocast(cfg):
            labels, logprobs = block_targets(drafter, batch)
            if block_drafter:
                logits, conf = drafter.train_forward(batch.features, batch.tokens, batch.anchors, recent.observer(batch))
            else:
                logits, conf = drafter.train_forward(batch.features, batch.tokens, batch.anchors)
        out = drafter_loss(logits.flatten(0, 1), logprobs.flatten(0, 1), labels.flatten(0, 1),
                           None, cfg.loss, batch.weight.flatten())
        taus.append(out.tau)
        greedy.append(out.tau_greedy)
        accept.append(out.accept)
    drafter.train()
    figures = {"tau": sum(taus) / len(taus), "tau_greedy": sum(greedy) / len(greedy),
               "accept": [round(float(a), 4) for a in torch.stack(accept).mean(0)]}
    if block_drafter:
        figures["recent_attention"] = recent.shares()
    return figures


class RecentAttention:
    """Accumulates, per drafter layer, the attention share of valid blocks' queries (mean over heads
    and block positions) on the last d context positions before their anchor, for d in RECENT_SPANS."""

    def __init__(self, num_layers: int, block_size: int) -> None:
        self.block = block_size
        self.mass = torch.zeros(len(RECENT_SPANS), num_layers, dtype=torch.float64)
        self.queries = torch.zeros(num_layers, dtype=torch.float64)

    def observer(self, batch: Batch):
        S = batch.tokens.shape[1]
        anchors = batch.anchors.repeat_interleave(self.block, dim=1)  # [B, A*W]
        valid = (batch.weight > 0).repeat_interleave(self.block, dim=1)
        distance = anchors.unsqueeze(-1) - torch.arange(S, device=anchors.device)  # 1 = just before the anchor
        nears = [(distance >= 1) & (distance <= span) for span in RECENT_SPANS]  # the same for every layer

        def observe(layer: int, probs: torch.Tensor) -> None:  # probs [B, heads, A*W, S + A*W]
            on_context = probs[..., :S].mean(1)  # [B, A*W, S]
            for i, near in enumerate(nears):
                self.mass[i, layer] += float((on_context * near).sum(-1)[valid].sum())
            self.queries[layer] += float(valid.sum())

        return observe

    def shares(self) -> dict[str, list[float]]:
        share = self.mass / self.queries.clamp_min(1)
        return {f"last_{span}": [round(float(x), 4) for x in share[i]] for i, span in enumerate(RECENT_SPANS)}


def heldout_batches(heldout: list[Sequence], cfg: TrainConfig, block: int) -> list[Batch]:
    """Fixed held-out blocks (seeded), so figures at different steps compare."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    seqs = usable(heldout, block)
    return [make_batch(seqs[i:i + cfg.batch_size], cfg, block, gen) for i in range(0, len(seqs), cfg.batch_size)]


def train_drafter(target: Transformer, config: DrafterConfig, train: list[Sequence], out_dir: Path,
                  cfg: TrainConfig, draft_vocab: torch.Tensor | None = None, heldout: list[Sequence] | None = None,
                  resume: bool = True, progress: bool = True, init: dict[str, torch.Tensor] | None = None,
                  layers_from_target: bool = False, run: dict | None = None) -> dict:
    """Train (or resume) a drafter inside ``draft_vocab`` (None: the full vocabulary); returns the final
    figures and the drafter. ``out_dir`` holds the drafter (model.safetensors, config.json) and
    training_state.pt (weights, optimizer, data RNG, step, training time, history). A new run starts
    from ``init`` (a state dict of the same configuration) when given, else from random weights, with
    the layers copied from the target's top layers when ``layers_from_target``. ``run`` (what defines the
    run beyond the drafter's shape: `run_record`) is kept in the state, so a resume can be checked
    against it (`saved_run`). The state is written before the drafter files, so a run killed at any
    point resumes from its last complete state."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RUN_MARKER).touch()
    if cfg.steps is None and not cfg.max_minutes:
        raise ValueError("an unbounded run needs max_minutes")
    torch.manual_seed(cfg.seed)
    drafter = build_drafter(config, target).float()
    drafter.embed, drafter.lm_head = drafter.embed.float().to(cfg.device), drafter.lm_head.float().to(cfg.device)
    drafter.set_draft_vocab(draft_vocab)
    if init is not None:
        drafter.load_state_dict({k: v.float() for k, v in init.items()})
    elif layers_from_target:
        init_layers_from_target(drafter, target)
    drafter.to(cfg.device).train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, history, evals = 0, 0.0, [], []
    state_file = out_dir / STATE_FILE
    if resume and state_file.exists():
        saved = torch.load(state_file, weights_only=False)
        if saved["config"] != config.to_json():
            raise ValueError(f"{out_dir} holds a run of another drafter configuration; use another --out")
        drafter.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        step, elapsed, history, evals = saved["step"], saved["elapsed"], saved["history"], saved["evals"]

    def checkpoint() -> None:
        tmp = state_file.with_suffix(".tmp")
        torch.save({"config": config.to_json(), "run": run, "draft_vocab": draft_vocab, "model": drafter.state_dict(),
                    "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step, "elapsed": elapsed,
                    "history": history, "evals": evals}, tmp)
        tmp.replace(state_file)
        save_drafter(drafter, out_dir)

    block = config.block_size
    train = [s.to(cfg.device) for s in usable(train, block)]
    eval_batches = [b.to(cfg.device) for b in heldout_batches(heldout, cfg, block)] if heldout and cfg.eval_every else []
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {config.kind}", disable=not progress)
    ema = None
    stop_at = step + cfg.session_steps if cfg.session_steps else None
    # Ctrl-C ends the run at the next step boundary, checkpointed, then interrupts; a second one at once
    interrupted: list[int] = []
    previous = signal.getsignal(signal.SIGINT)  # None: set outside Python, SIG_IGN: a background run's, both kept
    catch = threading.current_thread() is threading.main_thread() and previous not in (None, signal.SIG_IGN)

    def on_sigint(signum: int, frame) -> None:
        if interrupted:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        interrupted.append(1)
        bar.write(f"stopping after this step (step {step + 1}), checkpointed; Ctrl-C again to stop at once")

    if catch:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        while ((cfg.steps is None or step < cfg.steps) and not (cfg.max_minutes and elapsed >= 60 * cfg.max_minutes)
               and step != stop_at and not interrupted):
            started = time.monotonic()
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, elapsed)
            idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen).tolist()
            batch = make_batch([train[i] for i in idx], cfg, block, gen).to(cfg.device)
            with _autocast(cfg):
                labels, logprobs = block_targets(drafter, batch)
                logits, conf = drafter.train_forward(batch.features, batch.tokens, batch.anchors)
            out = drafter_loss(logits.flatten(0, 1), logprobs.flatten(0, 1), labels.flatten(0, 1),
                               None if conf is None else conf.flatten(0, 1).float(), cfg.loss, batch.weight.flatten())
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            elapsed += time.monotonic() - started
            ema = out.tau_greedy if ema is None else 0.95 * ema + 0.05 * out.tau_greedy
            loss = float(out.loss.detach())
            history.append({"step": step, "loss": loss, "ce": out.ce, "tv": out.tv, "conf": out.confidence,
                            "tau": out.tau, "tau_greedy": out.tau_greedy, "lr": opt.param_groups[0]["lr"]})
            budget = {"minutes": f"{elapsed / 60:.1f}/{cfg.max_minutes:g}"} if cfg.max_minutes else {}
            bar.set_postfix(loss=f"{loss:.3f}", tv=f"{out.tv:.3f}", tau0=f"{ema:.2f}", **budget)
            bar.update(1)
            if eval_batches and step % cfg.eval_every == 0:
                evals.append({"step": step, "minutes": round(elapsed / 60, 1), **evaluate(drafter, eval_batches, cfg)})
                bar.write(json.dumps(evals[-1]))
            if step % cfg.checkpoint_every == 0:
                checkpoint()
            del batch, labels, logprobs, logits, conf, out
            release_free_heap()  # the step's freed activations: their pages stay resident otherwise
    finally:
        if catch:
            signal.signal(signal.SIGINT, previous)
    checkpoint()
    if interrupted:
        bar.close()
        print(f"saved at step {step} in {out_dir}: rerun the same command to resume", file=sys.stderr)
        raise KeyboardInterrupt
    bar.close()
    drafter.eval()
    return {"steps": step, "minutes": round(elapsed / 60, 1), "loss_weights": asdict(cfg.loss),
            "final": history[-1] if history else None,
            "heldout": evals[-1] if evals else None, "drafter": drafter}


@torch.no_grad()
def calibrate_confidence(drafter, heldout: list[Sequence], out_dir: Path, cfg: TrainConfig, rounds: int = 2) -> dict:
    """Sequential calibration per regime on held-out blocks: fit on the first half, ECE of the cumulative
    survival on the second half, temperatures and biases stored in the drafter, figures in
    calibration.json and reliability.png."""
    block = drafter.config.block_size
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    seqs = [s.to(cfg.device) for s in usable(heldout, block)]
    drafter.confidence_temperature.fill_(1.0)
    drafter.confidence_bias.fill_(0.0)
    confs, greedy, sampled = [], [], []
    for _ in range(rounds):
        for i in range(0, len(seqs), cfg.batch_size):
            batch = make_batch(seqs[i:i + cfg.batch_size], cfg, block, gen).to(cfg.device)
            labels, logprobs = block_targets(drafter, batch)
            logits, conf = drafter.train_forward(batch.features, batch.tokens, batch.anchors)
            keep = batch.weight.flatten() > 0
            confs.append(conf.float().flatten(0, 1)[keep].cpu())
            tv = subset_total_variation(logits, logprobs).flatten(0, 1)[keep]
            sampled.append((1 - tv).cumprod(-1).cpu())
            greedy.append((logits.argmax(-1) == labels).flatten(0, 1)[keep].float().cumprod(-1).cpu())
    logit = torch.cat(confs)
    half = logit.shape[0] // 2
    result: dict = {"blocks": int(logit.shape[0]), "fit_blocks": half}
    panels = {}
    for name, row, outcome in (("greedy", GREEDY, torch.cat(greedy)), ("sampled", SAMPLED, torch.cat(sampled))):
        temps, biases = sequential_calibration(logit[:half], outcome[:half])
        before = cumulative_survival(logit[half:], torch.ones_like(temps))
        after = cumulative_survival(logit[half:], temps, biases)
        drafter.confidence_temperature[row] = temps.to(drafter.confidence_temperature)
        drafter.confidence_bias[row] = biases.to(drafter.confidence_bias)
        result[name] = {"temperatures": temps.tolist(), "biases": biases.tolist(),
                        "ece_before": expected_calibration_error(before, outcome[half:]),
                        "ece_after": expected_calibration_error(after, outcome[half:]),
                        "mean_prefix_acceptance": [round(float(x), 4) for x in outcome.mean(0)]}
        panels["T=0 (greedy)" if name == "greedy" else "T=1 (sampled)"] = ((before, outcome[half:]), (after, outcome[half:]))
    reliability_diagram(panels, out_dir / "reliability.png")
    (out_dir / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
