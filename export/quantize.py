"""int8 rewrites of an exported float32 step graph, for ONNX Runtime's CPU provider.

Two schemes, chosen by the export dtype:

- ``int8`` (weight-only): every matmul by a weight becomes ``MatMulNBits`` (symmetric, one scale
  per QUANT_BLOCK weights). Closest to float32, but its kernels are fast for a few rows only.
- ``w8a8`` (weights and activations, SmoothQuant): every matmul by a weight becomes an integer
  matmul (``MatMulIntegerToFloat``, ONNX Runtime's MatMulInteger with the weight scales applied in
  its output pass) on uint8 activations and int8 weights, which ONNX Runtime's MLAS runs on
  AVX-VNNI/AMX at any row count. Activations are quantized per row at run time (symmetric,
  scale max|x| / 127, shifted by 128 into uint8 against a constant zero point of 128), so a row's
  result never depends on the other rows of its batch; weights per output column. Before that,
  each input channel is divided by s_j = max|X_j|^a / max|W_j|^(1-a), and the weight's row j
  multiplied by it (SmoothQuant, Xiao et al. 2023, a = SMOOTHING_ALPHA): the few channels with
  large activations no longer set every row's scale. max|X_j| comes from a float32 run over
  calibration_texts(), none of which `cli.py bench precision` scores. The graph's KV cache is int8
  as well (export.onnx_export exports w8a8 graphs with it).

The README has perplexity and step times of both against float32 and torch bf16.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from models.config import TransformerConfig

QUANT_BLOCK = 32  # int8 weight-only: weights per scale, along the input dimension
SMOOTHING_ALPHA = 0.5  # measured here: 0.5 +0.9% perplexity, 0.65 +1.2%, none +4.4%
CALIBRATION_MODULES = ("collections", "inspect", "email.message", "logging", "pathlib", "string")
CALIBRATION_TOPICS = ("if", "while", "with", "class", "try", "lambda")
CALIBRATION_CHARS = 5000
CALIBRATION_TOKENS = 1024


def recipe(dtype: str) -> dict:
    """The settings a graph of ``dtype`` is quantized with (part of its export's cache key); {} for float."""
    if dtype == "int8":
        return {"block": QUANT_BLOCK}
    if dtype == "w8a8":
        return {"alpha": SMOOTHING_ALPHA, "modules": CALIBRATION_MODULES, "topics": CALIBRATION_TOPICS,
                "chars": CALIBRATION_CHARS, "tokens": CALIBRATION_TOKENS}
    return {}


def python_texts(modules: Sequence[str], topics: Sequence[str], chars: int, skip: int) -> list[str]:
    """Human-written text every machine with Python has: a slice of ``chars`` characters of each module's
    source, from 1/``skip`` of the way in (past licence headers and imports), then the first ``chars`` of
    each reference-documentation topic (``pydoc_data``)."""
    import pydoc_data.topics

    texts = []
    for name in modules:
        source = inspect.getsource(importlib.import_module(name))
        first = len(source) // skip
        texts.append(source[first:first + chars])
    return texts + [pydoc_data.topics.topics[t][:chars] for t in topics]


def calibration_texts() -> list[str]:
    """What w8a8's smoothing is calibrated on (disjoint from what `benchmarks.precision` scores)."""
    return python_texts(CALIBRATION_MODULES, CALIBRATION_TOPICS, CALIBRATION_CHARS, skip=2)


def _weight_matmuls(graph) -> list:
    """Nodes that multiply by a float 2-D weight initializer (projections and the LM head)."""
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_weights(path: Path) -> None:
    """``int8``: rewrite an exported graph in place, every matmul by a weight as ONNX Runtime's
    MatMulNBits (symmetric, one scale per QUANT_BLOCK weights, int8 arithmetic)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=4)
    log = logging.getLogger(MatMulNBitsQuantizer.__module__)
    level = log.level
    log.setLevel(logging.WARNING)  # it logs a line per matmul
    try:
        quantizer.process()
    finally:
        log.setLevel(level)
    quantizer.model.topological_sort()
    _save(quantizer.model.model, path)


def activation_ranges(path: Path, config: "TransformerConfig", token_ids: list[list[int]]) -> dict[str, np.ndarray]:
    """max |x| per input channel of every weight matmul's input, over the sequences ``token_ids``
    prefilled one at a time through the float32 graph at ``path``: {node name: float32 [in_features]}."""
    import onnx
    import onnxruntime as ort
    import torch

    from export.onnx_export import io_names, read_metadata
    from models.kv_cache import KVCache
    from runtimes.graph import cache_views, pack_batch, whole_pages
    from runtimes.onnxruntime_runner import session_options

    model = onnx.load(str(path), load_external_data=False)
    nodes = _weight_matmuls(model.graph)
    for node in nodes:
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    meta = read_metadata(path)
    int8_kv = meta.get("kv_cache") == "int8"
    inputs, _ = io_names(config.num_layers, meta.get("tap_layers", []), int8_kv)
    ranges: dict[str, np.ndarray] = {}
    probe = path.parent / "calibration-probe.onnx"  # beside the weights' file, which it names relative to its folder
    onnx.save_model(model, str(probe))
    try:
        session = ort.InferenceSession(str(probe), session_options(None), providers=["CPUExecutionProvider"])
        for ids in token_ids:
            cache = KVCache(config, 1, whole_pages(len(ids) + 1), dtype=torch.int8 if int8_kv else torch.float32)
            batch = pack_batch(torch.tensor(ids), [cache.allocate()], [len(ids)], cache, None)
            tensors = batch.inputs() + cache_views(cache)
            outs = session.run([n.input[0] for n in nodes], {k: t.numpy() for k, t in zip(inputs, tensors)})
            for node, x in zip(nodes, outs):
                peak = np.abs(x.reshape(-1, x.shape[-1])).max(0)
                ranges[node.name] = np.maximum(ranges[node.name], peak) if node.name in ranges else peak
    finally:
        probe.unlink()
    return ranges


def calibration_ids(tokenizer_file: Path) -> list[list[int]]:
    """calibration_texts() tokenized, each cut to CALIBRATION_TOKENS."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return [tokenizer.encode(t).ids[:CALIBRATION_TOKENS] for t in calibration_texts()]


def quantize_w8a8(path: Path, config: "TransformerConfig", token_ids: list[list[int]]) -> None:
    """``w8a8``: rewrite an exported float32 graph in place, every matmul by a weight as a smoothed,
    per-row dynamically quantized MatMulInteger (module docstring), its smoothing calibrated on the
    sequences ``token_ids`` (calibration_ids for a real model)."""
    import onnx

    ranges = activation_ranges(path, config, token_ids)
    model = onnx.load(str(path))
    rewrite_w8a8(model, ranges)
    _save(model, path)


def quantize_drafter_w8a8(path: Path) -> None:
    """``w8a8`` for a drafter's graph (export.drafter_export): its weight matmuls rewritten as the
    target's are, without smoothing (a drafter's rounding costs acceptance, never correctness: the
    target verifies every drafted token)."""
    import onnx

    from export.onnx_export import save_graph, weights_file

    model = onnx.load(str(path))
    _constant_weights(model.graph)
    rewrite_w8a8(model, None)
    weights_file(path).unlink(missing_ok=True)
    save_graph(model, path)
    onnx.checker.check_model(str(path), full_check=True)


def _constant_weights(graph) -> None:
    """2-D float Constant nodes a MatMul reads (a buffer the exporter folded, e.g. the drafter's
    draft head) become initializers, so _weight_matmuls sees them as the weights they are."""
    from onnx import TensorProto

    matmul_inputs = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    for node in list(graph.node):
        if node.op_type != "Constant" or node.output[0] not in matmul_inputs or node.attribute[0].name != "value":
            continue
        tensor = node.attribute[0].t
        if len(tensor.dims) == 2 and tensor.data_type == TensorProto.FLOAT:
            weight = TensorProto()
            weight.CopyFrom(tensor)
            weight.name = node.output[0]
            graph.initializer.append(weight)
            graph.node.remove(node)


def rewrite_w8a8(model, ranges: dict[str, np.ndarray] | None) -> None:
    """Every weight matmul of ``model`` (in place) as a per-row dynamically quantized MatMulIntegerToFloat
    with per-column weight scales; ``ranges`` (activation_ranges): each input channel smoothed first."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    quantized = {n.name for n in _weight_matmuls(graph)}
    consts = {"w8a8_inv127": np.float32(1 / 127), "w8a8_tiny": np.float32(1e-30), "w8a8_one": np.float32(1),
              "w8a8_zero_point": np.uint8(128)}
    nodes, new_weights = [], []
    for node in graph.node:
        if node.name not in quantized:
            nodes.append(node)
            continue
        x, w_name = node.input
        prefix = node.name.strip("/").replace("/", "_") + "_w8a8"
        name = lambda part: f"{prefix}_{part}"  # noqa: E731
        op = lambda kind, ins, out, **kw: helper.make_node(kind, ins, [out], name=out, **kw)  # noqa: E731
        w = numpy_helper.to_array(weights[w_name]).astype(np.float32)  # [in, out]
        if ranges is not None:
            x_peak = np.maximum(ranges[node.name], 1e-5)
            smooth = x_peak ** SMOOTHING_ALPHA / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - SMOOTHING_ALPHA)
            w = w * smooth[:, None]
            new_weights.append(numpy_helper.from_array((1 / smooth).astype(np.float32), name("smooth")))
            nodes.append(op("Mul", [x, name("smooth")], name("x")))
            x = name("x")
        w_scale = np.maximum(np.abs(w).max(0), 1e-30) / 127
        new_weights += [numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), name("weight")),
                        numpy_helper.from_array(w_scale.astype(np.float32), name("weight_scale"))]
        nodes += [
            op("Abs", [x], name("abs")),
            op("ReduceMax", [name("abs")], name("peak"), axes=[-1], keepdims=1),
            op("Mul", [name("peak"), "w8a8_inv127"], name("scale0")),
            op("Max", [name("scale0"), "w8a8_tiny"], name("scale")),  # an all-zero row: 0 / tiny = 0
            op("Div", [x, name("scale")], name("scaled")),
            # round half to even, + 128, saturate to uint8: one pass
            op("QuantizeLinear", [name("scaled"), "w8a8_one", "w8a8_zero_point"], name("x_uint8")),
            # the int32 product times each weight column's scale, in the GEMM's own output pass
            op("MatMulIntegerToFloat", [name("x_uint8"), name("weight"), "w8a8_one", name("weight_scale"),
                                        "w8a8_zero_point"], name("columns"), domain="com.microsoft"),
            helper.make_node("Mul", [name("columns"), name("scale")], [node.output[0]], name=name("out")),
        ]
    read = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name in read]  # a float weight only its matmul read is gone
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_weights + [numpy_helper.from_array(np.array(v), k) for k, v in consts.items()])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _save(model, path: Path) -> None:
    """Replace the graph at ``path`` and its weights' file with ``model`` (all in memory), check it, and
    derive its one-group graph again (export.onnx_export.one_group_graph)."""
    import onnx

    from export.onnx_export import one_group_graph, save_graph, weights_file

    weights_file(path).unlink()  # the float32 weights, loaded above: the quantized ones replace them
    save_graph(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    one_group_graph(path)
