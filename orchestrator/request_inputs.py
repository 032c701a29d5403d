"""Reading a generation request's named input arrays (as Triton delivers them) into engine types.

Kept free of Triton so the parsing and its error messages are unit-tested directly.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

import numpy as np

from orchestrator.errors import InvalidRequestError, brief
from orchestrator.policies import SpeculationParams
from orchestrator.sampling import SamplingParams


def _scalar(inputs: Mapping[str, np.ndarray], name: str, kind: str):
    """The single value of an optional scalar input, or None; `kind` is a numpy kind ('i', 'f', 'b')."""
    array = inputs.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequestError(f"{name} must hold exactly one value, got {array.size}")
    ok_kinds = {"i": "iu", "f": "fiu", "b": "b"}[kind]
    if array.dtype.kind not in ok_kinds:
        raise InvalidRequestError(f"{name} has the wrong type {array.dtype}")
    return array.reshape(-1)[0].item()


def _strings(inputs: Mapping[str, np.ndarray], name: str) -> tuple[str, ...]:
    array = inputs.get(name)
    if array is None:
        return ()
    out = []
    for item in array.reshape(-1):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(f"{name} is not valid UTF-8") from exc
        out.append(str(item))
    return tuple(out)


# Inputs of the TensorRT-LLM ensemble and vLLM backend conventions we accept only at their neutral value:
# name -> (value that changes nothing, what a client gets told otherwise)
NEUTRAL_INPUTS: dict[str, tuple[object, str]] = {
    "beam_width": (1, "beam search is not supported; beam_width must be 1"),
    "num_return_sequences": (1, "one sequence per request; num_return_sequences must be 1"),
    "repetition_penalty": (1.0, "repetition_penalty is not supported; it must be 1.0"),
    "presence_penalty": (0.0, "presence_penalty is not supported; it must be 0"),
    "frequency_penalty": (0.0, "frequency_penalty is not supported; it must be 0"),
    "length_penalty": (1.0, "length_penalty (beam search) is not supported; it must be 1.0"),
    "return_log_probs": (False, "return_log_probs is not supported; log probabilities are not returned"),
    "return_context_logits": (False, "return_context_logits is not supported"),
    "return_generation_logits": (False, "return_generation_logits is not supported"),
    "return_logprobs": (False, "return_logprobs is not supported; log probabilities are not returned"),
    "return_cumulative_logprob": (False, "return_cumulative_logprob is not supported"),
    "exclude_input_in_output": (True, "exclude_input_in_output must be true: outputs never repeat the prompt"),
}
# Inputs whose answer is always there (finish_reason, num_prompt_tokens, num_output_tokens): any value is fine.
ALWAYS_RETURNED = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")

# vLLM SamplingParams keys read from the `sampling_parameters` JSON -> our name and type
_VLLM_KEYS: dict[str, tuple[str, type]] = {
    "max_tokens": ("max_tokens", int), "temperature": ("temperature", float), "top_p": ("top_p", float),
    "top_k": ("top_k", int), "seed": ("seed", int), "min_tokens": ("min_tokens", int),
}
_VLLM_NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                 "logprobs": None, "prompt_logprobs": None, "ignore_eos": False, "skip_special_tokens": True}


def _coerce(name: str, value: object, kind: type) -> object:
    """A JSON value as `kind`; vLLM accepts numbers sent as strings (genai-perf sends "max_tokens": "64").
    An integer string is read as an integer (a seed past 2**53 keeps every digit). Infinities (JSON
    numbers beyond float64 parse as one) and NaN are refused by name."""
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass  # "12.0", "1e3": read as a number below
    try:
        if isinstance(value, bool):
            raise TypeError
        if not isinstance(value, (str, int, float)):
            raise TypeError
        try:
            number = float(value)
        except OverflowError:  # an integer literal beyond float64
            number = math.inf
    except (TypeError, ValueError):
        raise InvalidRequestError(f"sampling_parameters: {name} must be a number, got {brief(value)}") from None
    if not math.isfinite(number):
        raise InvalidRequestError(f"sampling_parameters: {name} must be a finite number, got {brief(number)}")
    if kind is int:
        if number != int(number):
            raise InvalidRequestError(f"sampling_parameters: {name} must be an integer, got {brief(value)}")
        return value if isinstance(value, int) else int(number)
    return number


def _vllm_sampling(inputs: Mapping[str, np.ndarray]) -> dict[str, object]:
    """The vLLM backend's `sampling_parameters` JSON string -> our parameter names (unknown keys are refused)."""
    texts = _strings(inputs, "sampling_parameters")
    if not texts:
        return {}
    if len(texts) != 1:
        raise InvalidRequestError(f"sampling_parameters must hold exactly one JSON string, got {len(texts)}")
    try:
        given = json.loads(texts[0]) if texts[0].strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"sampling_parameters is not valid JSON: {exc}") from exc
    if not isinstance(given, dict):
        raise InvalidRequestError("sampling_parameters must be a JSON object")
    out: dict[str, object] = {}
    for key, value in given.items():
        if key in _VLLM_KEYS:
            name, kind = _VLLM_KEYS[key]
            if value is not None:
                out[name] = _coerce(key, value, kind)
        elif key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise InvalidRequestError("sampling_parameters: stop must be a string or a list of strings")
            out["stop"] = tuple(stops)
        elif key in _VLLM_NEUTRAL:
            neutral = _VLLM_NEUTRAL[key]
            # numbers and booleans may come as strings, as vLLM allows ("0", "true" or "True")
            if value is not None and value != neutral and not (neutral is not None
                                                               and str(value).lower() == str(neutral).lower()):
                raise InvalidRequestError(f"sampling_parameters: {key}={brief(value)} is not supported "
                                          f"(only {neutral!r})")
        else:
            raise InvalidRequestError(f"sampling_parameters: {brief(key)} is not supported")
    if out.get("top_k") == -1:  # vLLM's "off"
        out["top_k"] = 0
    return out


