"""Training maths on tiny models: in-subset TV is the full TV, STS calibrates the cumulative
survival, a few hundred steps raise held-out acceptance, and a resumed run is the same run."""
from __future__ import annotations

import pytest
import torch

from models.drafters import default_config, load_drafter
from training.calibration import cumulative_survival, expected_calibration_error, sequential_temperature_scaling
from training.data import Sequence, generate_with_features
from training.losses import LossWeights, drafter_loss, subset_total_variation
from training.sources import build_prompts, split_of
from training.train import (
    STATE_FILE,
    TrainConfig,
    calibrate_confidence,
    evaluate,
    heldout_batches,
    learning_rate,
    train_drafter,
)
from training.vocab import coverage, draft_vocabulary
from tests.test_drafters import tiny_target


def test_in_subset_tv_equals_full_vocabulary_tv() -> None:
    gen = torch.Generator().manual_seed(0)
    target_logits = torch.randn(5, 3, 100, generator=gen) * 3
    subset = torch.randperm(100, generator=gen)[:30].sort().values
    draft_logits = torch.randn(5, 3, 30, generator=gen) * 3
    full_draft = torch.zeros(5, 3, 100)
    full_draft[..., subset] = torch.softmax(draft_logits, -1)
    full_tv = 0.5 * (full_draft - torch.softmax(target_logits, -1)).abs().sum(-1)
    sub_tv = subset_total_variation(draft_logits, torch.log_softmax(target_logits, -1)[..., subset])
    torch.testing.assert_close(sub_tv, full_tv)


def test_loss_uses_the_full_l1_and_skips_labels_outside_the_vocabulary() -> None:
    gen = torch.Generator().manual_seed(0)
    draft, target = torch.randn(4, 3, 10, generator=gen), torch.log_softmax(torch.randn(4, 3, 10, generator=gen), -1)
    labels = torch.tensor([[1, 2, -1]] * 4)
    only_l1 = drafter_loss(draft, target, labels, None, LossWeights(ce=0.0, l1=1.0))
    torch.testing.assert_close(float(only_l1.loss), 2 * only_l1.tv, rtol=1e-5, atol=1e-6)
    ce = drafter_loss(draft, target, labels, None, LossWeights(ce=1.0, l1=0.0)).ce
    assert torch.isfinite(torch.tensor(ce))
    padded = drafter_loss(draft, target, labels, None, LossWeights(), block_weight=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    head = drafter_loss(draft[:2], target[:2], labels[:2], None, LossWeights())
    assert padded.tv == pytest.approx(head.tv) and padded.tau == pytest.approx(head.tau)


def test_sts_lowers_ece_of_the_cumulative_survival() -> None:
    gen = torch.Generator().manual_seed(0)
    true_logit = torch.randn(6000, 4, generator=gen) + 1.5
    accepted = torch.bernoulli(torch.sigmoid(true_logit), generator=gen).cumprod(-1)  # prefix acceptance
    miscalibrated = true_logit * torch.tensor([3.0, 2.0, 0.5, 1.5])
    temps = sequential_temperature_scaling(miscalibrated[:3000], accepted[:3000])
    before = expected_calibration_error(cumulative_survival(miscalibrated[3000:], torch.ones(4)), accepted[3000:])
    after = expected_calibration_error(cumulative_survival(miscalibrated[3000:], temps), accepted[3000:])
    assert after < 0.5 * before and after < 0.02
    assert temps[0] > 1.0 and temps[2] < 1.0


def test_prompt_splits_are_disjoint_and_deterministic() -> None:
    spec = {"chat_tmpl": 20, "math_tmpl": 20, "humaneval": 10}
    train, calib = build_prompts("train", spec), build_prompts("calib", spec)
    assert len(train) == 50 and len({p.text for p in train}) == 50  # templated texts never repeat
    assert not {p.text for p in train} & {p.text for p in calib}
    assert build_prompts("train", spec) == train
    assert {p.domain for p in train} >= {"chat", "math"}
    assert split_of("stdlib:json/decoder.py:f:1") == split_of("stdlib:json/decoder.py:f:1")


def _tiny_data(target, taps, count: int, seed: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 64, (8,), generator=gen).tolist() for _ in range(count)]
    return generate_with_features(target, prompts, taps, max_new_tokens=24, batch_size=count, progress=False)


