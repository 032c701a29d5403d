"""A real tritonserver (from the pytriton wheel) starts, serves a python model, and stops cleanly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from serving.openai_frontend import stop_recorded
from serving.triton_launcher import (
    SHM_PREFIX,
    ServerConfig,
    TritonLaunchError,
    TritonServer,
    port_is_free,
    prepare_backend_dir,
    stop_from_pid_file,
)

ADD_ONE_CONFIG = """
name: "add_one"
backend: "python"
max_batch_size: 8
input [{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }]
output [{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
"""

ADD_ONE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils

import serving  # proves the project root is on the stub's PYTHONPATH


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def shm_files() -> set[Path]:
    return set(Path("/dev/shm").glob(f"{SHM_PREFIX}*"))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    model = tmp_path / "repo" / "add_one"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(textwrap.dedent(ADD_ONE_CONFIG))
    (model / "1" / "model.py").write_text(textwrap.dedent(ADD_ONE_MODEL))
    return tmp_path / "repo"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))


def test_serve_infer_stop(repo: Path, tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    before = shm_files()
    http, grpc, metrics = free_ports(3)
    pid_file = tmp_path / "triton.pid"
    config = ServerConfig(repo, http, grpc, metrics, log_file=tmp_path / "triton.log", pid_file=pid_file,
                          extra_env={"OMP_NUM_THREADS": "1"}, ready_timeout_s=120)
    with TritonServer(config) as server:
        pid = server.pid
        assert pid_file.read_text().strip() == str(pid)
        client = httpclient.InferenceServerClient(server.url_http)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("add_one", [inp])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)
        assert server.url_metrics.endswith("/metrics")
        # `status` finds this server's ports (none of them the defaults) from its pid file
        import cli
        result = CliRunner().invoke(cli.cli, ["status", "--pid-file", str(pid_file)])
        assert result.exit_code == 0 and "ready: True" in result.output, result.output
        assert "pending dspark requests: 0" in result.output  # read from its metrics port
    result = CliRunner().invoke(cli.cli, ["status", "--pid-file", str(pid_file)])  # not the default ports' server
    assert result.exit_code == 1 and f"no server recorded in {pid_file} is running" in result.output
    assert not Path(f"/proc/{pid}").exists()
    assert not pid_file.exists()
    assert all(port_is_free(p) for p in (http, grpc, metrics))
    assert shm_files() - before == set()


def test_taken_port_fails_fast_naming_it(repo: Path) -> None:
    http, grpc, metrics = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", grpc))
        taken.listen()
        server = TritonServer(ServerConfig(repo, http, grpc, metrics))
        with pytest.raises(TritonLaunchError, match=f"grpc port {grpc}"):
            server.start()
        assert server.pid is None


def test_crashing_server_reports_log_tail(tmp_path: Path) -> None:
    bad = tmp_path / "bad_repo" / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 1\n')
    http, grpc, metrics = free_ports(3)
    with pytest.raises(TritonLaunchError, match="exited with code"):
        TritonServer(ServerConfig(tmp_path / "bad_repo", http, grpc, metrics, ready_timeout_s=60)).start()


def test_cli_serve_failure_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """A server that will not start ends `cli.py serve` with exit code 1 and the log tail."""
    import cli

    bad = tmp_path / "bad_repo" / "dspark"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('name: "dspark"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 1\n')
    http, grpc, metrics = free_ports(3)
    args = ["serve", "--detach", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            "--pid-file", str(tmp_path / "server.pid")]
    result = CliRunner().invoke(cli.cli, args + ["--model-repository", str(tmp_path / "bad_repo")])
    assert result.exit_code == 1, result.output
    assert "exited with code" in result.output and "dspark" in result.output
    assert not isinstance(result.exception, TritonLaunchError)  # handled: click's own exit
    # a directory without the dspark model is refused before Triton starts (it would be ready, serving nothing)
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli.cli, args + ["--model-repository", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "is not a DSpark model repository" in result.output


def test_stop_from_stale_pid_file(tmp_path: Path) -> None:
    pid_file = tmp_path / "stale.pid"
    pid_file.write_text("999999999\n")
    assert stop_from_pid_file(pid_file) is False
    assert not pid_file.exists()
    assert stop_from_pid_file(tmp_path / "missing.pid") is False


def test_stop_leaves_a_pid_file_that_records_another_live_program(tmp_path: Path) -> None:
    """A pid file naming a live process that is no Triton server is someone else's: neither it nor the
    process is touched (a wrong --pid-file must not delete another daemon's record)."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        for pid_file, stop in ((tmp_path / "other.pid", stop_from_pid_file), (tmp_path / "other.pid.openai", stop_recorded)):
            pid_file.write_text(f"{other.pid}\n")
            assert stop(pid_file) is False
            assert pid_file.read_text() == f"{other.pid}\n"
            assert other.poll() is None
        import cli

        result = CliRunner().invoke(cli.cli, ["stop", "--pid-file", str(tmp_path / "other.pid")])
        assert result.exit_code == 1 and "that is not a Triton server: left as it is" in result.output
        assert (tmp_path / "other.pid").exists() and other.poll() is None
        result = CliRunner().invoke(cli.cli, ["serve", "--detach", "--pid-file", str(tmp_path / "other.pid")])
        assert result.exit_code == 1 and "give this server its own --pid-file" in result.output, result.output
        assert (tmp_path / "other.pid").read_text() == f"{other.pid}\n"
        (tmp_path / "garbage.pid").write_text("not a pid")  # unreadable: nothing was running, nothing refused
        result = CliRunner().invoke(cli.cli, ["stop", "--pid-file", str(tmp_path / "garbage.pid")])
        assert result.exit_code == 0 and "no server was running" in result.output, result.output
    finally:
        other.kill()
        other.wait()


def test_stop_says_it_stopped_a_frontend_whose_server_was_gone(tmp_path: Path) -> None:
    import sys

    import cli

    frontend = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "serving.openai_frontend"])
    try:
        (tmp_path / "server.pid.openai").write_text(f"{frontend.pid}\n")
        result = CliRunner().invoke(cli.cli, ["stop", "--pid-file", str(tmp_path / "server.pid")])
        assert result.exit_code == 0 and "stopped the OpenAI-compatible frontend" in result.output, result.output
        assert frontend.wait(timeout=10) is not None
    finally:
        frontend.kill()


def test_backend_dir_is_not_rewritten_when_unchanged(tmp_path: Path) -> None:
    target = prepare_backend_dir(tmp_path / "backends")
    lib = target / "python" / "libtriton_python.so"
    inode = lib.stat().st_ino
    prepare_backend_dir(target)
    assert lib.stat().st_ino == inode
    assert (target / "python" / "triton_python_backend_stub").stat().st_mode & 0o111


def test_stop_from_pid_file_stops_running_server(repo: Path, tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    pid_file = tmp_path / "triton.pid"
    server = TritonServer(ServerConfig(repo, http, grpc, metrics, pid_file=pid_file, ready_timeout_s=120))
    server.start()
    pid = server.pid
    import cli

    # a second `serve` with the same record refuses (overwriting it would orphan this server from `stop`)
    second = CliRunner().invoke(cli.cli, ["serve", "--detach", "--pid-file", str(pid_file), "--http-port", "1"])
    assert second.exit_code == 1 and f"is running (pid {pid})" in second.output
    assert stop_from_pid_file(pid_file) is True
    assert not pid_file.exists()
    server.stop()  # reaps the child; nothing left to do
    assert not Path(f"/proc/{pid}").exists()


def test_killed_server_shm_regions_are_removed(repo: Path) -> None:
    before = shm_files()
    http, grpc, metrics = free_ports(3)
    server = TritonServer(ServerConfig(repo, http, grpc, metrics, ready_timeout_s=120))
    server.start()
    assert shm_files() - before, "the python backend should have created a shm region"
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()
    assert shm_files() - before == set()


def test_stopping_kills_a_stub_the_server_left_behind(tmp_path: Path) -> None:
    """Seen in a test run: tritonserver exited on SIGTERM while a python-backend stub of its process
    group lived on, orphaned, holding 2.7 GB. Stopping must leave nothing of the server's group."""
    import subprocess
    import sys
    import time

    from serving.triton_launcher import _terminate

    stub_pid_file = tmp_path / "stub.pid"
    server = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        stub = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        open({str(stub_pid_file)!r}, "w").write(str(stub.pid))
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # exits cleanly, leaving the stub behind
        time.sleep(600)
    """)
    popen = subprocess.Popen([sys.executable, "-c", server], start_new_session=True)
    deadline = time.monotonic() + 30
    while not stub_pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stub = int(stub_pid_file.read_text())
    assert Path(f"/proc/{stub}").exists()
    assert _terminate(popen.pid, 10, popen, set()) is False  # not clean: something outlived the server
    deadline = time.monotonic() + 5
    while Path(f"/proc/{stub}").exists() and time.monotonic() < deadline:  # init reaps the killed orphan
        time.sleep(0.05)
    assert not Path(f"/proc/{stub}").exists()


def test_stop_after_a_crash_kills_the_orphaned_stubs_and_removes_their_shm(tmp_path: Path) -> None:
    """Seen when a 4 MB request body crashed tritonserver 2.51 (SIGSEGV): the dspark stub, which ignores
    SIGTERM, lived on under init with 1.9 GB and its shared-memory region, and `cli.py stop` said no
    server was running. The pid file still names the server's process group: stop must clear it."""
    import subprocess
    import sys
    import time

    region = Path("/dev/shm") / f"{SHM_PREFIX}test_{os.getpid()}"
    stub_pid_file = tmp_path / "stub.pid"
    stub_code = ("import mmap, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                 f"f = open({str(region)!r}, 'w+b'); f.truncate(4096); m = mmap.mmap(f.fileno(), 4096); "
                 f"open({str(stub_pid_file)!r}, 'w').write(str(__import__('os').getpid())); time.sleep(600)")
    server = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen(["bash", "-c", 'exec -a triton_python_backend_stub {sys.executable} -c "$0"', {stub_code!r}])
        while not os.path.exists({str(stub_pid_file)!r}):
            time.sleep(0.05)
        os._exit(139)  # the server dies; its stub does not
    """)
    popen = subprocess.Popen([sys.executable, "-c", server], start_new_session=True)
    pid_file = tmp_path / "triton.pid"
    pid_file.write_text(f"{popen.pid}\n")
    popen.wait(timeout=30)
    stub = int(stub_pid_file.read_text())
    try:
        assert Path(f"/proc/{stub}").exists() and region.exists()
        assert stop_from_pid_file(pid_file, timeout_s=5) is True
        deadline = time.monotonic() + 5
        while Path(f"/proc/{stub}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{stub}").exists()
        assert not region.exists() and not pid_file.exists()
    finally:
        if Path(f"/proc/{stub}").exists():
            os.kill(stub, signal.SIGKILL)
        region.unlink(missing_ok=True)


def test_status_says_which_port_it_could_not_reach() -> None:
    """A server on non-default ports answers health on --url; its metrics live on a port --url does not say."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import cli

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    http = HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        closed, = free_ports(1)
        result = CliRunner().invoke(cli.cli, ["status", "--url", f"127.0.0.1:{http.server_port}",
                                              "--metrics-url", f"http://127.0.0.1:{closed}/metrics"])
    finally:
        http.shutdown()
    assert result.exit_code == 1
    assert "ready: True" in result.output
    assert f"Error: metrics not reachable at http://127.0.0.1:{closed}/metrics (the server's --metrics-port" in result.output


def test_openai_frontend_refuses_a_taken_port_before_starting() -> None:
    """A port another server holds (Triton's metrics port answers any path) is refused up front: the
    readiness probe would otherwise take that server's answer for the frontend's."""
    import socket

    from serving.openai_frontend import start_frontend

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot serve the OpenAI API on 127.0.0.1:{port}"):
            start_frontend("127.0.0.1:1", Path("unused"), "m", port, Path("unused.log"))


def test_serve_refuses_an_openai_port_it_cannot_use_before_starting_triton(tmp_path: Path) -> None:
    """Seen: a clash of --openai-port with a Triton port (or a taken one) was found only after Triton had
    loaded (7 s here, minutes for a large model)."""
    import time

    import cli

    http, grpc, metrics = free_ports(3)
    args = ["serve", "--detach", "--pid-file", str(tmp_path / "s.pid"), "--http-port", str(http), "--grpc-port",
            str(grpc), "--metrics-port", str(metrics)]
    started = time.monotonic()
    result = CliRunner().invoke(cli.cli, args + ["--openai-port", str(http)])
    assert result.exit_code == 1 and f"--openai-port {http} is one of Triton's ports" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli.cli, args + ["--openai-port", str(port)])
    assert result.exit_code == 1 and f"cannot serve the OpenAI API on 127.0.0.1:{port}" in result.output
    assert time.monotonic() - started < 5 and not (tmp_path / "s.pid").exists()  # Triton never started
