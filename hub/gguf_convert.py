"""Convert a GGUF checkpoint (llama / qwen2 architectures) into a plain Hugging Face model directory.

The weights ship only as quantised GGUF files, while everything downstream (our own modules,
transformers, ONNX export) wants a normal safetensors directory. We read the GGUF with the
`gguf` package, de-quantise each tensor, map llama.cpp names back to Hugging Face names and undo
llama.cpp's rotary permutation of Q/K for llama-architecture models.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderField
from gguf.quants import dequantize

from hub.progress import bar
from models.loading import save_safetensors

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Tokens llama.cpp treats as end-of-generation besides the declared EOS; kept in
# generation_config so generation stops where llama.cpp would.
_END_OF_GENERATION_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/string/list, or `default` when absent."""
    field: ReaderField | None = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str) -> str | None:
    """Hugging Face name for a GGUF tensor; None for tensors HF recomputes (rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary halves in Q/K rows (llama arch only)."""
    dim = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, dim, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def _f32(value: float) -> float:
    """GGUF stores these as float32; print the shortest float32 spelling (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def read_config(reader: GGUFReader) -> dict[str, Any]:
    """config.json contents built from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(f"GGUF architecture {arch!r} not supported (supported: {SUPPORTED_ARCHITECTURES})")

    def g(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(g("embedding_length"))
    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = int(g("vocab_size", len(tokens.data)))
    rope_theta = _f32(g("rope.freq_base", 10000.0))
    tensor_names = {t.name for t in reader.tensors}
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    config: dict[str, Any] = {
        "architectures": [_HF_ARCH[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(g("rope.dimension_count", hidden // n_head)),
        "hidden_act": "silu",
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon")),
        # Older readers look for rope_theta at top level, transformers 5 for rope_parameters.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    return config


def dequantized_tensors(reader: GGUFReader, config: dict[str, Any], dtype: torch.dtype,
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """All tensors under Hugging Face names, de-quantised and cast to `dtype`."""
    permute = config["model_type"] == "llama"
    out: dict[str, torch.Tensor] = {}
    with bar(len(reader.tensors), "convert", progress, unit="tensor") as pbar:
        for t in reader.tensors:
            pbar.update(1)
            name = hf_tensor_name(t.name)
            if name is None:
                continue
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w = np.asarray(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
            else:
                w = dequantize(t.data, t.tensor_type)
            if permute and name.endswith("q_proj.weight"):
                w = unpermute_rotary(w, config["num_attention_heads"])
            elif permute and name.endswith("k_proj.weight"):
                w = unpermute_rotary(w, config["num_key_value_heads"])
            if not w.flags.writeable:  # F32 tensors are views into the memory-mapped file
                w = w.copy()
            out[name] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
    if config["tie_word_embeddings"]:
        out.pop("lm_head.weight", None)
    return out


def end_of_generation_ids(reader: GGUFReader, eos: int | None) -> list[int]:
    """EOS followed by the other end-of-turn control tokens present in the vocabulary."""
    field = reader.fields["tokenizer.ggml.tokens"]
    texts = set(_END_OF_GENERATION_TEXTS)
    ids = [eos] if eos is not None else []
    for i, idx in enumerate(field.data):
        text = bytes(field.parts[idx]).decode("utf-8", errors="replace")
        if text in texts and i not in ids:
            ids.append(i)
    return ids


def write_tokenizer(gguf_path: Path, out_dir: Path, reader: GGUFReader, max_length: int) -> None:
    """Save transformers' GGUF tokenizer conversion, with chat template and special tokens in the config."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    cfg.update(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
               model_max_length=max_length,
               # the class name transformers 4.x and 5.x both resolve to a tokenizer.json tokenizer
               tokenizer_class="PreTrainedTokenizerFast")
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", progress: bool = True) -> None:
    """Write config.json, model.safetensors, tokenizer and generation_config.json into `out_dir`.

    `dtype` names the torch dtype of the saved weights ("float32" or "bfloat16").
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    config = read_config(reader)
    config["dtype"] = dtype
    tensors = dequantized_tensors(reader, config, getattr(torch, dtype), progress)
    save_safetensors(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    del tensors
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": end_of_generation_ids(reader, config["eos_token_id"]),
        "pad_token_id": config["pad_token_id"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(gguf_path, out_dir, reader, config["max_position_embeddings"])
