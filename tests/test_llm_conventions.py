"""The ensemble speaks the TensorRT-LLM ensemble's and the vLLM backend's inputs, through a real Triton:
each takes effect on the answer, or is refused by name; the server keeps serving."""
from __future__ import annotations

import json

import pytest

from clients.generation import GenerationError, generate_http

pytestmark = pytest.mark.server

PROMPT = "What is 2+2?"


@pytest.fixture(scope="module")
def plain(triton):
    return generate_http(triton.http, PROMPT, model="ensemble", max_tokens=24, temperature=0.0)


def test_tensorrt_llm_inputs_take_effect(triton, plain):
    assert plain.finish_reason == "stop" and plain.num_output_tokens < 20  # it ends on its own
    longer = generate_http(triton.http, PROMPT, model="ensemble", max_tokens=24, min_length=20, temperature=0.0,
                           end_id=2, pad_id=2, beam_width=1, random_seed=1, return_log_probs=False,
                           exclude_input_in_output=True, stop_words=[""], bad_words=[""])
    assert longer.num_output_tokens >= 20
    word = plain.text.split()[-1].strip(".")  # the answer's last word, banned
    banned = generate_http(triton.http, PROMPT, model="ensemble", max_tokens=24, temperature=0.0,
                           bad_words=[f" {word}", word])
    assert word not in banned.text and banned.text != plain.text
    stopped = generate_http(triton.http, PROMPT, model="ensemble", max_tokens=24, temperature=0.0,
                            stop_words=[plain.text.split()[2]])
    assert stopped.finish_reason == "stop" and plain.text.startswith(stopped.text) and stopped.text != plain.text


def test_end_id_ends_the_answer_at_that_token(triton, plain):
    end = plain.token_ids[3]
    ended = generate_http(triton.http, PROMPT, model="ensemble", max_tokens=24, temperature=0.0, end_id=end)
    assert ended.token_ids == plain.token_ids[:3] and ended.finish_reason == "stop"


def test_vllm_sampling_parameters_take_effect(triton, plain):
    params = json.dumps({"max_tokens": "20", "min_tokens": "20", "temperature": 0, "top_k": -1})
    out = generate_http(triton.http, PROMPT, model="ensemble", sampling_parameters=params,
                        exclude_input_in_output=True, return_num_output_tokens=True)
    assert out.num_output_tokens == 20 and out.text.startswith(plain.text)


@pytest.mark.parametrize(("params", "message"), [
    ({"beam_width": 2}, "beam search is not supported; beam_width must be 1, got 2"),
    ({"return_log_probs": True}, "return_log_probs is not supported"),
    ({"repetition_penalty": 1.3}, "repetition_penalty is not supported"),
    ({"exclude_input_in_output": False}, "exclude_input_in_output must be true"),
    ({"min_length": 30, "max_tokens": 8}, r"min_tokens \(min_length\) must be an integer in \[0, max_tokens=8\]"),
    ({"end_id": 10**8}, "end_id must be in"),
    ({"sampling_parameters": '{"n": 3}'}, "sampling_parameters: n=3 is not supported"),
    ({"sampling_parameters": '{"use_beam_search": true}'}, "sampling_parameters: 'use_beam_search' is not supported"),
    ({"embedding_bias_words": ["x"]}, "embedding_bias_words"),  # not declared: Triton refuses it by name
    # a scalar that names no input becomes a request parameter over HTTP: refused by name too
    ({"embedding_bias_words": "x"}, "unexpected input embedding_bias_words"),
    ({"no_repeat_ngram_size": 3, "max_new_tokens": 1}, "unexpected inputs max_new_tokens, no_repeat_ngram_size"),
])
@pytest.mark.parametrize("model", ["ensemble", "dspark"])
def test_unsupported_values_are_refused_by_name(triton, params, message, model):
    with pytest.raises(GenerationError, match=message):
        generate_http(triton.http, PROMPT, model=model, **params)
    assert generate_http(triton.http, PROMPT, model=model, max_tokens=2).num_output_tokens == 2


def test_a_prompt_sent_both_as_text_and_as_ids_is_refused(triton):
    with pytest.raises(GenerationError, match="text_input and input_ids are both set"):
        generate_http(triton.http, PROMPT, model="dspark", input_ids=[1, 2, 3], max_tokens=2)
