"""Client library: send text to the served model over gRPC streaming or HTTP, get text back.

gRPC uses tritonclient's bidirectional stream; HTTP uses Triton's generate extension
(`/v2/models/<m>/generate` and `generate_stream`, server-sent events), which tritonclient
does not wrap, so it is plain HTTP here.
"""
from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

# The engine model takes text directly; its gRPC streams can be cancelled (an ensemble's cannot).
DEFAULT_MODEL = "dspark"

# Input name -> numpy dtype, as declared in the dspark and ensemble config.pbtxt files.
INPUT_DTYPES: dict[str, Any] = {
    "apply_chat_template": np.bool_,
    "stream": np.bool_,
    "max_tokens": np.int32,
    "min_length": np.int32,
    "temperature": np.float32,
    "top_p": np.float32,
    "top_k": np.int32,
    "seed": np.uint64,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
    "num_draft_tokens": np.int32,
    "spec_mode": np.object_,
}


_COUNTERS = ("num_prompt_tokens", "num_output_tokens", "draft_rounds", "draft_tokens", "accepted_tokens")


class GenerationError(RuntimeError):
    """The server refused or failed the request (the message is the server's), or a value could not
    be sent at all."""


@dataclass
class GenerationChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    draft_rounds: int = 0       # running totals for the request
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    draft_rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.finish_reason = chunk.finish_reason or self.finish_reason
        for name in _COUNTERS:
            setattr(self, name, getattr(chunk, name))

    @property
    def tokens_per_round(self) -> float | None:
        """Mean tokens emitted per verification round (accepted drafts + the target's own token)."""
        return 1 + self.accepted_tokens / self.draft_rounds if self.draft_rounds else None


def collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    result = GenerationResult()
    for chunk in chunks:
        result.add(chunk)
    return result


def unsendable(params: dict[str, Any]) -> tuple[str, str] | None:
    """(name, message) of the first integer its input's wire type cannot hold, else None: numpy would
    wrap it (2**32 + 5 max_tokens arriving as 5) or fail with an overflow traceback, not a message."""
    for name, value in params.items():
        dtype = INPUT_DTYPES.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and dtype is not None and np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            if not info.min <= value <= info.max:
                return name, f"{name} must be in [{info.min}, {info.max}] ({np.dtype(dtype).name}), got {value}"
    return None


def _checked(params: dict[str, Any]) -> dict[str, Any]:
    if (problem := unsendable(params)) is not None:
        raise GenerationError(problem[1])
    return params


def _wire(text: str | bytes, name: str) -> bytes:
    """A string input's bytes: a command line's undecodable bytes (Python's surrogate escapes) go as they
    came, for the server to refuse by name; other lone surrogates are no text to send."""
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise GenerationError(f"{name} holds a lone surrogate at character {exc.start}, which is not text") from None


def _grpc_inputs(prompt: str | bytes, stop: list[str] | None, params: dict[str, Any]) -> list[grpcclient.InferInput]:
    arrays = {"text_input": np.array([_wire(prompt, "text_input")], dtype=np.object_), "stream": np.array([True])}
    for name, value in _checked(params).items():
        if value is not None:
            value = _wire(value, name) if isinstance(value, str) else value
            arrays[name] = np.array([value], dtype=INPUT_DTYPES[name])
    if stop:
        arrays["stop"] = np.array([_wire(s, "stop") for s in stop], dtype=np.object_)
    return infer_inputs(arrays)


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """tritonclient gRPC inputs carrying these named arrays."""
    inputs = []
    for name, array in arrays.items():
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def chunk_from_result(result: Any) -> GenerationChunk:
    def scalar(name: str) -> Any:
        array = result.as_numpy(name)
        return None if array is None or array.size == 0 else array.reshape(-1)[0]

    finish = scalar("finish_reason")
    ids = result.as_numpy("output_ids")
    return GenerationChunk(
        text=(scalar("text_output") or b"").decode("utf-8"),
        token_ids=[] if ids is None else ids.astype(int).tolist(),
        finish_reason=(finish.decode() if finish is not None else "") or None,
        **{name: int(scalar(name) or 0) for name in _COUNTERS},
    )


