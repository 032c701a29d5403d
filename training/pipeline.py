"""End-to-end `cli.py train`: load the target, build or reuse the cached data, train, calibrate, save."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from export.fetch import cache_dir, fetch_model
from models.drafters import default_config, save_drafter
from models.loading import load_transformer
from orchestrator.prompting import PromptEncoder
from training.data import Sequence, build_prompts, load_or_build_dataset
from training.train import TrainConfig, calibrate_confidence, train_drafter


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
                 heldout_prompts: dict[str, int], max_new_tokens: int, export_dtype: torch.dtype | None = None) -> dict:
    """Train one drafter kind on the shared dataset; DSpark also gets its confidences calibrated (STS)."""
    target = load_transformer(fetch_model(target_name))
    config = default_config(kind, target, target_name, block_size=7)
    train = dataset(target_name, "train", train_prompts, config.tap_layers, max_new_tokens)
    result = train_drafter(target, config, train, out_dir, cfg)
    drafter = result.pop("drafter")
    if config.confidence:
        heldout = dataset(target_name, "heldout", heldout_prompts, config.tap_layers, max_new_tokens)
        result["calibration"] = calibrate_confidence(drafter, target, heldout, out_dir, cfg)
    save_drafter(drafter, out_dir, dtype=export_dtype)
    (out_dir / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
