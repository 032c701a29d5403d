"""Parsing Triton input arrays into engine requests, with clear errors for bad types."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.errors import InvalidRequestError
from orchestrator.request_inputs import parse_bool, parse_prompt_ids, parse_sampling_params, parse_text


def test_defaults_when_optional_inputs_are_absent():
    params = parse_sampling_params({})
    assert params.greedy and params.stop == ()


def test_values_are_read_from_one_element_arrays():
    params = parse_sampling_params({
        "max_tokens": np.array([7], np.int32), "temperature": np.array([0.5], np.float32),
        "top_p": np.array([0.9], np.float32), "top_k": np.array([40], np.int32),
        "seed": np.array([3], np.uint64), "stop": np.array([b"\n", "###".encode()], dtype=object),
    })
    assert (params.max_tokens, params.top_k, params.seed, params.stop) == (7, 40, 3, ("\n", "###"))
    assert params.temperature == pytest.approx(0.5) and params.top_p == pytest.approx(0.9)


@pytest.mark.parametrize(("inputs", "message"), [
    ({"max_tokens": np.array([1.5], np.float32)}, "max_tokens has the wrong type"),
    ({"max_tokens": np.array([1, 2], np.int32)}, "exactly one value"),
    ({"temperature": np.array([True])}, "temperature has the wrong type"),
    ({"stop": np.array([b"\xff"], dtype=object)}, "stop is not valid UTF-8"),
])
def test_bad_inputs_name_the_input(inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_sampling_params(inputs)


def test_prompt_ids_and_text():
    assert parse_prompt_ids({"input_ids": np.array([1, 2, 3], np.int32)}) == [1, 2, 3]
    with pytest.raises(InvalidRequestError, match="input_ids has the wrong type"):
        parse_prompt_ids({"input_ids": np.array([1.0], np.float32)})
    with pytest.raises(InvalidRequestError, match="input_ids is required"):
        parse_prompt_ids({})
    assert parse_text({"text_input": np.array([b"hi"], dtype=object)}) == b"hi"
    with pytest.raises(InvalidRequestError, match="exactly one string"):
        parse_text({"text_input": np.array([b"a", b"b"], dtype=object)})
    assert parse_bool({}, "stream", True) is True
    assert parse_bool({"stream": np.array([False])}, "stream", True) is False