def stream_grpc(
    url: str,
    prompt: str | bytes,
    model: str = DEFAULT_MODEL,
    stop: list[str] | None = None,
    timeout_s: float = 300.0,
    **params: Any,
) -> Iterator[GenerationChunk]:
    """Streams chunks over gRPC. Closing the iterator early cancels the request on the server."""
    inputs = _grpc_inputs(prompt, stop, params)  # a bad input is the caller's, not a missing server
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    finished = False
    try:
        try:
            client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        except InferenceServerException as exc:  # the stream failed at once (no server): its reason is in the callback
            try:
                _, error = responses.get(timeout=5)
                detail = error.message() if isinstance(error, InferenceServerException) else str(error)
            except queue.Empty:
                detail = exc.message()
            finished = True
            raise GenerationError(f"no gRPC answer from a Triton server at {url}: {detail}") from None
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty as exc:
                raise GenerationError(f"no response within {timeout_s} s") from exc
            if error is not None:
                finished = True
                detail = error.message() if isinstance(error, InferenceServerException) else str(error)
                if "failed to connect" in detail:  # gRPC's words for "nothing listens there"
                    detail = f"no gRPC answer from a Triton server at {url}: {detail}"
                raise GenerationError(detail)
            response = result.get_response()
            final = response.parameters.get("triton_final_response")
            if response.outputs:
                yield chunk_from_result(result)
            if final is not None and final.bool_param:
                finished = True
                return
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _http_payload(prompt: str, stop: list[str] | None, params: dict[str, Any], stream: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {"text_input": prompt, "stream": stream}
    payload.update({k: v for k, v in _checked(params).items() if v is not None})
    if stop:
        payload["stop"] = stop
    return payload


def _chunk_from_json(data: dict[str, Any]) -> GenerationChunk:
    if "error" in data:
        raise GenerationError(data["error"])
    ids = data.get("output_ids", [])
    return GenerationChunk(
        text=data.get("text_output", ""),
        token_ids=[ids] if isinstance(ids, int) else list(ids),
        finish_reason=data.get("finish_reason") or None,
        **{name: int(data.get(name, 0)) for name in _COUNTERS},
    )


def http_base(url: str) -> str:
    """'host:port' or a URL with its scheme ('http://host:port/', 'https://...') -> the base to join paths to."""
    return url.rstrip("/") if url.startswith(("http://", "https://")) else f"http://{url}"


def stream_http(
    url: str,
    prompt: str,
    model: str = DEFAULT_MODEL,
    stop: list[str] | None = None,
    timeout_s: float = 300.0,
    **params: Any,
) -> Iterator[GenerationChunk]:
    """Streams chunks from `generate_stream` (server-sent events)."""
    endpoint = f"{http_base(url)}/v2/models/{model}/generate_stream"
    with requests.post(endpoint, json=_http_payload(prompt, stop, params, True), stream=True, timeout=timeout_s) as r:
        if r.status_code != 200:
            raise GenerationError(_http_error(r))
        for line in r.iter_lines(decode_unicode=False):
            if line.startswith(b"data:"):
                yield _chunk_from_json(json.loads(line[5:]))


def generate_http(
    url: str,
    prompt: str,
    model: str = DEFAULT_MODEL,
    stop: list[str] | None = None,
    timeout_s: float = 300.0,
    **params: Any,
) -> GenerationResult:
    """One request, one answer, through `generate`."""
    endpoint = f"{http_base(url)}/v2/models/{model}/generate"
    r = requests.post(endpoint, json=_http_payload(prompt, stop, params, False), timeout=timeout_s)
    if r.status_code != 200:
        raise GenerationError(_http_error(r))
    result = GenerationResult()
    result.add(_chunk_from_json(r.json()))
    return result


def _http_error(response: requests.Response) -> str:
    """The server's message: a JSON body's "error", also when the streaming endpoint sends it as an event."""
    body = response.text.strip()
    try:
        return f"HTTP {response.status_code}: {json.loads(body.removeprefix('data:'))['error']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {body}"
