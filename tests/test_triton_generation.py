"""End to end through a real Triton server: ensemble (preprocessing -> dspark), gRPC and HTTP."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as grpcclient

from clients.generation import GenerationError, collect, generate_http, stream_grpc, stream_http
from models.loading import load_transformer
from orchestrator.prompting import PromptEncoder

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three prime numbers.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def reference_greedy(smollm2_dir: Path):
    """Greedy tokens from our model called in-process, one prompt at a time (no server, no batching)."""
    model = load_transformer(smollm2_dir, torch.float32)
    encoder = PromptEncoder.from_model_dir(smollm2_dir, max_prompt_tokens=2047)
    eos = set(model.config.eos_token_ids)

    def run(prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
        ids = encoder.encode(prompt, apply_chat_template=True)
        cache = model.new_cache(1, 512)
        slot = cache.allocate()
        out: list[int] = []
        feed = ids
        with torch.inference_mode():
            while len(out) < new_tokens:
                logits = model(torch.tensor(feed), [slot], [len(feed)], cache,
                               logits_indices=torch.tensor([len(feed) - 1])).logits
                token = int(logits[0].argmax())
                if token in eos:
                    break
                out.append(token)
                feed = [token]
        return out

    return run


def test_cli_generate_chooses_the_speculation_per_request(triton, reference_greedy, smollm2_dir):
    """`cli.py generate --spec-mode/--num-draft-tokens` reach the server: static drafting reports its
    rounds, off none, and both print the target's greedy answer."""
    from click.testing import CliRunner

    from cli import cli

    encoder = PromptEncoder.from_model_dir(smollm2_dir, max_prompt_tokens=2047)
    ids = reference_greedy(PROMPTS[0], 12)
    expected, finish = encoder.tokenizer.decode(ids), "length" if len(ids) == 12 else "stop"
    runs = {mode: CliRunner().invoke(cli, ["generate", "--url", triton.grpc, "--max-tokens", "12", "--spec-mode", mode,
                                            "--num-draft-tokens", "3", PROMPTS[0]])
            for mode in ("off", "static")}
    for mode, run in runs.items():
        assert run.exit_code == 0, run.output
        assert run.stdout.rstrip("\n") == expected
        assert f"[finish: {finish}; {len(ids)} tokens" in run.stderr
    assert "draft rounds" not in runs["off"].stderr and "draft rounds" in runs["static"].stderr


def test_grpc_stream_greedy_equals_in_process_model(triton, reference_greedy):
    for prompt in PROMPTS[:3]:
        chunks = list(stream_grpc(triton.grpc, prompt, max_tokens=NEW_TOKENS))
        assert len(chunks) > 1, "expected a stream of several responses"
        result = collect(iter(chunks))
        assert result.token_ids == reference_greedy(prompt)
        assert result.finish_reason in ("length", "stop")
        assert result.num_output_tokens == len(result.token_ids)


@pytest.mark.parametrize("model", ["dspark", "ensemble"])
def test_http_generate_and_stream_match_grpc(triton, model):
    prompt = PROMPTS[0]
    reference = collect(stream_grpc(triton.grpc, prompt, max_tokens=16))
    grpc_result = collect(stream_grpc(triton.grpc, prompt, model=model, max_tokens=16))
    http_result = generate_http(triton.http, prompt, model=model, max_tokens=16)
    sse_result = collect(stream_http(f"http://{triton.http}/", prompt, model=model, max_tokens=16))  # a URL too
    assert http_result.text == grpc_result.text == sse_result.text == reference.text
    assert http_result.token_ids == grpc_result.token_ids == reference.token_ids
    assert reference.text.strip()


def test_streamed_text_equals_decoding_all_tokens(triton, smollm2_dir):
    # A prompt that invites non-ASCII output: deltas must never split a UTF-8 character.
    encoder = PromptEncoder.from_model_dir(smollm2_dir, max_prompt_tokens=2047)
    result = collect(stream_grpc(triton.grpc, "Écris une phrase en français avec des accents: é, è, à.", max_tokens=40))
    assert "\ufffd" not in result.text
    assert result.text == encoder.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stop_string_ends_generation_and_is_not_returned(triton):
    full = generate_http(triton.http, PROMPTS[3], max_tokens=40).text
    assert "," in full or "." in full, full
    stop = "," if "," in full else "."
    result = generate_http(triton.http, PROMPTS[3], max_tokens=40, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]


