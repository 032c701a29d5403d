"""Runtimes behind one protocol: whatever the engine calls as ``model(...)`` / ``model.new_cache``.

The protocol is the Transformer's: ``runner(input_ids[T], slots, num_new, cache, logits_indices=None,
tap_layers=()) -> ForwardOutput``, ``runner.new_cache(num_slots, max_len) -> KVCache`` and
``runner.config``. The torch runner *is* the Transformer (runtimes.torch_runner); the ONNX Runtime
and TensorRT runners run the exported graph (runtimes.graph); runtimes.loading picks one.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from export.onnx_export import QUANTIZED
from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.transformer import ForwardOutput

RUNTIMES = ("torch", "onnxruntime", "tensorrt")


class ModelRunner(Protocol):
    """What the engine needs from a target model."""

    config: TransformerConfig

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
                 logits_indices: torch.Tensor | None = None, tap_layers: Sequence[int] = ()) -> ForwardOutput: ...

    def new_cache(self, num_slots: int, max_len: int) -> KVCache: ...


def check_runtime_dtype(runtime: str, dtype: str) -> None:
    """ValueError for a dtype a runtime cannot run: ONNX Runtime's CPU kernels lack bf16/fp16 matmuls, and
    the int8 graphs (export.quantize) use ONNX Runtime's operators."""
    if runtime == "onnxruntime" and dtype != "float32" and dtype not in QUANTIZED:
        raise ValueError(f"the onnxruntime runtime runs float32, {' or '.join(QUANTIZED)}, not {dtype} (ONNX "
                         "Runtime's CPU kernels lack bf16/fp16 matmuls)")
    if runtime != "onnxruntime" and dtype in QUANTIZED:
        raise ValueError(f"{dtype} graphs are for the onnxruntime runtime (ONNX Runtime's int8 matmuls), not {runtime}")
