"""The serving layer's guards without a server: load reading, drafter fit, and the Triton adapter's execute."""
from __future__ import annotations

import importlib.util
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from models.drafters import DrafterConfig
from models.loading import load_config
from orchestrator.drafting import DrafterMismatchError, check_drafter_fits
from orchestrator.engine import Engine, EngineConfig
from serving.load_monitor import LoadMonitor, LoadReading, parse_metrics
from tests.conftest import PROJECT_ROOT

METRICS = """# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="ensemble",version="1"} 3
nv_inference_pending_request_count{model="preprocessing",version="1"} 0
nv_inference_pending_request_count{model="dspark",version="1"} 3
nv_inference_queue_duration_us{model="ensemble",version="1"} 9000000
nv_inference_queue_duration_us{model="dspark",version="1"} 2000000
nv_cpu_utilization 0.5
"""


def test_load_reading_counts_the_engine_model_only():
    # Three requests through the ensemble are pending in the ensemble and in dspark: they are three, not six.
    reading = parse_metrics(METRICS, "dspark")
    assert reading.pending_requests == 3
    assert reading.queue_seconds_total == 2.0
    assert reading.cpu_utilization == 0.5


def test_load_monitor_outlives_a_bad_read():
    """A read that fails in any way (a truncated body is an HTTPException, a garbled line a ValueError)
    skips that period; the thread goes on and later readings still arrive."""
    readings: list[LoadReading] = []
    monitor = LoadMonitor("http://unused", "dspark", readings.append, period_s=0.001)
    results = iter([ValueError("garbled"), RuntimeError("truncated"), parse_metrics(METRICS, "dspark")])

    def read() -> LoadReading:
        result = next(results, None)
        if isinstance(result, Exception):
            raise result
        return result or parse_metrics(METRICS, "dspark")

    monitor.read = read
    monitor.start()
    deadline = time.monotonic() + 10
    while not readings and time.monotonic() < deadline:
        time.sleep(0.01)
    monitor.stop()
    assert readings and readings[0].pending_requests == 3


def test_drafter_that_does_not_fit_the_target_is_named_with_it(smollm2_dir):
    target = load_config(smollm2_dir)
    shipped = DrafterConfig.from_json(
        (PROJECT_ROOT / "models" / "checkpoints" / "smollm2-135m-instruct-dspark" / "config.json").read_text())
    check_drafter_fits("shipped", shipped, "smollm2", target)
    qwen_like = DrafterConfig(**{**shipped.__dict__, "vocab_size": 151936, "hidden_size": 896,
                                 "tap_layers": (1, 15, 31)})
    with pytest.raises(DrafterMismatchError) as error:
        check_drafter_fits("checkpoint:qwen-drafter", qwen_like, "smollm2-135m-instruct", target)
    message = str(error.value)
    for part in ("checkpoint:qwen-drafter", "smollm2-135m-instruct", "vocabulary 151936 != 49152",
                 "hidden size 896 != 576", "tap layers [31] out of range 0..30"):
        assert part in message, part
    small_lm = type(target)(**{**target.__dict__, "vocab_size": 32000})
    with pytest.raises(DrafterMismatchError, match="vocabulary 32000 != 49152"):
        check_drafter_fits("model:other", small_lm, "smollm2-135m-instruct", target)


# --- model.py's execute, with triton_python_backend_utils stubbed (the only Triton import) ----------

class _Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return False


class _Tensor:
    def __init__(self, name, value):
        self._name, self._value = name, value

    def name(self):
        return self._name

    def as_numpy(self):
        return self._value


class _Request:
    def __init__(self, inputs, parameters="{}"):
        self._inputs = inputs
        self._parameters = parameters  # a JSON object, as InferenceRequest.parameters() returns it
        self.sender = _Sender()

    def parameters(self):
        return self._parameters

    def get_response_sender(self):
        return self.sender

    def inputs(self):
        if self._inputs is None:
            raise RuntimeError("shared memory region vanished")
        return [_Tensor(k, v) for k, v in self._inputs.items()]


@pytest.fixture
def model_module(monkeypatch):
    stub = types.ModuleType("triton_python_backend_utils")
    stub.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError(Exception):
        CANCELLED, UNAVAILABLE = "cancelled", "unavailable"

        def __init__(self, message, code=None):
            super().__init__(message)
            self.message, self.code = message, code

    stub.TritonError = TritonError
    stub.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(
        output_tensors=output_tensors, error=error)
    stub.Tensor = _Tensor
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    path = Path(PROJECT_ROOT / "model_repository" / "dspark" / "1" / "model.py")
    spec = importlib.util.spec_from_file_location("dspark_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_execute_answers_every_request_of_a_batch_whatever_fails(model_module, smollm2_fp32, smollm2_encoder):
    model = model_module.TritonPythonModel()
    model.encoder = smollm2_encoder
    model.engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(2, 64, 8))
    good = {"input_ids": np.array([1, 2, 3], dtype=np.int32), "max_tokens": np.array([2], dtype=np.int32)}
    requests = [_Request(good), _Request(None), _Request({"input_ids": np.array([1.5])}), _Request(good),
                _Request(good, '{"max_new_tokens": 5}')]
    model.execute(requests)
    while model.engine.step():
        pass
    for request in requests:
        finals = [r for r, flags in request.sender.sent if flags == 1]
        assert len(finals) == 1, "each request gets exactly one final response"
    assert "internal error" in requests[1].sender.sent[0][0].error.message
    assert "input_ids" in requests[2].sender.sent[0][0].error.message
    assert "unexpected input max_new_tokens" in requests[4].sender.sent[0][0].error.message
    assert requests[0].sender.sent[-1][0].error is None and requests[3].sender.sent[-1][0].error is None


