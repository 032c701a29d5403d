"""OpenAI-compatible HTTP API in front of Triton: /v1/models, /v1/chat/completions, /v1/completions, /health.

A thin FastAPI app. Each request becomes one gRPC stream to the `dspark` model, not the ensemble:
Triton cancels a `dspark` stream when its gRPC call is cancelled, so a client that goes away mid-answer
frees its slot at once. Chat messages go through the model's chat template here and are sent as
`input_ids` (the same ids the native text path makes for one user turn); completions send the raw
prompt text. Validation stays where it is for the native paths: the server's own messages come back
as OpenAI error objects (bad input 400, server faults 500, Triton unreachable or shutting down 503).
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from tritonclient.utils import InferenceServerException

from clients.generation import INPUT_DTYPES, GenerationChunk, chunk_from_result, infer_inputs, unsendable
from orchestrator.errors import InvalidRequestError
from orchestrator.prompting import PromptEncoder
from serving.triton_launcher import port_is_free

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODEL = "dspark"


class OpenAIError(Exception):
    """An error the client gets as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {400: "invalid_request_error", 404: "invalid_request_error", 503: "service_unavailable"}.get(
            self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# The engine names the native input it refuses first in its message; the client sent the OpenAI field.
_OPENAI_FIELDS = {**{name: name for name in INPUT_DTYPES}, "text_input": "prompt", "input_ids": "messages"}


def triton_unavailable(detail: str) -> OpenAIError:
    """503 for a Triton that does not answer or does not serve the engine model."""
    return OpenAIError(503, f"the Triton server behind this API is unavailable: {detail}")


def error_from_triton(message: str) -> OpenAIError:
    """The engine says "internal error" for its own faults; everything else it refuses is the client's input,
    named by the OpenAI field it came from where the message starts with the native one."""
    if message.startswith("internal error"):
        return OpenAIError(500, message)
    if "shutting down" in message:
        return OpenAIError(503, message)
    native = message.split(" ", 1)[0]
    if (field := _OPENAI_FIELDS.get(native)) is not None:
        return OpenAIError(400, field + message[len(native):], param=field)
    return OpenAIError(400, message)


def _whole_number(value: Any) -> Any:
    """A float with no fraction (64.0) as the integer it is, as vLLM takes it; anything else as given."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_whole_number)]  # strict otherwise: no booleans, no strings


def _unicode(text: str) -> str:
    """JSON's escapes can spell a lone UTF-16 surrogate ("\\udc80"), which is no Unicode text and encodes to
    nothing the engine could read: refused here, by field, rather than failing later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start}, "
                         "which is not Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
_TYPE_TAGS = {"str", "int", "float", "bool"}  # pydantic names a union's branch in an error's location


