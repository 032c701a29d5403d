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


def _str(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def test_tensorrt_llm_inputs_take_effect():
    params = parse_sampling_params({
        "min_length": np.array([5], np.int32), "end_id": np.array([2], np.int32), "pad_id": np.array([2], np.int32),
        "random_seed": np.array([9], np.uint64), "stop_words": _str("", "END"), "bad_words": _str("", "ab cd"),
        "beam_width": np.array([1], np.int32), "return_log_probs": np.array([False]),
        "exclude_input_in_output": np.array([True]), "max_tokens": np.array([8], np.int32),
    }, encode_words=lambda w: [len(part) for part in w.split()])
    assert (params.min_tokens, params.end_ids, params.seed, params.stop) == (5, (2,), 9, ("END",))
    assert params.bad_words == ((2, 2),)


def test_vllm_sampling_parameters_take_effect():
    params = parse_sampling_params({
        "sampling_parameters": _str('{"max_tokens": "12", "min_tokens": "12", "temperature": 0.5, "top_k": -1, '
                                    '"top_p": "0.9", "seed": 4, "stop": "###", "n": 1, '
                                    '"skip_special_tokens": "true", "ignore_eos": "False"}'),  # neutral, as strings
        "exclude_input_in_output": np.array([True]), "return_num_output_tokens": np.array([True]),
    })
    assert (params.max_tokens, params.min_tokens, params.top_k, params.seed, params.stop) == (12, 12, 0, 4, ("###",))
    assert params.temperature == pytest.approx(0.5) and params.top_p == pytest.approx(0.9)


@pytest.mark.parametrize(("inputs", "message"), [
    ({"beam_width": np.array([4], np.int32)}, "beam search is not supported; beam_width must be 1, got 4"),
    ({"return_log_probs": np.array([True])}, "return_log_probs is not supported"),
    ({"repetition_penalty": np.array([1.2], np.float32)}, "repetition_penalty is not supported"),
    ({"exclude_input_in_output": np.array([False])}, "exclude_input_in_output must be true"),
    ({"seed": np.array([1], np.uint64), "random_seed": np.array([2], np.uint64)}, "seed and random_seed"),
    ({"sampling_parameters": _str("{oops")}, "sampling_parameters is not valid JSON"),
    ({"sampling_parameters": _str('{"n": 2}')}, r"sampling_parameters: n=2 is not supported"),
    ({"sampling_parameters": _str('{"use_beam_search": true}')}, "'use_beam_search' is not supported"),
    ({"sampling_parameters": _str('{"max_tokens": "lots"}')}, "max_tokens must be a number"),
    # JSON numbers beyond float64 parse as infinity, and NaN never equals a default: both refused by name
    ({"sampling_parameters": _str('{"max_tokens": 1e400}')}, "max_tokens must be a finite number, got inf"),
    ({"sampling_parameters": _str('{"top_k": "-1e400"}')}, "top_k must be a finite number"),
    ({"sampling_parameters": _str('{"temperature": NaN}')}, "temperature must be a finite number, got nan"),
    ({"sampling_parameters": _str('{"top_p": "nan"}')}, "top_p must be a finite number"),
    ({"sampling_parameters": _str('{"seed": 1' + '0' * 400 + '}')}, "seed must be a finite number"),
    ({"sampling_parameters": _str('{"top_k": 2.5}')}, "top_k must be an integer, got 2.5"),
    ({"sampling_parameters": _str('{"max_tokens": 5}'), "max_tokens": np.array([6], np.int32)},
     "max_tokens is set both as an input and in sampling_parameters"),
    ({"bad_words": _str("x")}, "bad_words needs the model's tokenizer"),
])
def test_other_conventions_refuse_by_name(inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_sampling_params(inputs)


def test_refusals_quote_values_briefly():
    """A refusal quoted every stop string it refused (5 MB for 17 long ones) and float32 artefacts."""
    with pytest.raises(InvalidRequestError) as info:
        parse_sampling_params({"stop": np.array([b"s" * 300_000] * 17, dtype=object)}).validate(2048)
    assert str(info.value) == "stop must be a list of at most 16 strings, got 17"
    with pytest.raises(InvalidRequestError, match=r"^top_p must be in \(0, 1\], got -0.1$"):
        parse_sampling_params({"top_p": np.array([-0.1], np.float32)}).validate(2048)
    with pytest.raises(InvalidRequestError) as info:
        parse_sampling_params({"sampling_parameters": _str('{"%s": 1}' % ("k" * 1000))})
    assert len(str(info.value)) < 150


@pytest.mark.parametrize("seed", ["9007199254740993", "18446744073709551615", " 7 "])
def test_integer_strings_keep_every_digit(seed):
    """A seed sent as a string is the integer it spells: past 2**53 a float would merge neighbouring seeds."""
    params = parse_sampling_params({"sampling_parameters": _str('{"seed": "%s"}' % seed)})
    assert params.seed == int(seed)
