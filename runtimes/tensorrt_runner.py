"""The TensorRT runner: the exported packed graph as a TensorRT engine (built by export.tensorrt_engine) on a CUDA GPU."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from export.onnx_export import DTYPES, PAGE_SIZE, io_names, read_metadata
from export.tensorrt_engine import TensorRTUnavailableError, build_engine, import_tensorrt, trt_profile
from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.transformer import ForwardOutput
from runtimes.graph import PackedBatch, _check_taps, _GraphRunner, cache_views, pack_batch


class TensorRTRunner(_GraphRunner):
    """The exported graph as a TensorRT engine on a CUDA GPU, with our KVCache on that GPU.

    The cache is bound by its device pointer (the graph reads it in place); a step uploads the
    batch layout and writes back only the new tokens' K/V.

    The engine is built once per (ONNX content, precision, profile, TensorRT version, GPU) and
    cached under ``<cache>/tensorrt/<hash>.plan``; later starts deserialize it in seconds.
    """

    def __init__(self, onnx_path: Path, config: TransformerConfig, max_batch: int, max_new: int, max_context: int,
                 engine_dir: Path | None = None) -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailableError("the tensorrt runtime needs a CUDA GPU; none is visible to torch")
        meta = read_metadata(onnx_path)
        self.config = config
        self.dtype = self.kv_dtype = DTYPES[meta.get("dtype", "float16")]  # w8a8 (int8 cache) is ONNX Runtime's
        self.device = torch.device("cuda")
        self.tap_layers = tuple(meta.get("tap_layers", ()))
        self.profile = trt_profile(max_batch, max_new, max_context, config.num_kv_heads)
        plan = build_engine(onnx_path, self.profile, engine_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan.read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.input_names, self.output_names = io_names(config.num_layers, self.tap_layers)
        self._torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self._trt = trt

    def _check_profile(self, batch: PackedBatch, cache: KVCache) -> None:
        dims = {"tokens": int(batch.input_ids.shape[0]), "rows": int(batch.logit_rows.shape[0]),
                "cache_pages": cache.num_slots * self.config.num_kv_heads * cache.max_len // PAGE_SIZE}
        for group in batch.groups:
            B, L, P = group.cache_pages.shape[0], group.rows.shape[1], group.cache_pages.shape[2]
            dims["batch"], dims["new"], dims["pages"] = max(dims.get("batch", 0), B), max(dims.get("new", 0), L), \
                max(dims.get("pages", 0), P)
        for name, value in dims.items():
            if value > self.profile[name][2]:
                raise ValueError(f"{name}={value} exceeds the TensorRT profile maximum {self.profile[name][2]}; "
                                 "rebuild with larger max_batch_size / max_context")

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
                 logits_indices: torch.Tensor | None = None, tap_layers: Sequence[int] = ()) -> ForwardOutput:
        taps = _check_taps(tap_layers, self.tap_layers)
        batch = pack_batch(input_ids, slots, num_new, cache, logits_indices)
        self._check_profile(batch, cache)
        with torch.cuda.stream(self.stream):
            inputs = [t.to(self.device, non_blocking=True) for t in batch.inputs()] + cache_views(cache)
            for name, tensor in zip(self.input_names, inputs):
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            outs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self._torch_dtype[self.engine.get_tensor_dtype(name)], device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outs.append(out)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            n = 2 * self.config.num_layers
            result = self._finish(cache, batch, outs[0], outs[1:1 + n], dict(zip(self.tap_layers, outs[1 + n:])), taps)
        self.stream.synchronize()
        return result
