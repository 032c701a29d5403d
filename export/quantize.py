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
    """``w8a8`` for a drafter's graph (export.drafter_export, which checks it): its weight matmuls
    rewritten as the target's are, without smoothing (a drafter's rounding costs acceptance, never
    correctness: the target verifies every drafted token)."""
    import onnx

    model = onnx.load(str(path))
    _constant_weights(model.graph)
    rewrite_w8a8(model, None)
    _replace(model, path)


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


def _ranks(model) -> dict[str, int]:
    """The rank of every value ONNX shape inference can tell."""
    import onnx

    graph = model.graph
    # the weights as typed inputs, not data: a model's proto over 2 GB cannot go through inference
    weights = [onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in graph.initializer]
    light = onnx.helper.make_model(onnx.helper.make_graph(graph.node, graph.name, list(graph.input) + weights,
                                                          graph.output), opset_imports=model.opset_import)
    inferred = onnx.shape_inference.infer_shapes(light).graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in list(inferred.value_info) + list(inferred.input)
            if v.type.tensor_type.HasField("shape")}


def _column_parts(graph, matmuls: set[str], ranks: dict[str, int]) -> dict[str, tuple[list, list[tuple[str, int, int]]]]:
    """{matmul name: (the nodes that cut its output, [(part's output name, first column, end column)])} for
    each of ``matmuls`` whose output is only read cut along its last axis (one Split, or Slices; constant
    bounds) into parts at least as wide as the input, e.g. gate/up from one fused projection: those run
    as one integer GEMM per part, so no pass copies the parts out of their joint product (measured on
    SmolLM2: a 16-prompt prefill 12% faster). Narrower parts (q/k/v's k and v) stay joint: their copy
    is cheap, and at one row a GEMM call more cost decoding 2-4%."""
    from onnx import numpy_helper

    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    shapes = {i.name: list(i.dims) for i in graph.initializer if len(i.dims) == 2}
    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) <= 1}
    known |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}

    def ints(name: str) -> list[int] | None:
        return [int(v) for v in np.ravel(known[name])] if name in known else None

    def parts_of(cutters: list, last: set[int], columns: int) -> list[tuple[str, int, int]] | None:
        if len(cutters) == 1 and cutters[0].op_type == "Split":
            split = cutters[0]
            sizes = ints(split.input[1]) if len(split.input) > 1 else None
            if sizes is None or next((a.i for a in split.attribute if a.name == "axis"), 0) not in last:
                return None
            ends = np.cumsum(sizes).tolist()
            return [(out, end - size, end) for out, size, end in zip(split.output, sizes, ends)]
        parts = []
        for cut in cutters:
            if cut.op_type != "Slice" or len(cut.input) not in (4, 5):
                return None
            starts, stops, axes = (ints(name) for name in cut.input[1:4])
            steps = ints(cut.input[4]) if len(cut.input) == 5 else [1]
            if not (starts and stops and axes) or len(axes) != 1 or axes[0] not in last or steps != [1]:
                return None
            first, end = (v + columns if v < 0 else v for v in (starts[0], stops[0]))  # negative: from the end
            parts.append((cut.output[0], max(0, min(first, columns)), max(0, min(end, columns))))
        return parts

    found = {}
    for node in graph.node:
        if node.name not in matmuls or not (cutters := readers.get(node.output[0])):
            continue
        width, columns = shapes[node.input[1]]
        parts = parts_of(cutters, {-1, ranks.get(node.output[0], 0) - 1}, columns)
        if parts and len(parts) > 1 and min(end - first for _, first, end in parts) >= width:
            found[node.name] = (cutters, parts)
    return found


