"""The ONNX Runtime runner: the exported packed graph in an ONNX Runtime session (CPU by default)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from export.onnx_export import DTYPES, io_names, read_metadata
from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.transformer import ForwardOutput
from runtimes.graph import _check_taps, _GraphRunner, pack_batch


def session_options(num_threads: int | None) -> "onnxruntime.SessionOptions":
    """Every session of ours: full graph optimization, ``num_threads`` intra-op threads (default torch's),
    and threads that sleep between runs. ONNX Runtime's spin after each run by default, which in a server
    sharing its cores with Triton, the drafter's sessions and the clients starves them all: through
    Triton here, int8 weights decoded 44 tokens/s per user at one client with spinning, 87 without."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeRunner(_GraphRunner):
    """The exported graph on ONNX Runtime (CPU by default), with our KVCache on the CPU.

    The cache goes in as numpy views of its own memory, which ONNX Runtime's CPU provider reads
    in place: a step copies only the rows attention reads, and the new K/V rows come back.
    """

    def __init__(self, onnx_path: Path, config: TransformerConfig, num_threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        meta = read_metadata(onnx_path)
        self.config = config
        self.dtype = DTYPES[meta.get("dtype", "float32")]
        self.device = torch.device("cpu")
        self.tap_layers = tuple(meta.get("tap_layers", ()))
        self.session = ort.InferenceSession(str(onnx_path), session_options(num_threads), providers=list(providers))
        self.input_names, self.output_names = io_names(config.num_layers, self.tap_layers)

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
                 logits_indices: torch.Tensor | None = None, tap_layers: Sequence[int] = ()) -> ForwardOutput:
        taps = _check_taps(tap_layers, self.tap_layers)
        batch = pack_batch(input_ids, slots, num_new, cache, logits_indices)
        tensors = batch.inputs() + self._caches(cache)
        feeds = {name: t.numpy() for name, t in zip(self.input_names, tensors)}
        outs = [torch.from_numpy(o) for o in self.session.run(self.output_names, feeds)]
        n = 2 * self.config.num_layers
        hidden = dict(zip(self.tap_layers, outs[1 + n:]))
        return self._finish(cache, batch, outs[0], outs[1:1 + n], hidden, taps)
