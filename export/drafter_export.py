"""Export a block drafter (DSpark, DFlash-style) to the ONNX graphs its graph runner runs.

A drafting round is one block forward, then a left-to-right walk whose only model maths is the
Markov head's low-rank bias (the draw between positions is the engine's sampling, which stays
in torch), then the confidence head over what was drawn. So a drafter exports as four graphs,
each over the same paged context cache the target graph reads (see export.onnx_export):

context.onnx     features [T, taps*H], positions [T]
                 -> key_<i>, value_<i> [T, kv_heads, D]: the committed tokens' context K/V, per layer
block.onnx       anchor_embeds [B, H], anchor_positions [B], context_mask bool [B, C],
                 cache_pages [B, kv_heads, P], key_cache_<i>, value_cache_<i> [pages, PAGE_SIZE*D]
                 -> hidden [B, W, H] (after the final norm), logits float32 [B, W, Vd] (draft head)
markov.onnx      logits [B, Vd], previous [B] -> logits + W2 W1[previous] (DSpark only)
confidence.onnx  hidden [B, k, H], previous [B, k] -> uncalibrated confidence logits float32 [B, k]

Vd is the draft vocabulary the drafter serves (its rows of the target's LM head are baked in).
A ``w8a8`` export (beside a w8a8 target) rewrites the context and block graphs' weight matmuls as
integer matmuls (export.quantize.quantize_drafter_w8a8): the block graph's draft head is most of
a draft's time, and float32 matmuls on the CPU ran it 1.3-1.7x slower than torch's bf16.
The anchor's embedding comes in as an input: it is one row of the target's table, which the
runner already holds, and baking a 50-150k-row table into a graph to read one row is waste.
EAGLE-3-style drafters draft autoregressively through their own layer and are not exported.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from export.onnx_export import OPSET, PAGE_SIZE, check_onnx, rms_norm, save_graph
from models.drafters import BlockDrafter

DRAFTER_GRAPH_VERSION = 4
GRAPHS = ("context", "block", "markov", "confidence")
DTYPES = ("float32", "w8a8")
QUANTIZED_GRAPHS = ("context", "block")  # the others' matmuls are a rank-r bias and one output column
META_FILE = "drafter_export.json"


class ContextStep(nn.Module):
    """fc + context norm + each layer's key/value projection of the committed tokens' features."""

    def __init__(self, drafter: BlockDrafter) -> None:
        super().__init__()
        self.drafter = drafter

    def forward(self, features: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.drafter
        ctx = rms_norm(F.linear(features, d.fc.weight), d.context_norm, d.config.rms_norm_eps)
        out: list[torch.Tensor] = []
        for layer in d.layers:
            out += list(_key_values(layer, ctx, positions))
        return tuple(out)


def _key_values(layer, a: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DrafterLayer.key_values in export ops: keys (positions applied as the drafter does) and values."""
    k = F.linear(a, layer.k_proj.weight).unflatten(-1, (layer.num_kv_heads, layer.head_dim))
    v = F.linear(a, layer.v_proj.weight).unflatten(-1, (layer.num_kv_heads, layer.head_dim))
    if layer.k_norm is not None:
        k = rms_norm(k, layer.k_norm, layer.eps)
    return layer.rope(k, positions), v


