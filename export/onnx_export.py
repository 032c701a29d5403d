"""Export our Transformer to one ONNX graph that ONNX Runtime and TensorRT both run.

The graph is a padded batch step over B sequences, each bringing up to L new tokens on top of
P cached ones (B, L, P dynamic):

inputs   input_ids       int64 [B, L]      new tokens (padding: any id)
         positions       int64 [B, L]      absolute position of each new token
         attention_mask  bool  [B, L, P+L] True where query i may read key j (past keys first)
         logit_rows      int64 [N]         rows of the flattened [B*L] batch that get logits
         past_key_<i>    dtype [B, kv_heads, P, head_dim]   per layer
         past_value_<i>  dtype [B, kv_heads, P, head_dim]
outputs  logits          float32 [N, vocab]
         new_key_<i>     dtype [B, kv_heads, L, head_dim]   K/V of the new tokens, per layer
         new_value_<i>   dtype [B, kv_heads, L, head_dim]
         hidden_<t>      dtype [B, L, hidden]               for each tapped layer t

Only the new K/V rows leave the graph: the caller owns the cache (our KVCache) and scatters
them into its slots, so one cache layout serves every runtime. ``logit_rows`` keeps the LM head
(the largest matmul for small models) to the rows the engine samples from.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import TransformerConfig
from models.loading import load_transformer
from models.transformer import Transformer

# Bump when the graph's inputs, outputs or maths change: it is part of every cache key.
GRAPH_VERSION = 1
OPSET = 17
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
META_FILE = "export.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def io_names(num_layers: int, tap_layers: Sequence[int]) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order."""
    inputs = ["input_ids", "positions", "attention_mask", "logit_rows"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
        outputs += [f"new_key_{i}", f"new_value_{i}"]
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


class PaddedBatchStep(nn.Module):
    """The Transformer's maths on a padded [B, L] batch with explicit past K/V (the export graph).

    Reads the Transformer's parameters; the maths is written here in export-friendly ops rather
    than shared, so that speed work on the torch path cannot break the exported graph.
    """

    def __init__(self, model: Transformer, tap_layers: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model
        self.tap_layers = tuple(sorted(set(int(t) for t in tap_layers)))
        bad = [t for t in self.tap_layers if not 0 <= t <= model.config.num_layers]
        if bad:
            raise ValueError(f"tap layers {bad} out of range 0..{model.config.num_layers}")
        self.register_buffer("inv_freq", model._inv_freq.clone(), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        logit_rows: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m, c = self.model, self.model.config
        dtype = m.dtype
        # RoPE tables computed like Transformer._rope_tables: float32 outer product, then cast.
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * m._attn_scaling).to(dtype).unsqueeze(2)  # [B, L, 1, D]
        sin = (emb.sin() * m._attn_scaling).to(dtype).unsqueeze(2)
        mask = attention_mask.unsqueeze(1)  # [B, 1, L, P+L]

        x = F.embedding(input_ids, m.embed)  # [B, L, hidden]
        new_kv: list[torch.Tensor] = []
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(m.layers):
            x, k, v = self._layer(layer, x, past[2 * i], past[2 * i + 1], cos, sin, mask)
            new_kv += [k, v]
            if i in self.tap_layers:
                hidden[i] = x
        x = rms_norm(x, m.norm, c.rms_norm_eps)
        if c.num_layers in self.tap_layers:
            hidden[c.num_layers] = x
        rows = x.reshape(-1, c.hidden_size).index_select(0, logit_rows)
        logits = F.linear(rows, m.lm_head_weight).float()
        return (logits, *new_kv, *(hidden[t] for t in self.tap_layers))

    @staticmethod
    def _layer(layer, x, past_k, past_v, cos, sin, mask):
        B, L = x.shape[0], x.shape[1]
        h = rms_norm(x, layer.attn_norm, layer.eps)
        qkv = F.linear(h, layer.qkv_proj, layer.qkv_bias)
        q, k, v = qkv.split((layer.q_size, layer.kv_size, layer.kv_size), dim=-1)
        q = q.reshape(B, L, layer.num_heads, layer.head_dim)
        k = k.reshape(B, L, layer.num_kv_heads, layer.head_dim)
        v = v.reshape(B, L, layer.num_kv_heads, layer.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, layer.eps)
            k = rms_norm(k, layer.k_norm, layer.eps)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, heads, L, D]
        k = apply_rope(k, cos, sin).transpose(1, 2)  # [B, kv_heads, L, D]
        v = v.transpose(1, 2)
        keys = torch.cat((past_k, k), dim=2)
        values = torch.cat((past_v, v), dim=2)
        rep = layer.num_heads // layer.num_kv_heads
        if rep > 1:  # grouped-query attention: repeat each kv head for its query heads
            S = keys.shape[2]
            keys = keys.unsqueeze(2).expand(B, layer.num_kv_heads, rep, S, layer.head_dim).reshape(
                B, layer.num_heads, S, layer.head_dim)
            values = values.unsqueeze(2).expand(B, layer.num_kv_heads, rep, S, layer.head_dim).reshape(
                B, layer.num_heads, S, layer.head_dim)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        o = o.transpose(1, 2).reshape(B, L, layer.q_size)
        x = x + F.linear(o, layer.o_proj, layer.o_bias)
        h = rms_norm(x, layer.mlp_norm, layer.eps)
        gate, up = F.linear(h, layer.gate_up_proj).split(layer.intermediate_size, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down_proj), k, v


def example_inputs(config: TransformerConfig, dtype: torch.dtype, batch: int = 2, new: int = 3,
                   past: int = 4) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; every dynamic dim is > 1 and distinct so the tracer specialises none of them."""
    ids = torch.zeros(batch, new, dtype=torch.int64)
    positions = past + torch.arange(new).repeat(batch, 1)
    mask = torch.ones(batch, new, past + new, dtype=torch.bool).tril(past)
    rows = torch.arange(batch * new, dtype=torch.int64)
    kv = torch.zeros(batch, config.num_kv_heads, past, config.head_dim, dtype=dtype)
    return (ids, positions, mask, rows, *([kv] * (2 * config.num_layers)))


def _dynamic_axes(num_layers: int, tap_layers: Sequence[int]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new"},
        "positions": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "new", 2: "total"},
        "logit_rows": {0: "rows"},
        "logits": {0: "rows"},
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            axes[f"past_{kind}_{i}"] = {0: "batch", 2: "past"}
            axes[f"new_{kind}_{i}"] = {0: "batch", 2: "new"}
    for t in tap_layers:
        axes[f"hidden_{t}"] = {0: "batch", 1: "new"}
    return axes


def export_transformer(model: Transformer, out_dir: Path, tap_layers: Sequence[int] = (),
                       metadata: dict | None = None) -> Path:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data`` with the weights) and check it."""
    import onnx

    step = PaddedBatchStep(model, tap_layers).eval()
    n = model.config.num_layers
    inputs, outputs = io_names(n, step.tap_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw"
    raw.mkdir(exist_ok=True)
    # The TorchScript exporter (dynamo=False): it needs no onnxscript, and its opset-17 graphs
    # parse in TensorRT 10; its deprecation notice is expected.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            step,
            example_inputs(model.config, model.dtype),
            str(raw / ONNX_FILE),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=_dynamic_axes(n, step.tap_layers),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    # One layout whatever the size: graph in model.onnx, all weights in one external file (the
    # 2 GiB protobuf limit would otherwise break models above ~500M parameters in fp32).
    proto = onnx.load(str(raw / ONNX_FILE))
    for key, value in {"graph_version": GRAPH_VERSION, "tap_layers": list(step.tap_layers),
                       **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save_model(proto, str(out_dir / ONNX_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=ONNX_DATA_FILE, size_threshold=1024)
    del proto
    shutil.rmtree(raw)
    shapes = check_onnx(out_dir / ONNX_FILE)
    # Written last: its presence marks a complete, checked export.
    (out_dir / META_FILE).write_text(json.dumps({"tap_layers": list(step.tap_layers), "outputs": shapes,
                                                 **(metadata or {})}, indent=2) + "\n")
    return out_dir / ONNX_FILE


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
    digest.update(json.dumps({"graph": GRAPH_VERSION, "opset": OPSET, "dtype": dtype,
                              "taps": sorted(set(tap_layers)), "torch": torch.__version__}).encode())
    for path in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        digest.update(path.name.encode())
        _hash_file(digest, path)
    return digest.hexdigest()[:20]


def export_onnx(model_dir: Path, out_dir: Path, dtype: str = "float32", tap_layers: Sequence[int] = ()) -> Path:
    """Load an HF model directory and export it; returns the path of model.onnx."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = load_transformer(model_dir, DTYPES[dtype])
    meta = {"model_type": model.config.model_type, "dtype": dtype, "source": Path(model_dir).name}
    return export_transformer(model, out_dir, tap_layers, meta)


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
