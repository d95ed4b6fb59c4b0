"""The verbs: `cfg-export triton`, and `cfg-export serve` + `cfg-export request` against
`cfg-export sample` as a user runs them (subprocesses, a server on 127.0.0.1)."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.cfg_export.serving.conftest import needs_tritonserver
from tests.conftest import ROOT, run_cli


def test_triton_writes_a_repository_and_refuses_to_overwrite(tiny_artifacts, tmp_path):
    proc = run_cli("triton", tiny_artifacts / "stacked", "-o", tmp_path / "repo", "--sampler-instances", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'repo'} (models denoiser, sampler; denoiser python, up to 64 "
                                  f"rows per batch; 2 sampler instances x 8 runs)")
    proc = run_cli("triton", tiny_artifacts / "stacked", "-o", tmp_path / "repo")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"Error: {tmp_path / 'repo'} already exists and is not empty; pass --overwrite " \
                                  f"to replace it"


def test_triton_refuses_a_static_graph(tiny_artifacts, tmp_path):
    proc = run_cli("triton", tiny_artifacts / "static2", "-o", tmp_path / "repo")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("Error: the denoiser graph is static for N=2 images")
    assert not (tmp_path / "repo").exists()


def test_request_names_an_unreachable_server(tmp_path):
    from cfg_export.serving.server import free_port

    port = free_port()
    proc = run_cli("request", f"127.0.0.1:{port}", "--classes", "1", "-o", tmp_path / "x.png", "--timeout", "10")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"Error: cannot reach a Triton server at 127.0.0.1:{port} (")
    assert proc.stderr.rstrip().endswith("start one with: cfg-export serve ARTIFACT")


@pytest.mark.parametrize("url, message", [
    ("nonsense:url::", "expected HOST:PORT"),  # tritonclient's refusal came with a traceback from its __del__
    ("localhost", "expected HOST:PORT"),
    ("127.0.0.1:70000", "port 1-65535"),
    ("https://127.0.0.1:8000", "plain HTTP"),
])
def test_request_refuses_a_malformed_url_in_one_line(tmp_path, url, message):
    proc = run_cli("request", url, "--classes", "1", "-o", tmp_path / "x.png")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("options, message", [
    (["--prompt", "a cat", "--classes", "1", "-o", "x.png"], "--prompt and --classes: give one kind of condition"),
    (["--classes", "1", "-o", "x.txt"], "-o x.txt: expected a file name ending in .png"),
    (["--prompt", "a cat", "--latents", "l.txt"], "--latents l.txt: expected a file name ending in .npy"),
    (["--classes", "1", "-o", "x.png", "--timeout", "-1"], "--timeout: got -1, expected seconds > 0"),
])
def test_request_refuses_bad_options_before_connecting(tmp_path, options, message):
    # port 9 has no server: these must be refused before the client tries to connect
    proc = run_cli("request", "127.0.0.1:9", *options, cwd=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr and "cannot reach" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_server_address_takes_what_serve_prints():
    from cfg_export.serving.client import server_address

    assert server_address("127.0.0.1:8000") == "127.0.0.1:8000"
    assert server_address("http://127.0.0.1:8000/") == "127.0.0.1:8000"
    assert server_address("[::1]:8000") == "[::1]:8000"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, the dead ones not yet waited for included."""
    from cfg_export.serving.server import child_processes

    return child_processes(pid, live=False)


def start_serve(artifact):
    """`cfg-export serve ARTIFACT` (2 sampler instances) in a subprocess on free ports;
    returns it and its (HTTP, gRPC, metrics) ports."""
    from cfg_export.serving.server import free_port

    ports = free_port(), free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-c", "from cfg_export.cli import main; main()", "serve", str(artifact),
                              "--port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                              "--sampler-instances", "2"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return serve, ports


