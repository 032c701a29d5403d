"""A runner for a model directory on the chosen runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from export.drafter_export import cached_drafter_export, drafter_dtype, exported_for
from export.onnx_export import DTYPES, ONNX_FILE, cached_onnx, check_dtype, read_metadata
from export.tensorrt_engine import import_tensorrt
from models.drafters import BlockDrafter, Drafter, load_drafter
from models.hardware import resolve_dtype
from models.loading import load_config, load_transformer
from runtimes.drafter_runner import OnnxRuntimeBlockDrafter
from runtimes.graph import _GraphRunner
from runtimes.onnxruntime_runner import OnnxRuntimeRunner
from runtimes.protocol import RUNTIMES, ModelRunner, check_runtime_dtype
from runtimes.tensorrt_runner import TensorRTRunner
from runtimes.torch_runner import cached_kernel_plan


def load_runner(model_dir: Path, runtime: str = "torch", dtype: str = "float32", onnx_path: Path | None = None,
                tap_layers: Sequence[int] = (), num_threads: int | None = None, max_batch: int = 16,
                max_new: int = 2048, max_context: int = 2048, device: str = "cpu") -> ModelRunner:
    """A runner for a model directory on the chosen runtime.

    onnx_path: an exported graph to use (e.g. one shipped in a built model repository); by
    default the export is taken from, or made into, the cache. The TensorRT sizes bound the
    engine's optimization profile. device: where the torch runtime runs (the others fix theirs);
    on the CPU its projections use the kernel plan measured for this machine (cached).
    dtype: ``auto`` is the CPU's default (models.hardware.default_dtype).
    """
    model_dir = Path(model_dir)
    dtype = resolve_dtype(dtype)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    check_dtype(dtype)
    check_runtime_dtype(runtime, dtype)
    if runtime == "torch":
        model = load_transformer(model_dir, DTYPES[dtype]).to(device)
        if model.device.type == "cpu":
            model.use_kernel_plan(cached_kernel_plan(model, model_dir))
        return model
    if runtime == "tensorrt":
        import_tensorrt()  # fail before a long export when TensorRT is absent
    path = Path(onnx_path) if onnx_path is not None else cached_onnx(model_dir, dtype, tap_layers)
    if path.is_dir():
        path = path / ONNX_FILE
    wanted, exported = sorted(set(int(t) for t in tap_layers)), read_metadata(path).get("tap_layers", [])
    if missing := sorted(set(wanted) - set(exported)):
        raise ValueError(f"the drafter needs tap layers {wanted}, but the graph {path} has {exported} (missing "
                         f"{missing}): build the repository again with this drafter, or serve the drafter it was built for")
    config = load_config(model_dir)
    if runtime == "onnxruntime":
        runner: _GraphRunner = OnnxRuntimeRunner(path, config, num_threads)
    else:
        runner = TensorRTRunner(path, config, max_batch, max_new, max_context)
    runner.model_dir = model_dir
    return runner


def load_feature_drafter(checkpoint: Path, target: ModelRunner, runtime: str = "torch",
                         export_dir: Path | None = None) -> Drafter | OnnxRuntimeBlockDrafter:
    """A trained drafter for a target on the target's runtime.

    On onnxruntime a block drafter (DSpark, DFlash-style) runs from its exported graphs
    (``export_dir``, e.g. shipped in a built repository, when they were exported from this
    checkpoint; else from or into the cache), quantized as the target is (drafter_dtype); on torch,
    and for EAGLE-3-style drafters, it is the torch module (on tensorrt: on the target's GPU).
    """
    module = load_drafter(checkpoint, target)
    if runtime != "onnxruntime" or not isinstance(module, BlockDrafter):
        return module
    dtype = drafter_dtype(target.export_dtype) if isinstance(target, OnnxRuntimeRunner) else "float32"
    if export_dir is None or not exported_for(export_dir, Path(checkpoint), module, dtype):
        export_dir = cached_drafter_export(module, Path(checkpoint), dtype)  # shipped graphs of another drafter: not these
    return OnnxRuntimeBlockDrafter(module, export_dir, target.embed,
                                   target.workers if isinstance(target, OnnxRuntimeRunner) else None)