def _field_path(loc: tuple) -> str | None:
    """A validation error's location as the client's field path ("messages.0.content"), without pydantic's
    union branches ("str", "list[str]", "function-after[...]") and the "body" root; None for the body itself."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS | {"body"})]
    return ".".join(parts) or None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage_stats: bool = False  # vLLM's extension: every chunk carries the usage so far


class _GenerationRequest(BaseModel):
    """Fields both endpoints share; unknown fields are refused by name, and values of another JSON type
    too (strict: `"max_tokens": true` or `"temperature": "0"` are errors, not 1 and 0.0; a whole float
    such as 64.0 is an integer, a fraction is not)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text
    max_tokens: Integer | None = None
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    seed: Integer | None = Field(default=None, ge=0)
    stop: Text | list[Text] | None = None
    n: Integer = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None   # passed on: the engine refuses anything but 0 by name
    frequency_penalty: float | None = None
    user: Text | None = None  # accepted, unused
    # DSpark's own inputs
    top_k: Integer | None = None
    min_tokens: Integer | None = None
    spec_mode: Text | None = None
    num_draft_tokens: Integer | None = None

    def engine_inputs(self) -> dict[str, Any]:
        if self.n != 1:
            raise OpenAIError(400, f"n must be 1 (one choice per request), got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:  # as OpenAI refuses it
            raise OpenAIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        values = {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k, "min_length": self.min_tokens, "spec_mode": self.spec_mode,
            "num_draft_tokens": self.num_draft_tokens,
        }
        return {k: v for k, v in values.items() if v is not None}

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    # Unknown fields are refused by name, as at the top level, unless empty: a client that sends back the
    # assistant message it got (with refusal, tool_calls, audio ... at null) is not asking for anything.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _no_unknown_values(self) -> "ChatMessage":
        for key, value in (self.model_extra or {}).items():
            if value not in (None, [], {}, ""):
                raise ValueError(f"{key} is not supported")
        return self

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Integer | None = None
    logprobs: Literal[False] | None = None

    def engine_inputs(self) -> dict[str, Any]:
        inputs = super().engine_inputs()
        if self.max_completion_tokens is not None:
            inputs["max_tokens"] = self.max_completion_tokens
        return inputs


class CompletionRequest(_GenerationRequest):
    prompt: Text | list[Text]
    echo: Literal[False] = False
    logprobs: None = None

    @property
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise OpenAIError(400, f"prompt must be one string, got {len(self.prompt)}", param="prompt")
        return self.prompt[0]


def engine_arrays(prompt: list[int] | str, params: dict[str, Any], stop: list[str]) -> dict[str, np.ndarray]:
    """dspark's input tensors: the prompt as ids (chat) or raw text (completions), streamed."""
    arrays: dict[str, np.ndarray] = {"stream": np.array([True])}
    if isinstance(prompt, str):
        arrays["text_input"] = np.array([prompt.encode("utf-8")], dtype=np.object_)
        arrays["apply_chat_template"] = np.array([False])
    else:
        arrays["input_ids"] = np.asarray(prompt, dtype=np.int32)
    if (problem := unsendable(params)) is not None:
        raise OpenAIError(400, problem[1], param=problem[0])
    for name, value in params.items():
        dtype = INPUT_DTYPES[name]
        arrays[name] = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
    if stop:
        arrays["stop"] = np.array([s.encode("utf-8") for s in stop], dtype=np.object_)
    return arrays


class EngineStream:
    """One request's chunks from a gRPC stream to dspark; `close` cancels the request on Triton."""

    def __init__(self, client: grpcclient_aio.InferenceServerClient, inputs: list[grpcclient.InferInput]) -> None:
        self._done = asyncio.Event()
        self._finished = False

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": ENGINE_MODEL, "inputs": inputs}
            await self._done.wait()  # keep the stream open until the answer is complete or abandoned

        self._call = client.stream_infer(requests())

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            result, error = await self._call.__anext__()
        except Exception as exc:  # the connection, not the request: Triton went away or never answered
            self._finished = True
            detail = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            raise triton_unavailable(detail) from exc
        if error is not None:
            self._finished = True
            raise error_from_triton(error.message() if isinstance(error, InferenceServerException) else str(error))
        chunk = chunk_from_result(result)
        self._finished = chunk.finish_reason is not None
        return chunk

    def close(self) -> None:
        """Ends the gRPC call; while the answer is still running this cancels it on the server."""
        self._done.set()
        self._call.cancel()


def usage(chunk: GenerationChunk) -> dict[str, Any]:
    """OpenAI usage, with the request's speculation counters: OpenAI's accepted/rejected prediction
    tokens, and ours (verification rounds with a draft, draft tokens verified, draft tokens accepted)."""
    return {
        "prompt_tokens": chunk.num_prompt_tokens,
        "completion_tokens": chunk.num_output_tokens,
        "total_tokens": chunk.num_prompt_tokens + chunk.num_output_tokens,
        "completion_tokens_details": {
            "accepted_prediction_tokens": chunk.accepted_tokens,
            "rejected_prediction_tokens": chunk.draft_tokens - chunk.accepted_tokens,
        },
        "speculation": {"draft_rounds": chunk.draft_rounds, "draft_tokens": chunk.draft_tokens,
                        "accepted_tokens": chunk.accepted_tokens},
    }


def create_app(triton_url: str, model_dir: Path, served_model_name: str) -> FastAPI:
    """The app for one served model; `triton_url` is Triton's gRPC host:port."""
    encoder = PromptEncoder.from_model_dir(model_dir, max_prompt_tokens=1 << 30)  # the engine checks the context
    created = int(time.time())
    state: dict[str, grpcclient_aio.InferenceServerClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["client"] = grpcclient_aio.InferenceServerClient(triton_url)
        yield
        await state["client"].close()

    app = FastAPI(title="DSpark OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # of a union's branches, the one that got furthest into the value says what is wrong with it
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        if first["type"] == "json_invalid":
            error = OpenAIError(400, f"the request body is not valid JSON (at character {first['loc'][-1]})")
        else:
            param = _field_path(first["loc"])
            message = "unsupported parameter" if first["type"] == "extra_forbidden" else first["msg"]
            error = OpenAIError(400, f"{param or 'the request body'}: {message.removeprefix('Value error, ')}",
                                param=param)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=status)

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise OpenAIError(404, f"model {name!r} does not exist; this server serves {served_model_name!r}",
                              param="model", code="model_not_found")

    async def open_stream(prompt: list[int] | str, body: _GenerationRequest) -> tuple[EngineStream, GenerationChunk]:
        """Starts the request and waits for its first chunk, so refusals get a proper status code."""
        stream = EngineStream(state["client"], infer_inputs(engine_arrays(prompt, body.engine_inputs(), body.stop_list)))
        try:
            return stream, await stream.__anext__()
        except BaseException:
            stream.close()
            raise

    async def respond(prompt: list[int] | str, body: _GenerationRequest, kind: str):
        stream, first = await open_stream(prompt, body)
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())

        def choice(text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if kind == "chat":
                message = {"content": text} if delta else {"role": "assistant", "content": text}
                return {"index": 0, "delta" if delta else "message": message, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def envelope(choices: list[dict[str, Any]], stream_chunk: bool) -> dict[str, Any]:
            obj = {"chat": ("chat.completion.chunk", "chat.completion"),
                   "text": ("text_completion", "text_completion")}[kind][0 if stream_chunk else 1]
            return {"id": request_id, "object": obj, "created": now, "model": served_model_name, "choices": choices}

        if not body.stream:
            last, text = first, first.text
            try:
                async for chunk in stream:
                    last, text = chunk, text + chunk.text
            finally:
                stream.close()
            return JSONResponse({**envelope([choice(text, last.finish_reason, False)], False), "usage": usage(last)})

        options = body.stream_options or StreamOptions()

        async def events() -> AsyncIterator[str]:
            def event(data: dict[str, Any]) -> str:
                return f"data: {json.dumps(data)}\n\n"

            last = first
            try:
                if kind == "chat":
                    yield event(envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None, "logprobs": None}], True))
                chunk: GenerationChunk | None = first
                while chunk is not None:
                    last = chunk
                    if chunk.text or chunk.finish_reason:
                        data = envelope([choice(chunk.text, chunk.finish_reason, True)], True)
                        if options.include_usage or options.continuous_usage_stats:
                            data["usage"] = usage(chunk) if options.continuous_usage_stats else None
                        yield event(data)
                    chunk = await anext(stream, None)
            except OpenAIError as exc:  # after the first chunk the status is sent: the error goes in the stream
                yield event(exc.body())
            finally:
                stream.close()  # a client that went away lands here (cancelled): Triton cancels the request
            if options.include_usage:
                yield event({**envelope([], True), "usage": usage(last)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while Triton serves the engine model, else 503: the probe for a load balancer or an
        orchestrator (/v1/models lists the model whether or not Triton answers, as vLLM's does)."""
        try:
            ready = await state["client"].is_model_ready(ENGINE_MODEL, client_timeout=5)
        except InferenceServerException as exc:
            raise triton_unavailable(exc.message()) from exc
        if not ready:
            raise triton_unavailable(f"{ENGINE_MODEL} is not ready")
        return JSONResponse({})

    model_card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "dspark-triton"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        try:
            ids = encoder.encode_messages([m.as_template_message() for m in body.messages])
        except InvalidRequestError as exc:
            raise OpenAIError(400, str(exc), param="messages") from exc
        return await respond(ids, body, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        return await respond(body.prompt_text, body, "text")

    return app


def check_frontend_port(port: int, host: str = "127.0.0.1") -> None:
    """RuntimeError when the frontend could not listen on host:port (something else holds it)."""
    if not port_is_free(port, host):
        raise RuntimeError(f"cannot serve the OpenAI API on {host}:{port}: the port is in use; choose another port")


def start_frontend(triton_grpc: str, model_dir: Path, served_model_name: str, port: int, log_file: Path,
                   host: str = "127.0.0.1", ready_timeout_s: float = 60) -> subprocess.Popen:
    """Starts the frontend in its own process and returns once /v1/models answers. RuntimeError when the
    port is taken (checked first: another server there, Triton's metrics one included, would answer the
    readiness probe in its place) or the frontend exits or stays silent."""
    check_frontend_port(port, host)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.openai_frontend", "--triton-grpc", triton_grpc, "--model-dir",
             str(model_dir), "--served-model-name", served_model_name, "--host", host, "--port", str(port)],
            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # whatever ends the wait (timeout, Ctrl-C, SIGTERM) stops the frontend: it has its own session
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the OpenAI frontend exited (rc {process.returncode}); see {log_file}")
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=2):
                    return process
            except (OSError, http.client.HTTPException):
                time.sleep(0.3)
        raise RuntimeError(f"the OpenAI frontend did not answer within {ready_timeout_s} s; see {log_file}")
    except BaseException:
        process.terminate()
        process.wait(timeout=30)
        raise


def pid_file_for(triton_pid_file: Path) -> Path:
    """Where `cli.py serve --detach` records the frontend it started beside a Triton server."""
    return triton_pid_file.with_name(triton_pid_file.name + ".openai")


def stop_recorded(pid_file: Path, timeout_s: float = 10) -> bool:
    """Stops the frontend whose PID the file holds (if it still runs); False if none was running.

    A file naming a live process that is not the frontend records another program: left as it is."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # stale: the frontend is gone
        pid_file.unlink(missing_ok=True)
        return False
    if "serving.openai_frontend" not in cmdline:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:  # it ended meanwhile
        pid_file.unlink(missing_ok=True)
        return False
    except PermissionError:  # another user's frontend: not ours to stop, nor its record to drop
        return False
    pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    return True


def main() -> None:
    """`python -m serving.openai_frontend`: what `cli.py serve --openai-port` starts."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton-grpc", default="127.0.0.1:8001", help="Triton's gRPC host:port")
    parser.add_argument("--model-dir", type=Path, required=True, help="the served model's directory (chat template)")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvicorn.run(create_app(args.triton_grpc, args.model_dir, args.served_model_name), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
