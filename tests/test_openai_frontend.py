"""The OpenAI-compatible frontend, driven by the official `openai` client against the test server:
same answers as the native gRPC path, streaming and not, usage with speculation counters, OpenAI-style
errors with 4xx codes, and a client leaving mid-stream cancels its request on Triton."""
from __future__ import annotations

import re
import time
import urllib.request

import openai
import pytest

from clients.generation import collect, stream_grpc
from tests.conftest import DEFAULT_MODEL

pytestmark = pytest.mark.server

PROMPT = "Name three colours."


@pytest.fixture(scope="module")
def client(openai_url):
    with openai.OpenAI(base_url=openai_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not exported"
    return float(match.group(1))


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]


def test_a_model_is_retrieved_by_name(client):
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


def test_health_is_200_while_the_engine_model_is_ready(openai_url):
    with urllib.request.urlopen(openai_url.removesuffix("/v1") + "/health", timeout=30) as response:
        assert response.status == 200


def test_chat_completion_equals_the_native_answer(client, triton):
    native = collect(stream_grpc(triton.grpc, PROMPT, max_tokens=16, temperature=0.0))
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == native.text
    assert reply.choices[0].finish_reason == native.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (native.num_prompt_tokens,
                                                                          native.num_output_tokens)
    spec = reply.usage.model_extra["speculation"]
    assert spec["draft_tokens"] >= spec["accepted_tokens"] >= 0 and spec["draft_rounds"] >= 0
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == spec["draft_tokens"]


def test_streamed_chat_matches_and_ends_with_usage(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 2
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_is_the_raw_prompt_path_with_stop_and_seed(client, triton):
    prompt = "The first five prime numbers are"
    native = collect(stream_grpc(triton.grpc, prompt, max_tokens=12, temperature=0.0, apply_chat_template=False))
    reply = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == native.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert streamed == native.text
    stop = native.text.strip()[3:5]
    stopped = client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert native.text.startswith(stopped.choices[0].text)
    sampled = [client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.95,
                                         seed=7, extra_body={"spec_mode": "off"}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    (dict(temperature=-1), 400, "temperature must be a finite number >= 0"),
    (dict(max_tokens=0), 400, "max_tokens must be an integer in"),
    (dict(max_tokens=2**32 + 5), 400, "max_tokens must be in [-2147483648, 2147483647] (int32), got 4294967301"),
    (dict(seed=2**64), 400, "seed must be in [0, 18446744073709551615] (uint64)"),
    (dict(n=2), 400, "n must be 1"),
    (dict(presence_penalty=0.5), 400, "presence_penalty is not supported"),
    (dict(extra_body={"spec_mode": "turbo"}), 400, "spec_mode"),
    (dict(extra_body={"best_of": 3}), 400, "best_of: unsupported parameter"),
    (dict(model="gpt-4o"), 404, "model 'gpt-4o' does not exist"),
    (dict(max_tokens=True), 400, "max_tokens: Input should be a valid integer"),  # not 1
    (dict(max_tokens=2.5), 400, "max_tokens: Input should be a valid integer"),
    (dict(temperature="0"), 400, "temperature: Input should be a valid number"),
    (dict(messages=[{"role": "user", "content": None}]), 400, "no message has any content"),
])
def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(client, kwargs, status, message):
    args = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code == status
    assert message in info.value.body["message"] and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="prompt is"):
        client.completions.create(model=DEFAULT_MODEL, prompt="word " * 5000, max_tokens=4)
    ok = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": PROMPT}],
                                        max_tokens=2.0, temperature=0)  # a whole float is an integer
    assert ok.usage.completion_tokens == 2


