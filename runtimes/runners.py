"""Runtimes behind one protocol: whatever the engine calls as ``model(...)`` / ``model.new_cache``.

The protocol is the Transformer's: ``runner(input_ids[T], slots, num_new, cache, logits_indices=None,
tap_layers=()) -> ForwardOutput``, ``runner.new_cache(num_slots, max_len) -> KVCache`` and
``runner.config``. The torch runner *is* the Transformer. The ONNX Runtime and TensorRT runners run
the exported padded-batch graph (see export.onnx_export): around each call they gather the slots'
cached K/V into [B, kv_heads, P, head_dim], build the mask, and scatter the new K/V rows back, so
every runtime shares our KVCache and the engine cannot tell them apart.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from export.onnx_export import DTYPES, ONNX_FILE, cached_onnx, io_names, read_metadata
from models.config import TransformerConfig
from models.hardware import measurement_path, resolve_dtype
from models.kv_cache import KVCache
from models.loading import load_config, load_token_matrices, load_transformer
from models.projection import KernelPlan
from models.transformer import ForwardOutput, Transformer

RUNTIMES = ("torch", "onnxruntime", "tensorrt")


class ModelRunner(Protocol):
    """What the engine needs from a target model."""

    config: TransformerConfig

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
                 logits_indices: torch.Tensor | None = None, tap_layers: Sequence[int] = ()) -> ForwardOutput: ...

    def new_cache(self, num_slots: int, max_len: int) -> KVCache: ...


@dataclass
class PaddedBatch:
    """One engine call laid out for the padded graph (all CPU tensors)."""

    input_ids: torch.Tensor  # int64 [B, L]
    positions: torch.Tensor  # int64 [B, L]
    mask: torch.Tensor  # bool [B, L, P + L]
    logit_rows: torch.Tensor  # int64 [N] rows of [B * L]
    slots: torch.Tensor  # int64 [B]
    past_len: int  # P
    pad_index: torch.Tensor  # int64 [T] row of each packed token in [B * L]
    tok_slots: torch.Tensor  # int64 [T]
    tok_positions: torch.Tensor  # int64 [T]
    num_new: torch.Tensor  # int64 [B]


def pad_batch(input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
              logits_indices: torch.Tensor | None) -> PaddedBatch:
    """Check a packed call like the Transformer does and lay it out as a padded batch.

    P is at least 1 (a masked dummy key when every sequence is new): TensorRT profiles and some
    kernels dislike zero-sized dimensions, and one masked key costs nothing.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D packed tokens, got shape {tuple(input_ids.shape)}")
    B = len(slots)
    slots_l, new_l = [int(s) for s in slots], [int(n) for n in num_new]
    if B == 0 or len(new_l) != B:
        raise ValueError(f"need one num_new per slot, got slots={slots_l} num_new={new_l}")
    if len(set(slots_l)) != B:
        raise ValueError(f"duplicate slots in {slots_l}")
    if min(new_l) < 1:
        raise ValueError(f"every sequence needs at least one new token, got num_new={new_l}")
    T = int(input_ids.shape[0])
    if sum(new_l) != T:
        raise ValueError(f"input_ids has {T} tokens but sum(num_new) = {sum(new_l)}")
    slots_t = torch.tensor(slots_l, dtype=torch.int64)
    new_t = torch.tensor(new_l, dtype=torch.int64)
    starts = cache.lengths.index_select(0, slots_t)
    if int((starts + new_t).max()) > cache.max_len:
        raise ValueError(f"sequence would reach {int((starts + new_t).max())} tokens; cache max_len is {cache.max_len}")
    L = max(new_l)
    P = max(1, int(starts.max()))
    batch_of_tok = torch.arange(B).repeat_interleave(new_t)
    offset = torch.arange(T) - (torch.cumsum(new_t, 0) - new_t)[batch_of_tok]
    pad_index = batch_of_tok * L + offset

    ids = torch.zeros(B * L, dtype=torch.int64)
    ids[pad_index] = input_ids.to(torch.int64).cpu()
    # padded queries repeat the last real position: finite everywhere, their outputs are dropped
    q_off = torch.minimum(torch.arange(L)[None, :], (new_t - 1)[:, None])
    positions = starts[:, None] + q_off  # [B, L]
    past_mask = torch.arange(P)[None, None, :] < starts[:, None, None]  # [B, 1, P]
    new_mask = torch.ones(L, L, dtype=torch.bool).tril()  # query i sees new keys 0..i
    mask = torch.cat((past_mask.expand(B, L, P), new_mask.expand(B, L, L)), dim=2)
    rows = pad_index if logits_indices is None else pad_index.index_select(0, logits_indices.cpu().to(torch.int64))
    return PaddedBatch(
        input_ids=ids.view(B, L), positions=positions, mask=mask, logit_rows=rows.contiguous(), slots=slots_t,
        past_len=P, pad_index=pad_index, tok_slots=slots_t[batch_of_tok], tok_positions=starts[batch_of_tok] + offset,
        num_new=new_t,
    )