class BlockStep(nn.Module):
    """The parallel backbone over one block per row: anchor + W-1 mask slots, bidirectional inside
    the block, each layer also attending to the row's cached context; then the draft head."""

    def __init__(self, drafter: BlockDrafter) -> None:
        super().__init__()
        self.drafter = drafter
        self.register_buffer("draft_head", drafter.draft_head().detach().clone(), persistent=False)

    def forward(self, anchor_embeds: torch.Tensor, anchor_positions: torch.Tensor, context_mask: torch.Tensor,
                cache_pages: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, c = self.drafter, self.drafter.config
        W, H = c.block_size, c.hidden_size
        B = anchor_embeds.shape[0]
        slot = d.mask_embed.reshape(1, 1, H).expand(B, W - 1, H)
        x = torch.cat((anchor_embeds.unsqueeze(1).to(slot.dtype), slot), dim=1)  # [B, W, H]
        positions = anchor_positions.unsqueeze(1) + torch.arange(W, dtype=torch.int64)  # [B, W]
        pages = cache_pages.reshape(-1)
        C = cache_pages.shape[2] * PAGE_SIZE
        own = torch.ones_like(context_mask[:, :1]).unsqueeze(1).expand(B, W, W)  # the block sees all of itself
        allowed = torch.cat((context_mask.unsqueeze(1).expand(B, W, C), own), dim=2)
        for i, layer in enumerate(d.layers):
            Hkv, D = layer.num_kv_heads, layer.head_dim
            ctx_k = caches[2 * i].index_select(0, pages).reshape(B, Hkv, C, D)
            ctx_v = caches[2 * i + 1].index_select(0, pages).reshape(B, Hkv, C, D)
            x = self._layer(layer, x, positions, ctx_k, ctx_v, allowed)
        hidden = rms_norm(x, d.norm, c.rms_norm_eps)
        return hidden, F.linear(hidden, self.draft_head.to(hidden.dtype)).float()

    @staticmethod
    def _layer(layer, x, positions, ctx_k, ctx_v, allowed):
        B, W = x.shape[0], x.shape[1]
        H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
        G = H // Hkv
        a = rms_norm(x, layer.attn_norm, layer.eps)
        q = F.linear(a, layer.q_proj.weight).unflatten(-1, (H, D))
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, layer.eps)
        q = layer.rope(q, positions)
        k, v = _key_values(layer, a, positions)  # [B, W, Hkv, D]
        # grouped-query attention with the G query heads of a KV head folded into the query length
        qg = q.reshape(B, W, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * W, D)
        keys = torch.cat((ctx_k, k.transpose(1, 2)), dim=2)
        values = torch.cat((ctx_v, v.transpose(1, 2)), dim=2)
        S = keys.shape[2]
        scores = torch.matmul(qg, keys.transpose(2, 3)).float() * (D ** -0.5)
        mask = allowed.unsqueeze(1).unsqueeze(1).expand(B, 1, G, W, S).reshape(B, 1, G * W, S)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
        o = torch.matmul(probs, values).reshape(B, Hkv, G, W, D).permute(0, 3, 1, 2, 4).reshape(B, W, H * D)
        x = x + F.linear(o, layer.o_proj.weight)
        width = layer.down.weight.shape[1]  # sizes, not chunk(2): a Split whose parts the w8a8 rewrite can see
        gate, up = F.linear(rms_norm(x, layer.mlp_norm, layer.eps), layer.gate_up.weight).split([width, width], dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down.weight)


