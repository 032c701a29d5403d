"""Architecture description of the Llama / Qwen2 / Qwen3 decoder family.

`TransformerConfig.from_hf_dict` reads a Hugging Face ``config.json`` (both the 4.x layout with
``rope_theta`` / ``rope_scaling`` and the 5.x layout with a ``rope_parameters`` dict).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("linear", "llama3", "yarn")


@dataclass(frozen=True)
class TransformerConfig:
    model_type: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    # None for plain RoPE, else {"rope_type": "linear" | "llama3" | "yarn", <that type's parameters>}
    rope_scaling: dict | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (always on for Qwen2)
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (Qwen3)
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # bias on o_proj too (Llama/Qwen3 `attention_bias` covers all four projections; Qwen2 has none on o_proj)
    o_proj_bias: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling {self.rope_scaling!r}; expected rope_type in {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "TransformerConfig":
        """Build from the contents of a Hugging Face ``config.json``."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")

        hidden_size = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or hidden_size // num_heads)
        max_pos = int(cfg.get("max_position_embeddings", 2048))

        rope_theta, rope_scaling = _parse_rope(cfg, max_pos)

        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))

        bos = cfg.get("bos_token_id")

        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=max_pos,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_token_ids(cfg.get("eos_token_id")),
            o_proj_bias=o_bias,
        )


def eos_token_ids(value: Any) -> tuple[int, ...]:
    """An ``eos_token_id`` entry (absent, one id, or a list) as a tuple of ids."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(e) for e in value)
    return (int(value),)


def _parse_rope(cfg: dict[str, Any], max_pos: int) -> tuple[float, dict | None]:
    """Return (theta, scaling dict or None) from either config.json layout."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get("rope_theta", 10000.0)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if cfg.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    merged.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; expected default or one of {SUPPORTED_ROPE_TYPES}")
    if rope_type in ("llama3", "yarn"):
        merged.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos))
    return float(theta), {"rope_type": rope_type, **merged}