def _check_taps(tap_layers: Sequence[int], exported: Sequence[int]) -> list[int]:
    taps = sorted(set(int(t) for t in tap_layers))
    missing = [t for t in taps if t not in exported]
    if missing:
        raise ValueError(f"tap layers {missing} were not exported (graph has {list(exported)}); "
                         "export again with --tap-layers")
    return taps


class _GraphRunner:
    """Shared part of the graph runtimes: padding, cache gather/scatter, output unpacking."""

    config: TransformerConfig
    dtype: torch.dtype
    device: torch.device
    tap_layers: tuple[int, ...]
    model_dir: Path | None = None  # set by load_runner; where the shared token matrices are read from
    _token_matrices: tuple[torch.Tensor, torch.Tensor] | None = None

    def _shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._token_matrices is None:
            if self.model_dir is None:
                raise RuntimeError("this runner was not loaded from a model directory")
            embed, head = load_token_matrices(self.model_dir, self.dtype)
            self._token_matrices = embed.to(self.device), head.to(self.device)
        return self._token_matrices

    @property
    def embed(self) -> torch.Tensor:
        """The target's input embedding (read on first use): trained drafters share it, as with the torch runtime."""
        return self._shared()[0]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._shared()[1]

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.config, num_slots, max_len, dtype=self.dtype, device=self.device)

    def last_token_indices(self, num_new: Sequence[int]) -> torch.Tensor:
        """Packed row of each sequence's last new token (as Transformer.last_token_indices)."""
        return torch.tensor(num_new, dtype=torch.int64).cumsum(0) - 1

    def _past(self, cache: KVCache, batch: PaddedBatch) -> list[torch.Tensor]:
        """[B, kv_heads, P, D] per layer, K then V, contiguous (a copy: the graph reads dense tensors)."""
        slots = batch.slots.to(self.device)
        P = batch.past_len
        past: list[torch.Tensor] = []
        for layer in range(self.config.num_layers):
            past.append(cache.k[layer].index_select(0, slots)[:, :, :P].contiguous())
            past.append(cache.v[layer].index_select(0, slots)[:, :, :P].contiguous())
        return past

    def _finish(self, cache: KVCache, batch: PaddedBatch, logits: torch.Tensor, new_kv: Sequence[torch.Tensor],
                hidden: dict[int, torch.Tensor], taps: list[int]) -> ForwardOutput:
        """Scatter the new K/V rows into the cache, advance lengths, pack taps back to [T, hidden]."""
        B, L = batch.input_ids.shape
        pad_index = batch.pad_index.to(self.device)
        tok_slots, tok_pos = batch.tok_slots.to(self.device), batch.tok_positions.to(self.device)
        for layer in range(self.config.num_layers):
            for store, new in ((cache.k[layer], new_kv[2 * layer]), (cache.v[layer], new_kv[2 * layer + 1])):
                rows = new.transpose(1, 2).reshape(B * L, self.config.num_kv_heads, self.config.head_dim)
                store[tok_slots, :, tok_pos] = rows.index_select(0, pad_index).to(store.dtype)
        cache.lengths.index_add_(0, batch.slots, batch.num_new)
        packed = {t: hidden[t].reshape(B * L, -1).index_select(0, pad_index) for t in taps}
        return ForwardOutput(logits=logits.float(), hidden_states=packed)


class OnnxRuntimeRunner(_GraphRunner):
    """The exported graph on ONNX Runtime (CPU by default), with our KVCache on the CPU."""

    def __init__(self, onnx_path: Path, config: TransformerConfig, num_threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        meta = read_metadata(onnx_path)
        self.config = config
        self.dtype = DTYPES[meta.get("dtype", "float32")]
        self.device = torch.device("cpu")
        self.tap_layers = tuple(meta.get("tap_layers", ()))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=list(providers))
        self.input_names, self.output_names = io_names(config.num_layers, self.tap_layers)

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
                 logits_indices: torch.Tensor | None = None, tap_layers: Sequence[int] = ()) -> ForwardOutput:
        taps = _check_taps(tap_layers, self.tap_layers)
        batch = pad_batch(input_ids, slots, num_new, cache, logits_indices)
        feeds = dict(zip(self.input_names, (batch.input_ids.numpy(), batch.positions.numpy(), batch.mask.numpy(),
                                            batch.logit_rows.numpy(), *(t.numpy() for t in self._past(cache, batch)))))
        outs = [torch.from_numpy(o) for o in self.session.run(self.output_names, feeds)]
        n = 2 * self.config.num_layers
        hidden = dict(zip(self.tap_layers, outs[1 + n:]))
        return self._finish(cache, batch, outs[0], outs[1:1 + n], hidden, taps)


