"""Reading a generation request's named input arrays (as Triton delivers them) into engine types.

Kept free of Triton so the parsing and its error messages are unit-tested directly.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from orchestrator.errors import InvalidRequestError
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


def parse_sampling_params(inputs: Mapping[str, np.ndarray]) -> SamplingParams:
    """Optional inputs max_tokens, temperature, top_p, top_k, seed, stop; defaults otherwise."""
    values = {
        "max_tokens": _scalar(inputs, "max_tokens", "i"),
        "temperature": _scalar(inputs, "temperature", "f"),
        "top_p": _scalar(inputs, "top_p", "f"),
        "top_k": _scalar(inputs, "top_k", "i"),
        "seed": _scalar(inputs, "seed", "i"),
    }
    params = {k: v for k, v in values.items() if v is not None}
    return SamplingParams(**params, stop=_strings(inputs, "stop"))


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