@pytest.mark.parametrize("spec_mode", ["off", "static"])
def test_seeded_sampling_is_reproducible(triton, spec_mode):
    # dspark mode is excluded: its draft lengths follow the live load, which changes which random draws a
    # seed's stream feeds (the distribution stays the target's; the exact sample may not repeat).
    params = dict(max_tokens=20, temperature=1.0, top_p=0.9, spec_mode=spec_mode)
    a = generate_http(triton.http, PROMPTS[1], seed=7, **params)
    b = generate_http(triton.http, PROMPTS[1], seed=7, **params)
    c = generate_http(triton.http, PROMPTS[1], seed=8, **params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_sixteen_concurrent_clients_get_their_own_answers(triton, reference_greedy):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (#{i})" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: collect(stream_grpc(triton.grpc, p, max_tokens=12)), prompts))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(prompt, 12), prompt


# --- bad input: a clear error to that client, and the server keeps serving ----------------

@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", {}, "text_input is empty"),
        ("word " * 3000, {}, "at most 2047 fit"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"max_tokens": 10**7}, "max_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"top_k": -1}, "top_k"),
    ],
)
@pytest.mark.parametrize("model", ["dspark", "ensemble"])
def test_bad_request_gets_clear_error_over_grpc_and_http(triton, model, prompt, params, message):
    with pytest.raises(GenerationError, match=message):
        collect(stream_grpc(triton.grpc, prompt, model=model, **params))
    with pytest.raises(GenerationError, match=message):
        generate_http(triton.http, prompt, model=model, **params)


def test_a_whitespace_prompt_is_a_prompt(triton):
    """Empty is refused; whitespace is text (a raw completion may start from a newline), as vLLM takes it."""
    for model in ("dspark", "ensemble"):
        for chat in (True, False):
            assert generate_http(triton.http, "\n ", model=model, max_tokens=2, apply_chat_template=chat,
                                 temperature=0.0).num_output_tokens == 2


def test_invalid_utf8_prompt_is_rejected(triton):
    for model in ("dspark", "ensemble"):
        with pytest.raises(GenerationError, match="UTF-8"):
            collect(stream_grpc(triton.grpc, b"caf\xc3(", model=model, max_tokens=4))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_command_line_that_is_not_utf8_is_refused_by_the_server_in_one_line(triton, protocol):
    """Undecodable command-line bytes reach Python as surrogate escapes; over gRPC they raised a traceback."""
    from click.testing import CliRunner

    import cli

    url = triton.grpc if protocol == "grpc" else triton.http
    for args, message in ((["abc\udcff"], "text_input is not valid UTF-8 (byte 3)"),
                          (["--stop", "\udcff", "hi"], "stop is not valid UTF-8")):
        result = CliRunner().invoke(cli.cli, ["generate", "--protocol", protocol, "--url", url, "--max-tokens", "4", *args])
        assert result.exit_code == 1 and message in result.output and result.output.startswith("Error: "), result.output