def rewrite_w8a8(model, ranges: dict[str, np.ndarray] | None) -> None:
    """Every weight matmul of ``model`` (in place) as a per-row dynamically quantized MatMulIntegerToFloat
    with per-column weight scales; ``ranges`` (activation_ranges): each input channel smoothed first."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    quantized = {n.name for n in _weight_matmuls(graph)}
    consts = {"w8a8_inv127": np.float32(1 / 127), "w8a8_tiny": np.float32(1e-30), "w8a8_one": np.float32(1),
              "w8a8_zero_point": np.uint8(128), "w8a8_rows": np.array([-1], np.int64)}
    ranks = _ranks(model)
    cuts = _column_parts(graph, quantized, ranks)
    absorbed = {id(cutter) for cutters, _ in cuts.values() for cutter in cutters}
    nodes, new_weights = [], []
    for node in graph.node:
        if id(node) in absorbed:
            continue
        if node.name not in quantized:
            nodes.append(node)
            continue
        x, w_name = node.input
        rank = ranks.get(x)
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
        nodes += [
            op("Abs", [x], name("abs")),
            op("ReduceMax", [name("abs")], name("peak"), axes=[-1], keepdims=1),
            op("Mul", [name("peak"), "w8a8_inv127"], name("scale0")),
            op("Max", [name("scale0"), "w8a8_tiny"], name("scale")),  # an all-zero row: 0 / tiny = 0
            # one scale (and zero point 128) per row along axis 0: QuantizeLinear divides, rounds half to even,
            # shifts and saturates in one pass (a Div before it was a pass of its own: 30% of this chain)
            op("Reshape", [name("scale"), "w8a8_rows"], name("row_scale")),
            op("Shape", [name("row_scale")], name("rows")),
            op("Expand", ["w8a8_zero_point", name("rows")], name("row_zero_point")),
        ]
        if rank == 2:
            nodes.append(op("QuantizeLinear", [x, name("row_scale"), name("row_zero_point")], name("x_uint8"), axis=0))
        else:  # rows of any leading shape: quantized as a [rows, in] view, then viewed as x is
            k = w.shape[0]
            new_weights.append(numpy_helper.from_array(np.array([-1, k], np.int64), name("flat_shape")))
            nodes += [op("Reshape", [x, name("flat_shape")], name("x_rows")),
                      op("QuantizeLinear", [name("x_rows"), name("row_scale"), name("row_zero_point")], name("rows_uint8"),
                         axis=0),
                      op("Shape", [x], name("x_shape")),
                      op("Reshape", [name("rows_uint8"), name("x_shape")], name("x_uint8"))]
        split = node.name in cuts
        parts = cuts[node.name][1] if split else [(node.output[0], 0, w.shape[1])]
        for part, (output, first, end) in enumerate(parts):  # each part of a cut output: a GEMM of its own
            cols = slice(first, end)
            part_name = lambda what: name(f"{what}{part}" if split else what)  # noqa: E731
            new_weights += [numpy_helper.from_array(np.round(w[:, cols] / w_scale[cols]).astype(np.int8), part_name("weight")),
                            numpy_helper.from_array(w_scale[cols].astype(np.float32), part_name("weight_scale"))]
            nodes += [
                # the int32 product times each weight column's scale, in the GEMM's own output pass
                op("MatMulIntegerToFloat", [name("x_uint8"), part_name("weight"), "w8a8_one", part_name("weight_scale"),
                                            "w8a8_zero_point"], part_name("columns"), domain="com.microsoft"),
                helper.make_node("Mul", [part_name("columns"), name("scale")], [output], name=part_name("out")),
            ]
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    # a float weight only its matmul read is gone, and so are the Constants only an absorbed cut read (its bounds)
    bounds = {name for cutters, _ in cuts.values() for cutter in cutters for name in cutter.input} - read
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] not in bounds]
    kept = [i for i in graph.initializer if i.name in read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_weights + [numpy_helper.from_array(np.array(v), k) for k, v in consts.items()])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _replace(model, path: Path) -> None:
    """Replace the graph at ``path`` and its weights' file with ``model`` (all in memory)."""
    from export.onnx_export import save_graph, weights_file

    weights_file(path).unlink(missing_ok=True)  # the float32 weights, loaded: the quantized ones replace them
    save_graph(model, path)


def _save(model, path: Path) -> None:
    """_replace a target's graph, check it, and derive its one-group graph again
    (export.onnx_export.one_group_graph)."""
    import onnx

    from export.onnx_export import one_group_graph

    _replace(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    one_group_graph(path)
