"""Drafters for speculative decoding: DSpark and the DFlash / EAGLE-3 baselines, one protocol.

Every drafter offers ``tap_layers``, ``new_state(num_slots, max_len)``,
``extend_context(state, slots, num_new, target_hidden, input_ids)`` and
``draft(state, slots, anchor_tokens, num_tokens, sample_fn, greedy=False) -> DraftBlock`` (``greedy``: the
requests verify at T=0, which picks DSpark's confidence calibration for that regime).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from models.drafters.common import DraftBlock, DrafterConfig, DrafterState, SampleFn, greedy_sample
from models.drafters.dflash import DFlashDrafter
from models.drafters.dspark import BlockDrafter, DSparkDrafter
from models.drafters.eagle3 import Eagle3Drafter
from models.loading import save_safetensors
from models.transformer import Transformer

Drafter = BlockDrafter | Eagle3Drafter


class DrafterTarget(Protocol):
    """What a drafter takes from its target: our Transformer, or a graph runner (ONNX Runtime, TensorRT)."""

    embed: torch.Tensor
    lm_head_weight: torch.Tensor
    dtype: torch.dtype
    device: torch.device


class DrafterMismatchError(ValueError):
    """A drafter that cannot serve this target: found when it loads (a server: at start), never per request."""


_CLASSES = {"dspark": DSparkDrafter, "dflash": DFlashDrafter, "eagle3": Eagle3Drafter}
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"  # optional: the token ids drafting scores (see DraftVocabMixin)


def default_tap_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high target layers whose outputs a drafter reads (the paper's taps)."""
    return (1, num_layers // 2, num_layers - 3)


def default_config(kind: str, target: Transformer, target_name: str = "", block_size: int = 7,
                   num_layers: int = 1, intermediate_size: int = 1024, markov_rank: int = 32,
                   draft_vocab_size: int = 0, rope: str = "standard", qk_norm: bool = True) -> DrafterConfig:
    """A small drafter for a target: low/mid/high taps, the target's head geometry and RoPE base."""
    t = target.config
    n = t.num_layers
    return DrafterConfig(
        kind=kind, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        num_layers=1 if kind == "eagle3" else num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
        head_dim=t.head_dim, intermediate_size=intermediate_size, tap_layers=default_tap_layers(n),
        block_size=block_size, markov_rank=markov_rank if kind == "dspark" else 0, confidence=kind == "dspark",
        rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, target=target_name, draft_vocab_size=draft_vocab_size,
        rope=rope, qk_norm=qk_norm,
    )


def build_drafter(config: DrafterConfig, target: DrafterTarget) -> Drafter:
    """A fresh drafter sharing the target's (frozen) embeddings and LM head."""
    return _CLASSES[config.kind](config, target.embed.detach(), target.lm_head_weight.detach())


def save_drafter(drafter: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Weights (model.safetensors, without the shared target tensors) and config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in drafter.state_dict().items()}
    save_safetensors(state, directory / "model.safetensors")
    tmp = directory / ".config.json.tmp"  # whole or not at all, like the weights
    tmp.write_text(drafter.config.to_json() + "\n")
    tmp.replace(directory / "config.json")
    vocab_file = directory / DRAFT_VOCAB_FILE
    if drafter.draft_vocab is not None:
        save_safetensors({"token_ids": drafter.draft_vocab.contiguous()}, vocab_file)
    elif vocab_file.exists():
        vocab_file.unlink()


def load_drafter(directory: str | Path, target: DrafterTarget) -> Drafter:
    """A saved drafter attached to its target's embeddings and LM head, in the target's dtype, eval mode."""
    directory = Path(directory)
    config = DrafterConfig.from_json((directory / "config.json").read_text())
    vocab, hidden = target.embed.shape
    if (config.vocab_size, config.hidden_size) != (vocab, hidden):
        raise DrafterMismatchError(
            f"drafter {directory} (trained for {config.target or 'an unnamed target'}) does not fit this target: "
            f"vocabulary {config.vocab_size} vs {vocab}, hidden size {config.hidden_size} vs {hidden}")
    drafter = build_drafter(config, target)
    state = load_file(str(directory / "model.safetensors"))
    temps = state.get("confidence_temperature")
    if temps is not None and temps.dim() == 1:  # calibrated before per-regime temperatures: one row for both
        state["confidence_temperature"] = temps = temps.expand(2, -1).clone()
    if temps is not None and "confidence_bias" not in state:  # calibrated by temperature alone
        state["confidence_bias"] = torch.zeros_like(temps)
    drafter.load_state_dict(state)
    if (directory / DRAFT_VOCAB_FILE).exists():
        drafter.set_draft_vocab(load_file(str(directory / DRAFT_VOCAB_FILE))["token_ids"])
    drafter = drafter.to(dtype=target.dtype, device=target.device).eval().requires_grad_(False)
    drafter.use_kernel_plan(getattr(target, "kernel_plan", None))  # the target's measured few-row kernels
    return drafter


__all__ = [
    "BlockDrafter", "DFlashDrafter", "DSparkDrafter", "DraftBlock", "Drafter", "DrafterConfig", "DrafterMismatchError",
    "DrafterState",
    "Eagle3Drafter", "SampleFn", "build_drafter", "default_config", "greedy_sample", "load_drafter", "save_drafter",
]
