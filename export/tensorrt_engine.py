"""Build the exported ONNX graph into a TensorRT engine, cached by content hash (runtimes.tensorrt_runner runs it)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (or the GPU it needs) is not on this host: the user's fix is another host or runtime."""


def import_tensorrt():
    """The tensorrt module, or an error saying how to get it (imported lazily: CPU hosts lack it)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            "the tensorrt runtime needs the TensorRT Python package and an NVIDIA GPU: use the image in "
            "docker/ (nvcr.io/nvidia/tritonserver, with `pip install tensorrt-cu12`), or on CPU hosts the "
            "onnxruntime or torch runtime (`build --runtime`, `export --to onnx`)"
        ) from exc
    return tensorrt


def trt_profile(max_batch: int, max_new: int, max_context: int, kv_heads: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each dynamic dim: tuned for decode (one new token), half-full batch and context.

    tokens: packed new tokens of a step (a prefill chunk beside every other sequence's verify);
    batch/new/past: one attention group's sequences, new tokens and cached keys; cache_rows: the
    cache in pages (max_batch slots of max_context positions per KV head).
    """
    from export.onnx_export import PAGE_SIZE

    pages = -(-max_context // PAGE_SIZE)
    half_batch = max(1, max_batch // 2)
    return {"tokens": (1, half_batch, max_new + max_batch * 8), "rows": (1, half_batch, max_new + max_batch * 8),
            "batch": (1, half_batch, max_batch), "new": (1, 1, max_new),
            "pages": (1, max(1, pages // 2), pages),
            "cache_pages": (kv_heads * pages, kv_heads * pages * max_batch, kv_heads * pages * max_batch)}


def _input_shapes(name: str, shape: tuple[int, ...], profile: dict[str, tuple[int, int, int]]) -> list[tuple[int, ...]]:
    """(min, opt, max) shapes of one packed-graph input (see export.onnx_export for the layout)."""
    dim = profile
    if name in ("input_ids", "positions", "token_rows"):
        return [(dim["tokens"][k],) for k in range(3)]
    if name == "logit_rows":
        return [(dim["rows"][k],) for k in range(3)]
    from export.onnx_export import PAGE_SIZE

    if name.startswith("group") and name.endswith("_cache_pages"):  # [B, kv_heads, P]
        return [(dim["batch"][k], shape[1], dim["pages"][k]) for k in range(3)]
    if name.startswith("group") and name.endswith("_rows"):  # [B, L]
        return [(dim["batch"][k], dim["new"][k]) for k in range(3)]
    if name.startswith("group") and name.endswith("_mask"):  # [B, L, C + L]
        return [(dim["batch"][k], dim["new"][k], dim["pages"][k] * PAGE_SIZE + dim["new"][k]) for k in range(3)]
    # key_cache_<i> / value_cache_<i> [cache_pages, PAGE_SIZE * head_dim]
    return [(dim["cache_pages"][k], shape[1]) for k in range(3)]


def engine_key(onnx_path: Path, profile: dict[str, tuple[int, int, int]]) -> str:
    """Content hash of everything an engine depends on: ONNX bytes, profile, TensorRT version, GPU."""
    from export.onnx_export import weights_file

    trt = import_tensorrt()
    digest = hashlib.sha256()
    for path in (onnx_path, weights_file(onnx_path)):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
    digest.update(json.dumps({"profile": profile, "trt": trt.__version__,
                              "gpu": torch.cuda.get_device_name(), "cc": torch.cuda.get_device_capability()},
                             sort_keys=True).encode())
    return digest.hexdigest()[:24]


def build_engine(onnx_path: Path, profile: dict[str, tuple[int, int, int]], engine_dir: Path | None = None) -> Path:
    """Build (or reuse) a serialized TensorRT engine for the exported graph.

    The network is strongly typed: precisions follow the ONNX graph (exported in fp16/bf16 with
    RMSNorm and softmax statistics in fp32), so no layer is silently demoted.
    """
    from hub.fetch import cache_dir

    trt = import_tensorrt()
    engine_dir = engine_dir or cache_dir() / "tensorrt"
    plan = engine_dir / f"{engine_key(onnx_path, profile)}.plan"
    if plan.is_file():
        return plan
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        opt.set_shape(tensor.name, *_input_shapes(tensor.name, tuple(tensor.shape), profile))
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT engine build failed for {onnx_path}")
    engine_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=engine_dir, suffix=".plan.tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(serialized)
    os.replace(tmp, plan)
    return plan