class TensorRTRunner(_GraphRunner):
    """The exported graph as a TensorRT engine on a CUDA GPU, with our KVCache on that GPU.

    The engine is built once per (ONNX content, precision, profile, TensorRT version, GPU) and
    cached under ``<cache>/tensorrt/<hash>.plan``; later starts deserialize it in seconds.
    """

    def __init__(self, onnx_path: Path, config: TransformerConfig, max_batch: int, max_new: int, max_context: int,
                 engine_dir: Path | None = None) -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt runtime needs a CUDA GPU; none is visible to torch")
        meta = read_metadata(onnx_path)
        self.config = config
        self.dtype = DTYPES[meta.get("dtype", "float16")]
        self.device = torch.device("cuda")
        self.tap_layers = tuple(meta.get("tap_layers", ()))
        self.profile = trt_profile(max_batch, max_new, max_context)
        plan = build_engine(onnx_path, self.profile, engine_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan.read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.input_names, self.output_names = io_names(config.num_layers, self.tap_layers)
        self._torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self._trt = trt

    def _check_profile(self, batch: PaddedBatch) -> None:
        B, L = batch.input_ids.shape
        for name, value in (("batch", B), ("new", L), ("past", batch.past_len + L)):
            if value > self.profile[name][2]:
                raise ValueError(f"{name}={value} exceeds the TensorRT profile maximum {self.profile[name][2]}; "
                                 "rebuild with larger max_batch_size / max_context")

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
                 logits_indices: torch.Tensor | None = None, tap_layers: Sequence[int] = ()) -> ForwardOutput:
        taps = _check_taps(tap_layers, self.tap_layers)
        batch = pad_batch(input_ids, slots, num_new, cache, logits_indices)
        self._check_profile(batch)
        with torch.cuda.stream(self.stream):
            inputs = [batch.input_ids, batch.positions, batch.mask, batch.logit_rows]
            inputs = [t.to(self.device, non_blocking=True) for t in inputs] + self._past(cache, batch)
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


def import_tensorrt():
    """The tensorrt module, or an error saying how to get it (imported lazily: CPU hosts lack it)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError(
            "the tensorrt runtime needs the TensorRT Python package and an NVIDIA GPU: use the image in "
            "docker/ (nvcr.io/nvidia/tritonserver, with `pip install tensorrt-cu12`), or choose "
            "--runtime onnxruntime / torch on CPU hosts"
        ) from exc
    return tensorrt


def trt_profile(max_batch: int, max_new: int, max_context: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each dynamic dim: tuned for decode (one new token), half-full batch and context."""
    return {"batch": (1, max(1, max_batch // 2), max_batch), "new": (1, 1, max_new),
            "past": (1, max(1, max_context // 2), max_context)}


def engine_key(onnx_path: Path, profile: dict[str, tuple[int, int, int]]) -> str:
    """Content hash of everything an engine depends on: ONNX bytes, profile, TensorRT version, GPU."""
    trt = import_tensorrt()
    digest = hashlib.sha256()
    for path in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
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
    b, n, p = profile["batch"], profile["new"], profile["past"]
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        name = tensor.name
        if name in ("input_ids", "positions"):
            shapes = [(b[k], n[k]) for k in range(3)]
        elif name == "attention_mask":
            shapes = [(b[k], n[k], p[k] + n[k]) for k in range(3)]
        elif name == "logit_rows":
            shapes = [(1,), (b[1] * n[1],), (b[2] * n[2],)]
        else:  # past_key_i / past_value_i [B, kv_heads, P, head_dim]
            heads, dim = tensor.shape[1], tensor.shape[3]
            shapes = [(b[k], heads, p[k], dim) for k in range(3)]
        opt.set_shape(name, *shapes)
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


def cached_kernel_plan(model: Transformer, model_dir: Path) -> KernelPlan:
    """The projection kernels for this model, dtype, thread count and machine: measured once, then read."""
    from hub.fetch import cache_dir

    dtype = str(model.dtype).removeprefix("torch.")
    path = measurement_path(cache_dir(), model_dir, f"kernels-{dtype}-{torch.get_num_threads()}t")
    if path.exists():
        return KernelPlan.from_json(json.loads(path.read_text()))
    plan = model.measure_kernel_plan()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.to_json()))
    return plan


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
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if runtime == "torch":
        model = load_transformer(model_dir, DTYPES[dtype]).to(device)
        if model.device.type == "cpu":
            model.use_kernel_plan(cached_kernel_plan(model, model_dir))
        return model
    if runtime == "onnxruntime" and dtype != "float32":
        raise ValueError("the onnxruntime runtime runs float32 (ONNX Runtime's CPU kernels lack bf16/fp16 matmuls)")
    if runtime == "tensorrt":
        import_tensorrt()  # fail before a long export when TensorRT is absent
    path = Path(onnx_path) if onnx_path is not None else cached_onnx(model_dir, dtype, tap_layers)
    if path.is_dir():
        path = path / ONNX_FILE
    config = load_config(model_dir)
    if runtime == "onnxruntime":
        runner: _GraphRunner = OnnxRuntimeRunner(path, config, num_threads)
    else:
        runner = TensorRTRunner(path, config, max_batch, max_new, max_context)
    runner.model_dir = model_dir
    return runner
