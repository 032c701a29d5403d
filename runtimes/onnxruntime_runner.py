"""The ONNX Runtime runner: the exported packed graph in an ONNX Runtime session (CPU by default)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from export.onnx_export import ATTENTION_GROUPS, DTYPES, ONE_GROUP_FILE, io_names, read_metadata
from models.config import TransformerConfig
from models.kv_cache import KVCache
from models.transformer import ForwardOutput
from runtimes.graph import _check_taps, _GraphRunner, cache_views, check_call, layout_batch, split_groups


def session_options(num_threads: int | None) -> "onnxruntime.SessionOptions":
    """Every session of ours: full graph optimization, ``num_threads`` intra-op threads (default torch's),
    threads that sleep between runs, and float32 denormals flushed to zero (run_session does it for the
    calling thread, which computes a share of every run). ONNX Runtime's threads spin after each run by
    default, which in a server sharing its cores with Triton, the drafter's sessions and the clients
    starves them all: through Triton here, int8 weights decoded 44 tokens/s per user at one client with
    spinning, 87 without. Denormals: a softmax over masked scores makes many, and a 16-prompt w8a8
    prefill ran 14-18% faster without them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


def run_session(session: "onnxruntime.InferenceSession", names: Sequence[str] | None,
                feeds: dict) -> list:
    """``session.run`` with this thread's float32 denormals flushed to zero, as the session's own threads
    have them (session_options): the thread that runs a step need not be the one that made the session.
    The thread keeps them flushed, as ONNX Runtime leaves the thread that makes a session."""
    torch.set_flush_denormal(True)
    return session.run(names, feeds)


def run_concurrently(pool: ThreadPoolExecutor | None, fn: Callable[..., Any], calls: list[tuple]) -> list:
    """``fn(*args)`` for each of ``calls``, results in order: this thread computes the first while ``pool``
    computes the others (no pool: all on this thread)."""
    if pool is None:
        return [fn(*args) for args in calls]
    later = [pool.submit(fn, *args) for args in calls[1:]]
    return [fn(*calls[0])] + [f.result() for f in later]


# A step with fewer new tokens runs as one call: two concurrent calls each read every weight, and
# for a batch of 4 decodes that cost more than the second core gave (0.80x; 16 decodes: 1.08x).
MIN_PARALLEL_TOKENS = 16


def parallel_parts(num_new: list[int], starts: list[int], workers: int) -> list[list[int]]:
    """Sequences (indices) of the calls a step runs as: split_groups' attention groups, then the group
    with the most new tokens cut in two (sequences dealt out by new tokens, largest first, to the
    lighter half) until there is one call per worker, while the step has MIN_PARALLEL_TOKENS or more."""
    parts = [part for part in split_groups(num_new, starts) if part]
    if workers < 2 or sum(num_new) < MIN_PARALLEL_TOKENS:
        return parts
    while len(parts) < workers and (cuttable := [p for p in parts if len(p) > 1]):
        largest = max(cuttable, key=lambda p: sum(num_new[b] for b in p))
        halves: tuple[list[int], list[int]] = ([], [])
        for b in sorted(largest, key=lambda b: -num_new[b]):
            min(halves, key=lambda h: sum(num_new[i] for i in h)).append(b)
        parts.remove(largest)
        parts += [sorted(h) for h in halves]
    return parts


class OnnxRuntimeRunner(_GraphRunner):
    """The exported graph on ONNX Runtime (CPU by default), with our KVCache on the CPU.

    The cache goes in as numpy views of its own memory, which ONNX Runtime's CPU provider reads
    in place: a step copies only the rows attention reads, and the new K/V rows come back. A w8a8
    graph's cache is int8 with a scale per vector (``kv_dtype``; export.onnx_export).

    It runs the graph's one-group copy (export.onnx_export.one_group_graph), once per attention
    group: a step that split_groups cuts in two (a prompt's prefill beside decodes) makes two
    calls, every other step one call without the empty group's dummy attention (measured on
    SmolLM2 w8a8, context 256: 4-5% of a decode step at batch 1 and 16, 2% of a 4-token verify).
    One session, so the weights are held once.

    Threads: the session computes each call on one thread, and a step's calls (parallel_parts: its
    attention groups, cut further by sequences up to ``num_threads`` calls) run concurrently, one per
    core. ONNX Runtime's own intra-op threads sleep between operators (session_options) and a
    worker's wake-up costs more than most of a decode step's small operators gain: measured on SmolLM2
    w8a8 on two cores, against one call with two intra-op threads, 16 x 64-token prompts prefill
    1.28x faster this way, 16 decodes 1.08x, 16 4-token verifies 1.59x, one decode 1.11x, while one
    256-token prompt, which no cut splits, prefills 0.88x as fast.
    """

    def __init__(self, onnx_path: Path, config: TransformerConfig, num_threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        meta = read_metadata(onnx_path)
        self.config = config
        self.dtype = DTYPES[meta.get("dtype", "float32")]
        self.export_dtype: str = meta.get("weights", meta.get("dtype", "float32"))  # e.g. w8a8: what it was exported as
        self.kv_dtype = torch.int8 if meta.get("kv_cache") == "int8" else self.dtype
        self.device = torch.device("cpu")
        self.tap_layers = tuple(meta.get("tap_layers", ()))
        one_group = Path(onnx_path).parent / ONE_GROUP_FILE
        if not one_group.is_file():
            raise FileNotFoundError(f"{one_group} is missing beside {Path(onnx_path).name}: export the graph again "
                                    "(cli.py export, or cli.py build for a model repository)")
        self.session = ort.InferenceSession(str(one_group), session_options(1), providers=list(providers))
        self.workers = num_threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(self.workers - 1, "onnxruntime-call") if self.workers > 1 else None
        inputs, self.output_names = io_names(config.num_layers, self.tap_layers, self.kv_dtype == torch.int8)
        last = f"group{ATTENTION_GROUPS - 1}_"
        self.input_names = [name for name in inputs if not name.startswith(last)]

    def __call__(self, input_ids: torch.Tensor, slots: Sequence[int], num_new: Sequence[int], cache: KVCache,
                 logits_indices: torch.Tensor | None = None, tap_layers: Sequence[int] = ()) -> ForwardOutput:
        taps = _check_taps(tap_layers, self.tap_layers)
        slots_l, new_l, starts_l = check_call(input_ids, slots, num_new, cache)
        parts = parallel_parts(new_l, starts_l, self.workers)
        if len(parts) == 1:
            return self._finish(cache, *self._compute(input_ids, slots_l, new_l, starts_l, cache, logits_indices), taps)
        # One call per part, run concurrently (the cache is only read until every call is done, then
        # each part's new K/V are written); each output row goes back where one call would have put it.
        new_t = torch.tensor(new_l)
        first = (torch.cumsum(new_t, 0) - new_t).tolist()
        T = int(input_ids.shape[0])
        rows = torch.arange(T) if logits_indices is None else logits_indices.cpu().to(torch.int64)
        calls = []
        for part in parts:
            tokens = torch.cat([torch.arange(first[b], first[b] + new_l[b]) for b in part])
            row_in_part = torch.full((T,), -1, dtype=torch.int64)
            row_in_part[tokens] = torch.arange(len(tokens))
            mine = (row_in_part[rows] >= 0).nonzero().squeeze(1)
            calls.append((tokens, mine, (input_ids[tokens], [slots_l[b] for b in part], [new_l[b] for b in part],
                                         [starts_l[b] for b in part], cache, row_in_part[rows[mine]])))
        computed = run_concurrently(self._pool, self._compute, [args for _, _, args in calls])
        logits, hidden = None, {t: None for t in taps}
        for (tokens, mine, _), result in zip(calls, computed):
            out = self._finish(cache, *result, taps)
            if logits is None:
                logits = out.logits.new_empty(len(rows), out.logits.shape[1])
            logits[mine] = out.logits
            for t in taps:
                if hidden[t] is None:
                    hidden[t] = out.hidden_states[t].new_empty(T, out.hidden_states[t].shape[1])
                hidden[t][tokens] = out.hidden_states[t]
        return ForwardOutput(logits=logits, hidden_states=hidden)

    def _compute(self, input_ids: torch.Tensor, slots: list[int], num_new: list[int], starts: list[int], cache: KVCache,
                 logits_indices: torch.Tensor | None) -> tuple:
        """One call of the one-group graph over checked sequences (check_call) that all go in its group: the
        _finish arguments but the taps. Reads the cache, writes nothing."""
        batch = layout_batch(input_ids, slots, num_new, starts, cache, logits_indices, one_group=True)
        views = cache_views(cache)
        feeds = {name: t.numpy() for name, t in zip(self.input_names, batch.inputs(skip_dummy=True) + views)}
        outs = [torch.from_numpy(o) for o in run_session(self.session, self.output_names, feeds)]
        n = len(views)  # the new tokens' entries come back one per cache view
        return batch, outs[0], outs[1:1 + n], dict(zip(self.tap_layers, outs[1 + n:]))
