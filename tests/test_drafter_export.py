"""Exported block drafters (ONNX Runtime) against the torch drafter they came from (float32).

Tolerance: the graphs run the same float32 maths in another order, so probabilities and
confidences move by float32 rounding (measured ~1e-7 on the shipped SmolLM2 drafter); 1e-5
absolute is far below any real defect (a wrong mask or position moves them by 1e-2 and more).
Greedy drafts must be identical.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import onnx
import pytest
import torch

from export.drafter_export import META_FILE, cached_drafter_export, export_drafter, exported_for
from models.drafters import build_drafter, default_config, load_drafter, save_drafter
from models.loading import load_transformer
from runtimes import drafter_runner
from runtimes.drafter_runner import OnnxRuntimeBlockDrafter
from runtimes.loading import load_feature_drafter
from test_drafters import drafter_for, tiny_target
from test_onnx_export import _weight_matmul_ops

ATOL = 1e-5


class _Recorder:
    """A greedy sample_fn that keeps the logits it was given."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.logits.append(logits.clone())
        tokens = logits.argmax(-1)
        return tokens, torch.softmax(logits.float(), -1)


def _compare(target, torch_drafter, graph_drafter, prompts: list[list[int]], slots: list[int]) -> None:
    """Same context (two extensions, slots out of order), then greedy blocks of every length and regime."""
    cache = target.new_cache(4, 96)
    for _ in range(4):
        cache.allocate()
    states = [d.new_state(4, 90) for d in (torch_drafter, graph_drafter)]
    for part in (slice(None, -3), slice(-3, None)):  # a prefill, then a few committed tokens more
        seqs = [p[part] for p in prompts]
        ids = torch.tensor([t for s in seqs for t in s])
        out = target(ids, slots, [len(s) for s in seqs], cache, tap_layers=torch_drafter.tap_layers)
        for d, state in zip((torch_drafter, graph_drafter), states):
            d.extend_context(state, slots, [len(s) for s in seqs], out.hidden_states, ids)
    n = int(states[0].lengths.max())
    assert torch.equal(states[0].lengths, states[1].lengths)
    assert torch.allclose(states[0].k[..., :n, :], states[1].k[..., :n, :], atol=ATOL)
    anchors = torch.tensor([p[-1] for p in prompts])
    for k in (1, torch_drafter.config.block_size):
        for greedy in (True, False):
            rec = [_Recorder(), _Recorder()]
            a, b = (d.draft(s, slots[::-1], anchors.flip(0), k, r, greedy=greedy)
                    for d, s, r in zip((torch_drafter, graph_drafter), states, rec))
            assert torch.equal(a.tokens, b.tokens)
            for x, y in zip(*(r.logits for r in rec)):
                assert torch.allclose(x, y, atol=ATOL * max(1.0, float(x.abs().max())))
            if greedy:  # greedy verification reads no probabilities: neither drafter spreads them
                assert a.probs is None and b.probs is None
            else:
                assert torch.allclose(a.probs, b.probs, atol=ATOL)
            if a.confidences is None:
                assert b.confidences is None
            else:
                assert torch.allclose(a.confidences, b.confidences, atol=ATOL)


