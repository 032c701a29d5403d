"""Incremental detokenization and stop strings, on the real default tokenizer."""
from __future__ import annotations

import pytest

from orchestrator.detokenizer import IncrementalDetokenizer
from orchestrator.prompting import load_tokenizer
from orchestrator.stop_strings import StopStringMatcher

TEXTS = [
    "Hello world, this is plain ASCII text.",
    "Grüße aus Köln — naïve café, 東京タワー and emoji 🚀🔥 mixed in.",
    "def f(x):\n    return x ** 2  # 二乗\n",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode_and_never_split_characters(tokenizer, text):
    prompt = tokenizer.encode("Say something:").ids
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push([t]) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_multi_token_pushes_match_single_token_pushes(tokenizer):
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False).ids
    one = IncrementalDetokenizer(tokenizer, [])
    three = IncrementalDetokenizer(tokenizer, [])
    a = "".join(one.push([t]) for t in ids) + one.flush()
    b = "".join(three.push(ids[i:i + 3]) for i in range(0, len(ids), 3)) + three.flush()
    assert a == b == tokenizer.decode(ids)


def test_emoji_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("🚀", add_special_tokens=False).ids
    assert len(ids) > 1, "this test needs a character spanning several byte tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push(ids[:1]) == ""
    assert "".join(detok.push([t]) for t in ids[1:]) == "🚀"


def test_stop_string_split_across_deltas_is_caught_and_not_emitted():
    matcher = StopStringMatcher(["</end>"])
    out = [matcher.feed(d) for d in ["Answer: 4", "2 </e", "nd> trailing"]]
    assert "".join(out) == "Answer: 42 "
    assert matcher.stopped
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_be_one():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST") == "go "
    assert matcher.feed("ART") == "START"
    assert matcher.feed("S") == ""
    assert matcher.flush() == "S"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["\n\n", "."])
    assert matcher.feed("One. Two\n\n") == "One"


def test_stop_strings_ending_before_stops_count_do_not_stop():
    # the first "." ends in text fed before stops count (min_tokens); ".\n" begins there but ends after
    matcher = StopStringMatcher([".", ".\n"])
    assert matcher.feed("One. Two.", can_stop=False) == "One. Two"
    assert matcher.feed("\nThree.") == "" and matcher.stopped


def test_stop_string_wholly_held_before_stops_count_is_skipped_once_they_do():
    # "ab" lies inside held-back text (a prefix of "xabz") when stops start to count: it ended too early
    matcher = StopStringMatcher(["ab", "xabz"])
    assert matcher.feed("1 xab", can_stop=False) == "1 "
    assert matcher.feed("c ab") == "xabc " and matcher.stopped


def test_prompt_ending_inside_a_character_streams_the_decode_of_the_output(tokenizer):
    rocket = tokenizer.encode("🚀", add_special_tokens=False).ids
    prompt = tokenizer.encode("Say it: ", add_special_tokens=False).ids + rocket[:1]
    output = rocket[1:] + tokenizer.encode(" lift-off, then 東京 ✓", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join(detok.push([t]) for t in output) + detok.flush()
    assert streamed == tokenizer.decode(output, skip_special_tokens=True)
