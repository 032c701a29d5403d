"""Export our Transformer to one packed step graph that ONNX Runtime and TensorRT both run.

The graph runs T new tokens of B sequences packed back to back (no padding in the projections,
the MLP or the LM head) on top of the caller's KV cache, which it reads in place:

inputs   input_ids          int64 [T]                 new tokens of all sequences, concatenated
         positions          int64 [T]                 absolute position of each new token
         logit_rows         int64 [N]                 packed rows that get logits
         token_rows         int64 [T]                 row of each packed token in the groups' outputs
         group<g>_rows      int64 [B_g, L_g]          packed row of each query of attention group g
         group<g>_mask      bool  [B_g, L_g, C_g+L_g] True where query i may read key j (cached keys first)
         group<g>_cache_pages int64 [B_g, kv_heads, P_g]  pages of cached keys (C_g = P_g * PAGE_SIZE)
         key_cache_<i>      dtype [cache_pages, PAGE_SIZE * head_dim]  layer i's whole cache (read only)
         value_cache_<i>    dtype [cache_pages, PAGE_SIZE * head_dim]
         key_scale_<i>      float32 [cache_pages, PAGE_SIZE]  int8 caches only: each cached vector's scale
         value_scale_<i>    float32 [cache_pages, PAGE_SIZE]
outputs  logits             float32 [N, vocab]
         new_key_<i>        dtype [T, kv_heads, head_dim]  K/V of the new tokens, per layer
         new_value_<i>      dtype [T, kv_heads, head_dim]
         new_key_scale_<i>  float32 [T, kv_heads]          int8 caches only
         new_value_scale_<i> float32 [T, kv_heads]
         hidden_<t>         dtype [T, hidden]              for each tapped layer t

Attention is the only part that needs a per-sequence layout. The caller splits the sequences
into ATTENTION_GROUPS groups by their number of new tokens (decodes and verifies in one, a
prompt's prefill in the other), so a long prefill does not pad every decode to its length; each
group gathers its sequences' cached keys straight from the cache in pages of PAGE_SIZE
positions (one Gather of 4 KiB rows per layer, over the live pages of those slots only) and
attends over them plus its new keys. The
cache never enters or leaves as a copy: the graph reads it where the runtime keeps it (an ONNX
Runtime input over the cache's memory, a TensorRT binding of its device pointer) and returns
only the new tokens' K/V, which the caller writes into its slots.

An int8 KV cache (``w8a8`` graphs) stores each key and value vector as int8 with one float32 scale
(symmetric, per token and KV head), so that a step's gather moves a quarter of float32's bytes
into attention that never widens them: scores by MatMulInteger of the per-row quantized queries
against the int8 keys, and the output by MatMulInteger of the per-row quantized probabilities
(each key's value scale folded in) against the int8 values. The step's own keys and values enter
attention rounded as they are cached, in float32.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from export.quantize import calibration_ids, quantize_w8a8, quantize_weights, recipe
from models.config import TransformerConfig
from models.loading import load_transformer
from models.transformer import Transformer

# Bump when the graph's inputs, outputs or maths change: it is part of every cache key.
GRAPH_VERSION = 5
OPSET = 17
ATTENTION_GROUPS = 2
PAGE_SIZE = 16  # cached positions per gathered row; cache lengths are rounded up to it
ONNX_FILE = "model.onnx"
ONE_GROUP_FILE = "model_one_group.onnx"  # the same graph without its last attention group (one_group_graph)
ONNX_DATA_FILE = f"{ONNX_FILE}.data"  # weights_file(ONNX_FILE)
META_FILE = "export.json"
EXPORT_FILES = (ONNX_FILE, ONE_GROUP_FILE, ONNX_DATA_FILE, META_FILE)  # what an export directory holds
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# int8 graphs (export.quantize) -> the dtype of what stays float (attention, norms; the drafter; int8's KV cache).
QUANTIZED = {"int8": "float32", "w8a8": "float32"}
# Graphs whose KV cache is int8 with a float32 scale per cached vector (module docstring).
INT8_KV = frozenset({"w8a8"})


GROUP_INPUTS = ("rows", "mask", "cache_pages")


def check_dtype(dtype: str) -> None:
    """ValueError for a dtype no graph or model of ours has."""
    if dtype not in DTYPES and dtype not in QUANTIZED:
        raise ValueError(f"dtype must be one of {sorted(DTYPES) + sorted(QUANTIZED)}, got {dtype!r}")


def compute_dtype(dtype: str) -> str:
    """The dtype of a graph's KV cache and unquantized maths: int8 graphs keep float32 there."""
    return QUANTIZED.get(dtype, dtype)