def test_training_raises_heldout_acceptance_and_resume_continues_the_same_run(tmp_path) -> None:
    target = tiny_target()
    vocab = torch.arange(2, 50)  # 48 tokens (EOS 2 inside)
    config = default_config("dspark", target, num_layers=2, intermediate_size=48, markov_rank=8, draft_vocab_size=48)
    train, heldout = _tiny_data(target, config.tap_layers, 16, 0), _tiny_data(target, config.tap_layers, 8, 1)
    cfg = TrainConfig(steps=100, batch_size=4, anchors=6, lr=3e-3, warmup=10, checkpoint_every=1000, max_len=64)
    fresh = train_drafter(target, config, train, tmp_path / "a", TrainConfig(**{**cfg.__dict__, "steps": 0}),
                          draft_vocab=vocab, progress=False)["drafter"]
    batches = heldout_batches(heldout, cfg, config.block_size)
    before = evaluate(fresh, batches, cfg)
    trained = train_drafter(target, config, train, tmp_path / "b", cfg, draft_vocab=vocab, progress=False)["drafter"]
    after = evaluate(trained, batches, cfg)
    # The random tiny target is close to unpredictable at T=0; at T=1 the drafter learns its distributions.
    assert after["tau"] > before["tau"] + 0.25 and after["accept"][0] > 2 * before["accept"][0]

    short = TrainConfig(**{**cfg.__dict__, "steps": 30})
    straight = train_drafter(target, config, train, tmp_path / "c", short, draft_vocab=vocab, progress=False)
    stopped = train_drafter(target, config, train, tmp_path / "d", TrainConfig(**{**short.__dict__, "session_steps": 12}),
                            draft_vocab=vocab, progress=False)
    assert stopped["steps"] == 12
    resumed = train_drafter(target, config, train, tmp_path / "d", short, draft_vocab=vocab, progress=False)
    assert resumed["steps"] == 30
    for (name, a), b in zip(straight["drafter"].state_dict().items(), resumed["drafter"].state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    saved = torch.load(tmp_path / "d" / STATE_FILE, weights_only=False)
    assert saved["elapsed"] > 0 and [h["step"] for h in saved["history"]] == list(range(1, 31))
    assert load_drafter(tmp_path / "d", target).config == config


def test_calibration_stores_one_set_of_temperatures_per_regime(tmp_path) -> None:
    target = tiny_target()
    config = default_config("dspark", target, intermediate_size=48, markov_rank=8, draft_vocab_size=48)
    train, heldout = _tiny_data(target, config.tap_layers, 8, 0), _tiny_data(target, config.tap_layers, 8, 1)
    cfg = TrainConfig(steps=5, batch_size=4, anchors=6, max_len=64)
    drafter = train_drafter(target, config, train, tmp_path, cfg, draft_vocab=torch.arange(2, 50), progress=False)["drafter"]
    result = calibrate_confidence(drafter, heldout, tmp_path, cfg)
    for row, regime in enumerate(("greedy", "sampled")):
        assert result[regime]["ece_after"] <= result[regime]["ece_before"] + 1e-6
        torch.testing.assert_close(drafter.confidence_temperature[row], torch.tensor(result[regime]["temperatures"]))
    assert (tmp_path / "reliability.png").exists() and (tmp_path / "calibration.json").exists()


def test_learning_rate_warms_up_then_anneals_by_steps_or_run_time() -> None:
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-4, rel=0.01)
    assert learning_rate(cfg, 9, 0.0) == pytest.approx(1e-3, rel=0.03)  # warm, barely decayed
    assert learning_rate(cfg, 50, 0.0) == pytest.approx(5e-4, rel=0.01)
    assert learning_rate(cfg, 100, 0.0) == pytest.approx(0.0, abs=1e-12)
    timed = TrainConfig(steps=None, warmup=10, lr=1e-3, max_minutes=2.0)
    assert learning_rate(timed, 50, 60.0) == pytest.approx(5e-4, rel=0.01)  # half the run's time = half-way down
    assert learning_rate(timed, 50, 120.0) == pytest.approx(0.0, abs=1e-12)


def test_draft_vocabulary_keeps_the_most_frequent_answer_tokens() -> None:
    def seq(prompt: list[int], answer: list[int]) -> Sequence:
        tokens = torch.tensor(prompt + answer)
        return Sequence(tokens, len(prompt), torch.zeros(len(tokens) - 1, 4), torch.zeros(len(answer), 2),
                        torch.zeros(len(answer)))

    train = [seq([9, 9, 9, 9], [1, 1, 1, 2, 2, 3]), seq([9, 9], [1, 2, 4])]  # prompt tokens do not count
    vocab = draft_vocabulary(train, vocab_size=10, size=2)
    assert vocab.tolist() == [1, 2]
    assert coverage(vocab, train, vocab_size=10) == pytest.approx(7 / 9)
    assert draft_vocabulary(train, 10, 3).tolist() == [1, 2, 3]  # ties (3 and 4, once each) go to the lower id
    assert draft_vocabulary(train, 10, 5).tolist() == [1, 2, 3, 4, 9]  # then prompt tokens, the answers' source
    with pytest.raises(ValueError):
        draft_vocabulary(train, 10, 0)
