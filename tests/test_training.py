"""Training maths on tiny models: in-subset TV is the full TV, STS calibrates the cumulative
survival, a few hundred steps raise held-out acceptance, and a resumed run is the same run."""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models.drafters import build_drafter, default_config, load_drafter
from training.calibration import cumulative_survival, expected_calibration_error, sequential_calibration
from training.data import AnswerSpec, Sequence, build_dataset, generate_answers, generate_with_features
from training.layer_init import check_layers_fit, init_layers_from_target, qk_norm_gains, widened_markov
from training.losses import LossWeights, drafter_loss, subset_total_variation
from training.sources import BENCHMARK_SOURCES, build_prompts, domain_prompts, source_items, split_of
from training.train import (
    RECENT_SPANS,
    STATE_FILE,
    TrainConfig,
    block_targets,
    calibrate_confidence,
    evaluate,
    heldout_batches,
    learning_rate,
    train_drafter,
)
from training.vocab import coverage, draft_vocabulary
from tests.conftest import PROJECT_ROOT
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


def test_sequential_calibration_undoes_scale_and_shift_of_the_cumulative_survival() -> None:
    """Confidence logits off by a scale and a shift per position: the fit recovers both (a temperature
    alone cannot undo a shift) and the held-out ECE of the product falls below 2%."""
    gen = torch.Generator().manual_seed(0)
    true_logit = torch.randn(20000, 4, generator=gen) + 1.5
    accepted = torch.bernoulli(torch.sigmoid(true_logit), generator=gen).cumprod(-1)  # prefix acceptance
    scale, shift = torch.tensor([3.0, 2.0, 0.5, 1.5]), torch.tensor([1.0, -1.0, 0.5, 0.0])
    miscalibrated = true_logit * scale + shift
    temps, biases = sequential_calibration(miscalibrated[:10000], accepted[:10000])
    before = expected_calibration_error(cumulative_survival(miscalibrated[10000:], torch.ones(4)), accepted[10000:])
    after = expected_calibration_error(cumulative_survival(miscalibrated[10000:], temps, biases), accepted[10000:])
    assert after < 0.5 * before and after < 0.02
    torch.testing.assert_close(temps, scale, rtol=0.2, atol=0.0)
    torch.testing.assert_close(biases, -shift / scale, rtol=0.0, atol=0.2)


def test_prompt_splits_are_disjoint_and_deterministic() -> None:
    spec = {"chat_tmpl": 20, "math_tmpl": 20, "humaneval": 10}
    train, calib = build_prompts("train", spec), build_prompts("calib", spec)
    assert len(train) == 50 and len({p.text for p in train}) == 50  # templated texts never repeat
    assert not {p.text for p in train} & {p.text for p in calib}
    assert build_prompts("train", spec) == train
    assert {p.domain for p in train} >= {"chat", "math"}
    assert split_of("stdlib:json/decoder.py:f:1") == split_of("stdlib:json/decoder.py:f:1")


def test_a_later_set_takes_the_prompts_after_an_earlier_one() -> None:
    import click

    from cli import _source_ranges

    first = build_prompts("train", _source_ranges("chat_tmpl=12,humaneval=5"))
    later = build_prompts("train", _source_ranges("chat_tmpl=12:30,humaneval=5:9"))
    both = build_prompts("train", _source_ranges("chat_tmpl=30,humaneval=9"))
    assert len(first) == 17 and len(later) == 22 and not {p.text for p in first} & {p.text for p in later}
    assert sorted(p.text for p in first + later) == sorted(p.text for p in both)
    # templated arithmetic draws from a pool that grows with the count: still disjoint, STOP - START of them
    first, later = (build_prompts("train", _source_ranges(spec)) for spec in ("math_tmpl=40", "math_tmpl=40:100"))
    assert len(first) == 40 and len(later) == 60 and not {p.text for p in first} & {p.text for p in later}
    for bad in ("chat_tmpl", "chat_tmpl=x", "chat_tmpl=9:3", "chat_tmpl=-1", "chat_tmpl=1:2:3"):
        with pytest.raises(click.BadParameter, match="SOURCE=COUNT or SOURCE=START:STOP"):
            _source_ranges(bad)


def test_added_standard_library_sources_are_new_prompts_and_leave_the_benchmark_alone() -> None:
    first, more = source_items("stdlib", 0), source_items("stdlib_more", 0)
    assert len(more) > len(first) > 1000
    assert not {k for k, _ in first} & {k for k, _ in more}
    assert not {t for _, t in first} & {t for _, t in more}
    docs = source_items("stdlib_doc", 0)
    assert len(docs) > 500 and all(">>>" not in t and len(t) >= 300 for _, t in docs)
    # the held-out benchmark draws its fixed sources only
    assert not {"stdlib_more", "stdlib_doc"} & set(BENCHMARK_SOURCES)
    assert {p.source for p in domain_prompts("heldout", "code", 12, seed=1)} == {"stdlib", "humaneval"}