@pytest.mark.parametrize("kind,workers", [("dspark", 1), ("dspark", 2), ("dspark", 4), ("dflash", 1)])
def test_tiny_block_drafter_graphs_match_torch(tmp_path, monkeypatch, kind, workers) -> None:
    """Two workers: a draft's block graph runs as two concurrent calls on shares of the batch (over any
    context here, so the tiny prompts take that path); more workers than sequences: one call each."""
    monkeypatch.setattr(drafter_runner, "MIN_PARALLEL_CONTEXT", 1)
    target = tiny_target()
    drafter = drafter_for(kind, target)
    if kind == "dspark":  # calibrated, so the regimes differ
        drafter.confidence_temperature.copy_(torch.tensor([[0.5] * 7, [2.0] * 7]))
        drafter.confidence_bias.fill_(0.3)
    graphs = export_drafter(drafter, tmp_path)
    expected = {"context.onnx", "block.onnx"} | ({"markov.onnx", "confidence.onnx"} if kind == "dspark" else set())
    assert {p.name for p in graphs.glob("*.onnx")} == expected
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in (9, 20, 5)]  # 20: two cache pages
    runner = OnnxRuntimeBlockDrafter(drafter, graphs, target.embed, num_threads=workers)
    calls = []  # (thread, sequences) per block-graph call
    block = runner._block
    runner._block = lambda state, slots, *rest: calls.append((threading.current_thread().name, len(slots))) or \
        block(state, slots, *rest)
    _compare(target, drafter, runner, prompts, [2, 0, 3])
    # four drafts of 3 sequences: per draft one call, shares of 1 and 2, or one call per sequence (which
    # pool threads ran them is the pool's business; that more than one did is the point)
    shares = {1: [3], 2: [1, 2], 4: [1, 1, 1]}[workers]
    assert sorted(n for _, n in calls) == sorted(shares * 4)
    assert (len({thread for thread, _ in calls}) > 1) == (workers > 1)


def test_drafter_inside_a_draft_vocabulary_proposes_from_it(tmp_path) -> None:
    target = tiny_target()
    torch.manual_seed(1)
    drafter = build_drafter(default_config("dspark", target, intermediate_size=48, markov_rank=8, draft_vocab_size=15),
                            target).eval()
    drafter.set_draft_vocab(torch.arange(3, 63, 4))
    runner = OnnxRuntimeBlockDrafter(drafter, export_drafter(drafter, tmp_path), target.embed)
    _compare(target, drafter, runner, [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], [1, 0])
    # its threads sleep between runs, as the target's do (runtimes.onnxruntime_runner.session_options)
    assert {session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            for session in runner.sessions.values()} == {"0"}
    # ... and one thread each (a second drafted no faster, runtimes.drafter_runner)
    assert {session.get_session_options().intra_op_num_threads for session in runner.sessions.values()} == {1}


def test_eagle3_is_not_exported(tmp_path) -> None:
    target = tiny_target()
    with pytest.raises(ValueError, match="torch module beside any runtime"):
        export_drafter(drafter_for("eagle3", target), tmp_path)


def test_shipped_smollm2_drafter_graphs_match_torch(tmp_path, smollm2_dir: Path) -> None:
    from hub.fetch import default_drafter
    from export.repository import drafter_checkpoint

    target = load_transformer(smollm2_dir, torch.float32)
    drafter = load_drafter(drafter_checkpoint(default_drafter(smollm2_dir)), target)
    drafter.use_kernel_plan(None)
    runner = OnnxRuntimeBlockDrafter(drafter, export_drafter(drafter, tmp_path), target.embed)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 5000, (n,), generator=gen).tolist() for n in (23, 8, 40)]
    _compare(target, drafter, runner, prompts, [3, 1, 2])


def test_graphs_shipped_for_another_drafter_are_not_used(tmp_path) -> None:
    """A server told to use drafter B on a repository that ships drafter A's graphs runs B's own."""
    target = tiny_target()
    for name, seed in (("a", 1), ("b", 2)):
        save_drafter(drafter_for("dspark", target, seed=seed), tmp_path / name)
    graphs_a = cached_drafter_export(load_drafter(tmp_path / "a", target), tmp_path / "a")
    runner = load_feature_drafter(tmp_path / "b", target, "onnxruntime", export_dir=graphs_a)
    b = load_drafter(tmp_path / "b", target)
    assert runner.export_dir != graphs_a and exported_for(runner.export_dir, tmp_path / "b", b)
    assert not exported_for(graphs_a, tmp_path / "b", b)
    _compare(target, b, runner, [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], [1, 0])


