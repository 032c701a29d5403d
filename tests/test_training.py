"""Training pieces: STS calibration lowers ECE on held-out data; the loss falls on a tiny run."""
from __future__ import annotations

import pytest
import torch

from models.drafters import default_config, load_drafter
from training.calibration import expected_calibration_error, sequential_temperature_scaling
from training.data import build_prompts, generate_with_features
from training.train import TrainConfig, learning_rate, train_drafter
from tests.test_drafters import tiny_target


def test_sts_lowers_ece_on_held_out_synthetic_data() -> None:
    gen = torch.Generator().manual_seed(0)
    true_logit = torch.randn(4000, 3, generator=gen) * 1.5
    outcome = torch.bernoulli(torch.sigmoid(true_logit), generator=gen)
    overconfident = true_logit * torch.tensor([3.0, 2.0, 0.5])  # per position miscalibration
    temps = sequential_temperature_scaling(overconfident[:2000], outcome[:2000])
    before = expected_calibration_error(torch.sigmoid(overconfident[2000:]), outcome[2000:])
    after = expected_calibration_error(torch.sigmoid(overconfident[2000:] / temps), outcome[2000:])
    assert after < 0.5 * before
    assert temps[0] > temps[1] > 1.0 > temps[2]


def test_prompts_cover_domains_and_split() -> None:
    train = build_prompts("train", {"code": 3, "chat": 2, "math": 2})
    held = build_prompts("heldout", {"code": 3})
    assert [p.domain for p in train].count("code") == 3 and len(train) == 7
    assert not {p.text for p in train} & {p.text for p in held}


def test_training_loss_falls_and_checkpoint_resumes(tmp_path) -> None:
    target = tiny_target()
    config = default_config("dspark", target, intermediate_size=48, markov_rank=8)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (12,), generator=gen).tolist() for _ in range(4)]
    seqs = generate_with_features(target, prompts, config.tap_layers, max_new_tokens=24, batch_size=4, progress=False)
    cfg = TrainConfig(steps=40, batch_size=4, anchors=4, lr=3e-3, warmup=5, checkpoint_every=20)
    result = train_drafter(target, config, seqs, tmp_path, cfg, progress=False)
    losses = [h["loss"] for h in torch.load(tmp_path / "optimizer.pt", weights_only=False)["history"]]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert result["steps"] == 40
    resumed = train_drafter(target, config, seqs, tmp_path, TrainConfig(**{**cfg.__dict__, "steps": 45}), progress=False)
    assert resumed["steps"] == 45
    assert load_drafter(tmp_path, target).config == config


def test_learning_rate_warms_up_then_anneals_by_steps_or_time() -> None:
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-4, rel=0.01)
    assert learning_rate(cfg, 9, 0.0) == pytest.approx(1e-3, rel=0.03)  # warm, barely decayed
    assert learning_rate(cfg, 50, 0.0) == pytest.approx(5e-4, rel=0.01)
    assert learning_rate(cfg, 100, 0.0) == pytest.approx(0.0, abs=1e-12)
    timed = TrainConfig(steps=None, warmup=10, lr=1e-3, max_minutes=2.0)
    assert learning_rate(timed, 50, 60.0) == pytest.approx(5e-4, rel=0.01)  # half the time = half-way down
    assert learning_rate(timed, 50, 120.0) == pytest.approx(0.0, abs=1e-12)


def test_draft_vocabulary_keeps_the_most_frequent_answer_tokens() -> None:
    from training.data import Sequence
    from training.vocab import coverage, draft_vocabulary

    def seq(prompt: list[int], answer: list[int]) -> Sequence:
        tokens = torch.tensor(prompt + answer)
        return Sequence(tokens, len(prompt), torch.zeros(len(tokens) - 1, 4), torch.zeros(len(tokens) - 1, 2))

    train = [seq([9, 9, 9, 9], [1, 1, 1, 2, 2, 3]), seq([9, 9], [1, 2, 4])]  # prompt tokens do not count
    vocab = draft_vocabulary(train, vocab_size=10, size=2)
    assert vocab.tolist() == [1, 2]
    assert coverage(vocab, train, vocab_size=10) == pytest.approx(7 / 9)
    assert draft_vocabulary(train, 10, 3).tolist() == [1, 2, 3]  # ties (3 and 4, once each) go to the lower id
    assert draft_vocabulary(train, 10, 5).tolist() == [1, 2, 3, 4, 9]  # then prompt tokens, the answers' source
    with pytest.raises(ValueError):
        draft_vocabulary(train, 10, 0)
