"""Built model repositories: parameters per runtime, and ONNX Runtime served by a real Triton.

The server test starts a second Triton (free ports) on a repository written by
`build_repository(runtime="onnxruntime")` and checks its greedy output equals the torch server's
(the session `triton` fixture, which serves ./model_repository with the default runtime).
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from clients.generation import collect, stream_grpc
from export.onnx_export import read_metadata
from export.repository import (
    ENGINE_MODEL,
    PROJECT_ROOT,
    build_repository,
    drafter_tap_layers,
    read_parameters,
    set_parameters,
)
from hub.fetch import default_drafter

PROMPTS = ["What is the capital of France?", "def fibonacci(n):"]
NEW_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_set_parameters_replaces_and_appends() -> None:
    text = 'name: "m"\nparameters { key: "runtime" value: { string_value: "torch" } }\n'
    out = set_parameters(text, {"runtime": "onnxruntime", "onnx_model": "onnx/model.onnx"})
    assert read_parameters(out) == {"runtime": "onnxruntime", "onnx_model": "onnx/model.onnx"}
    assert out.startswith('name: "m"\n')


def test_source_repository_defaults_to_torch() -> None:
    params = read_parameters((PROJECT_ROOT / "model_repository" / ENGINE_MODEL / "config.pbtxt").read_text())
    assert params["runtime"] == "torch" and params["onnx_model"] == ""


def test_build_torch_repository_copies_models(tmp_path, smollm2_dir: Path) -> None:
    out = build_repository(tmp_path / "repo", "torch", "smollm2-135m-instruct", smollm2_dir)
    assert {p.name for p in out.iterdir()} >= {"dspark", "preprocessing", "ensemble"}
    assert not list(out.rglob("__pycache__"))
    params = read_parameters((out / ENGINE_MODEL / "config.pbtxt").read_text())
    assert params["runtime"] == "torch" and params["dtype"] == "auto" and params["onnx_model"] == ""


def test_build_replaces_only_a_repository_it_wrote(tmp_path, smollm2_dir: Path) -> None:
    """`build --out` replaces its own earlier output, and refuses any other non-empty directory (a user's
    files, the checkout) untouched; a build that fails leaves the earlier output as it was."""
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a directory `cli.py build` wrote"):
        build_repository(precious, "torch", "smollm2-135m-instruct", smollm2_dir)
    assert (precious / "sub" / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ValueError, match="not a directory `cli.py build` wrote"):
        build_repository(PROJECT_ROOT, "torch", "smollm2-135m-instruct", smollm2_dir)

    repo = build_repository(tmp_path / "repo", "torch", "smollm2-135m-instruct", smollm2_dir)
    build_repository(repo, "torch", "smollm2-135m-instruct", smollm2_dir, dtype="float32")  # its own: replaced
    assert read_parameters((repo / ENGINE_MODEL / "config.pbtxt").read_text())["dtype"] == "float32"
    with pytest.raises(FileNotFoundError):  # a drafter checkpoint that is not there
        build_repository(repo, "onnxruntime", "smollm2-135m-instruct", smollm2_dir,
                         parameters={"drafter": f"checkpoint:{tmp_path / 'missing'}"})
    assert read_parameters((repo / ENGINE_MODEL / "config.pbtxt").read_text())["runtime"] == "torch"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no half-built directory left behind"


def test_a_w8a8_build_ships_w8a8_drafter_graphs(tmp_path, smollm2_dir: Path) -> None:
    """Beside a w8a8 target the drafter's graphs are w8a8 (export.drafter_export.drafter_dtype), and they are
    the ones the server then loads (exported for this checkpoint in that dtype: nothing is exported again)."""
    import json

    from export.drafter_export import META_FILE, exported_for
    from export.repository import drafter_checkpoint
    from models.drafters import load_drafter
    from models.loading import load_transformer

    out = build_repository(tmp_path / "w8a8", "onnxruntime", "smollm2-135m-instruct", smollm2_dir, dtype="w8a8")
    params = read_parameters((out / ENGINE_MODEL / "config.pbtxt").read_text())
    graphs = out / ENGINE_MODEL / "1" / params["drafter_onnx"]
    assert json.loads((graphs / META_FILE).read_text())["dtype"] == "w8a8"
    checkpoint = drafter_checkpoint(params["drafter"])
    module = load_drafter(checkpoint, load_transformer(smollm2_dir))
    assert exported_for(graphs, checkpoint, module, "w8a8")


@pytest.fixture(scope="module")
def ort_repository(tmp_path_factory, smollm2_dir: Path) -> Path:
    out = build_repository(tmp_path_factory.mktemp("repo") / "ort", "onnxruntime", "smollm2-135m-instruct",
                           smollm2_dir)
    params = read_parameters((out / ENGINE_MODEL / "config.pbtxt").read_text())
    assert params["runtime"] == "onnxruntime"
    assert (out / ENGINE_MODEL / "1" / params["onnx_model"]).is_file()
    # The target's default drafter (the shipped DSpark one) is named, and the graph exports the layers it taps.
    assert params["drafter"] == default_drafter(smollm2_dir) and params["drafter"].startswith("checkpoint:")
    meta = read_metadata(out / ENGINE_MODEL / "1" / params["onnx_model"])
    assert set(drafter_tap_layers(params["drafter"])) <= set(meta["tap_layers"])
    # ... and that drafter's own graphs ship beside it
    graphs = out / ENGINE_MODEL / "1" / params["drafter_onnx"]
    assert params["drafter_onnx"] and {"context.onnx", "block.onnx", "markov.onnx", "confidence.onnx"} <= {
        p.name for p in graphs.iterdir()}
    return out


@pytest.mark.server
def test_onnxruntime_server_greedy_equals_torch_server(triton, ort_repository, smollm2_dir, tmp_path) -> None:
    from serving.triton_launcher import ServerConfig, TritonServer

    config = ServerConfig(
        model_repository=ort_repository,
        http_port=_free_port(),
        grpc_port=_free_port(),
        metrics_port=_free_port(),
        log_file=tmp_path / "server.log",
        extra_env={"DSPARK_MODEL": str(smollm2_dir)},
    )
    with TritonServer(config) as ort_server:
        for prompt in PROMPTS:
            ours = collect(stream_grpc(ort_server.url_grpc, prompt, max_tokens=NEW_TOKENS))
            ref = collect(stream_grpc(triton.grpc, prompt, max_tokens=NEW_TOKENS))
            assert ours.token_ids == ref.token_ids
            assert ours.text == ref.text and len(ours.token_ids) > 0
        # Speculation with the trained drafter on the ONNX Runtime target: still the target's greedy tokens.
        plain = collect(stream_grpc(ort_server.url_grpc, PROMPTS[1], max_tokens=NEW_TOKENS, spec_mode="off"))
        spec = collect(stream_grpc(ort_server.url_grpc, PROMPTS[1], max_tokens=NEW_TOKENS, spec_mode="static",
                                   num_draft_tokens=4))
        assert spec.draft_rounds > 0 and spec.draft_tokens >= spec.draft_rounds
        assert spec.token_ids == plain.token_ids
    # the drafter ran from its graphs, not as a torch module
    assert "target on onnxruntime, drafter dspark+prompt_lookup on onnxruntime" in (tmp_path / "server.log").read_text()


def test_serve_loads_the_model_a_built_repository_names(tmp_path, smollm2_dir: Path) -> None:
    import cli

    repo = build_repository(tmp_path / "repo", "torch", "qwen2.5-coder-0.5b-instruct", smollm2_dir)
    assert cli.served_model(None, repo) == "qwen2.5-coder-0.5b-instruct"
    assert cli.served_model("smollm2-135m-instruct", repo) == "smollm2-135m-instruct"
    assert cli.served_model(None, None) == cli.DEFAULT_MODEL


@pytest.mark.server
def test_a_graph_exported_from_another_model_stops_the_server_at_start(ort_repository, smollm2_dir, tmp_path) -> None:
    """The same weights under another model name stand in for another model: the shipped graph's
    recorded source must match the model the server loads."""
    from serving.triton_launcher import ServerConfig, TritonLaunchError, TritonServer

    other = tmp_path / "another-model"
    other.mkdir()
    for path in smollm2_dir.iterdir():
        if path.is_file():
            (other / path.name).symlink_to(path)
    server = TritonServer(ServerConfig(model_repository=ort_repository, http_port=_free_port(), grpc_port=_free_port(),
                                       metrics_port=_free_port(), log_file=tmp_path / "server.log",
                                       extra_env={"DSPARK_MODEL": str(other)}))
    with pytest.raises(TritonLaunchError) as error:
        server.start()
    message = (tmp_path / "server.log").read_text() + str(error.value)
    assert "was exported from smollm2-135m-instruct, but this server loads another-model" in message
    import cli  # `serve` says so before Triton starts

    result = CliRunner().invoke(cli.cli, ["serve", "--model-repository", str(ort_repository), "--model", str(other),
                                          "--http-port", "1"])
    assert result.exit_code == 1 and "--model: " in result.output and "this server loads another-model" in result.output
