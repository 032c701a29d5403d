"""Shared fixtures: the real default model, fetched once per test session."""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Converted SmolLM2-135M-Instruct model directory (downloaded and cached on first use)."""
    from hub.fetch import fetch_model

    return fetch_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir: Path):
    """The default model in fp32 (token-exact comparisons), loaded once for the in-process engine tests."""
    import torch

    from models.loading import load_transformer

    return load_transformer(smollm2_dir, torch.float32)


@pytest.fixture(scope="session")
def smollm2_encoder(smollm2_dir: Path):
    from orchestrator.prompting import PromptEncoder

    return PromptEncoder.from_model_dir(smollm2_dir, max_prompt_tokens=1024)


@dataclass(frozen=True)
class TritonEndpoints:
    http: str  # host:port
    grpc: str  # host:port
    metrics: str  # full URL of the Prometheus endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def triton(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonEndpoints]:
    """A real Triton serving the project's model repository with the default model.

    Uses the server CI started (DSPARK_TRITON_* set) or starts one for this test session.
    """
    if os.environ.get("DSPARK_TRITON_HTTP"):
        yield TritonEndpoints(
            os.environ["DSPARK_TRITON_HTTP"],
            os.environ["DSPARK_TRITON_GRPC"],
            f"http://{os.environ['DSPARK_TRITON_METRICS']}/metrics",
        )
        return
    from serving.triton_launcher import ServerConfig, TritonServer

    config = ServerConfig(
        model_repository=PROJECT_ROOT / "model_repository",
        http_port=_free_port(),
        grpc_port=_free_port(),
        metrics_port=_free_port(),
        log_file=tmp_path_factory.mktemp("triton") / "server.log",
        pid_file=None,
        extra_env={"DSPARK_MODEL": str(smollm2_dir), "DSPARK_DTYPE": "float32"},  # token-exact comparisons
    )
    with TritonServer(config) as server:
        yield TritonEndpoints(server.url_http, server.url_grpc, server.url_metrics)


@pytest.fixture(scope="session")
def openai_url(triton: TritonEndpoints, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (http://host:port/v1) of the OpenAI-compatible frontend in front of the test server.

    Uses the one CI started with `cli.py serve --openai-port` (DSPARK_OPENAI_URL set) or starts one here.
    """
    if os.environ.get("DSPARK_OPENAI_URL"):
        yield os.environ["DSPARK_OPENAI_URL"]
        return
    from serving.openai_frontend import start_frontend

    port = _free_port()
    log = tmp_path_factory.mktemp("openai") / "frontend.log"
    process = start_frontend(triton.grpc, smollm2_dir, DEFAULT_MODEL, port, log)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)