def stop_serve(serve) -> None:
    """Stops a serve subprocess as `kill` does (SIGTERM), killing it if it does not stop."""
    serve.send_signal(signal.SIGTERM)
    try:
        serve.wait(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()


@needs_tritonserver
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_and_request_give_what_sample_gives(tiny_artifacts, tmp_path):
    artifact = tiny_artifacts / "stacked"
    serve, (port, grpc_port, metrics_port) = start_serve(artifact)
    try:
        line = serve.stdout.readline()  # blocks until the server is ready (or serve exits)
        assert line.startswith(f"serving {artifact} at http://127.0.0.1:{port} (gRPC 127.0.0.1:{grpc_port}, metrics "
                               f"http://127.0.0.1:{metrics_port}/metrics)"), line + serve.stderr.read()
        args = ["--classes", "0,2", "--n", "2", "--w", "1,3", "--steps", "12", "--seed", "7", "--sampler", "dpmpp-2m"]
        proc = run_cli("request", f"127.0.0.1:{port}", *args, "-o", tmp_path / "served.png")
        assert proc.returncode == 1  # the tiny model's 2 channels are no image: refused before sending
        assert proc.stderr.startswith("Error: cannot draw samples of shape [2, 6, 6] as images")
        proc = run_cli("request", f"127.0.0.1:{port}", *args, "--npy", tmp_path / "served.npy")
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {tmp_path / 'served.npy'} ([4, 2, 6, 6] float32)" in proc.stdout
        proc = run_cli("sample", artifact, *args, "--npy", tmp_path / "sampled.npy", "-q")
        assert proc.returncode == 0, proc.stderr
        np.testing.assert_allclose(np.load(tmp_path / "served.npy"), np.load(tmp_path / "sampled.npy"), rtol=0,
                                   atol=1e-5)
        proc = run_cli("request", f"127.0.0.1:{port}", "--classes", "5", "--npy", tmp_path / "bad.npy")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"Error: 127.0.0.1:{port}: class 5 out of range: the model has classes 0..2 "
                                       f"(null class 3)")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'nv_inference_exec_count{model="denoiser",version="1"} 12' in metrics
        server_pids = children(serve.pid)
        assert server_pids, "no tritonserver child"
    finally:
        stop_serve(serve)
    assert serve.returncode == 0, serve.stderr.read()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in server_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in server_pids)


def read_line(stream, timeout: float) -> str:
    """The next line of a subprocess pipe, or "" when none comes within `timeout` seconds."""
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


@needs_tritonserver
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_restarts_the_server_when_a_model_process_dies(tiny_artifacts, tmp_path):
    """Triton 2.51's Python backend never answers the requests a crashed model process was
    running and fails those routed to it later: serve restarts the server."""
    from cfg_export.serving.server import model_processes

    artifact = tiny_artifacts / "stacked"
    serve, (port, grpc_port, metrics_port) = start_serve(artifact)
    try:
        line = read_line(serve.stdout, 180)
        assert line.startswith(f"serving {artifact} at http://127.0.0.1:{port}"), line
        (server_pid,) = children(serve.pid)
        models = model_processes(server_pid)
        assert sorted(models) == ["denoiser_0_0", "sampler_0_0", "sampler_0_1"]
        os.kill(models["sampler_0_1"], signal.SIGSEGV)
        lines = []
        while not any(line.startswith("error:") for line in lines):
            line = read_line(serve.stderr, 30)
            assert line, f"no error line from serve within 30 s; stderr so far: {lines}"
            lines.append(line)
        assert lines[-1].strip() == ("error: the model process of sampler_0_1 (killed by SIGSEGV) died; restarting "
                                     "tritonserver (the requests in flight fail, clients may resend them)")
        assert read_line(serve.stdout, 180).strip() == f"serving again at http://127.0.0.1:{port}"
        (new_pid,) = children(serve.pid)
        assert new_pid != server_pid and sorted(model_processes(new_pid)) == sorted(models)
        for seed in range(4):  # both sampler instances answer
            proc = run_cli("request", f"127.0.0.1:{port}", "--classes", "1", "--steps", "4", "--seed", str(seed),
                           "--npy", tmp_path / f"x{seed}.npy")
            assert proc.returncode == 0, proc.stderr
    finally:
        stop_serve(serve)
    assert serve.returncode == 0, serve.stderr.read()


def test_without_tritonclient_request_names_the_extra(tmp_path):
    from tests.conftest import run_without

    proc = run_without("tritonclient", f"""
        import cfg_export.serving.client, cfg_export.serving.repository, cfg_export.serving.server
        from cfg_export.cli import main
        assert "torch" not in sys.modules
        main(["request", "127.0.0.1:1", "--classes", "1", "--npy", {str(tmp_path / "x.npy")!r}])
    """)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: tritonclient.http is not installed (") and "cfg-export[serve]" in proc.stderr


@needs_tritonserver
def test_serve_on_a_busy_port_is_one_line(tiny_artifacts):
    import socket

    from cfg_export.serving.server import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", tiny_artifacts / "stacked", "--port", port, "--grpc-port", free_port(),
                       "--metrics-port", free_port(), "--sampler-instances", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: tritonserver exited at start (code 1): ")
    assert f"Socket '127.0.0.1:{port}' already in use" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("options, message", [
    (["--port", "99999"], "Error: Invalid value for '--port': 99999 is not in the range 1<=x<=65535."),
    (["--port", "8001"], "Error: --port 8001, --grpc-port 8001, --metrics-port 8002: two endpoints on one port; "
                         "give each its own"),
    (["--port", "9000", "--metrics-port", "9000"], "Error: --port 9000, --grpc-port 8001, --metrics-port 9000: two "
                                                   "endpoints on one port; give each its own"),
])
def test_serve_refuses_bad_ports_before_starting(tiny_artifacts, options, message):
    proc = run_cli("serve", tiny_artifacts / "stacked", *options)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == message
