"""End-to-end `cli.py train`: load the target, build or reuse the cached data, train, calibrate, save."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from export.fetch import cache_dir, fetch_model
from models.drafters import DrafterConfig, default_config, load_drafter, save_drafter
from models.loading import load_transformer
from orchestrator.prompting import PromptEncoder
from training.data import Sequence, build_prompts, load_or_build_dataset
from training.train import TrainConfig, calibrate_confidence, train_drafter
from training.vocab import coverage, draft_vocabulary


def dataset(target_name: str, split: str, num_per_domain: dict[str, int], tap_layers: tuple[int, ...],
            max_new_tokens: int, temperature: float = 0.0) -> list[Sequence]:
    """Target-answered sequences for a split, cached under the cache dir by everything that shapes them."""
    model_dir = fetch_model(target_name)
    key = json.dumps([target_name, split, sorted(num_per_domain.items()), list(tap_layers), max_new_tokens, temperature])
    path = cache_dir() / "drafter-data" / target_name / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        return load_or_build_dataset(path, None, None, [], tap_layers, max_new_tokens)
    target = load_transformer(model_dir)
    encoder = PromptEncoder.from_model_dir(model_dir, max_prompt_tokens=4096)
    prompts = build_prompts(split, num_per_domain)
    return load_or_build_dataset(path, target, lambda text: encoder.encode(text, True), prompts, tap_layers,
                                 max_new_tokens, temperature)


def run_training(kind: str, target_name: str, out_dir: Path, cfg: TrainConfig, train_prompts: dict[str, int],
                 heldout_prompts: dict[str, int], max_new_tokens: int, export_dtype: torch.dtype | None = None,
                 draft_vocab_size: int = 0) -> dict:
    """Train one drafter kind on the shared dataset; DSpark also gets its confidences calibrated (STS).
    draft_vocab_size > 0 also gives it a draft vocabulary of that many tokens (0 = the full vocabulary)."""
    target = load_transformer(fetch_model(target_name))
    config = default_config(kind, target, target_name, block_size=7)
    train = dataset(target_name, "train", train_prompts, config.tap_layers, max_new_tokens)
    result = train_drafter(target, config, train, out_dir, cfg)
    drafter = result.pop("drafter")
    heldout = dataset(target_name, "heldout", heldout_prompts, config.tap_layers, max_new_tokens)
    if config.confidence:
        result["calibration"] = calibrate_confidence(drafter, target, heldout, out_dir, cfg)
    if draft_vocab_size:
        result["draft_vocab"] = attach_draft_vocab(drafter, train, heldout, draft_vocab_size)
    save_drafter(drafter, out_dir, dtype=export_dtype)
    (out_dir / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def attach_draft_vocab(drafter, train: list[Sequence], heldout: list[Sequence], size: int) -> dict:
    """Give a drafter the ``size`` most frequent answer tokens as its draft vocabulary; returns
    the size and the held-out coverage (the share of target tokens it can still propose)."""
    vocab_size = drafter.config.vocab_size
    vocab = draft_vocabulary(train, vocab_size, size)
    drafter.set_draft_vocab(vocab)
    return {"size": int(vocab.numel()), "heldout_coverage": coverage(vocab, heldout, vocab_size)}


def add_draft_vocab(directory: Path, train_prompts: dict[str, int], heldout_prompts: dict[str, int],
                    max_new_tokens: int, size: int) -> dict:
    """Give a trained drafter checkpoint a draft vocabulary from the data it was trained on (0 removes it)."""
    target_name = DrafterConfig.from_json((Path(directory) / "config.json").read_text()).target
    target = load_transformer(fetch_model(target_name))
    drafter = load_drafter(directory, target)
    saved_dtype = next(iter(load_file(str(Path(directory) / "model.safetensors")).values())).dtype
    if size:
        train = dataset(target_name, "train", train_prompts, drafter.tap_layers, max_new_tokens)
        heldout = dataset(target_name, "heldout", heldout_prompts, drafter.tap_layers, max_new_tokens)
        result = attach_draft_vocab(drafter, train, heldout, size)
    else:
        drafter.set_draft_vocab(None)
        result = {"size": 0}
    save_drafter(drafter, directory, dtype=saved_dtype)
    summary = Path(directory) / "train_result.json"
    if summary.exists():
        recorded = json.loads(summary.read_text())
        recorded["draft_vocab"] = result
        summary.write_text(json.dumps(recorded, indent=2) + "\n")
    return result