def test_shutdown_answers_unavailable_not_internal_error(model_module, smollm2_fp32, smollm2_encoder):
    """Requests running when the model unloads, and those arriving after, are told the server is going
    away (UNAVAILABLE, which clients and the OpenAI frontend's 503 treat as retryable), not that it failed."""
    model = model_module.TritonPythonModel()
    model.encoder = smollm2_encoder
    model.engine = Engine(smollm2_fp32, smollm2_encoder.tokenizer, EngineConfig(2, 64, 8))
    good = {"input_ids": np.array([1, 2, 3], dtype=np.int32), "max_tokens": np.array([8], dtype=np.int32)}
    running, late = _Request(good), _Request(good)
    model.execute([running])
    model.engine.step()
    model.engine.shutdown()
    model.execute([late])
    for request in (running, late):
        (response, flags), = [sent for sent in request.sender.sent if sent[1] == 1]
        assert (response.error.message, response.error.code) == ("server is shutting down", "unavailable")


def test_drafter_settings_resolve_auto_and_lookup_first(smollm2_dir, tmp_path):
    """`auto` takes the target's own default, lookup-first included; a user's own model directory gets
    prompt lookup alone, even asked lookup-first; lookup after lookup or after none is refused by name."""
    from export.repository import resolve_drafter

    shipped = "checkpoint:models/checkpoints/smollm2-135m-instruct-dspark"
    assert resolve_drafter("auto", smollm2_dir) == (shipped, True)
    assert resolve_drafter(shipped, smollm2_dir) == (shipped, False)
    assert resolve_drafter(shipped + "+prompt_lookup", smollm2_dir) == (shipped, True)
    assert resolve_drafter("auto+prompt_lookup", tmp_path) == ("prompt_lookup", False)
    for bad in ("prompt_lookup+prompt_lookup", "none+prompt_lookup", shipped + "+prompt_lookup+prompt_lookup"):
        with pytest.raises(ValueError, match=re.escape(f"drafter '{bad}': +prompt_lookup goes after auto")):
            resolve_drafter(bad, smollm2_dir)


def test_drafter_settings_a_server_could_not_load_are_refused_from_their_configs(smollm2_dir, tmp_path):
    """What `serve --drafter` and the model's load both check before any weights load, each with its reason."""
    from export.repository import check_drafter_setting
    from models.drafters import DrafterMismatchError

    assert check_drafter_setting("auto", smollm2_dir) == ("checkpoint:models/checkpoints/smollm2-135m-instruct-dspark", True)
    assert check_drafter_setting("prompt_lookup", smollm2_dir) == ("prompt_lookup", False)
    for setting, message in (("garbage", "unknown drafter 'garbage': expected auto | none"),
                             (f"checkpoint:{tmp_path}", "holds no trained drafter"),
                             ("model:nosuch", "neither a model directory nor one of"),
                             ("none+prompt_lookup", "goes after auto")):
        with pytest.raises(ValueError, match=message):
            check_drafter_setting(setting, smollm2_dir)
    with pytest.raises(DrafterMismatchError, match="trained for qwen2.5-coder-1.5b-instruct.*vocabulary 151936 != 49152"):
        check_drafter_setting("checkpoint:models/checkpoints/qwen2.5-coder-1.5b-instruct-dspark", smollm2_dir)


@pytest.mark.server
def test_a_foreground_serve_ended_by_sigterm_stops_its_server(smollm2_dir: Path, tmp_path: Path) -> None:
    """SIGTERM (a supervisor's stop) ends `serve` through its cleanup, as Ctrl-C does: no Triton, which runs in
    its own session, is left behind, nor its pid file."""
    import signal
    import socket
    import subprocess

    from serving.triton_launcher import running_from_pid_file, stop_from_pid_file

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    http, grpc, metrics = free_port(), free_port(), free_port()
    pid_file = tmp_path / "fg.pid"
    cmd = [sys.executable, "cli.py", "serve", "--drafter", "prompt_lookup", "--pid-file", str(pid_file),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    serve = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        for line in serve.stdout:
            if "Ctrl-C to stop." in line:
                break
        pid = running_from_pid_file(pid_file)
        assert pid is not None
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() and not pid_file.exists()
    finally:
        serve.kill()
        stop_from_pid_file(pid_file)