def test_invalid_utf8_in_http_body_is_rejected(triton):
    body = b'{"text_input": "caf\xc3(", "max_tokens": 4}'
    r = requests.post(f"http://{triton.http}/v2/models/ensemble/generate", data=body,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400


def test_wrong_tensor_type_is_rejected(triton):
    client = grpcclient.InferenceServerClient(triton.grpc)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    max_tokens = grpcclient.InferInput("max_tokens", [1], "FP32")
    max_tokens.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    errors = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    client.async_stream_infer("ensemble", [text, max_tokens])
    client.stop_stream()
    assert errors and errors[0] is not None
    assert "max_tokens" in errors[0].message() and "FP32" in errors[0].message()


def test_an_ensemble_request_without_a_prompt_is_refused_by_name(triton):
    """Seen: without text_input, Triton 2.51 never ran the ensemble's first step and never answered (a gRPC
    stream waited for ever; HTTP said 200 with another error). The ensemble declares it optional so that
    preprocessing runs and refuses it."""
    import queue

    client = grpcclient.InferenceServerClient(triton.grpc)
    max_tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([4], dtype=np.int32))
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put(error))
    client.async_stream_infer("ensemble", [max_tokens])
    error = events.get(timeout=30)
    client.stop_stream()
    assert error is not None and "text_input is required" in error.message()
    r = requests.post(f"http://{triton.http}/v2/models/ensemble/generate", json={"max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "text_input is required" in r.json()["error"]


def test_http_wrong_json_type_is_rejected(triton):
    # Triton's HTTP frontend converts JSON to tensors itself and answers 500 for a type it cannot convert.
    r = requests.post(f"http://{triton.http}/v2/models/ensemble/generate",
                      json={"text_input": "hi", "max_tokens": "many"}, timeout=30)
    assert r.status_code in (400, 500)
    assert "Unable to parse" in r.json()["error"]
    assert generate_http(triton.http, "hi", max_tokens=2).num_output_tokens == 2


def test_cancelled_streams_free_their_slots(triton, reference_greedy):
    # Abandon more streams than the engine has slots (16), mid-generation; if a cancelled
    # request kept its slot, the requests after them would never be admitted.
    for _ in range(18):
        stream = stream_grpc(triton.grpc, PROMPTS[2], max_tokens=1000, timeout_s=60)
        next(stream)
        next(stream)
        stream.close()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: collect(stream_grpc(triton.grpc, p, max_tokens=8, timeout_s=120)),
                                [PROMPTS[0]] * 16))
    assert all(r.token_ids == reference_greedy(PROMPTS[0], 8) for r in results)


# --- speculation through the server ----------------------------------------------------------

CODE_PROMPT = "Repeat this list twice: apple, banana, cherry, apple, banana, cherry."


def test_speculative_and_plain_requests_stream_the_same_greedy_tokens(triton, reference_greedy):
    off = collect(stream_grpc(triton.grpc, CODE_PROMPT, max_tokens=32, spec_mode="off"))
    spec = collect(stream_grpc(triton.grpc, CODE_PROMPT, max_tokens=32, spec_mode="static", num_draft_tokens=5))
    assert off.token_ids == spec.token_ids == reference_greedy(CODE_PROMPT, 32)
    assert off.draft_rounds == 0 and off.tokens_per_round is None
    assert spec.draft_rounds > 0 and spec.draft_tokens >= spec.draft_rounds
    assert spec.tokens_per_round == 1 + spec.accepted_tokens / spec.draft_rounds


def test_speculation_counters_are_exported_as_metrics(triton):
    collect(stream_grpc(triton.grpc, CODE_PROMPT, max_tokens=16, spec_mode="static", num_draft_tokens=3))
    time.sleep(2 * 0.5)  # the model publishes its counters every 0.5 s
    metrics = requests.get(triton.metrics, timeout=10).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith("dspark_")}
    assert values['dspark_draft_tokens_total{position="1"}'] >= values['dspark_accepted_tokens_total{position="1"}']
    assert values["dspark_draft_rounds_total"] > 0


@pytest.mark.parametrize(("params", "message"), [
    ({"spec_mode": "turbo"}, "spec_mode"),
    ({"num_draft_tokens": 99}, "num_draft_tokens"),
])
def test_bad_speculation_parameters_are_refused(triton, params, message):
    with pytest.raises(GenerationError, match=message):
        collect(stream_grpc(triton.grpc, "hi", **params))


def _cancelled_total(metrics_url: str) -> float:
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith('dspark_finished_requests_total{reason="cancelled"}'):
            return float(line.split(" ")[1])
    return 0.0