def _check_neutral(inputs: Mapping[str, np.ndarray]) -> None:
    for name, (neutral, message) in NEUTRAL_INPUTS.items():
        kind = "b" if isinstance(neutral, bool) else "f" if isinstance(neutral, float) else "i"
        value = _scalar(inputs, name, kind)
        if value is not None and value != neutral:
            raise InvalidRequestError(f"{message}, got {brief(value)}")
    for name in ALWAYS_RETURNED:
        _scalar(inputs, name, "b")


def parse_sampling_params(inputs: Mapping[str, np.ndarray],
                          encode_words: Callable[[str], list[int]] | None = None) -> SamplingParams:
    """Our inputs (max_tokens, temperature, top_p, top_k, seed, stop) plus those of the TensorRT-LLM
    ensemble (min_length, end_id, pad_id, random_seed, stop_words, bad_words, ...) and of the vLLM backend
    (sampling_parameters JSON, exclude_input_in_output); defaults otherwise. `encode_words` tokenizes
    bad_words (required when they are sent). The same value given twice differently is refused."""
    _check_neutral(inputs)
    values = {
        "max_tokens": _scalar(inputs, "max_tokens", "i"),
        "temperature": _scalar(inputs, "temperature", "f"),
        "top_p": _scalar(inputs, "top_p", "f"),
        "top_k": _scalar(inputs, "top_k", "i"),
        "seed": _scalar(inputs, "seed", "i"),
        "min_tokens": _scalar(inputs, "min_length", "i"),
    }
    random_seed = _scalar(inputs, "random_seed", "i")
    if random_seed is not None:
        if values["seed"] not in (None, random_seed):
            raise InvalidRequestError("seed and random_seed are both set, to different values")
        values["seed"] = random_seed
    _scalar(inputs, "pad_id", "i")  # outputs are never padded: nothing to pad with it
    end_id = _scalar(inputs, "end_id", "i")
    params: dict[str, object] = {k: v for k, v in values.items() if v is not None}
    # TensorRT-LLM clients send [""] for "no stop words / bad words"
    stop = tuple(s for s in _strings(inputs, "stop") + _strings(inputs, "stop_words") if s)
    for key, value in _vllm_sampling(inputs).items():
        if key == "stop":
            stop += tuple(value)
        elif params.get(key, value) != value:
            raise InvalidRequestError(f"{key} is set both as an input and in sampling_parameters, to different values")
        else:
            params[key] = value
    words = [w for w in _strings(inputs, "bad_words") if w]
    if words and encode_words is None:
        raise InvalidRequestError("bad_words needs the model's tokenizer")
    bad_words = tuple(tuple(encode_words(w)) for w in words) if words else ()
    return SamplingParams(**params, stop=stop, bad_words=bad_words,
                          end_ids=None if end_id is None else (end_id,))


def parse_speculation(inputs: Mapping[str, np.ndarray], default: SpeculationParams) -> SpeculationParams:
    """Optional inputs spec_mode and num_draft_tokens, falling back to the server's default."""
    modes = _strings(inputs, "spec_mode")
    if len(modes) > 1:
        raise InvalidRequestError(f"spec_mode must hold exactly one value, got {len(modes)}")
    k = _scalar(inputs, "num_draft_tokens", "i")
    return SpeculationParams(
        mode=modes[0] if modes else default.mode,
        num_draft_tokens=default.num_draft_tokens if k is None else k,
    )


def parse_bool(inputs: Mapping[str, np.ndarray], name: str, default: bool) -> bool:
    value = _scalar(inputs, name, "b")
    return default if value is None else bool(value)


def refuse_parameters(parameters: str) -> None:
    """Triton's HTTP generate endpoints turn a JSON key that names no input of the model into a request
    parameter, which nothing here reads: refuse it by name, as gRPC refuses an undeclared input.
    ``parameters``: the request's parameters as Triton hands them over (a JSON object, "" for none)."""
    given = json.loads(parameters) if parameters and parameters.strip() else {}
    if given:
        raise InvalidRequestError(f"unexpected input{'s' if len(given) > 1 else ''} {', '.join(sorted(given))}: "
                                  "not an input of this model (its config.pbtxt lists them)")


def check_one_prompt(inputs: Mapping[str, np.ndarray]) -> None:
    """A request carries its prompt as text_input or as input_ids, never both (which one would it mean?)."""
    if "text_input" in inputs and "input_ids" in inputs:
        raise InvalidRequestError("text_input and input_ids are both set: send the prompt as one of them")


def parse_prompt_ids(inputs: Mapping[str, np.ndarray]) -> list[int]:
    array = inputs.get("input_ids")
    if array is None:
        raise InvalidRequestError("input_ids is required")
    if array.dtype.kind not in "iu":
        raise InvalidRequestError(f"input_ids has the wrong type {array.dtype}")
    return [int(t) for t in array.reshape(-1)]


def parse_text(inputs: Mapping[str, np.ndarray]) -> bytes:
    """The raw prompt bytes (UTF-8 is checked where the prompt is decoded)."""
    array = inputs.get("text_input")
    if array is None:
        raise InvalidRequestError("text_input is required")
    if array.size != 1:
        raise InvalidRequestError(f"text_input must hold exactly one string, got {array.size}")
    value = array.reshape(-1)[0]
    if isinstance(value, str):
        return value.encode("utf-8")
    if not isinstance(value, bytes):
        raise InvalidRequestError("text_input must be a string")
    return value