def test_malformed_requests_get_openai_errors(openai_url):
    import json
    import urllib.error

    def post(path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"{openai_url}{path}", data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = post("/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post("/chat/completions", json.dumps({"model": DEFAULT_MODEL}).encode())
    assert status == 400 and body["error"]["message"] == "messages: Field required"
    status, body = post("/embeddings", b"{}")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    # what the engine refuses is named by the OpenAI field the client sent, not the native input
    status, body = post("/completions", json.dumps({"model": DEFAULT_MODEL, "prompt": ""}).encode())
    assert status == 400 and body["error"]["message"] == "prompt is empty" and body["error"]["param"] == "prompt"
    status, body = post("/completions", json.dumps({"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 10**5}).encode())
    assert status == 400 and body["error"]["message"].startswith("max_tokens must be") and body["error"]["param"] == "max_tokens"
    # JSON can spell a lone surrogate, which is no text: refused by field, not an internal error (it was a 500)
    for path, fields, param in (
            ("/completions", {"prompt": "a\udc80b"}, "prompt"),
            ("/chat/completions", {"messages": [{"role": "user", "content": "a\udc80b"}]}, "messages.0.content"),
            ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud83d"]}, "stop.0")):
        status, body = post(path, json.dumps({"model": DEFAULT_MODEL, "max_tokens": 4} | fields).encode())
        assert status == 400 and body["error"]["param"] == param, body
        assert body["error"]["message"].startswith(f"{param}: holds a lone surrogate"), body
    hi = {"role": "user", "content": "hi"}
    status, body = post("/chat/completions", json.dumps({"model": DEFAULT_MODEL, "max_tokens": 2, "stream_options": {
        "include_usage": True}, "messages": [hi]}).encode())
    assert status == 400 and body["error"]["message"] == "stream_options is only allowed when stream is true"
    status, body = post("/chat/completions", json.dumps({"model": DEFAULT_MODEL, "max_tokens": 2,
                                                         "messages": [hi | {"foo": 1}]}).encode())
    assert status == 400 and body["error"]["message"] == "messages.0: foo is not supported", body
    # an assistant message sent back as the client got it, its empty fields included, is fine
    answer = {"role": "assistant", "content": "Hello!", "refusal": None, "tool_calls": None, "audio": None}
    status, body = post("/chat/completions", json.dumps({"model": DEFAULT_MODEL, "max_tokens": 2,
                                                         "messages": [hi, answer, hi]}).encode())
    # two tokens, or fewer ending the answer (a clean-clone CI run once got one token here)
    used, finish = body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]
    assert status == 200 and ((used, finish) == (2, "length") or (used < 2 and finish == "stop")), body
    status, body = post("/completions", b"[1, 2]")  # the body itself, named as such
    assert status == 400 and body["error"]["message"].startswith("the request body: Input should be a valid dict")
    assert body["error"]["param"] is None


def test_triton_gone_is_a_503_that_says_so(tmp_path) -> None:
    """A frontend whose Triton does not answer gives 503 with a sentence, not a gRPC object's dump."""
    import json
    import urllib.error

    from hub.fetch import fetch_model
    from serving.openai_frontend import start_frontend

    frontend = start_frontend("127.0.0.1:1", fetch_model(DEFAULT_MODEL), DEFAULT_MODEL, 19871, tmp_path / "f.log")
    try:
        # a load balancer's probe learns it too: /v1/models lists the model regardless, as vLLM's does
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen("http://127.0.0.1:19871/health", timeout=60)
        error = json.loads(info.value.read())["error"]
        assert info.value.code == 503 and error["message"].startswith("the Triton server behind this API is unavailable: ")
        body = json.dumps({"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 2}).encode()
        request = urllib.request.Request("http://127.0.0.1:19871/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        error = json.loads(info.value.read())["error"]
        assert info.value.code == 503 and error["type"] == "service_unavailable"
        assert error["message"].startswith("the Triton server behind this API is unavailable: ")
        assert "AioRpcError" not in error["message"] and "<" not in error["message"]
    finally:
        frontend.terminate()
        frontend.wait(30)


def test_frontend_interrupted_while_starting_is_stopped(monkeypatch, tmp_path) -> None:
    """Ctrl-C (or SIGTERM, which `serve` turns into it) while the frontend starts leaves no frontend
    running: it has its own session, so nothing else would stop it."""
    import subprocess

    from hub.fetch import fetch_model
    from serving import openai_frontend
    from tests.conftest import _free_port

    model_dir = fetch_model(DEFAULT_MODEL)
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(openai_frontend.subprocess, "Popen", Recorded)
    monkeypatch.setattr(openai_frontend.urllib.request, "urlopen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        openai_frontend.start_frontend("127.0.0.1:1", model_dir, DEFAULT_MODEL, _free_port(), tmp_path / "f.log")
    assert len(started) == 1 and started[0].poll() is not None


def test_client_leaving_mid_stream_cancels_the_request_on_triton(client, triton):
    cancelled = 'dspark_finished_requests_total{reason="cancelled"}'
    before = metric(triton.metrics, cancelled)
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Write a very long story."}], max_tokens=2000,
        temperature=0, stream=True, extra_body={"min_tokens": 2000})  # 2000 tokens would take minutes here
    received = [chunk for chunk, _ in zip(stream, range(4))]
    assert len(received) == 4 and received[-1].choices[0].finish_reason is None
    stream.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(triton.metrics, cancelled) == before:
        time.sleep(0.25)
    assert metric(triton.metrics, cancelled) == before + 1
    assert metric(triton.metrics, "dspark_active_requests") == 0