def test_closing_an_http_stream_cancels_the_request(triton):
    # The README's claim, checked: Triton 2.51 passes an HTTP client's disconnect to a decoupled model.
    before = _cancelled_total(triton.metrics)
    with requests.post(f"http://{triton.http}/v2/models/dspark/generate_stream", stream=True, timeout=60,
                       json={"text_input": PROMPTS[2], "max_tokens": 1000, "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith(b"data:"))
    deadline = time.monotonic() + 10
    while _cancelled_total(triton.metrics) <= before:
        assert time.monotonic() < deadline, "the closed stream's request was not cancelled"
        time.sleep(0.25)


def _start(model_dir: Path, tmp_path: Path, **env):
    from serving.triton_launcher import ServerConfig, TritonServer
    from tests.conftest import PROJECT_ROOT, _free_port

    return TritonServer(ServerConfig(PROJECT_ROOT / "model_repository", _free_port(), _free_port(), _free_port(),
                                     log_file=tmp_path / "server.log", ready_timeout_s=600,
                                     extra_env={"DSPARK_MODEL": str(model_dir), "DSPARK_DTYPE": "float32", **env}))


def test_a_drafter_that_does_not_fit_the_target_stops_the_server_at_start(smollm2_dir, tmp_path):
    from serving.triton_launcher import TritonLaunchError
    from tests.conftest import PROJECT_ROOT

    shipped = PROJECT_ROOT / "models" / "checkpoints" / "smollm2-135m-instruct-dspark"
    bad = tmp_path / "qwen-sized-drafter"
    bad.mkdir()
    config = json.loads((shipped / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": 151936, "tap_layers": [1, 12, 40]}))
    server = _start(smollm2_dir, tmp_path, DSPARK_DRAFTER=f"checkpoint:{bad}")
    with pytest.raises(TritonLaunchError) as error:
        server.start()
    message = (tmp_path / "server.log").read_text() + str(error.value)
    assert "does not fit target smollm2-135m-instruct" in message
    assert "vocabulary 151936 != 49152" in message and "tap layers [40] out of range 0..30" in message


SPEC_MODES = ["off", "static", "batch_limited", "adaptive", "dspark"]
SLOW = pytest.mark.skipif(os.environ.get("DSPARK_SLOW_TESTS") != "1", reason="set DSPARK_SLOW_TESTS=1")


def _greedy_in_every_mode(grpc_url: str) -> None:
    for prompt in (PROMPTS[2], CODE_PROMPT):
        plain = collect(stream_grpc(grpc_url, prompt, max_tokens=24, spec_mode="off"))
        assert plain.token_ids and plain.finish_reason in ("length", "stop")
        for mode in SPEC_MODES[1:]:
            spec = collect(stream_grpc(grpc_url, prompt, max_tokens=24, spec_mode=mode, num_draft_tokens=4))
            assert (spec.token_ids, spec.text, spec.finish_reason) == (plain.token_ids, plain.text,
                                                                       plain.finish_reason), mode


def test_default_target_answers_greedy_requests_in_every_spec_mode(triton):
    _greedy_in_every_mode(triton.grpc)


@SLOW
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_every_fetchable_target_serves_with_its_own_default_drafter(name, tmp_path):
    from hub.fetch import fetch_model

    with _start(fetch_model(name), tmp_path) as server:
        _greedy_in_every_mode(server.url_grpc)


@pytest.mark.parametrize("name, value", [("max_tokens", 2**32 + 5), ("top_k", 2**32 + 1), ("min_length", -2**31 - 1),
                                         ("seed", 2**64), ("seed", -1)])
@pytest.mark.parametrize("stream", [stream_grpc, stream_http])
def test_the_client_refuses_integers_its_wire_type_cannot_hold(name, value, stream) -> None:
    """numpy would wrap 2**32 + 5 max_tokens to 5 (accepted, silently) or raise an overflow traceback."""
    with pytest.raises(GenerationError, match=f"{name} must be in \\[.*got {value}"):
        next(stream("localhost:1", "hi", **{name: value}))  # refused before any connection


@pytest.mark.parametrize("body", [b'data: {"error":"top_p must be in (0, 1], got 2.0"}\n\n',
                                  b'{"error":"top_p must be in (0, 1], got 2.0"}'])
def test_an_http_refusal_reads_as_the_servers_message(body: bytes) -> None:
    """Triton's generate_stream sends a refusal as a server-sent event; generate as plain JSON."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(400)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for call in (lambda url: next(stream_http(url, "hi")), lambda url: generate_http(url, "hi")):
            with pytest.raises(GenerationError) as info:
                call(f"127.0.0.1:{server.server_port}")
            assert str(info.value) == "HTTP 400: top_p must be in (0, 1], got 2.0"
    finally:
        server.shutdown()