def io_names(num_layers: int, tap_layers: Sequence[int], int8_kv: bool = False) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order (an int8 cache's scales follow each layer's K and V)."""
    inputs = ["input_ids", "positions", "logit_rows", "token_rows"]
    inputs += [f"group{g}_{kind}" for g in range(ATTENTION_GROUPS) for kind in GROUP_INPUTS]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"key_cache_{i}", f"value_cache_{i}"]
        outputs += [f"new_key_{i}", f"new_value_{i}"]
        if int8_kv:
            inputs += [f"key_scale_{i}", f"value_scale_{i}"]
            outputs += [f"new_key_scale_{i}", f"new_value_scale_{i}"]
    outputs += [f"hidden_{t}" for t in tap_layers]
    return inputs, outputs


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back, then scaled, spelled out in primitive ops.

    torch's tracer turns ``F.rms_norm`` into ``aten::rms_norm``, which has no ONNX symbolic
    below opset 23 (and TensorRT parses opset 17 best); the rounding order matches the model's.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@torch.library.custom_op("dspark::matmul_integer", mutates_args=())
def matmul_integer(a: torch.Tensor, b: torch.Tensor, zero_point: int) -> torch.Tensor:
    """int32 ``(a - zero_point) @ b`` of uint8 ``a`` and int8 ``b``: ONNX MatMulInteger in the graph."""
    return torch.matmul(a.double() - zero_point, b.double()).to(torch.int32)


@matmul_integer.register_fake
def _(a: torch.Tensor, b: torch.Tensor, zero_point: int) -> torch.Tensor:
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    return torch.empty(shape, dtype=torch.int32)


def _matmul_integer_symbolic(g, a, b, zero_point):
    from torch.onnx.symbolic_helper import _get_const

    zp = torch.tensor(_get_const(zero_point, "i", "zero_point"), dtype=torch.uint8)
    return g.op("MatMulInteger", a, b, g.op("Constant", value_t=zp))


torch.onnx.register_custom_op_symbolic("dspark::matmul_integer", _matmul_integer_symbolic, OPSET)


def quantize_rows(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of each row (last dim): integers on [-levels, levels] held in x's
    float dtype, and the float scale [..., 1] that multiplies them back (an all-zero row stays 0)."""
    scale = torch.clamp(x.abs().amax(-1, keepdim=True) * (1 / levels), min=1e-30)
    return torch.round(x / scale), scale


def mask_bias(mask: torch.Tensor, G: int) -> torch.Tensor:
    """A group's mask [B, L, K] as what its scores [B, kv_heads, G*L, K] add (G query heads per KV head
    folded into the query length): float32 [B, 1, G*L, K], 0 where a query may read a key, -inf
    elsewhere. Built once per step for all layers; an add is cheaper than a masked fill per layer."""
    B, L, K = mask.shape
    allowed = mask.unsqueeze(1).expand(B, G, L, K).reshape(B, 1, G * L, K)
    return torch.zeros_like(allowed, dtype=torch.float32).masked_fill(~allowed, float("-inf"))


