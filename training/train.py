"""The training loop: random anchors over target-regenerated sequences, frozen target tensors,
AdamW, resumable safetensors checkpoints, and a tqdm bar with loss and an acceptance estimate."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from models.drafters import DrafterConfig, build_drafter, save_drafter
from models.transformer import Transformer
from training.calibration import expected_calibration_error, reliability_diagram, sequential_temperature_scaling
from training.data import Sequence
from training.losses import LossWeights, drafter_loss


@dataclass
class TrainConfig:
    steps: int | None = 300  # None: until max_minutes runs out
    batch_size: int = 4  # sequences per step
    anchors: int = 8  # blocks per sequence per step
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 20
    max_len: int = 384  # longer sequences are cropped (keeping the answer's start)
    checkpoint_every: int = 100
    max_minutes: float | None = None  # stop (and checkpoint) early when the wall-clock budget is spent
    seed: int = 0
    loss: LossWeights = LossWeights()


def _batch(seqs: list[Sequence], cfg: TrainConfig, block: int, gen: torch.Generator):
    """Pad sequences into [B, S] tokens / [B, S, F] features / [B, S, H] final states and draw anchors in the answers."""
    B = len(seqs)
    crops = []
    for s in seqs:
        n = min(len(s.tokens), cfg.max_len)
        start = max(0, min(s.prompt_len - 1, len(s.tokens) - n))
        crops.append((start, start + n))
    S = max(e - st for st, e in crops)
    feat_dim, hid = seqs[0].features.shape[1], seqs[0].final_hidden.shape[1]
    tokens = torch.zeros(B, S, dtype=torch.int64)
    feats = torch.zeros(B, S, feat_dim)
    finals = torch.zeros(B, S, hid)
    anchors = torch.zeros(B, cfg.anchors, dtype=torch.int64)
    for b, (s, (st, e)) in enumerate(zip(seqs, crops)):
        n = e - st
        tokens[b, :n] = s.tokens[st:e]
        m = min(n, s.features.shape[0] - st)
        feats[b, :m] = s.features[st:st + m].float()
        finals[b, :m] = s.final_hidden[st:st + m].float()
        lo = max(1, s.prompt_len - 1 - st)  # first anchor: the last prompt token (predicts the answer's start)
        hi = n - block - 1  # the block's labels anchor+1..anchor+W stay inside the sequence
        if hi < lo:
            lo = hi = max(1, hi)
        anchors[b] = torch.randint(lo, hi + 1, (cfg.anchors,), generator=gen)
    return tokens, feats, finals, anchors


def _labels_and_target_logits(tokens, finals, anchors, block: int, lm_head: torch.Tensor):
    offs = torch.arange(block)
    pos = anchors.unsqueeze(-1) + offs  # positions whose next token the block predicts
    labels = tokens.gather(1, (pos + 1).flatten(1)).view_as(pos)
    hid = finals.gather(1, pos.flatten(1).unsqueeze(-1).expand(-1, -1, finals.shape[-1]))
    with torch.no_grad():
        tlogits = (hid @ lm_head.T.to(hid.dtype)).view(*pos.shape, -1)
    return labels, tlogits


def learning_rate(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine decay to zero over the run; with a wall-clock budget the decay
    follows whichever of steps or time runs out first, so a timed run still ends annealed."""
    done = 0.0 if cfg.steps is None else step / cfg.steps
    if cfg.max_minutes:
        done = max(done, elapsed_s / (60 * cfg.max_minutes))
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def train_drafter(target: Transformer, config: DrafterConfig, train: list[Sequence], out_dir: Path,
                  cfg: TrainConfig, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume) a drafter; returns the final metrics. Checkpoints: model.safetensors,
    config.json, optimizer.pt (optimizer + step + RNG) in ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    drafter = build_drafter(config, target).float().train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    history: list[dict] = []
    state_file = out_dir / "optimizer.pt"
    if resume and state_file.exists():
        drafter.load_state_dict(load_file(str(out_dir / "model.safetensors")))
        saved = torch.load(state_file, weights_only=False)
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        step, history = saved["step"], saved["history"]

    def checkpoint() -> None:
        save_drafter(drafter, out_dir)
        torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "step": step, "history": history}, state_file)

    block = config.block_size
    lm_head = drafter.lm_head.float()
    started = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {config.kind}", disable=not progress)
    ema = None
    if cfg.steps is None and not cfg.max_minutes:
        raise ValueError("an unbounded run needs max_minutes")
    while cfg.steps is None or step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step, time.monotonic() - started)
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen).tolist()
        tokens, feats, finals, anchors = _batch([train[i] for i in idx], cfg, block, gen)
        labels, tlogits = _labels_and_target_logits(tokens, finals, anchors, block, lm_head)
        logits, conf = drafter.train_forward(feats, tokens, anchors)
        out = drafter_loss(logits.flatten(0, 1), tlogits.flatten(0, 1), labels.flatten(0, 1),
                           None if conf is None else conf.flatten(0, 1), cfg.loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = out.tau if ema is None else 0.95 * ema + 0.05 * out.tau
        loss = float(out.loss.detach())
        history.append({"step": step, "loss": loss, "ce": out.ce, "tv": out.tv, "conf": out.confidence, "tau": out.tau})
        bar.set_postfix(loss=f"{loss:.3f}", tv=f"{out.tv:.3f}", tau=f"{ema:.2f}")
        bar.update(1)
        out_of_time = cfg.max_minutes is not None and time.monotonic() - started > 60 * cfg.max_minutes
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
            checkpoint()
        if out_of_time:
            break
    bar.close()
    drafter.eval()
    return {"steps": step, "seconds": round(time.monotonic() - started, 1), "final": history[-1] if history else None,
            "tau_ema": ema, "drafter": drafter}


@torch.no_grad()
def calibrate_confidence(drafter, target: Transformer, heldout: list[Sequence], out_dir: Path, cfg: TrainConfig,
                         rounds: int = 8) -> dict:
    """STS on held-out sequences: fit per-position temperatures, report ECE before/after, draw the diagram.
    The fit uses the first half of the held-out blocks and ECE is reported on the second half."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    block = drafter.config.block_size
    lm_head = drafter.lm_head.float()
    drafter.confidence_temperature.fill_(1.0)
    confs, outcomes = [], []
    for _ in range(rounds):
        for i in range(0, len(heldout), cfg.batch_size):
            tokens, feats, finals, anchors = _batch(heldout[i:i + cfg.batch_size], cfg, block, gen)
            _, tlogits = _labels_and_target_logits(tokens, finals, anchors, block, lm_head)
            logits, conf = drafter.train_forward(feats, tokens, anchors)
            tv = 0.5 * (torch.softmax(logits, -1) - torch.softmax(tlogits, -1)).abs().sum(-1)
            confs.append(conf.flatten(0, 1))
            outcomes.append((1 - tv).flatten(0, 1))
    logit, outcome = torch.cat(confs), torch.cat(outcomes)
    half = logit.shape[0] // 2
    temps = sequential_temperature_scaling(logit[:half], outcome[:half])
    before = torch.sigmoid(logit[half:])
    after = torch.sigmoid(logit[half:] / temps)
    drafter.confidence_temperature.copy_(temps)
    result = {"temperatures": temps.tolist(),
              "ece_before": expected_calibration_error(before, outcome[half:]),
              "ece_after": expected_calibration_error(after, outcome[half:]),
              "blocks": int(logit.shape[0])}
    reliability_diagram((before, outcome[half:]), (after, outcome[half:]), out_dir / "reliability.png")
    (out_dir / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
