"""Launch the tritonserver binary bundled in nvidia-pytriton, on CPU, on loopback only.

The pytriton wheel carries a full tritonserver with the python backend, but starting it needs
care (see the triton-on-cpu note): a backend directory with the stub for our Python, library
paths so the stub finds the venv's libpython (else the model load hangs silently), the venv
first on PATH, and a clean stop so /dev/shm regions do not pile up.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from hub.fetch import cache_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHM_PREFIX = "triton_python_backend_shm_region_"
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"


class TritonLaunchError(RuntimeError):
    """The server could not be started; the message says why (port, library, or log tail)."""


@dataclass
class ServerConfig:
    """How to run one tritonserver process."""

    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None  # default: <cache>/triton/logs/tritonserver-<http_port>.log
    pid_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    log_verbose: int = 0
    ready_timeout_s: float = 300
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--model-control-mode=explicit"]


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def _pytriton_libs() -> Path:
    """Shared libraries the bundled binaries link against (auditwheel's hashed names)."""
    return _pytriton_root().parents[1] / "nvidia_pytriton.libs"


def find_tritonserver() -> Path:
    """The tritonserver binary shipped in the nvidia-pytriton wheel."""
    path = _pytriton_root() / "bin" / "tritonserver"
    if not path.is_file():
        raise TritonLaunchError(f"tritonserver not found at {path}; is nvidia-pytriton==0.7.0 installed?")
    return path


def _copy_if_different(src: Path, dst: Path) -> None:
    """Copy via temp file + rename: overwriting a .so in place kills servers that have it mapped."""
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prepare_backend_dir(target: Path) -> Path:
    """Fill `target/python/` with the python backend and the stub for this interpreter; returns `target`."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        raise TritonLaunchError(f"no python backend stub for Python {version} in {stub.parent.parent}")
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in _PYTHON_BACKEND_FILES:
        _copy_if_different(root / "backends" / "python" / name, python_dir / name)
    _copy_if_different(stub, python_dir / _STUB)
    return target


def server_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its python stubs (library path, venv PATH, project on PYTHONPATH)."""
    env = dict(os.environ)

    def prepend(key: str, *values: str) -> None:
        env[key] = os.pathsep.join([*values, *([env[key]] if env.get(key) else [])])

    prepend("LD_LIBRARY_PATH", str(_pytriton_libs()), str(sysconfig.get_config_var("LIBDIR")))
    prepend("PATH", str(Path(sys.executable).parent))
    prepend("PYTHONPATH", str(PROJECT_ROOT))
    env.update(extra_env or {})
    return env


def check_stub_libraries(backend_dir: Path, env: dict[str, str]) -> None:
    """Fail fast if the stub cannot resolve a library: the model load would otherwise hang silently."""
    stub = backend_dir / "python" / _STUB
    try:
        out = subprocess.run(["ldd", str(stub)], env=env, capture_output=True, text=True, timeout=30).stdout
    except FileNotFoundError:
        return  # no ldd on this system; nothing to check with
    missing = [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]
    if missing:
        raise TritonLaunchError(
            f"python backend stub {stub} cannot load {', '.join(missing)} "
            f"(LD_LIBRARY_PATH={env.get('LD_LIBRARY_PATH', '')})"
        )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on host:port (TIME_WAIT leftovers of a stopped server do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _proc_stats() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc/<pid>/stat."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        yield int(stat.parent.name), state, int(ppid), int(pgrp)


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (the python stubs are children of tritonserver)."""
    children: dict[int, list[int]] = {}
    for child, _, parent, _ in _proc_stats():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _group_members(pgid: int) -> list[int]:
    """The live processes of a process group (a crashed server's stubs, reparented to init, stay in it)."""
    return [p for p, state, _, group in _proc_stats() if group == pgid and state != "Z"]


def shm_regions(pid: int) -> set[Path]:
    """The python-backend shared-memory files mapped by a server process or its stubs."""
    return _mapped_regions(_process_tree(pid))


def _mapped_regions(pids: list[int]) -> set[Path]:
    regions: set[Path] = set()
    for p in pids:
        try:
            maps = Path(f"/proc/{p}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)  # address perms offset dev inode [path]
            if len(parts) == 6 and Path(parts[5]).name.startswith(SHM_PREFIX):
                regions.add(Path(parts[5].removesuffix(" (deleted)")))
    return regions


STUB_EXIT_GRACE_S = 2.0  # after the server exits, how long its python-backend stubs get to follow it
DRAIN_S = 1.0  # after the stubs are signalled: the engine finishes its step and ends every request
EXIT_TIMEOUT_S = 5  # Triton's wait for in-flight requests and model unloads after SIGTERM
# After that Triton gives up ("Exiting immediately"), or waits on a client's open gRPC stream (2.51 shuts its
# gRPC server down only once every stream has closed): killing it then loses nothing, its models being unloaded
# or past waiting for.
STOP_TIMEOUT_S = EXIT_TIMEOUT_S + 5


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group the server led (it starts its own session) is still running."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _is_stub(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"triton_python_backend_stub")
    except OSError:
        return False


def _is_tritonserver(pid: int) -> bool:
    try:
        return b"tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _terminate(pid: int, timeout_s: float, popen: subprocess.Popen | None, known_regions: set[Path]) -> bool:
    """SIGTERM, wait, SIGKILL the process group as a last resort; returns True if it exited cleanly."""
    regions = known_regions | shm_regions(pid)
    clean = True
    stubs = [p for p in _group_members(pid) if _is_stub(p)]
    for stub in stubs:  # the engine model ends its requests (serving.stop_signal); the other stubs ignore it
        try:
            os.kill(stub, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if stubs:
        time.sleep(DRAIN_S)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        clean = False  # it was already gone: it died on its own
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid) and time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            break
        time.sleep(0.1)
    if _pid_alive(pid) and (popen is None or popen.poll() is None):
        clean = False
        try:
            os.killpg(pid, signal.SIGKILL)  # the server leads its own session; take the stubs too
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if popen is not None:
        rc = popen.wait()
        clean = clean and rc == 0
    else:
        while _pid_alive(pid):
            time.sleep(0.05)
    grace = time.monotonic() + STUB_EXIT_GRACE_S
    while _group_alive(pid) and time.monotonic() < grace:
        time.sleep(0.05)
    if _group_alive(pid):  # a stub the server left behind on its way out: it would hold its memory for good
        clean = False
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not clean:
        for region in regions:
            region.unlink(missing_ok=True)
    return clean


def _recorded_pid(pid_file: Path) -> int | None:
    """The PID a pid file holds, else None (missing or unreadable)."""
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_running_server(pid: int) -> bool:
    return _pid_alive(pid) and _is_tritonserver(pid)


def running_from_pid_file(pid_file: Path) -> int | None:
    """The PID of the live tritonserver the file records, else None (missing, stale or reused)."""
    pid = _recorded_pid(pid_file)
    return pid if pid is not None and _is_running_server(pid) else None


def recorded_ports(pid_file: Path) -> dict[str, int]:
    """The ports ("http", "grpc", "metrics") of the live tritonserver the pid file records, read from
    its command line; empty when none runs."""
    pid = running_from_pid_file(pid_file)
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if pid is not None else []
    except OSError:
        return {}
    ports = {}
    for arg in args:
        name, _, value = arg.partition("=")
        if name in ("--http-port", "--grpc-port", "--metrics-port") and value.isdigit():
            ports[name[2:-5]] = int(value)
    return ports


def foreign_pid(pid_file: Path) -> int | None:
    """The PID a pid file records when it names a live process that is neither a Triton server nor a
    crashed one's stubs: the file is another program's record (None otherwise)."""
    pid = _recorded_pid(pid_file)
    if pid is None or not _pid_alive(pid) or _is_tritonserver(pid) or any(map(_is_stub, _group_members(pid))):
        return None
    return pid


def stop_from_pid_file(pid_file: Path, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server whose PID the file holds; False if none was running (stale or missing file).

    A file naming a live process that is neither a Triton server nor a crashed one's stubs records
    another program: it is left as it is."""
    pid = _recorded_pid(pid_file)
    if pid is None:
        return False
    stopped = False
    if _is_running_server(pid):
        _terminate(pid, timeout_s, None, set())
        stopped = True
    elif stubs := [p for p in _group_members(pid) if _is_stub(p)]:
        # The server died (a crash) and left its python-backend stubs, which ignore SIGTERM, holding the
        # models' memory and their shared-memory regions: nothing else will ever free them.
        regions = _mapped_regions(stubs)
        for stub in stubs:
            try:
                os.kill(stub, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for region in regions:
            region.unlink(missing_ok=True)
        stopped = True
    elif _pid_alive(pid):
        return False
    pid_file.unlink(missing_ok=True)
    return stopped


class TritonServer:
    """One tritonserver process serving a model repository on 127.0.0.1."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen | None = None
        self._regions: set[Path] = set()
        self.log_file = config.log_file or cache_dir() / "triton" / "logs" / f"tritonserver-{config.http_port}.log"

    @property
    def url_http(self) -> str:
        return f"127.0.0.1:{self.config.http_port}"

    @property
    def url_grpc(self) -> str:
        return f"127.0.0.1:{self.config.grpc_port}"

    @property
    def url_metrics(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self, backend_dir: Path) -> list[str]:
        """The tritonserver command line (flags from the triton-on-cpu note)."""
        c = self.config
        return [
            str(find_tritonserver()),
            f"--model-repository={Path(c.model_repository).resolve()}",
            f"--backend-directory={backend_dir}",
            "--http-address=127.0.0.1", f"--http-port={c.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={c.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={c.metrics_port}",
            "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
            "--metrics-interval-ms=1000",
            "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={c.log_verbose}",
            *c.extra_args,
        ]

    def _check_ports(self) -> None:
        ports = {"http": self.config.http_port, "grpc": self.config.grpc_port, "metrics": self.config.metrics_port}
        if len(set(ports.values())) != len(ports):
            raise TritonLaunchError(f"ports must differ: {ports}")
        for kind, port in ports.items():
            if not port_is_free(port):
                raise TritonLaunchError(f"{kind} port {port} on 127.0.0.1 is already in use; pick another port")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url_http}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        """Spawn the server and block until /v2/health/ready answers 200."""
        if self._proc is not None and self._proc.poll() is None:
            raise TritonLaunchError(f"server already running (pid {self._proc.pid})")
        repo = Path(self.config.model_repository)
        if not repo.is_dir():
            raise TritonLaunchError(f"model repository {repo} is not a directory")
        self._check_ports()
        # Models read their own server's load from the metrics endpoint (see serving.load_monitor).
        env = server_env({"DSPARK_METRICS_URL": self.url_metrics, **self.config.extra_env})
        backend_dir = prepare_backend_dir(cache_dir() / "triton" / "backends")
        check_stub_libraries(backend_dir, env)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as log:
            self._proc = subprocess.Popen(self.command(backend_dir), env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.config.pid_file is not None:
            self.config.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.config.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + self.config.ready_timeout_s
        while not self._ready():
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._cleanup_after_failure()
                raise TritonLaunchError(f"tritonserver exited with code {rc} before ready; log "
                                        f"{self.log_file}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop(timeout_s=10)
                raise TritonLaunchError(f"tritonserver not ready after {self.config.ready_timeout_s:.0f} s; log "
                                        f"{self.log_file}:\n{self.log_tail()}")
            time.sleep(0.2)
        self._regions = shm_regions(self._proc.pid)

    def _cleanup_after_failure(self) -> None:
        if self._proc is not None:
            _terminate(self._proc.pid, 5, self._proc, self._regions)
        if self.config.pid_file is not None:
            self.config.pid_file.unlink(missing_ok=True)
        self._proc = None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; removes shm leftovers only if it died uncleanly."""
        if self._proc is not None:
            _terminate(self._proc.pid, timeout_s, self._proc, self._regions)
            self._proc = None
            self._regions = set()
        if self.config.pid_file is not None:
            self.config.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