def _block_logits(drafter, target, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
    """Each prompt's context, then one drafted position per prompt: its logits [B, Vd]."""
    cache = target.new_cache(4, 96)
    for _ in range(4):
        cache.allocate()
    state = drafter.new_state(4, 90)
    ids = torch.tensor([t for p in prompts for t in p[:-1]])
    out = target(ids, slots, [len(p) - 1 for p in prompts], cache, tap_layers=drafter.tap_layers)
    drafter.extend_context(state, slots, [len(p) - 1 for p in prompts], out.hidden_states, ids)
    rec = _Recorder()
    drafter.draft(state, slots, torch.tensor([p[-1] for p in prompts]), 1, rec, greedy=True)
    return rec.logits[0]


def test_w8a8_drafter_graphs_run_every_projection_and_the_draft_head_as_integer_matmuls(tmp_path) -> None:
    """Beside a w8a8 target the drafter's graphs are w8a8 too: its projections and draft head (most of a
    float32 draft's time) run as integer matmuls. Rounding may cost acceptance, never output (the target
    verifies every token), so the bound is loose: drafted logits within 5% of their scale of float32's."""
    target = tiny_target()
    drafter = drafter_for("dspark", target)
    graphs = export_drafter(drafter, tmp_path, dtype="w8a8")
    n = drafter.config.num_layers
    context, block = (_weight_matmul_ops(graphs / f"{name}.onnx") for name in ("context", "block"))
    assert context.count("MatMulIntegerToFloat") == 1 + 2 * n and "MatMul" not in context, context
    assert block.count("MatMulIntegerToFloat") == 7 * n + 1 and "MatMul" not in block, block  # q k v o gate up down; head
    for name in ("context", "block"):  # nothing the rewrite left unread (ONNX Runtime warns of each at load)
        graph = onnx.load(str(graphs / f"{name}.onnx"), load_external_data=False).graph
        read = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        assert [node.name for node in graph.node if not set(node.output) & read] == [], name
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 60, (n,), generator=gen).tolist() for n in (9, 20, 5)]
    expected = _block_logits(drafter, target, prompts, [2, 0, 3])
    ours = _block_logits(OnnxRuntimeBlockDrafter(drafter, graphs, target.embed), target, prompts, [2, 0, 3])
    assert (ours - expected).abs().max() <= 0.05 * expected.abs().max()
    with pytest.raises(ValueError, match="exports in one of"):
        export_drafter(drafter, tmp_path / "other", dtype="int8")


def test_a_w8a8_target_drafts_with_w8a8_graphs(tmp_path) -> None:
    """load_feature_drafter quantizes the drafter as the target graph beside it is, and a repository's
    shipped float32 graphs are not taken for them."""
    from export.onnx_export import export_transformer
    from export.quantize import quantize_w8a8
    from runtimes.onnxruntime_runner import OnnxRuntimeRunner

    target = tiny_target()
    save_drafter(drafter_for("dspark", target), tmp_path / "ckpt")
    module = load_drafter(tmp_path / "ckpt", target)
    path = export_transformer(target, tmp_path / "target", module.tap_layers, {"weights": "w8a8"}, int8_kv=True)
    quantize_w8a8(path, target.config, [list(range(3, 40))])
    runner = OnnxRuntimeRunner(path, target.config, num_threads=1)
    runner._token_matrices = (target.embed, target.embed)  # tied; load_runner reads them from a model directory
    float_graphs = cached_drafter_export(module, tmp_path / "ckpt")
    drafter = load_feature_drafter(tmp_path / "ckpt", runner, "onnxruntime", export_dir=float_graphs)
    assert drafter.export_dir != float_graphs
    assert json.loads((drafter.export_dir / META_FILE).read_text())["dtype"] == "w8a8"
    assert exported_for(drafter.export_dir, tmp_path / "ckpt", module, "w8a8")
    assert not exported_for(drafter.export_dir, tmp_path / "ckpt", module)
