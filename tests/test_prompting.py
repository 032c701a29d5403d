"""Prompt length limits: a text sure to be too long is refused before it is tokenized, and never one that fits."""
from __future__ import annotations

import pytest

from orchestrator.errors import InvalidRequestError
from orchestrator.prompting import PromptEncoder


class CountingTokenizer:
    """The real tokenizer, counting encode calls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoded = 0

    def encode(self, *args, **kwargs):
        self.encoded += 1
        return self.tokenizer.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture
def encoder(smollm2_dir):
    encoder = PromptEncoder.from_model_dir(smollm2_dir, max_prompt_tokens=2047)
    encoder.tokenizer = CountingTokenizer(encoder.tokenizer)
    return encoder


def test_megabytes_of_text_are_refused_without_tokenizing(encoder) -> None:
    """Seen: a 5 MB prompt held the engine's process for 1.8 s (every stream stalled) just to be counted."""
    with pytest.raises(InvalidRequestError, match=r"prompt is at least \d+ tokens; at most 2047 fit"):
        encoder.encode("word " * 1_000_000, apply_chat_template=True)
    with pytest.raises(InvalidRequestError, match="prompt is at least"):
        encoder.encode_messages([{"role": "user", "content": "word " * 1_000_000}])
    assert encoder.tokenizer.encoded == 0
    with pytest.raises(InvalidRequestError, match=r"prompt is \d+ tokens; at most 2047 fit"):  # counted exactly
        encoder.encode("word " * 3000, apply_chat_template=True)


def test_the_bound_never_refuses_a_prompt_that_fits(encoder) -> None:
    """The bound divides the text's bytes by the longest token's: texts made of the longest tokens are the
    closest it comes, and still tokenize to no fewer tokens than it says."""
    vocab = encoder.tokenizer.get_vocab(with_added_tokens=True)
    longest = sorted(vocab, key=lambda t: len(t.encode()), reverse=True)[:5]
    decode = encoder.tokenizer.decode
    texts = [decode([vocab[t]]) * 40 for t in longest] + ["🚀" * 500, "東京 " * 400, " " * 5000, "a\u0301" * 900]
    for text in texts:
        tokens = len(encoder.tokenizer.encode(text, add_special_tokens=False).ids)
        small = PromptEncoder(encoder.tokenizer, None, "", "", max_prompt_tokens=tokens)
        assert small.encode(text, apply_chat_template=False), text[:40]  # exactly at the limit: accepted
        small.max_prompt_tokens = tokens - 1
        with pytest.raises(InvalidRequestError, match=f"prompt is {tokens} tokens"):  # counted, not bounded
            small.encode(text, apply_chat_template=False)
