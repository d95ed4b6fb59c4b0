"""Starting and stopping a Triton server on loopback for a model repository.

The server binary: a `tritonserver` on PATH (the NGC container's, with all its backends)
is taken first; else the one inside the nvidia-pytriton wheel (`pip install
'cfg-export[serve]'`), which carries Triton's Python backend but not its ONNX Runtime
and TensorRT backends. That one runs from a backend folder made here (the wheel's
Python backend and the stub built for the running Python), with the wheel's libraries
on LD_LIBRARY_PATH and this Python's bin folder first on PATH, so that the stub finds
this environment's numpy and onnxruntime.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cfg_export.runtime.errors import CfgExportError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 180.0  # seconds for every model to load (one process per instance)
STOP_TIMEOUT = 30.0
# Triton's Python backend can abort while many stub processes start on a loaded machine
# (boost::interprocess::lock_exception, seen here with 16 instances): such a start is retried
START_ATTEMPTS = 3
DEFAULT_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002


@dataclass(frozen=True)
class TritonBinary:
    """A tritonserver executable, the backend folder it needs (None: its own default) and
    the environment variables it runs with."""

    path: Path
    origin: str  # "PATH" or "nvidia-pytriton"
    backend_dir: Path | None = None
    env: dict = field(default_factory=dict)


def _pytriton_server(workdir: Path) -> TritonBinary | None:
    """The wheel's tritonserver with a backend folder under `workdir`, or None without the wheel."""
    spec = importlib.util.find_spec("pytriton")  # found, not imported: its import pulls in much more
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    python_dir = root / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file():
        return None
    if not stub.is_file():
        raise CfgExportError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub}); run "
                             f"with a Python it ships a stub for, or put Triton's own tritonserver on PATH")
    backends = workdir / "backends"
    (backends / "python").mkdir(parents=True)
    for source in (*python_dir.iterdir(), stub):
        if source.is_file():
            (backends / "python" / source.name).symlink_to(source)
    libs = root.parents[1] / "nvidia_pytriton.libs"
    env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH")) if p)
    return TritonBinary(binary, "nvidia-pytriton", backends, env)