class PackedStep(nn.Module):
    """The Transformer's maths on packed tokens over a flat, read-only KV cache (the export graph).

    Reads the Transformer's parameters; the maths is written here in export-friendly ops rather
    than shared, so that speed work on the torch path cannot break the exported graph.
    """

    def __init__(self, model: Transformer, tap_layers: Sequence[int] = (), int8_kv: bool = False) -> None:
        super().__init__()
        self.model = model
        self.int8_kv = int8_kv
        self.tap_layers = tuple(sorted(set(int(t) for t in tap_layers)))
        bad = [t for t in self.tap_layers if not 0 <= t <= model.config.num_layers]
        if bad:
            raise ValueError(f"tap layers {bad} out of range 0..{model.config.num_layers}")
        self.register_buffer("inv_freq", model._inv_freq.clone(), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logit_rows: torch.Tensor,
                token_rows: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, c = self.model, self.model.config
        dtype = m.dtype
        n = len(GROUP_INPUTS)
        groups = [tuple(rest[n * g:n * (g + 1)]) for g in range(ATTENTION_GROUPS)]
        groups = [(rows, mask_bias(mask, c.num_heads // c.num_kv_heads), pages) for rows, mask, pages in groups]
        caches = rest[n * ATTENTION_GROUPS:]
        per_layer = 4 if self.int8_kv else 2  # K, V (and their scales)
        # RoPE tables computed like Transformer._rope_tables: float32 outer product, then cast.
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * m._attn_scaling).to(dtype).unsqueeze(1)  # [T, 1, D]
        sin = (emb.sin() * m._attn_scaling).to(dtype).unsqueeze(1)

        x = F.embedding(input_ids, m.embed)  # [T, hidden]
        new_kv: list[torch.Tensor] = []
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(m.layers):
            x, kv = self._layer(layer, x, caches[per_layer * i:per_layer * (i + 1)], cos, sin, groups, token_rows)
            new_kv += kv
            if i in self.tap_layers:
                hidden[i] = x
        x = rms_norm(x, m.norm, c.rms_norm_eps)
        if c.num_layers in self.tap_layers:
            hidden[c.num_layers] = x
        logits = F.linear(x.index_select(0, logit_rows), m.lm_head_weight).float()
        return (logits, *new_kv, *(hidden[t] for t in self.tap_layers))

    @staticmethod
    def _attend(layer, q, k, v, key_cache, value_cache, rows, bias, cache_pages) -> torch.Tensor:
        """One group's attention: queries [B, L] of packed rows over their cached keys and new keys.

        Grouped-query attention without repeating K/V: the G query heads of each KV head are
        folded into the query length, [B, kv_heads, G*L, D] against [B, kv_heads, C+L, D].
        Returns [B*L, heads*D], row-major by sequence then query.
        """
        B, L = rows.shape[0], rows.shape[1]
        H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
        G = H // Hkv
        flat = rows.reshape(-1)
        qg = q.index_select(0, flat).reshape(B, L, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * L, D)
        kg = k.index_select(0, flat).reshape(B, L, Hkv, D).transpose(1, 2)
        vg = v.index_select(0, flat).reshape(B, L, Hkv, D).transpose(1, 2)
        past = cache_pages.reshape(-1)
        C = cache_pages.shape[2] * PAGE_SIZE
        past_k = key_cache.index_select(0, past).reshape(B, Hkv, C, D)
        past_v = value_cache.index_select(0, past).reshape(B, Hkv, C, D)
        # Scores against cached and new keys apart, then one softmax over both: concatenating the
        # scores (G*L per key) instead of the keys (D per key) keeps the cache read to one gather.
        qg = qg * (1.0 / math.sqrt(D))  # scaled before the matmuls: fewer elements than the scores
        scores = torch.cat((torch.matmul(qg, past_k.transpose(2, 3)), torch.matmul(qg, kg.transpose(2, 3))), dim=3)
        probs = torch.softmax(scores.float() + bias, dim=-1).to(q.dtype)
        o = torch.matmul(probs[..., :C], past_v) + torch.matmul(probs[..., C:], vg)  # [B, Hkv, G*L, D]
        return o.reshape(B, Hkv, G, L, D).permute(0, 3, 1, 2, 4).reshape(B * L, H * D)

    @staticmethod
    def _attend_int8(layer, q, k, k_scale, v, v_scale, key_cache, value_cache, key_scale, value_scale,
                     rows, bias, cache_pages) -> torch.Tensor:
        """_attend over an int8 cache (module docstring): k, v [T, kv_heads, D] integer-valued floats
        with scales [T, kv_heads, 1]; the cache int8 pages with float32 scales [pages, PAGE_SIZE].

        Only the cached keys and values go through integer matmuls; the step's own (a prompt's
        prefill: most of its attention) are dequantized and attended in float32, so a long prefill
        pays no quantization passes over its [L, L] scores.
        """
        B, L = rows.shape[0], rows.shape[1]
        H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
        G = H // Hkv
        flat = rows.reshape(-1)
        qg = q.index_select(0, flat).reshape(B, L, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * L, D)
        q_int, q_scale = quantize_rows(qg, 127)
        q_scale = q_scale / math.sqrt(D)

        def grouped(t: torch.Tensor) -> torch.Tensor:  # [T, kv_heads, X] -> [B, kv_heads, L, X]
            return t.index_select(0, flat).reshape(B, L, Hkv, -1).transpose(1, 2)

        kg, vg = grouped(k * k_scale), grouped(v * v_scale)  # the new keys and values as they are cached
        past = cache_pages.reshape(-1)
        C = cache_pages.shape[2] * PAGE_SIZE
        past_k = key_cache.index_select(0, past).reshape(B, Hkv, C, D)
        past_v = value_cache.index_select(0, past).reshape(B, Hkv, C, D)
        past_k_scale = key_scale.index_select(0, past).reshape(B, Hkv, 1, C)
        past_v_scale = value_scale.index_select(0, past).reshape(B, Hkv, 1, C)
        past_scores = matmul_integer((q_int + 128).to(torch.uint8), past_k.transpose(2, 3), 128).float()
        scores = torch.cat((past_scores * past_k_scale * q_scale, torch.matmul(q_int * q_scale, kg.transpose(2, 3))), dim=3)
        probs = torch.softmax(scores + bias, dim=-1)
        # Each cached value's scale folded into its probability, then one scale per query row on 0..255.
        p_int, p_scale = quantize_rows(probs[..., :C] * past_v_scale, 255)
        o = matmul_integer(p_int.to(torch.uint8), past_v, 0).float() * p_scale + torch.matmul(probs[..., C:], vg)
        return o.reshape(B, Hkv, G, L, D).permute(0, 3, 1, 2, 4).reshape(B * L, H * D)

    @classmethod
    def _layer(cls, layer, x, caches, cos, sin, groups, token_rows):
        """One decoder layer; returns the new x and the new tokens' cache entries (K, V and, for an
        int8 cache, their int8 values and scales [T, kv_heads])."""
        T = x.shape[0]
        h = rms_norm(x, layer.attn_norm, layer.eps)
        qkv = F.linear(h, layer.qkv_proj, layer.qkv_bias)
        q, k, v = qkv.split((layer.q_size, layer.kv_size, layer.kv_size), dim=-1)
        q = q.reshape(T, layer.num_heads, layer.head_dim)
        k = k.reshape(T, layer.num_kv_heads, layer.head_dim)
        v = v.reshape(T, layer.num_kv_heads, layer.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, layer.eps)
            k = rms_norm(k, layer.k_norm, layer.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if len(caches) == 4:
            (k, k_scale), (v, v_scale) = quantize_rows(k, 127), quantize_rows(v, 127)
            o = torch.cat([cls._attend_int8(layer, q, k, k_scale, v, v_scale, *caches, *g) for g in groups], dim=0)
            kv = [k.to(torch.int8), v.to(torch.int8), k_scale.squeeze(-1), v_scale.squeeze(-1)]
        else:
            o = torch.cat([cls._attend(layer, q, k, v, *caches, *g) for g in groups], dim=0)
            kv = [k, v]
        x = x + F.linear(o.index_select(0, token_rows), layer.o_proj, layer.o_bias)
        h = rms_norm(x, layer.mlp_norm, layer.eps)
        gate, up = F.linear(h, layer.gate_up_proj).split(layer.intermediate_size, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down_proj), kv


def example_inputs(config: TransformerConfig, dtype: torch.dtype, int8_kv: bool = False) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: valid indices, and every dynamic dim > 1 and distinct from the others, so
    the tracer specialises none of them. Group 0: 2 sequences of up to 3 new tokens over 5 cached
    ones; group 1: 4 sequences of up to 6 over 11; 9 packed tokens; 8 cache slots of 4 pages."""
    hkv, d = config.num_kv_heads, config.head_dim
    T, slots, pages = 9, 8, 4
    ids = torch.zeros(T, dtype=torch.int64)
    positions = torch.arange(T, dtype=torch.int64)
    logit_rows = torch.arange(7, dtype=torch.int64)
    token_rows = torch.arange(T, dtype=torch.int64)
    inputs = [ids, positions, logit_rows, token_rows]
    for B, L, P in ((2, 3, 2), (4, 5, 3)):
        rows = torch.arange(B * L, dtype=torch.int64).remainder(T).view(B, L)
        mask = torch.ones(B, L, P * PAGE_SIZE + L, dtype=torch.bool)
        cache_pages = torch.arange(B * hkv * P, dtype=torch.int64).view(B, hkv, P)
        inputs += [rows, mask, cache_pages]
    if int8_kv:
        cache = torch.zeros(slots * hkv * pages, PAGE_SIZE * d, dtype=torch.int8)
        scale = torch.zeros(slots * hkv * pages, PAGE_SIZE, dtype=torch.float32)
        return (*inputs, *([cache, cache, scale, scale] * config.num_layers))
    cache = torch.zeros(slots * hkv * pages, PAGE_SIZE * d, dtype=dtype)
    return (*inputs, *([cache] * (2 * config.num_layers)))


def _dynamic_axes(num_layers: int, tap_layers: Sequence[int], int8_kv: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "tokens"},
        "positions": {0: "tokens"},
        "logit_rows": {0: "rows"},
        "token_rows": {0: "tokens"},
        "logits": {0: "rows"},
    }
    for g in range(ATTENTION_GROUPS):
        axes[f"group{g}_rows"] = {0: f"group{g}_batch", 1: f"group{g}_new"}
        axes[f"group{g}_mask"] = {0: f"group{g}_batch", 1: f"group{g}_new", 2: f"group{g}_keys"}
        axes[f"group{g}_cache_pages"] = {0: f"group{g}_batch", 2: f"group{g}_pages"}
    for i in range(num_layers):
        for kind in ("key", "value"):
            axes[f"{kind}_cache_{i}"] = {0: "cache_pages"}
            axes[f"new_{kind}_{i}"] = {0: "tokens"}
            if int8_kv:
                axes[f"{kind}_scale_{i}"] = {0: "cache_pages"}
                axes[f"new_{kind}_scale_{i}"] = {0: "tokens"}
    for t in tap_layers:
        axes[f"hidden_{t}"] = {0: "tokens"}
    return axes


def weights_file(path: Path) -> Path:
    """Where save_graph puts the weights of the graph at ``path``."""
    return path.parent / f"{path.name}.data"


def save_graph(proto, path: Path) -> None:
    """Write ``path`` with its weights in one ``<name>.data`` file beside it (none when every tensor is
    under 1 KiB), readable as the graph is (onnx writes the weights' file owner-only; a server running
    as another user must read both)."""
    import onnx

    data = weights_file(path)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if data.exists():
        shutil.copymode(path, data)


def export_transformer(model: Transformer, out_dir: Path, tap_layers: Sequence[int] = (),
                       metadata: dict | None = None, int8_kv: bool = False) -> Path:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data`` with the weights) and check it; ``int8_kv``:
    the graph reads and returns an int8 KV cache (module docstring; metadata ``kv_cache: int8``)."""
    import onnx

    step = PackedStep(model, tap_layers, int8_kv).eval()
    n = model.config.num_layers
    inputs, outputs = io_names(n, step.tap_layers, int8_kv)
    metadata = {**(metadata or {}), **({"kv_cache": "int8"} if int8_kv else {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw"
    raw.mkdir(exist_ok=True)
    # The TorchScript exporter (dynamo=False): it needs no onnxscript, and its opset-17 graphs
    # parse in TensorRT 10; its deprecation notice is expected.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            step,
            example_inputs(model.config, model.dtype, int8_kv),
            str(raw / ONNX_FILE),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=_dynamic_axes(n, step.tap_layers, int8_kv),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    # One layout whatever the size: graph in model.onnx, all weights in one external file (the
    # 2 GiB protobuf limit would otherwise break models above ~500M parameters in fp32).
    proto = onnx.load(str(raw / ONNX_FILE))
    for key, value in {"graph_version": GRAPH_VERSION, "tap_layers": list(step.tap_layers), **metadata}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    save_graph(proto, out_dir / ONNX_FILE)
    del proto
    shutil.rmtree(raw)
    shapes = check_onnx(out_dir / ONNX_FILE)
    one_group_graph(out_dir / ONNX_FILE)
    # Written last: its presence marks a complete, checked export.
    (out_dir / META_FILE).write_text(json.dumps({"tap_layers": list(step.tap_layers), "outputs": shapes,
                                                 **metadata}, indent=2) + "\n")
    return out_dir / ONNX_FILE


def one_group_graph(path: Path) -> Path:
    """Write ONE_GROUP_FILE beside ``path``: its graph without the last attention group, reading the
    same weights' file. ONNX Runtime runs it once per group (runtimes.onnxruntime_runner), so the
    steps whose sequences all fit one group (decode and verification steps without a prefill) skip
    the empty group's dummy attention: ~40 nodes a layer, 4-5% of a SmolLM2 w8a8 decode step.

    The last group's nodes are those reading its inputs; where its output joins the others'
    (the Concat that token_rows reads), the others' outputs pass on alone.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    last = ATTENTION_GROUPS - 1
    groups_of = {f"group{g}_{kind}": {g} for g in range(ATTENTION_GROUPS) for kind in GROUP_INPUTS}  # tensor -> groups read
    nodes = []
    for node in graph.node:  # topological order
        read = [groups_of.get(i, set()) for i in node.input]
        groups = set().union(*read)
        if last not in groups:
            nodes.append(node)
        elif node.op_type == "Concat" and all(read) and not all(last in r for r in read):  # the groups' outputs joined
            kept = [i for i, r in zip(node.input, read) if last not in r]
            joined = helper.make_node("Concat" if len(kept) > 1 else "Identity", kept, node.output, name=node.name)
            joined.attribute.extend(node.attribute if len(kept) > 1 else [])
            nodes.append(joined)
            groups.discard(last)
        for out in node.output:
            groups_of[out] = groups
    if any(last in groups_of.get(o.name, ()) for o in graph.output):
        raise ValueError(f"{path}: an output depends on the last attention group alone")
    needed, live = {o.name for o in graph.output}, []
    for node in reversed(nodes):  # what only the dropped nodes read goes too
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    nodes = live
    kept_inputs = [i for i in graph.input if last not in groups_of.get(i.name, ())]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    used = {i for node in nodes for i in node.input}
    kept_weights = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_weights)
    out = path.parent / ONE_GROUP_FILE
    onnx.save_model(model, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


def check_onnx(path: Path) -> dict[str, list]:
    """onnx.checker (full: includes strict shape inference); returns the inferred output shapes.

    Path-based so that external weights and models over 2 GiB are checked too.
    """
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        inferred = Path(tmp) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
        graph = onnx.load(str(inferred), load_external_data=False).graph
    return {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output
    }


def read_metadata(path: Path) -> dict:
    """The metadata written at export (tap_layers, model_type, dtype, ...)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def _hash_file(digest: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)


def export_key(model_dir: Path, dtype: str, tap_layers: Sequence[int]) -> str:
    """Content hash of the weights, the config and the export settings: the cache key of an export."""
    digest = hashlib.sha256()
    settings = {"graph": GRAPH_VERSION, "opset": OPSET, "dtype": dtype, "taps": sorted(set(tap_layers)),
                "torch": torch.__version__}
    if quantized := recipe(dtype):
        settings["quantized"] = quantized
    digest.update(json.dumps(settings).encode())
    for path in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        digest.update(path.name.encode())
        _hash_file(digest, path)
    return digest.hexdigest()[:20]


def export_onnx(model_dir: Path, out_dir: Path, dtype: str = "float32", tap_layers: Sequence[int] = ()) -> Path:
    """Load an HF model directory and export it; returns the path of model.onnx. ``int8`` and ``w8a8``: a
    float32 graph then rewritten by export.quantize."""
    check_dtype(dtype)
    compute = compute_dtype(dtype)
    model = load_transformer(model_dir, DTYPES[compute])
    meta = {"model_type": model.config.model_type, "dtype": compute, "source": Path(model_dir).name}
    if dtype in QUANTIZED:
        meta["weights"] = dtype
    path = export_transformer(model, out_dir, tap_layers, meta, int8_kv=dtype in INT8_KV)
    if dtype == "int8":
        quantize_weights(path)
    elif dtype == "w8a8":
        quantize_w8a8(path, model.config, calibration_ids(Path(model_dir) / "tokenizer.json"))
    return path


def cached_onnx(model_dir: Path, dtype: str = "float32", tap_layers: Sequence[int] = ()) -> Path:
    """The ONNX export of a model from the cache, exporting it first when absent.

    Built in a temporary directory and renamed into place, so a crash never leaves a half export.
    """
    from hub.fetch import cache_dir

    model_dir = Path(model_dir)
    target = cache_dir() / "exports" / f"{model_dir.name}-{dtype}-{export_key(model_dir, dtype, tap_layers)}"
    if (target / META_FILE).is_file():
        return target / ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        export_onnx(model_dir, tmp, dtype, tap_layers)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / META_FILE).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / ONNX_FILE
