"""Drafter maths and protocol on a tiny random target: exact per-token softmax, confidences,
batch-vs-single equivalence, rollback, and greedy losslessness of the speculative loop."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.acceptance import simulate
from models.config import TransformerConfig
from models.drafters import DrafterConfig, build_drafter, default_config, greedy_sample, load_drafter, save_drafter
from models.drafters.common import PlannedLinear
from models.projection import KernelPlan
from models.transformer import Transformer, apply_rope


def tiny_target(seed: int = 0) -> Transformer:
    config = TransformerConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=8, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, qk_norm=False, max_position_embeddings=256,
        bos_token_id=1, eos_token_ids=(2,),
    )
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.3)
    return model.eval().requires_grad_(False)


def drafter_for(kind: str, target: Transformer, seed: int = 1):
    torch.manual_seed(seed)
    d = build_drafter(default_config(kind, target, intermediate_size=48, markov_rank=8), target)
    with torch.no_grad():  # the Markov head starts at zero; give it something to do
        for name, p in d.named_parameters():
            if "markov_w2" in name:
                p.normal_(0, 0.5)
    return d.eval()


def context(target: Transformer, drafter, seqs: list[list[int]], slots: list[int], state, cache):
    ids = torch.tensor([t for s in seqs for t in s])
    lens = [len(s) for s in seqs]
    out = target(ids, slots, lens, cache, tap_layers=drafter.tap_layers)
    drafter.extend_context(state, slots, lens, out.hidden_states, ids)
    return out


@pytest.fixture(scope="module")
def target() -> Transformer:
    return tiny_target()


def test_markov_probabilities_exact_and_depend_on_previous_token(target) -> None:
    d = drafter_for("dspark", target)
    hidden = torch.randn(3, 32)
    logits_a = d.block_logits(hidden, torch.tensor([5, 5, 5]))
    logits_b = d.block_logits(hidden, torch.tensor([9, 9, 9]))
    p = torch.softmax(logits_a, -1)
    assert torch.allclose(p.sum(-1), torch.ones(3), atol=1e-6)
    assert not torch.allclose(logits_a, logits_b)


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_draft_shapes_and_batch_equals_single(target, kind) -> None:
    d = drafter_for(kind, target)
    seqs = [[3, 4, 5, 6, 7, 8], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]]
    state, cache = d.new_state(4, 64), target.new_cache(4, 64)
    context(target, d, seqs, [0, 1, 3], state, cache)
    anchors = torch.tensor([30, 31, 32])
    blk = d.draft(state, [0, 1, 3], anchors, 5, greedy_sample)
    assert blk.tokens.shape == (3, 5) and blk.probs.shape == (3, 5, 64)
    assert torch.allclose(blk.probs.sum(-1), torch.ones(3, 5))
    if kind == "dspark":
        assert blk.confidences.shape == (3, 5)
        assert bool(((blk.confidences > 0) & (blk.confidences < 1)).all())
    else:
        assert blk.confidences is None
    for i, (seq, slot) in enumerate(zip(seqs, [0, 1, 3])):
        s1, c1 = d.new_state(1, 64), target.new_cache(1, 64)
        context(target, d, [seq], [0], s1, c1)
        single = d.draft(s1, [0], anchors[i:i + 1], 5, greedy_sample)
        assert torch.equal(single.tokens[0], blk.tokens[i])
        assert torch.allclose(single.probs[0], blk.probs[i], atol=1e-5)


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_drafting_through_a_kernel_plan_proposes_the_same_block(target, kind) -> None:
    d = drafter_for(kind, target)
    seqs = [[3, 4, 5, 6, 7, 8], [10, 11, 12]]
    state, cache = d.new_state(2, 64), target.new_cache(2, 64)
    context(target, d, seqs, [0, 1], state, cache)
    plain = d.draft(state, [0, 1], torch.tensor([30, 31]), 5, greedy_sample)
    d.use_kernel_plan(KernelPlan((1, 64), ("weight_left", "weight_left")))
    assert all(m.kernel is not None for m in d.modules() if isinstance(m, PlannedLinear))
    planned = d.draft(state, [0, 1], torch.tensor([30, 31]), 5, greedy_sample)
    fused_state = d.new_state(2, 64)  # the context K/V through the fused k/v kernel
    context(target, d, seqs, [0, 1], fused_state, target.new_cache(2, 64))
    d.use_kernel_plan(None)
    assert torch.equal(planned.tokens, plain.tokens)
    torch.testing.assert_close(planned.probs, plain.probs, atol=1e-5, rtol=1e-4)
    for a, b in ((fused_state.k, state.k), (fused_state.v, state.v)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_new_draft_vocabulary_drops_the_kernels_planned_for_the_old_one(target) -> None:
    vocab = torch.tensor([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47])
    planned, plain = drafter_for("dspark", target), drafter_for("dspark", target)
    with torch.no_grad():  # a Markov head that matters (it starts at zero)
        for d in (planned, plain):
            d.markov_w2.weight.copy_(torch.randn_like(d.markov_w2.weight))
    planned.use_kernel_plan(KernelPlan((1, 64), ("weight_left", "weight_left")))
    for d in (planned, plain):
        d.set_draft_vocab(vocab)
    seqs = [[3, 4, 5, 6, 7, 8]]
    blocks = []
    for d in (planned, plain):
        state, cache = d.new_state(1, 64), target.new_cache(1, 64)
        context(target, d, seqs, [0], state, cache)
        blocks.append(d.draft(state, [0], torch.tensor([30]), 5, greedy_sample))
    assert torch.equal(blocks[0].tokens, blocks[1].tokens)
    torch.testing.assert_close(blocks[0].probs, blocks[1].probs, atol=1e-5, rtol=1e-4)


def test_the_rope_table_gives_the_computed_rotation_at_any_position(target) -> None:
    """Drafting reads cos/sin from a table grown on demand; graph export computes them from the positions."""
    layer = drafter_for("dspark", target).layers[0]
    x = torch.randn(3, 5, layer.num_heads, layer.head_dim)
    for positions in (torch.tensor([[0, 1, 2, 3, 4]] * 3), torch.arange(985, 1000).view(3, 5), torch.arange(15).view(3, 5)):
        cos, sin = layer.rope_cos_sin(positions, x.dtype)
        torch.testing.assert_close(apply_rope(x, cos, sin), layer.rope(x, positions), atol=1e-6, rtol=1e-5)
    assert layer._rope_table[0].shape[0] == 1024  # grew from 256 by doubling to cover position 999


def test_a_drafted_block_equals_its_teacher_forced_training_pass(target) -> None:
    """Serving drafts left to right (Markov bias from the token just drawn); training scores the same
    block teacher-forced. Fed the drafted tokens, training's logits, confidences and argmax must match."""
    d = drafter_for("dspark", target)
    with torch.no_grad():
        d.confidence_temperature.fill_(1.7)
        d.confidence_bias.fill_(-0.3)
    committed, anchor, W = [3, 4, 5, 6, 7], 9, d.config.block_size
    state, cache = d.new_state(1, 64), target.new_cache(1, 64)
    out = context(target, d, [committed], [0], state, cache)
    argmax_with_softmax = lambda logits: (logits.argmax(-1), torch.softmax(logits.float(), -1))  # noqa: E731
    block = d.draft(state, [0], torch.tensor([anchor]), W, argmax_with_softmax)  # sampled regime: keeps q
    drafted = block.tokens[0]
    tokens = torch.tensor(committed + [anchor] + drafted.tolist()).unsqueeze(0)
    features = torch.cat([torch.cat([out.hidden_states[t] for t in d.tap_layers], -1),
                          torch.zeros(1 + W, len(d.tap_layers) * 32)]).unsqueeze(0)  # after the anchor: unseen
    logits, conf = d.train_forward(features, tokens, torch.tensor([[len(committed)]]))
    assert torch.equal(logits[0, 0].argmax(-1), drafted)
    torch.testing.assert_close(block.probs[0], torch.softmax(logits[0, 0], -1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(block.confidences[0], torch.sigmoid(conf[0, 0] / 1.7 - 0.3), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_extend_then_truncate_equals_fresh_state(target, kind) -> None:
    d = drafter_for(kind, target)
    prefix, extra = [3, 4, 5, 6, 7], [40, 41, 42, 43]
    state, cache = d.new_state(1, 64), target.new_cache(1, 64)
    context(target, d, [prefix], [0], state, cache)
    context(target, d, [extra], [0], state, cache)  # verified tokens, then two are rejected
    state.truncate(0, len(prefix) + 2)
    cache.truncate(0, len(prefix) + 2)
    context(target, d, [[50]], [0], state, cache)
    fresh, fresh_cache = d.new_state(1, 64), target.new_cache(1, 64)
    context(target, d, [prefix + extra[:2] + [50]], [0], fresh, fresh_cache)
    a = d.draft(state, [0], torch.tensor([9]), 4, greedy_sample)
    b = d.draft(fresh, [0], torch.tensor([9]), 4, greedy_sample)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.probs, b.probs, atol=1e-5)


def test_speculative_greedy_is_lossless(target) -> None:
    """The simulated engine loop emits the target's own greedy tokens, whatever the drafter proposes."""
    d = drafter_for("dspark", target)
    prompt = [3, 4, 5, 6]
    cache = target.new_cache(1, 64)
    ids, ar = torch.tensor(prompt), []
    out = target(ids, [0], [len(prompt)], cache, logits_indices=torch.tensor([len(prompt) - 1]))
    for _ in range(24):
        tok = int(out.logits[-1].argmax())
        ar.append(tok)
        out = target(torch.tensor([tok]), [0], [1], cache)
    result = simulate(target, d, [prompt], 0.0, 4, 16)
    assert result["rounds"] >= 1
    out = result["outputs"][0]
    assert len(out) >= 16 and out == ar[: len(out)]


def test_checkpoint_roundtrip_excludes_shared_tensors(target, tmp_path) -> None:
    d = drafter_for("dspark", target)
    save_drafter(d, tmp_path)
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert not any("embed" == n or "lm_head" == n for n in names)
    loaded = load_drafter(tmp_path, target)
    assert isinstance(loaded.config, DrafterConfig) and loaded.config == d.config
    for (n1, p1), (n2, p2) in zip(d.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_draft_vocabulary_proposes_only_its_tokens_with_exact_probabilities(target, kind, tmp_path) -> None:
    vocab = torch.tensor([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47])
    full, sub = drafter_for(kind, target), drafter_for(kind, target)
    sub.set_draft_vocab(vocab)
    anchors = torch.tensor([6, 9])
    blocks = {}
    for name, d in (("full", full), ("sub", sub)):
        state, cache = d.new_state(2, 64), target.new_cache(2, 64)
        context(target, d, [[3, 4, 5, 6], [7, 8, 9]], [0, 1], state, cache)
        g = torch.Generator().manual_seed(0)

        def sample(logits):
            p = torch.softmax(logits, -1)
            return torch.multinomial(p, 1, generator=g).squeeze(-1), p

        blocks[name] = d.draft(state, [0, 1], anchors, 4, sample)
        blocks[name + "_greedy"] = d.draft(state, [0, 1], anchors, 4, greedy_sample)
    b = blocks["sub"]
    assert set(b.tokens.flatten().tolist()) <= set(vocab.tolist())
    assert b.probs.shape == (2, 4, 64)
    torch.testing.assert_close(b.probs.sum(-1), torch.ones(2, 4))
    outside = torch.ones(64, dtype=torch.bool)
    outside[vocab] = False
    assert (b.probs[..., outside] == 0).all()
    assert (b.probs.gather(-1, b.tokens.unsqueeze(-1)) > 0).all()
    # The first position sees the same context either way: the subset's greedy pick is the full
    # distribution's best token inside the subset, and its probabilities are the renormalized full ones.
    first = blocks["full"].probs[:, 0, vocab]
    assert torch.equal(blocks["sub_greedy"].tokens[:, 0], vocab[first.argmax(-1)])
    torch.testing.assert_close(b.probs[:, 0, vocab], first / first.sum(-1, keepdim=True))

    save_drafter(sub, tmp_path)
    assert torch.equal(load_drafter(tmp_path, target).draft_vocab, vocab)
    save_drafter(full, tmp_path)  # saving a full-vocabulary drafter over it removes the subset
    assert load_drafter(tmp_path, target).draft_vocab is None


def test_draft_vocabulary_rejects_out_of_range_ids(target) -> None:
    d = drafter_for("dspark", target)
    with pytest.raises(ValueError, match="draft vocabulary"):
        d.set_draft_vocab(torch.tensor([1, 64]))


def test_drafter_trained_inside_its_vocabulary_keeps_it(target, tmp_path) -> None:
    vocab = torch.arange(3, 63, 4)  # 15 tokens
    torch.manual_seed(1)
    config = default_config("dspark", target, intermediate_size=48, markov_rank=8, draft_vocab_size=15)
    d = build_drafter(config, target)
    with pytest.raises(ValueError, match="exactly"):
        d.set_draft_vocab(None)
    d.set_draft_vocab(vocab)
    assert d.markov_w2.weight.shape == (15, 8)  # the Markov head's output covers the subset only
    assert d.block_logits(torch.randn(2, 32), torch.tensor([5, 9])).shape == (2, 15)
    state, cache = d.new_state(1, 64), target.new_cache(1, 64)
    context(target, d, [[3, 4, 5, 6]], [0], state, cache)
    blk = d.draft(state, [0], torch.tensor([9]), 4, greedy_sample)
    assert set(blk.tokens.flatten().tolist()) <= set(vocab.tolist())
    save_drafter(d, tmp_path)
    loaded = load_drafter(tmp_path, target)
    assert torch.equal(loaded.draft_vocab, vocab) and loaded.config.draft_vocab_size == 15


def test_confidences_use_the_calibration_of_the_request_regime(target, tmp_path) -> None:
    d = drafter_for("dspark", target)
    with torch.no_grad():
        d.confidence_temperature[0] = 0.5  # greedy
        d.confidence_temperature[1] = 3.0  # sampled
        d.confidence_bias[1] = -0.7
    state, cache = d.new_state(1, 64), target.new_cache(1, 64)
    context(target, d, [[3, 4, 5, 6]], [0], state, cache)
    greedy = d.draft(state, [0], torch.tensor([9]), 4, greedy_sample, greedy=True).confidences
    sampled = d.draft(state, [0], torch.tensor([9]), 4, greedy_sample, greedy=False).confidences
    logit = torch.logit(greedy) * 0.5  # undo the greedy temperature
    torch.testing.assert_close(sampled, torch.sigmoid(logit / 3.0 - 0.7))
    # A checkpoint calibrated before regimes had one row of temperatures: it serves both.
    from safetensors.torch import load_file, save_file

    save_drafter(d, tmp_path)
    state_dict = load_file(str(tmp_path / "model.safetensors"))
    state_dict["confidence_temperature"] = torch.full((d.config.block_size,), 2.0)
    del state_dict["confidence_bias"]  # and no biases: calibrated by temperature alone
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    loaded = load_drafter(tmp_path, target)
    assert (loaded.confidence_temperature == 2.0).all() and (loaded.confidence_bias == 0.0).all()


def test_prompt_lookup_simulation_is_lossless(target) -> None:
    from benchmarks.acceptance import simulate_prompt_lookup

    prompt = [3, 4, 5, 6, 3, 4, 5]
    reference = simulate(target, drafter_for("dspark", target), [prompt], 0.0, 4, 16)["outputs"][0]
    result = simulate_prompt_lookup(target, [prompt, [7, 8, 9]], 3, 16)
    assert result["outputs"][0][:16] == reference[:16] and result["tokens_per_round"] >= 1.0


def test_drafter_positions_rotate_keys_so_attention_depends_on_distance(target) -> None:
    """Rotary positions: the score of a query at m and a key at n depends on m - n only, and keys
    keep their norm. Checkpoints from before this was fixed keep their (sin, sin) transform, which
    is neither (it collapses some key pairs), and load as such."""
    layer = drafter_for("dspark", target).layers[0]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, layer.num_heads, layer.head_dim, generator=gen)
    k = torch.randn(1, layer.num_kv_heads, layer.head_dim, generator=gen)

    def score(m: int, n: int) -> torch.Tensor:
        return (layer.rope(q, torch.tensor([m])) * layer.rope(k, torch.tensor([n])).repeat_interleave(2, 1)).sum(-1)

    assert torch.allclose(score(3, 1), score(40, 38), atol=1e-5)
    assert torch.allclose(layer.rope(k, torch.tensor([17])).norm(dim=-1), k.norm(dim=-1), atol=1e-5)
    saved = drafter_for("dspark", target).config.to_json()
    legacy = json.loads(saved)
    del legacy["rope"]
    assert DrafterConfig.from_json(json.dumps(legacy)).rope == "unsigned_sin"
    assert DrafterConfig.from_json(saved).rope == "standard"


def test_qk_norm_makes_attention_independent_of_the_query_and_key_scale(target, tmp_path) -> None:
    """With per-head q/k norms (the default) scaling a layer's query and key projections leaves the
    drafted block unchanged; without them it changes the attention. Checkpoints saved before the
    field load with the norms off."""
    anchors, pos = torch.tensor([[3, 9]]), torch.tensor([[4, 6]])
    ctx = torch.randn(1, 8, 32)
    mask = torch.arange(8)[None, None, :] < pos.unsqueeze(-1)

    def blocks(drafter, scale: float) -> torch.Tensor:
        with torch.no_grad():
            for layer in drafter.layers:
                layer.q_proj.weight.mul_(scale)
                layer.k_proj.weight.mul_(scale)
        kv = [tuple(t.transpose(1, 2) for t in layer.key_values(ctx, torch.arange(8).expand(1, 8))) for layer in drafter.layers]
        return drafter.backbone(anchors, pos, kv, mask)

    normed = drafter_for("dspark", target)
    assert normed.config.qk_norm and normed.layers[0].q_norm is not None
    torch.testing.assert_close(blocks(drafter_for("dspark", target), 1.0), blocks(normed, 5.0), atol=1e-4, rtol=1e-4)
    plain_config = default_config("dspark", target, intermediate_size=48, markov_rank=8, qk_norm=False)
    torch.manual_seed(1)
    plain, plain_scaled = build_drafter(plain_config, target), build_drafter(plain_config, target)
    plain_scaled.load_state_dict(plain.state_dict())
    assert not torch.allclose(blocks(plain, 1.0), blocks(plain_scaled, 5.0), atol=1e-3)

    legacy = json.loads(normed.config.to_json())
    del legacy["qk_norm"]
    old = build_drafter(DrafterConfig.from_json(json.dumps(legacy)), target)
    assert not old.config.qk_norm and not any("q_norm" in name for name in old.state_dict())
    save_drafter(old, tmp_path)
    assert not load_drafter(tmp_path, target).config.qk_norm


def test_saved_drafter_files_get_the_usual_mode_and_a_rewrite_keeps_it(target, tmp_path) -> None:
    """Weights are readable as any new file here (safetensors alone writes 0600), and rewriting a
    drafter in place (as calibrate does) leaves no narrower mode and no temporary file."""
    import os

    drafter = build_drafter(default_config("dspark", target, num_layers=1, intermediate_size=32, markov_rank=4), target)
    drafter.set_draft_vocab(torch.arange(2, 40))
    old = os.umask(0o022)
    try:
        save_drafter(drafter, tmp_path)
        save_drafter(drafter, tmp_path)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "draft_vocab.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "draft_vocab.safetensors", "model.safetensors"]
    assert load_drafter(tmp_path, target).draft_vocab.tolist() == list(range(2, 40))
