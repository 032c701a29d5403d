"""Turning a client's text into prompt token ids: UTF-8 checks, chat template, length limits."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from orchestrator.errors import InvalidRequestError, prompt_too_long
from orchestrator.request_inputs import parse_bool, parse_text


def load_tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def _raise_template_error(message: str) -> None:
    raise InvalidRequestError(f"chat template: {message}")


@dataclass
class PromptEncoder:
    """Validates and tokenizes prompts for one model; owns the model's chat template."""

    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str
    eos_token: str
    max_prompt_tokens: int

    @classmethod
    def from_model_dir(cls, model_dir: Path, max_prompt_tokens: int) -> "PromptEncoder":
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}

        def token_text(key: str) -> str:
            value = config.get(key) or ""
            return value.get("content", "") if isinstance(value, dict) else value

        template_file = Path(model_dir) / "chat_template.jinja"  # where newer HF versions keep it
        chat_template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        return cls(
            tokenizer=load_tokenizer(model_dir),
            chat_template=chat_template,
            bos_token=token_text("bos_token"),
            eos_token=token_text("eos_token"),
            max_prompt_tokens=max_prompt_tokens,
        )

    def render_chat(self, user_text: str) -> str:
        """One user turn through the model's chat template, ready for the assistant's answer."""
        return self.render_messages([{"role": "user", "content": user_text}])

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        """A conversation (role/content dicts) through the model's chat template, ready for the assistant's answer."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; send apply_chat_template=false")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template failed: {exc}") from exc

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation, as `encode` gives them for a single user turn."""
        if not messages or not any(m.get("content") for m in messages):
            raise InvalidRequestError("messages are empty: no message has any content")
        return self._tokenize(self.render_messages(messages), add_special_tokens=False)

    @cached_property
    def _max_token_bytes(self) -> int:
        """The most bytes of normalized text one token can stand for: no token's text is longer (a byte-level
        token's characters are one byte each, a byte-fallback token stands for one byte)."""
        return max(len(text.encode("utf-8")) for text in self.tokenizer.get_vocab(with_added_tokens=True))

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of a prompt that fits; an over-long one is refused, one that is sure to be too long
        before it is tokenized (megabytes of text would hold the server's process for seconds)."""
        least = -(-len(text.encode("utf-8")) // self._max_token_bytes)
        normalizer = self.tokenizer.normalizer
        if least > self.max_prompt_tokens and normalizer is not None:  # the bound holds for the normalized text
            least = -(-len(normalizer.normalize_str(text).encode("utf-8")) // self._max_token_bytes)
        if least > self.max_prompt_tokens:
            raise prompt_too_long(least, self.max_prompt_tokens, at_least=True)
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if len(ids) > self.max_prompt_tokens:
            raise prompt_too_long(len(ids), self.max_prompt_tokens)
        return ids

    def encode(self, text: bytes | str, apply_chat_template: bool) -> list[int]:
        """Prompt ids, or InvalidRequestError for empty, non-UTF-8 or over-long prompts."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(f"text_input is not valid UTF-8 (byte {exc.start})") from exc
        if not text:  # whitespace is text: a raw completion may start from a newline, as vLLM allows
            raise InvalidRequestError("text_input is empty")
        if apply_chat_template:
            text = self.render_chat(text)
        return self._tokenize(text, add_special_tokens=not apply_chat_template)

    def encode_request(self, inputs: Mapping[str, np.ndarray]) -> list[int]:
        """Prompt ids from a request's `text_input` and optional `apply_chat_template` (default on)."""
        return self.encode(parse_text(inputs), parse_bool(inputs, "apply_chat_template", True))