def test_training_sets_take_their_own_answer_temperatures(tmp_path) -> None:
    import click

    from cli import _train_sets

    default, own = _train_sets(("chat_tmpl=4", "stdlib_doc=3@0,0.7"), None, 32, "1", 16)
    assert default.answers.temperatures == (1.0,) and own.answers.temperatures == (0.0, 0.7)
    assert dict(own.per_source) == {"stdlib_doc": (0, 3)} and own.split == "train"
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(click.BadParameter, match="one training set"):
        _train_sets(("chat_tmpl=4", "math_tmpl=4"), tmp_path, 32, "0", 16)


def _tiny_data(target, taps, count: int, seed: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 64, (8,), generator=gen).tolist() for _ in range(count)]
    return generate_with_features(target, prompts, taps, max_new_tokens=24)


def test_features_kept_while_generating_a_batch_equal_each_sequence_decoded_alone() -> None:
    target = tiny_target()
    taps = (1, 2)
    prompts = [[5, 9, 13, 7], [11, 3, 40], [8, 8, 21, 30, 6, 17]]
    first = generate_answers(target, prompts, [0.0] * 3, max_new_tokens=10)
    # an end token drawn from row 0's answer: rows stop at different steps, row 0 after 4 tokens at most
    target.config = replace(target.config, eos_token_ids=(first[0][3],))
    seqs = generate_with_features(target, prompts, taps, max_new_tokens=10)
    answers = [s.tokens.tolist()[len(p):] for p, s in zip(prompts, seqs)]
    assert len(answers[0]) <= 4 and len({len(a) for a in answers}) > 1
    final = target.config.num_layers
    for p, a, seq in zip(prompts, answers, seqs):
        cache = target.new_cache(1, 64)
        feats, finals, lses = [], [], []
        for k, ids in enumerate([p] + [[t] for t in a[:-1]]):  # the last answer token is never fed
            res = target(torch.tensor(ids), [0], [len(ids)], cache, tap_layers=taps + (final,))
            feats.append(torch.cat([res.hidden_states[t] for t in taps], -1))
            finals.append(res.hidden_states[final][-1:])
            lses.append(torch.logsumexp(res.logits[-1:], -1))
            assert int(res.logits[-1].argmax()) == a[k]
        assert seq.prompt_len == len(p) and seq.features.shape[0] == len(p) + len(a) - 1
        torch.testing.assert_close(seq.features.float(), torch.cat(feats).half().float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(seq.final_hidden.float(), torch.cat(finals).half().float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(seq.target_lse, torch.cat(lses), atol=1e-4, rtol=1e-4)


def test_sampled_answers_follow_the_target_distribution_and_replay_from_the_seed() -> None:
    target = tiny_target()
    prompt, n = [5, 9, 13, 7], 3000
    cache = target.new_cache(1, 8)
    logits = target(torch.tensor(prompt), [0], [4], cache).logits[-1]
    for temperature in (1.0, 0.5):
        probs = torch.softmax(logits / temperature, -1)
        first = [a[0] for a in generate_answers(target, [prompt] * n, [temperature] * n, 1,
                                                torch.Generator().manual_seed(0))]
        freq = torch.bincount(torch.tensor(first), minlength=probs.numel()).float() / n
        assert (freq - probs).abs().max() < 4 * (0.25 / n) ** 0.5  # 4 sigma of the worst-case bin
    again = lambda: generate_answers(target, [prompt] * 4, [1.0] * 4, 8, torch.Generator().manual_seed(3))
    assert again() == again()
    mixed = generate_answers(target, [prompt] * 2, [0.0, 1.0], 8, torch.Generator().manual_seed(3))
    assert mixed[0] == generate_answers(target, [prompt], [0.0], 8)[0]


def test_dataset_answers_each_prompt_once_per_temperature_and_rebuilds_a_lost_shard(tmp_path) -> None:
    from training.sources import Prompt

    target = tiny_target()
    prompts = [Prompt("chat", "chat_tmpl", f"p{i}") for i in range(5)]
    encode = lambda text: [3 + int(text[1:]), 9, 17]
    spec = AnswerSpec(max_new_tokens=6, temperatures=(0.0, 1.0), batch_size=4)
    seqs = build_dataset(tmp_path, target, encode, prompts, (1,), spec, progress=False)
    assert len(seqs) == 10 and len(list(tmp_path.glob("shard-*.pt"))) == 3
    prompt_of = lambda s: tuple(s.tokens[:s.prompt_len].tolist())
    assert sorted(prompt_of(s) for s in seqs) == sorted(tuple(encode(p.text)) for p in prompts for _ in range(2))
    (tmp_path / "shard-00001.pt").unlink()
    rebuilt = build_dataset(tmp_path, target, encode, prompts, (1,), spec, progress=False)
    assert [s.tokens.tolist() for s in rebuilt] == [s.tokens.tolist() for s in seqs]


def test_dataset_workers_share_shards_by_claims(tmp_path) -> None:
    """A shard claimed by a live worker is left to it (and waited for); a dead worker's claim is taken over."""
    import socket
    import threading

    from training.sources import Prompt

    target = tiny_target()
    prompts = [Prompt("chat", "chat_tmpl", f"p{i}") for i in range(6)]
    encode = lambda text: [3 + int(text[1:]), 9, 17]
    spec = AnswerSpec(max_new_tokens=4, batch_size=2)
    reference = build_dataset(tmp_path / "ref", target, encode, prompts, (1,), spec, progress=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "shard-00000.claim").write_text(f"{socket.gethostname()} 999999999")  # its worker is gone
    (shared / "shard-00001.claim").write_text(f"{socket.gethostname()} {os.getpid()}")  # alive: another worker
    result: list = []
    worker = threading.Thread(target=lambda: result.append(
        build_dataset(shared, target, encode, prompts, (1,), spec, progress=False)))
    worker.start()
    deadline = time.monotonic() + 60
    while not (shared / "shard-00002.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.join(timeout=1)
    assert worker.is_alive() and not (shared / "shard-00001.pt").exists()  # waits for the other worker's shard
    assert (shared / "shard-00000.pt").exists() and not (shared / "shard-00000.claim").exists()
    shutil.copy(tmp_path / "ref" / "shard-00001.pt", shared / "shard-00001.pt")  # the other worker finishes
    (shared / "shard-00001.claim").unlink()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert [s.tokens.tolist() for s in result[0]] == [s.tokens.tolist() for s in reference]


def test_dataset_claims_that_name_no_worker_here(tmp_path, capsys) -> None:
    """An unreadable claim (its worker died before writing its name) is taken over once it is stale; a
    claim of another host is waited for with a message naming the shard, its holder and how to free it."""
    import socket

    from training.sources import Prompt

    target = tiny_target()
    prompts = [Prompt("chat", "chat_tmpl", f"p{i}") for i in range(6)]
    encode = lambda text: [3 + int(text[1:]), 9, 17]
    spec = AnswerSpec(max_new_tokens=4, batch_size=2)
    empty = tmp_path / "shard-00000.claim"
    empty.touch()
    os.utime(empty, (time.time() - 600, time.time() - 600))
    foreign = tmp_path / "shard-00001.claim"
    foreign.write_text(f"not-{socket.gethostname()} 4242")
    seqs = build_dataset(tmp_path, target, encode, prompts, (1,), spec, progress=False, wait=False)
    assert (tmp_path / "shard-00000.pt").exists() and not empty.exists()
    assert not (tmp_path / "shard-00001.pt").exists() and foreign.exists() and len(seqs) == 4
    err = capsys.readouterr().err
    assert f"shard-00001 (claimed by not-{socket.gethostname()} pid 4242)" in err
    assert f"delete {foreign}" in err


def test_dataset_without_waiting_leaves_other_workers_shards_and_returns(tmp_path) -> None:
    """``wait=False`` answers the unclaimed shards and returns without waiting for a live worker's,
    so a worker can go on to the next set instead of idling."""
    import socket

    from training.sources import Prompt

    target = tiny_target()
    prompts = [Prompt("chat", "chat_tmpl", f"p{i}") for i in range(6)]
    encode = lambda text: [3 + int(text[1:]), 9, 17]
    spec = AnswerSpec(max_new_tokens=4, batch_size=2)
    (tmp_path / "shard-00001.claim").write_text(f"{socket.gethostname()} {os.getpid()}")  # alive: another worker
    started = time.monotonic()
    seqs = build_dataset(tmp_path, target, encode, prompts, (1,), spec, progress=False, wait=False)
    assert time.monotonic() - started < 30
    assert (tmp_path / "shard-00000.pt").exists() and (tmp_path / "shard-00002.pt").exists()
    assert not (tmp_path / "shard-00001.pt").exists() and len(seqs) == 4


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

    # Ctrl-C ends the run at a step boundary with every step done saved (no checkpoint was due). Python's own
    # handler first: a suite started in the background inherits SIGINT ignored, which a run keeps ignored.
    import os
    import signal
    import threading

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
        long = TrainConfig(**{**short.__dict__, "steps": None, "max_minutes": 1.0})  # a run Ctrl-C missed ends, and fails
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            train_drafter(target, config, train, tmp_path / "e", long, draft_vocab=vocab, progress=False)
        timer.join()
        done = torch.load(tmp_path / "e" / STATE_FILE, weights_only=False)["step"]
        assert done > 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_run_can_start_from_another_drafters_weights(tmp_path) -> None:
    target = tiny_target()
    config = default_config("dspark", target, intermediate_size=48, markov_rank=8, draft_vocab_size=48)
    train = _tiny_data(target, config.tap_layers, 8, 0)
    cfg = TrainConfig(steps=5, batch_size=4, anchors=6, max_len=64, loss=LossWeights(ce=1.0))
    first = train_drafter(target, config, train, tmp_path / "a", cfg, draft_vocab=torch.arange(2, 50), progress=False)
    assert first["loss_weights"] == {"ce": 1.0, "l1": 0.9, "confidence": 1.0, "decay": 4.0}  # the recipe it ran
    init = {k: v.clone() for k, v in first["drafter"].state_dict().items()}
    started = train_drafter(target, config, train, tmp_path / "b", TrainConfig(**{**cfg.__dict__, "steps": 0}),
                            draft_vocab=torch.arange(2, 50), progress=False, init=init)["drafter"]
    for name, value in started.state_dict().items():
        torch.testing.assert_close(value, init[name], msg=name)
    fresh = train_drafter(target, config, train, tmp_path / "c", TrainConfig(**{**cfg.__dict__, "steps": 0}),
                          draft_vocab=torch.arange(2, 50), progress=False)["drafter"]
    assert not torch.equal(fresh.fc.weight, init["fc.weight"])


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
        torch.testing.assert_close(drafter.confidence_bias[row], torch.tensor(result[regime]["biases"]))
    assert (tmp_path / "reliability.png").exists() and (tmp_path / "calibration.json").exists()


def test_recalibrating_a_drafter_without_a_confidence_head_is_refused(tmp_path) -> None:
    from training.pipeline import SplitData, recalibrate

    (tmp_path / "config.json").write_text(default_config("dflash", tiny_target()).to_json())
    with pytest.raises(ValueError, match="no confidence head"):
        recalibrate(tmp_path, SplitData("calib", AnswerSpec(8)))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_data_generation_training_and_calibration_run_on_cuda(tmp_path) -> None:
    target = tiny_target()
    config = default_config("dspark", target, num_layers=2, intermediate_size=48, markov_rank=8, draft_vocab_size=48)
    prompts = [[5, 9, 13, 7], [11, 3, 40]]
    on_cpu = generate_answers(target, prompts, [0.0, 0.0], 12)
    gpu_target = tiny_target().cuda()
    assert generate_answers(gpu_target, prompts, [0.0, 0.0], 12) == on_cpu
    gen = torch.Generator("cuda").manual_seed(0)
    train = generate_with_features(gpu_target, prompts * 4, config.tap_layers, 24, [1.0] * 8, gen)
    assert train[0].features.device.type == "cpu"
    cfg = TrainConfig(steps=20, batch_size=4, anchors=6, max_len=64, device="cuda", eval_every=10)
    result = train_drafter(target, config, train, tmp_path, cfg, draft_vocab=torch.arange(2, 50), heldout=train,
                           progress=False)
    assert result["steps"] == 20 and result["heldout"]["tau"] > 1.0
    calibration = calibrate_confidence(result["drafter"], train, tmp_path, cfg)
    assert calibration["greedy"]["ece_after"] <= calibration["greedy"]["ece_before"] + 1e-6
    assert load_drafter(tmp_path, target).config == config


def test_drafter_layers_start_from_the_targets_top_layers() -> None:
    target = tiny_target()  # 4 layers, FFN 64
    full = build_drafter(default_config("dspark", target, num_layers=2, intermediate_size=64, markov_rank=8, qk_norm=False),
                         target)
    assert init_layers_from_target(full, target) == [2, 3]
    x = torch.randn(5, 32)
    for mine, theirs in zip(full.layers, target.layers[2:]):
        torch.testing.assert_close(torch.cat([mine.q_proj.weight, mine.k_proj.weight, mine.v_proj.weight]), theirs.qkv_proj)
        gate, up = mine.gate_up(x).chunk(2, -1)
        their_gate, their_up = (x @ theirs.gate_up_proj.T).chunk(2, -1)
        torch.testing.assert_close(mine.down(F.silu(gate) * up), (F.silu(their_gate) * their_up) @ theirs.down_proj.T)
    narrow = build_drafter(default_config("dflash", target, num_layers=1, intermediate_size=16, qk_norm=False), target)
    init_layers_from_target(narrow, target)
    strongest = target.layers[3].down_proj.norm(dim=0).topk(16).indices.sort().values
    torch.testing.assert_close(narrow.layers[0].down.weight, target.layers[3].down_proj[:, strongest])
    with pytest.raises(ValueError, match="wider"):
        init_layers_from_target(build_drafter(default_config("dspark", target, intermediate_size=96, markov_rank=8,
                                                             qk_norm=False), target), target)
    with pytest.raises(ValueError, match="q/k norms, which the target's lack"):
        init_layers_from_target(build_drafter(default_config("dspark", target, intermediate_size=64, markov_rank=8),
                                              target), target)
    with pytest.raises(ValueError, match="block drafters"):
        init_layers_from_target(build_drafter(default_config("eagle3", target, intermediate_size=64), target), target)
    with pytest.raises(ValueError, match="biases"):  # Qwen2-style q/k/v biases
        check_layers_fit(full.config, replace(target.config, attention_bias=True))


def test_qk_norms_added_to_a_trained_drafter_start_close_to_its_attention() -> None:
    """Norm gains fitted on the drafter's own forward keep its outputs close to the plain drafter's;
    unit gains (a norm added as a fresh drafter has it) change them over three times more."""
    target = tiny_target()
    plain_config = replace(default_config("dspark", target, num_layers=2, intermediate_size=48, markov_rank=8, qk_norm=False),
                           head_dim=64)  # a real head's width: the rms of a query varies less from token to token
    torch.manual_seed(0)
    plain = build_drafter(plain_config, target).eval()
    with torch.no_grad():
        for layer, scale in zip(plain.layers, (3.0, 0.3)):  # raw q/k rms far from 1, as a trained drafter's
            layer.q_proj.weight.mul_(scale)
            layer.k_proj.weight.mul_(scale)
    batches = heldout_batches(_tiny_data(target, plain_config.tap_layers, 8, 1), TrainConfig(batch_size=4, anchors=6, max_len=64),
                              plain_config.block_size)
    gains = qk_norm_gains(plain, batches[:1])
    assert sorted(gains) == ["layers.0.k_norm", "layers.0.q_norm", "layers.1.k_norm", "layers.1.q_norm"]
    normed = build_drafter(replace(plain_config, qk_norm=True), target).eval()

    def error(norms: dict[str, torch.Tensor]) -> float:
        normed.load_state_dict({**plain.state_dict(), **norms})
        with torch.no_grad():
            return max((normed.train_forward(b.features, b.tokens, b.anchors)[0]
                        - plain.train_forward(b.features, b.tokens, b.anchors)[0]).abs().max().item() for b in batches[1:])

    ones = {name: torch.ones_like(g) for name, g in gains.items()}
    assert error(gains) < 0.4 * error(ones)  # 0.29 here
    with pytest.raises(ValueError, match="already has q/k norms"):
        qk_norm_gains(normed, batches)


def test_a_widened_markov_head_starts_where_the_drafter_was_and_learns() -> None:
    """Rank 8 -> 24: the same logits and confidences at the start, and the new columns get gradients."""
    target = tiny_target()
    config = default_config("dspark", target, num_layers=1, intermediate_size=48, markov_rank=8)
    torch.manual_seed(0)
    narrow = build_drafter(config, target).eval()
    with torch.no_grad():
        narrow.markov_w2.weight.normal_(std=0.5)  # a trained head is not zero
        narrow.confidence_head.weight.normal_(std=0.5)
    wide = build_drafter(replace(config, markov_rank=24), target).eval()
    wide.load_state_dict(widened_markov(narrow.state_dict(), 24))
    batch = heldout_batches(_tiny_data(target, config.tap_layers, 4, 1), TrainConfig(batch_size=4, anchors=6, max_len=64),
                            config.block_size)[0]
    with torch.no_grad():
        for got, want in zip(wide.train_forward(batch.features, batch.tokens, batch.anchors),
                             narrow.train_forward(batch.features, batch.tokens, batch.anchors)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    logits, conf = wide.train_forward(batch.features, batch.tokens, batch.anchors)
    (logits.square().mean() + conf.square().mean()).backward()
    assert wide.markov_w2.weight.grad[:, 8:].abs().sum() > 0 and wide.confidence_head.weight.grad[:, -16:].abs().sum() > 0
    with pytest.raises(ValueError, match="rank 8 cannot be narrowed to 4"):
        widened_markov(narrow.state_dict(), 4)


def test_train_init_with_a_larger_markov_rank_widens_the_head(tmp_path, smollm2_dir) -> None:
    from click.testing import CliRunner

    import cli
    from models.drafters import save_drafter
    from models.loading import load_transformer

    target = load_transformer(smollm2_dir)
    save_drafter(build_drafter(default_config("dspark", target, "smollm2-135m-instruct", num_layers=1, intermediate_size=32,
                                              markov_rank=4, draft_vocab_size=0), target), tmp_path / "r4")
    small = ["--train-prompts", "chat_tmpl=2", "--calib-prompts", "chat_tmpl=2", "--max-new-tokens", "16",
             "--answer-temperatures", "0", "--eval-every", "0", "--threads", "1", "--steps", "1", "--init", str(tmp_path / "r4")]
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--markov-rank", "12", "--out", str(tmp_path / "r12")]
                           + small)
    assert result.exit_code == 0, result.output
    assert load_drafter(tmp_path / "r12", target).config.markov_rank == 12
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--markov-rank", "2", "--out", str(tmp_path / "r2")]
                           + small)
    assert result.exit_code == 1 and "Markov head of rank 4 cannot be narrowed to 2" in result.output, result.output
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--out", str(tmp_path / "same")] + small)
    assert result.exit_code == 0 and load_drafter(tmp_path / "same", target).config.markov_rank == 4, result.output


def test_train_refuses_target_layers_it_cannot_take_with_a_one_line_error(tmp_path, smollm2_dir) -> None:
    from click.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.cli, ["train", "--drafter", "eagle3", "--layers-from-target", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # click's error, not a traceback
    assert "Error: --layers-from-target: only block drafters (dspark, dflash) take the target's layers" in result.output
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_out_directory_it_would_overwrite(tmp_path, smollm2_dir) -> None:
    """A shipped drafter (weights, no training state) or any other file or non-empty directory as --out is
    refused before any data loads, and left as it was."""
    import shutil

    from click.testing import CliRunner

    import cli

    shipped = tmp_path / "shipped"
    shutil.copytree(PROJECT_ROOT / "models" / "checkpoints" / "smollm2-135m-instruct-dspark", shipped)
    before = {p.name: p.read_bytes() for p in shipped.iterdir() if p.is_file()}
    (tmp_path / "file").write_text("x")
    for out in (shipped, tmp_path / "file"):
        result = CliRunner().invoke(cli.cli, ["train", "--drafter", "dspark", "--steps", "1", "--out", str(out)])
        assert result.exit_code == 1 and "nor a run to resume" in result.output, result.output
    assert {p.name: p.read_bytes() for p in shipped.iterdir() if p.is_file()} == before


def test_train_resumes_only_its_own_run_and_checks_its_options(tmp_path, smollm2_dir) -> None:
    """A rerun into --out continues the saved run only with the same drafter, schedule options and data
    (else a message, nothing trained); a run killed before its first state was saved starts again in its
    directory; options out of range and answers too short for a block end in messages."""
    from click.testing import CliRunner

    import cli
    from training.train import RUN_MARKER

    small = ["--train-prompts", "chat_tmpl=2", "--calib-prompts", "chat_tmpl=2", "--max-new-tokens", "16",
             "--answer-temperatures", "0", "--layers", "1", "--intermediate-size", "32", "--markov-rank", "4",
             "--draft-vocab", "0", "--eval-every", "0", "--threads", "1"]
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--steps", "2", "--out", str(run)] + small)
    assert result.exit_code == 0, result.output
    weights = (run / "model.safetensors").read_bytes()
    for args, message in (
            (["--drafter", "dspark", "--steps", "2", "--lr", "1e-4"], "holds a run with other lr (lr: 0.002 then, 0.0001 now)"),
            (["--drafter", "dspark", "--steps", "3"], "holds a run with other steps"),
            (["--drafter", "dflash", "--steps", "2"], "holds a run of another drafter (dspark for 'smollm2-135m-instruct'")):
        result = runner.invoke(cli.cli, ["train", *args, "--out", str(run)] + small)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert (run / "model.safetensors").read_bytes() == weights
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--steps", "2", "--out", str(run)] + small)
    assert result.exit_code == 0 and '"steps": 2' in result.output, result.output  # the same run: resumed, done

    shipped = tmp_path / "shipped"  # a finished run without its state (as gpu_train.sh ships one) is not a run
    shipped.mkdir()
    for name in (RUN_MARKER, "model.safetensors", "config.json"):
        (shipped / name).write_bytes((run / name).read_bytes() if (run / name).is_file() else b"")
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--steps", "2", "--out", str(shipped)] + small)
    assert result.exit_code == 1 and "nor a run to resume" in result.output, result.output

    killed = tmp_path / "killed"  # killed while writing its first state: the marker and a partial file
    killed.mkdir()
    (killed / RUN_MARKER).touch()
    (killed / "training_state.tmp").write_bytes(b"partial")
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--steps", "2", "--out", str(killed)] + small)
    assert result.exit_code == 0 and (killed / "training_state.pt").is_file(), result.output

    for args in (["--checkpoint-every", "0"], ["--steps", "0"], ["--max-minutes", "0"], ["--lr", "-1"],
                 ["--block-size", "0"], ["--layers", "0"], ["--ce-weight", "-1"], ["--draft-vocab", "-1"]):
        result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", *args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and "Invalid value" in result.output, (args, result.output)
    result = runner.invoke(cli.cli, ["train", "--drafter", "eagle3", "--layers", "3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "an EAGLE-3-style drafter has one layer, not 3" in result.output
    result = runner.invoke(cli.cli, ["train", "--drafter", "dspark", "--steps", "2", "--block-size", "16",
                                     "--out", str(tmp_path / "x")] + small[:-2] + ["--max-new-tokens", "8"])
    assert result.exit_code == 1 and "holds a whole block (17 answer tokens)" in result.output, result.output
    assert not (tmp_path / "x" / "training_state.pt").exists()


def test_train_refuses_to_take_q_k_norms_out_of_a_drafter_that_has_them(tmp_path, smollm2_dir) -> None:
    from click.testing import CliRunner

    import cli
    from models.drafters import save_drafter
    from models.loading import load_transformer

    target = load_transformer(smollm2_dir)
    save_drafter(build_drafter(default_config("dspark", target, "smollm2-135m-instruct", intermediate_size=64, markov_rank=8),
                               target), tmp_path / "normed")
    result = CliRunner().invoke(cli.cli, ["train", "--drafter", "dspark", "--init", str(tmp_path / "normed"),
                                          "--no-qk-norm", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "q/k norms: they cannot be taken out" in result.output
    assert not (tmp_path / "run").exists()


def test_recent_attention_reports_the_share_on_the_positions_just_before_each_anchor() -> None:
    """With zero queries a block's attention is uniform over what it sees: the a context positions
    before its anchor and its own W slots, so the last d positions hold min(d, a) / (a + W)."""
    target = tiny_target()
    config = default_config("dspark", target, num_layers=2, intermediate_size=48, markov_rank=8)
    torch.manual_seed(0)
    drafter = build_drafter(config, target)
    for layer in drafter.layers:
        torch.nn.init.zeros_(layer.q_proj.weight)
    cfg = TrainConfig(batch_size=4, anchors=6, max_len=64)
    batches = heldout_batches(_tiny_data(target, config.tap_layers, 8, 1), cfg, config.block_size)
    W = config.block_size
    expected = {}
    for span in RECENT_SPANS:
        shares = [min(span, int(a)) / (int(a) + W) for b in batches for a, w in zip(b.anchors.flatten(), b.weight.flatten()) if w > 0]
        expected[f"last_{span}"] = sum(shares) / len(shares)
    figures = evaluate(drafter, batches, cfg)["recent_attention"]
    for name, share in expected.items():
        assert figures[name] == pytest.approx([share] * config.num_layers, abs=1e-4)
    assert 0 < expected["last_1"] < expected["last_16"] < 1


def test_bf16_training_scores_the_target_in_bf16_close_to_float32(tmp_path) -> None:
    """Under bf16 autocast the target's log-probabilities come from a bf16 product (as the target
    computed them when it answered): within bf16 rounding of float32's, same labels, and a bf16 run trains."""
    target = tiny_target()
    config = default_config("dspark", target, num_layers=2, intermediate_size=48, markov_rank=8, draft_vocab_size=48)
    data = _tiny_data(target, config.tap_layers, 8, 0)
    cfg = TrainConfig(steps=20, batch_size=4, anchors=6, lr=3e-3, warmup=5, checkpoint_every=1000, max_len=64, bf16=True)
    result = train_drafter(target, config, data, tmp_path, cfg, draft_vocab=torch.arange(2, 50), progress=False)
    batch = heldout_batches(data, cfg, config.block_size)[0]
    labels, exact = block_targets(result["drafter"], batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same, fast = block_targets(result["drafter"], batch)
    assert fast.dtype == torch.float32 and torch.equal(labels, same)
    assert (fast - exact).abs().max() < 0.05 * exact.abs().max() and not torch.equal(fast, exact)
    assert result["steps"] == 20 and math.isfinite(result["final"]["loss"])


def _resident_anon_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_release_free_heap_returns_pages_held_under_a_live_chunk() -> None:
    """Freed heap chunks below a live one stay resident (what grew training runs to 20 GB) until
    release_free_heap hands their pages back."""
    import ctypes
    import ctypes.util

    from training.heap import release_free_heap

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("the C library is not glibc")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 100 * 1024, 400  # under glibc's 128 KiB mmap threshold: heap chunks, 40 MB in all
    chunks = [libc.malloc(size) for _ in range(count)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, size)
    pin = chunks.pop()  # the last one, at the heap's top, stays live: free() alone cannot shrink the heap past it
    for chunk in chunks:
        libc.free(chunk)
    before = _resident_anon_kb()
    assert release_free_heap()
    released_kb = before - _resident_anon_kb()
    libc.free(pin)
    assert released_kb > 30 * 1024, f"only {released_kb} KiB returned of ~40 MB freed"


def test_prompt_and_temperature_specs_are_checked_before_anything_is_written(tmp_path) -> None:
    from click.testing import CliRunner

    import cli

    runner = CliRunner()
    result = runner.invoke(cli.cli, ["prompts", "--calib-prompts", "bogus=3", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "unknown source 'bogus'" in result.output
    assert not (tmp_path / "p").exists()
    for temperatures in ("abc", "-1", "nan"):
        result = runner.invoke(cli.cli, ["train-data", f"--answer-temperatures={temperatures}"])
        assert result.exit_code == 2 and "expected numbers >= 0" in result.output, temperatures

    result = runner.invoke(cli.cli, ["train-data", "--train-prompts", "chat_tmpl=0"])
    assert result.exit_code == 2 and "selects no prompts" in result.output


def test_prompt_files_are_checked_before_any_answer(tmp_path, smollm2_dir) -> None:
    """`prompts` refuses a selection that gives a split no prompts and an --out it cannot create;
    train-data refuses a prompts dir whose files are empty, malformed or hold a prompt too long for
    the target (before answering any), and counts given beside --prompts-dir."""
    import json

    from click.testing import CliRunner

    import cli

    runner = CliRunner()
    (tmp_path / "file").write_text("x")
    for args, message in ((["--train-prompts", "stdlib=0:0", "--out", str(tmp_path / "p")], "selects no"),
                          (["--train-prompts", "chat_tmpl=2", "--out", str(tmp_path / "file" / "sub")], "cannot create")):
        result = runner.invoke(cli.cli, ["prompts", "--calib-prompts", "chat_tmpl=2", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "p").exists()

    good = [{"domain": "chat", "source": "chat_tmpl", "text": "Say hi."}]
    for name, train, message in (("empty", [], "holds no prompts"), ("broken", "{oops", "is not a prompt list"),
                                 ("keys", [{"text": "no domain"}], "is not a prompt list"),
                                 ("long", [{"domain": "chat", "source": "x", "text": "word " * 5000}],
                                  "prompt 1 of the train set (x)")):
        d = tmp_path / name
        d.mkdir()
        (d / "calib.json").write_text(json.dumps(good))
        (d / "train.json").write_text(train if isinstance(train, str) else json.dumps(train))
        result = runner.invoke(cli.cli, ["train-data", "--prompts-dir", str(d), "--max-new-tokens", "4", "--threads", "1"])
        assert result.exit_code in (1, 2) and message in result.output, (name, result.output)
        assert isinstance(result.exception, SystemExit), (name, result.exception)
    result = runner.invoke(cli.cli, ["train-data", "--prompts-dir", str(tmp_path / "long"), "--train-prompts", "stdlib=5"])
    assert result.exit_code == 2 and "takes only '@TEMPERATURES' with --prompts-dir" in result.output
    (tmp_path / "good").mkdir()
    for split in ("train", "calib"):
        (tmp_path / "good" / f"{split}.json").write_text(json.dumps(good))
    result = runner.invoke(cli.cli, ["train-data", "--prompts-dir", str(tmp_path / "good"), "--train-prompts", "@0",
                                     "--max-new-tokens", "4", "--threads", "1"])
    assert result.exit_code == 0 and "train: 1 answers" in result.output, result.output

    import shutil  # answers shorter than a block give calibration nothing to fit

    shutil.copytree(PROJECT_ROOT / "models" / "checkpoints" / "smollm2-135m-instruct-dspark", tmp_path / "drafter")
    result = runner.invoke(cli.cli, ["calibrate", "--drafter", str(tmp_path / "drafter"), "--calib-prompts",
                                     "chat_tmpl=2", "--max-new-tokens", "4", "--threads", "1"])
    assert result.exit_code == 1 and "no calib answer holds a whole block (8 answer tokens)" in result.output


def test_a_directory_that_holds_no_drafter_is_refused_by_name(tmp_path, smollm2_dir) -> None:
    """train --init and calibrate --drafter on a model directory (or an empty one) say so, not KeyError."""
    from click.testing import CliRunner

    import cli

    for args in (["train", "--drafter", "dspark", "--init", str(smollm2_dir), "--out", str(tmp_path / "run")],
                 ["calibrate", "--drafter", str(tmp_path)]):
        result = CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 1 and "holds no saved drafter" in result.output, (args, result.output)
