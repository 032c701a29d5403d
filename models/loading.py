"""Load a Hugging Face format directory (config.json + safetensors) into `Transformer`; save safetensors files."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import TransformerConfig, eos_token_ids
from models.transformer import Transformer


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would, for every thread)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whole or not at all (beside it, then renamed), with the mode any new file
    gets here (safetensors alone leaves 0600, and a rewrite would narrow a shipped file's mode)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def read_hf_state_dict(model_dir: str | Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an HF safetensors checkpoint (all, or only ``names``), by their HF names."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if names is None or name in names:
                    tensors[name] = f.get_tensor(name)
    return tensors


def load_config(model_dir: str | Path) -> TransformerConfig:
    """config.json, with the end-of-generation ids of generation_config.json added: transformers and
    serving engines stop on the union (Llama-3 instruct models list <|eot_id|> only there)."""
    model_dir = Path(model_dir)
    config = TransformerConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    generation = model_dir / "generation_config.json"
    if not generation.is_file():
        return config
    extra = eos_token_ids(json.loads(generation.read_text()).get("eos_token_id"))
    return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra)))


def transformer_from_hf_state_dict(
    config: TransformerConfig, hf: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> Transformer:
    """Build a Transformer from HF-named tensors (fusing q/k/v and gate/up), in eval mode, frozen."""
    hf = dict(hf)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"checkpoint lacks tensor {name!r}")
        used.add(name)
        return hf[name].to(dtype)

    with torch.device("meta"):
        model = Transformer(config)
    state: dict[str, torch.Tensor] = {"embed": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    if not config.tie_word_embeddings:
        state["lm_head"] = take("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        state[f"layers.{i}.attn_norm"] = take(p + "input_layernorm.weight")
        state[f"layers.{i}.mlp_norm"] = take(p + "post_attention_layernorm.weight")
        state[f"layers.{i}.qkv_proj"] = torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"], dim=0)
        if config.attention_bias:
            state[f"layers.{i}.qkv_bias"] = torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"], dim=0)
        state[f"layers.{i}.o_proj"] = take(a + "o_proj.weight")
        if config.o_proj_bias:
            state[f"layers.{i}.o_bias"] = take(a + "o_proj.bias")
        if config.qk_norm:
            state[f"layers.{i}.q_norm"] = take(a + "q_norm.weight")
            state[f"layers.{i}.k_norm"] = take(a + "k_norm.weight")
        m = p + "mlp."
        state[f"layers.{i}.gate_up_proj"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")], dim=0)
        state[f"layers.{i}.down_proj"] = take(m + "down_proj.weight")

    # A tied checkpoint may still carry a copy of the head; anything else left over is a mismatch.
    leftover = sorted(n for n in hf if n not in used and not (n == "lm_head.weight" and config.tie_word_embeddings))
    leftover = [n for n in leftover if not n.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unexpected tensors in checkpoint (first few): {leftover[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    return model


def load_transformer(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load an HF-format directory (config.json + model.safetensors or sharded with an index)."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    return transformer_from_hf_state_dict(config, read_hf_state_dict(model_dir), dtype=dtype)


def load_token_matrices(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the input embedding and the LM head (the same tensor when tied): what a drafter shares
    with a target that runs as an exported graph."""
    config = load_config(model_dir)
    wanted = {"model.embed_tokens.weight"} | (set() if config.tie_word_embeddings else {"lm_head.weight"})
    found = read_hf_state_dict(model_dir, wanted)
    missing = wanted - found.keys()
    if missing:
        raise KeyError(f"checkpoint lacks tensors {sorted(missing)}")
    embed = found["model.embed_tokens.weight"].to(dtype)
    return embed, embed if config.tie_word_embeddings else found["lm_head.weight"].to(dtype)