def find_tritonserver(workdir: Path) -> TritonBinary:
    """Returns the tritonserver to run: one on PATH, else the nvidia-pytriton wheel's
    (with its backend folder made under `workdir`); raises CfgExportError naming the extra."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonBinary(Path(on_path), "PATH")
    found = _pytriton_server(workdir)
    if found is None:
        raise CfgExportError("no tritonserver found: pip install 'cfg-export[serve]' (the nvidia-pytriton wheel "
                             "carries one), or run inside Triton's container (tritonserver on PATH)")
    return found


def free_port() -> int:
    """Returns a TCP port on loopback that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TritonServer:
    """A tritonserver process serving `repository` over HTTP on 127.0.0.1.

    Use it as a context manager (`with TritonServer(repo) as server:`) or call start()
    and stop(). Ports left None are picked free; a clash at start (another process took
    the port first) is retried with new ports. The server log goes to `log_path`
    (default: a file in the server's work folder).
    """

    def __init__(self, repository: str | Path, port: int | None = None, metrics_port: int | None = None,
                 metrics: bool = False, grpc_port: int | None = None, grpc: bool = False,
                 log_path: str | Path | None = None, startup_timeout: float | None = None):
        self.repository = Path(repository)
        self.port = port
        self.metrics_port = metrics_port
        self.metrics = metrics
        self.grpc_port = grpc_port
        self.grpc = grpc
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = DEFAULT_STARTUP_TIMEOUT if startup_timeout is None else startup_timeout
        self.process: subprocess.Popen | None = None
        self.binary: TritonBinary | None = None
        self._workdir: Path | None = None
        self._own_log: Path | None = None
        self.remove_on_stop: Path | None = None  # a temporary repository folder, removed by stop()
        # the Python backend's shared-memory regions of this server: removed at stop if a crash left them
        self._shm_prefix = f"cfg_export_{os.getpid()}_{id(self):x}_"
        self._models: dict[str, int] = {}  # the model instances' processes once ready, by instance name

    @property
    def url(self) -> str:
        """host:port of the HTTP endpoint, as tritonclient takes it."""
        return f"{HOST}:{self.port}"

    @property
    def grpc_url(self) -> str | None:
        """host:port of the gRPC endpoint (a gRPC client that cancels stops its run), or None."""
        return f"{HOST}:{self.grpc_port}" if self.grpc else None

    @property
    def metrics_url(self) -> str | None:
        return f"http://{HOST}:{self.metrics_port}/metrics" if self.metrics else None

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def command(self) -> list[str]:
        cmd = [str(self.binary.path), f"--model-repository={self.repository.resolve()}",
               f"--http-address={HOST}", f"--http-port={self.port}", f"--allow-grpc={'true' if self.grpc else 'false'}",
               "--disable-auto-complete-config", "--exit-on-error=true", f"--exit-timeout-secs={int(STOP_TIMEOUT)}",
               f"--allow-metrics={'true' if self.metrics else 'false'}"]
        if self.metrics:
            cmd += [f"--metrics-address={HOST}", f"--metrics-port={self.metrics_port}"]
        if self.grpc:
            cmd += [f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}"]
        if self.binary.backend_dir is not None:
            cmd.append(f"--backend-directory={self.binary.backend_dir}")
        cmd.append(f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}")
        return cmd

    def start(self) -> "TritonServer":
        """Starts the server and returns once every model is ready; raises CfgExportError
        with the server's own error line when it does not come up."""
        if not (self.repository / "sampler" / "config.pbtxt").is_file():
            raise CfgExportError(f"{self.repository}: not a model repository made by cfg-export triton "
                                 f"(no sampler/config.pbtxt)")
        self._workdir = Path(tempfile.mkdtemp(prefix="cfg-export-triton-"))
        try:
            self.binary = find_tritonserver(self._workdir)
            self._launch_until_ready(pick_ports=self.port is None)
            return self
        except BaseException:
            self._own_log = None  # keep the log the error names
            self.stop()
            raise

    def _launch_until_ready(self, pick_ports: bool) -> None:
        """Launches the server until it is ready (START_ATTEMPTS tries); raises CfgExportError."""
        for attempt in range(START_ATTEMPTS):
            if pick_ports:
                self.port = free_port()
            if self.metrics and (self.metrics_port is None or (pick_ports and attempt)):
                self.metrics_port = free_port()
            if self.grpc and (self.grpc_port is None or (pick_ports and attempt)):
                self.grpc_port = free_port()
            error, retry = self._launch()
            if error is None:
                return
            if not (retry or (pick_ports and "already in use" in error)):
                break
            log.warning("%s; starting it again", error)
        raise CfgExportError(error)

    def dead_models(self) -> list[str]:
        """The model instances whose process has died since the server became ready, each
        named with how it ended (e.g. "sampler_1_0 (killed by SIGSEGV)"). Triton's Python
        backend (2.51) neither restarts such a process nor fails the requests routed to it:
        they wait forever, so a caller restarts the server (see restart)."""
        if self.process is None or not self._models:
            return []
        alive = model_processes(self.process.pid)
        return [f"{name} ({_how_it_ended(pid)})" for name, pid in self._models.items() if name not in alive]

    def restart(self) -> None:
        """Stops the server and starts it again on the same ports, from the same repository
        (requests in flight fail); raises CfgExportError when it does not come up."""
        self._terminate()
        self._remove_shm()
        self._launch_until_ready(pick_ports=False)

    def _launch(self) -> tuple[str | None, bool]:
        """Runs the server once; returns (None, False) when ready, else (the reason it is
        not, whether to try again: it was killed by a signal while loading its models)."""
        log_path = self.log_path or self._default_log()
        env = {**os.environ, **self.binary.env}
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                            preexec_fn=_stop_with_parent)
        log.info("started %s (%s) on %s, pid %d, log %s", self.binary.path, self.binary.origin, self.url,
                 self.process.pid, log_path)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, pid, self.process = self.process.returncode, self.process.pid, None
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # model processes it left behind
                self._remove_shm()
                return (f"tritonserver exited at start (code {code}): {_error_line(log_path)}; log: {log_path}",
                        code < 0)
            if _ready(self.port):
                self._models = model_processes(self.process.pid)
                return None, False
            time.sleep(0.25)
        self._terminate()
        return (f"tritonserver was not ready after {self.startup_timeout:.0f} s: {_error_line(log_path)}; "
                f"log: {log_path}"), False

    def _default_log(self) -> Path:
        """A log file kept when the server fails to start, removed by a clean stop."""
        if self._own_log is None:
            handle, name = tempfile.mkstemp(prefix="cfg-export-triton-", suffix=".log")
            os.close(handle)
            self._own_log = Path(name)
        return self._own_log

    def wait(self) -> int:
        """Blocks until the server exits; returns its exit code."""
        return self.process.wait() if self.process is not None else 0

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # Triton unloads its models and stops their processes
        try:
            process.wait(timeout=STOP_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver pid %d did not stop in time: killing its process group", process.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the group started for this server: stubs left behind
        process.wait(timeout=10)

    def _remove_shm(self) -> None:
        """Removes shared-memory regions of this server that its processes did not (after a crash)."""
        shm = Path("/dev/shm")
        if shm.is_dir():
            for region in shm.glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()

    def stop(self) -> None:
        """Stops the server (and its model processes) and removes its work folder."""
        self._terminate()
        self._remove_shm()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._own_log is not None:
            self._own_log.unlink(missing_ok=True)
            self._own_log = None
        if self.remove_on_stop is not None:
            shutil.rmtree(self.remove_on_stop, ignore_errors=True)
            self.remove_on_stop = None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def child_processes(pid: int, live: bool = True) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc, else none); live: without the
    dead ones not yet waited for (zombies)."""
    found = []
    if not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == str(pid) and not (live and stat[0] in ("Z", "X")):
                found.append(int(entry))
    return found


def model_processes(server_pid: int) -> dict[str, int]:
    """The live model processes (Python-backend stubs) of a tritonserver, by model
    instance name (the stub's next-to-last argument, e.g. "sampler_1_0")."""
    found = {}
    for pid in child_processes(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if len(args) >= 3 and "stub" in os.path.basename(args[0]):
            found[args[-2]] = pid
    return found


def _how_it_ended(pid: int) -> str:
    """How a dead child process ended, from its zombie's exit status, if it is still there."""
    stat = _proc_stat(pid)
    if stat is None or len(stat) < 50 or stat[0] != "Z":
        return "gone"
    status = int(stat[49])  # the exit status as waitpid reports it (Linux 3.5+)
    if os.WIFSIGNALED(status):
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _stop_with_parent() -> None:
    """In the server's process before exec (Linux): SIGTERM it when the process that
    started it dies, so that no server outlives a killed client of this module."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _error_line(log_path: Path) -> str:
    """The most telling line of a server log: its last error, else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    fatal = [line for line in lines if line.startswith(("terminate called", "what():"))]
    errors = [line for line in lines if (line.startswith("E") or "error" in line.lower())
              and "CudaDriverHelper has not been initialized" not in line]  # printed by every start without a GPU
    return " ".join(fatal[:2]) if fatal else (errors or lines or ["no output"])[-1][:500]


def serve_artifact(artifact, repository: str | Path | None = None, options=None, port: int | None = None,
                   grpc_port: int | None = None, metrics_port: int | None = None, log_path: str | Path | None = None,
                   overwrite: bool = False) -> TritonServer:
    """Returns a started TritonServer for the artifact (an Artifact or a folder): its
    repository written at `repository` (default: a temporary folder removed at stop),
    HTTP on 127.0.0.1:`port` (default 8000), gRPC on `grpc_port` (default 8001), metrics
    on `metrics_port` (default 8002).
    options: the RepositoryOptions. Stop it with stop() (or use it in a `with` block)."""
    from .repository import write_repository

    temporary = repository is None
    folder = Path(tempfile.mkdtemp(prefix="cfg-export-repo-")) / "repository" if temporary else Path(repository)
    try:
        write_repository(artifact, folder, options, overwrite=overwrite)
        server = TritonServer(folder, port=DEFAULT_PORT if port is None else port,
                              metrics_port=DEFAULT_METRICS_PORT if metrics_port is None else metrics_port,
                              metrics=True, grpc_port=DEFAULT_GRPC_PORT if grpc_port is None else grpc_port, grpc=True,
                              log_path=log_path)
        server.remove_on_stop = folder.parent if temporary else None
        return server.start()
    except BaseException:
        if temporary:
            shutil.rmtree(folder.parent, ignore_errors=True)
        raise