class MarkovStep(nn.Module):
    """One position's logits plus the Markov head's bias from the token drawn before it."""

    def __init__(self, drafter: BlockDrafter) -> None:
        super().__init__()
        self.register_buffer("w1", drafter.markov_w1.weight.detach().clone(), persistent=False)
        self.register_buffer("w2", drafter.markov_out().detach().clone(), persistent=False)

    def forward(self, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return logits + F.linear(F.embedding(previous, self.w1), self.w2).float()


class ConfidenceStep(nn.Module):
    """The confidence head over [h_k ; W1[x_{k-1}]] (calibration is applied by the caller)."""

    def __init__(self, drafter: BlockDrafter) -> None:
        super().__init__()
        self.register_buffer("w1", drafter.markov_w1.weight.detach().clone(), persistent=False)
        head = drafter.confidence_head
        self.register_buffer("weight", head.weight.detach().clone(), persistent=False)
        self.register_buffer("bias", head.bias.detach().clone(), persistent=False)

    def forward(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        feats = torch.cat((hidden, F.embedding(previous, self.w1).to(hidden.dtype)), dim=-1)
        return F.linear(feats, self.weight, self.bias).squeeze(-1).float()


def _graphs(drafter: BlockDrafter) -> dict[str, tuple[nn.Module, tuple, list[str], list[str], dict]]:
    """name -> (module, tracing inputs, input names, output names, dynamic axes). Tracing sizes are
    distinct and > 1 so no dynamic dim is specialised."""
    c = drafter.config
    dtype = drafter.fc.weight.dtype
    n, Hkv, D, H = c.num_layers, c.num_kv_heads, c.head_dim, c.hidden_size
    Vd = drafter.draft_head().shape[0]
    kv_names = [f"{kind}_{i}" for i in range(n) for kind in ("key", "value")]
    cache_names = [f"{kind}_cache_{i}" for i in range(n) for kind in ("key", "value")]
    T, B, P, slots = 5, 3, 2, 4
    graphs = {
        "context": (ContextStep(drafter), (torch.zeros(T, len(c.tap_layers) * H, dtype=dtype), torch.arange(T)),
                    ["features", "positions"], kv_names,
                    {"features": {0: "tokens"}, "positions": {0: "tokens"}, **{k: {0: "tokens"} for k in kv_names}}),
        "block": (BlockStep(drafter),
                  (torch.zeros(B, H, dtype=dtype), torch.arange(B) + 7, torch.ones(B, P * PAGE_SIZE, dtype=torch.bool),
                   torch.arange(B * Hkv * P).view(B, Hkv, P),
                   *([torch.zeros(slots * Hkv * P * 2, PAGE_SIZE * D, dtype=dtype)] * (2 * n))),
                  ["anchor_embeds", "anchor_positions", "context_mask", "cache_pages", *cache_names], ["hidden", "logits"],
                  {"anchor_embeds": {0: "batch"}, "anchor_positions": {0: "batch"},
                   "context_mask": {0: "batch", 1: "context"}, "cache_pages": {0: "batch", 2: "pages"},
                   **{k: {0: "cache_pages"} for k in cache_names}, "hidden": {0: "batch"}, "logits": {0: "batch"}}),
    }
    if c.markov_rank:
        graphs["markov"] = (MarkovStep(drafter), (torch.zeros(B, Vd), torch.arange(B)), ["logits", "previous"],
                            ["biased"], {"logits": {0: "batch"}, "previous": {0: "batch"}, "biased": {0: "batch"}})
    if c.confidence:
        graphs["confidence"] = (ConfidenceStep(drafter), (torch.zeros(B, T, H, dtype=dtype), torch.zeros(B, T, dtype=torch.int64)),
                                ["hidden", "previous"], ["confidence_logits"],
                                {"hidden": {0: "batch", 1: "positions"}, "previous": {0: "batch", 1: "positions"},
                                 "confidence_logits": {0: "batch", 1: "positions"}})
    return graphs


def drafter_dtype(target_weights: str) -> str:
    """The dtype a drafter's graphs are exported in beside a target graph whose weights are
    ``target_weights``: w8a8 beside w8a8, float32 beside anything else."""
    return "w8a8" if target_weights == "w8a8" else "float32"


def export_drafter(drafter: BlockDrafter, out_dir: Path, metadata: dict | None = None, dtype: str = "float32") -> Path:
    """Write ``<graph>.onnx`` (+ external weights) for each graph the drafter has, in ``dtype`` (DTYPES),
    checked, and the metadata file last (its presence marks a complete export). Returns out_dir."""
    import onnx

    from export.quantize import quantize_drafter_w8a8

    if dtype not in DTYPES:
        raise ValueError(f"a drafter exports in one of {DTYPES}, got {dtype!r}")
    if not isinstance(drafter, BlockDrafter):
        raise ValueError(f"only block drafters (dspark, dflash) export; {drafter.config.kind} drafts "
                         "autoregressively through its own layer and runs as a torch module beside any runtime")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [out_dir / META_FILE] + [out_dir / f"{n}.onnx{ext}" for n in GRAPHS for ext in ("", ".data")]:
        stale.unlink(missing_ok=True)  # a directory exported into before holds no graph of another drafter
    shapes = {}
    for name, (module, inputs, input_names, output_names, axes) in _graphs(drafter).items():
        raw = out_dir / f".{name}.raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module.eval(), inputs, str(raw), input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(raw))
        path = out_dir / f"{name}.onnx"
        save_graph(proto, path)
        raw.unlink()
        if dtype == "w8a8" and name in QUANTIZED_GRAPHS:
            quantize_drafter_w8a8(path)
        shapes[name] = check_onnx(path)
    meta = {"graph_version": DRAFTER_GRAPH_VERSION, "kind": drafter.config.kind, "dtype": dtype, "outputs": shapes,
            "draft_vocab_size": int(drafter.draft_head().shape[0]), **(metadata or {})}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def drafter_export_key(checkpoint: Path, dtype: str, draft_vocab: torch.Tensor | None) -> str:
    """Content hash of the checkpoint's files, the served draft vocabulary and the export settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"graph": DRAFTER_GRAPH_VERSION, "opset": OPSET, "page": PAGE_SIZE, "dtype": dtype,
                              "torch": torch.__version__}).encode())
    for path in sorted(Path(checkpoint).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    if draft_vocab is not None:
        digest.update(draft_vocab.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:20]


def exported_for(export_dir: Path, checkpoint: Path, drafter: BlockDrafter, dtype: str = "float32") -> bool:
    """Whether the graphs in export_dir were exported from this checkpoint (and draft vocabulary)."""
    meta = Path(export_dir) / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("key") == drafter_export_key(checkpoint, dtype, drafter.draft_vocab)


def cached_drafter_export(drafter: BlockDrafter, checkpoint: Path, dtype: str = "float32") -> Path:
    """The drafter's graphs from the cache, exporting them first when absent (built in a temporary
    directory and renamed into place, so a crash never leaves a half export)."""
    from hub.fetch import cache_dir

    key = drafter_export_key(checkpoint, dtype, drafter.draft_vocab)
    target = cache_dir() / "exports" / f"drafter-{Path(checkpoint).name}-{dtype}-{key}"
    if (target / META_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        export_drafter(drafter, tmp, {"source": Path(checkpoint).name, "key": key}, dtype)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
