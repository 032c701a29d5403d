"""A block drafter (DSpark, DFlash-style) run from its exported graphs on ONNX Runtime.

It is a drop-in for the torch module inside orchestrator.drafting.FeatureDrafter: same
``new_state`` / ``extend_context`` / ``draft`` and draft-vocabulary helpers, same DrafterState
(its K/V read in place by the graphs, in pages like the target's cache). No torch module runs
per step: the forwards are the graphs of export.drafter_export; what stays in torch is the
engine's sampling between positions, the confidence calibration and index bookkeeping.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from export.drafter_export import GRAPHS
from export.onnx_export import PAGE_SIZE
from models.drafters import BlockDrafter
from models.drafters.common import DraftBlock, DrafterState, SampleFn, fused_features, packed_positions
from runtimes.graph import page_rows, paged_views, pages_read, whole_pages
from runtimes.onnxruntime_runner import run_concurrently, run_session, session_options


# A draft whose sequences have this much committed context in all runs its block graph as one call per
# worker, concurrently, on shares of the batch: there attending the context outweighs what a call more
# costs. Measured on SmolLM2 w8a8's drafter, two workers against one call (a whole draft, block 7):
# 16 x 1,024 context 1.57x, 4 x 2,048 1.20x, 16 x 512 1.12x, 8 x 1,024 0.99x; at 4,096 in all
# 0.82-1.09x (2 x 2,048, 4 x 1,024, 8 x 512, 16 x 256), smaller batches 0.83-0.89x.
MIN_PARALLEL_CONTEXT = 8192


class OnnxRuntimeBlockDrafter:
    """The exported graphs of ``module`` (whose weights they hold) in ONNX Runtime sessions.

    ``module`` stays for what is not a forward: config, draft vocabulary maps, calibration.
    ``num_threads`` (default torch's): at most how many block-graph calls a draft over a long context
    runs concurrently (MIN_PARALLEL_CONTEXT), never more than its sequences.
    """

    runtime = "onnxruntime"

    def __init__(self, module: BlockDrafter, export_dir: Path, embed: torch.Tensor,
                 num_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.module = module
        self.config = module.config
        self.export_dir = Path(export_dir)
        self.embed = embed  # the target's table: the anchor's row is the block graph's input
        # One thread per session: a second intra-op thread drafted no faster on SmolLM2 w8a8 (batch 1, 4, 16:
        # 2.2 / 4.6 / 14.4 ms against 2.0 / 4.6 / 14.9), and it leaves the other core to the target's calls.
        options = session_options(1)
        self.sessions = {name: ort.InferenceSession(str(Path(export_dir) / f"{name}.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
                         for name in GRAPHS if (Path(export_dir) / f"{name}.onnx").is_file()}
        if "block" not in self.sessions or "context" not in self.sessions:
            raise FileNotFoundError(f"{export_dir} lacks the drafter's context/block graphs")
        self.workers = num_threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(self.workers - 1, "drafter-call") if self.workers > 1 else None

    # -- what FeatureDrafter and its sampler read from a drafter module
    @property
    def tap_layers(self) -> tuple[int, ...]:
        return self.config.tap_layers

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        return self.module.draft_vocab

    def to_draft_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.module.to_draft_ids(token_ids)

    def new_state(self, num_slots: int, max_len: int) -> DrafterState:
        """float32 context cache on the CPU, max_len rounded up to whole pages."""
        return DrafterState(self.config, num_slots, whole_pages(max_len), torch.float32, torch.device("cpu"),
                            keep_features=False)

    def _run(self, name: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        session = self.sessions[name]
        outputs = run_session(session, None, {k: v.numpy() for k, v in feeds.items()})
        return [torch.from_numpy(o) for o in outputs]

    @torch.no_grad()
    def extend_context(self, state: DrafterState, slots: Sequence[int], num_new: Sequence[int],
                       target_hidden: dict[int, torch.Tensor], input_ids: torch.Tensor | None = None) -> None:
        """Append the committed tokens' context K/V (BlockDrafter.extend_context through the context graph)."""
        tok_slot, pos = packed_positions(state.lengths, slots, num_new)
        if int(pos.max()) >= state.max_len:
            raise ValueError(f"drafter context would exceed max_len {state.max_len}")
        features = fused_features(target_hidden, self.tap_layers).to(torch.float32).contiguous()
        kv = self._run("context", {"features": features, "positions": pos})
        for i in range(self.config.num_layers):
            state.k[i][tok_slot, :, pos] = kv[2 * i]
            state.v[i][tok_slot, :, pos] = kv[2 * i + 1]
        state.lengths.index_add_(0, torch.tensor([int(s) for s in slots]), torch.tensor([int(n) for n in num_new]))

    @torch.no_grad()
    def draft(self, state: DrafterState, slots: Sequence[int], anchor_tokens: torch.Tensor, num_tokens: int,
              sample_fn: SampleFn, greedy: bool = False) -> DraftBlock:
        """BlockDrafter.draft through the block, Markov and confidence graphs."""
        c, m = self.config, self.module
        if not 1 <= num_tokens <= c.block_size:
            raise ValueError(f"num_tokens must be in 1..{c.block_size}, got {num_tokens}")
        slot_t = torch.tensor([int(s) for s in slots], dtype=torch.int64)
        lengths = state.lengths.index_select(0, slot_t)
        if int(lengths.min()) < 1:
            raise ValueError("every slot needs at least one committed token before drafting")
        anchors = anchor_tokens.to(torch.int64).cpu()
        if self._pool is None or len(slot_t) < 2 or int(lengths.sum()) < MIN_PARALLEL_CONTEXT:
            hidden, base = self._block(state, slot_t, lengths, anchors)
        else:  # one call per share of the batch, concurrently; outputs in batch order
            shares = torch.arange(len(slot_t)).tensor_split(min(self.workers, len(slot_t)))
            parts = run_concurrently(self._pool, self._block,
                                     [(state, slot_t[i], lengths[i], anchors[i]) for i in shares])
            hidden, base = (torch.cat(outs) for outs in zip(*parts))
        hidden = hidden[:, :num_tokens].contiguous()
        markov = (lambda logits, prev: self._run("markov", {"logits": logits.contiguous(), "previous": prev})[0]) \
            if c.markov_rank else None
        return m.walk_block(base[:, :num_tokens], anchors, sample_fn, markov,
                            lambda before: self._run("confidence", {"hidden": hidden, "previous": before})[0], greedy)

    def _block(self, state: DrafterState, slots: torch.Tensor, lengths: torch.Tensor,
               anchors: torch.Tensor) -> list[torch.Tensor]:
        """The block graph over sequences ``slots`` (their committed lengths, anchor tokens): its hidden
        states and draft logits, [len(slots), block, ...]. Reads the state, writes nothing."""
        c = self.config
        pages = pages_read(int(lengths.max()))
        names = [f"{kind}_cache_{i}" for i in range(c.num_layers) for kind in ("key", "value")]
        feeds = {"anchor_embeds": self.embed.index_select(0, anchors).to(torch.float32),
                 "anchor_positions": lengths, "context_mask": torch.arange(pages * PAGE_SIZE)[None, :] < lengths[:, None],
                 "cache_pages": page_rows(slots, c.num_kv_heads, state.max_len, pages),
                 **dict(zip(names, paged_views(state.k, state.v, c.head_dim)))}
        return self._run("block", feeds)
