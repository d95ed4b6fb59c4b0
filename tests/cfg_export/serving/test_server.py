"""A real Triton server (nvidia-pytriton's tritonserver, Python backend, CPU) on 127.0.0.1:
requests running at the same time give what `cfg-export sample` gives, their rows share
denoiser batches, bad requests get one-line errors, and neither a killed client nor a
burst beyond the queue costs the accepted requests anything.

Tolerance: served samples must equal the solo run to within 1e-5 (absolute, on samples of
order 1). The sampler loop is the same code on the same numpy; only the denoiser batch
differs (rows of other requests beside this one's), and ONNX Runtime may pick other
kernels or blockings at other batch sizes. On this machine the results are bitwise equal.
"""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cfg_export.runtime.grid import sample_grid
from cfg_export.runtime.errors import CfgExportError
from cfg_export.serving.client import SamplerClient, request_samples
from tests.conftest import ROOT

ATOL = 1e-5
REQUESTS = [  # (classes, n, w, extra sample options): different classes, w, seeds, steps and samplers
    ([0], 1, [0.0], dict(seed=0, steps=20)),
    ([1, 2], 2, [1.0, 3.0], dict(seed=5, steps=10)),
    ([2], 3, [2.5], dict(seed=9, steps=30, sampler="dpmpp-2m")),
    ([0, 1, 2], 1, [4.0], dict(seed=1, steps=15, sampler="ddpm")),
    ([1], 2, [-1.0], dict(seed=2, steps=25, eta=0.5)),
    ([2, 0], 1, [2.0], dict(seed=3, steps=12, negative=[1], spacing="trailing")),
]


def stats(client: SamplerClient, model: str) -> tuple[int, int]:
    """(requests that succeeded, executions) of a model so far."""
    s = client.client.get_inference_statistics(model)["model_stats"][0]
    return s["inference_stats"]["success"]["count"], s["execution_count"]


def solo(artifact, tmp_path, name, classes, n, w, options) -> np.ndarray:
    """What `cfg-export sample --npy` writes for the same settings (its library call)."""
    path = tmp_path / f"{name}.npy"
    sample_grid(artifact, classes=classes, n=n, w=w, npy=path, backend="onnxruntime-cpu", **options)
    return np.load(path)


def served(server, tmp_path, name, classes, n, w, options) -> np.ndarray:
    path = tmp_path / f"{name}.npy"
    request_samples(server.url, classes=classes, n=n, w=w, npy=path, timeout=120, **options)
    return np.load(path)


def test_concurrent_requests_equal_sample_and_share_denoiser_batches(server, tiny_artifacts, tmp_path):
    artifact = tiny_artifacts / "stacked"
    with SamplerClient(server.url) as client:
        requests_before, executions_before = stats(client, "denoiser")
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            futures = [pool.submit(served, server, tmp_path, f"served{i}", *r) for i, r in enumerate(REQUESTS)]
            results = [f.result(timeout=120) for f in futures]
        requests_after, executions_after = stats(client, "denoiser")
    for i, (got, r) in enumerate(zip(results, REQUESTS)):
        want = solo(artifact, tmp_path, f"solo{i}", *r)
        assert got.shape == want.shape == (len(r[0]) * r[1], 2, 6, 6)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"request {i}: {r}")
    steps = sum(r[3]["steps"] for r in REQUESTS)
    # one model call per run and step; calls of the runs in one sampler process merge before they leave it
    assert 0 < requests_after - requests_before <= steps
    # rows of different runs shared denoiser executions (merged in a sampler process, or by Triton's batcher)
    assert executions_after - executions_before < steps


@pytest.mark.parametrize("cond, w, options, message", [
    ([7], 1.0, {}, "class 7 out of range: the model has classes 0..2 (null class 3)"),
    ([1], float("nan"), {}, "w: got nan, expected a finite number"),
    ([1, 2], [1.0, 2.0, 3.0], {}, "w: got 3 values, expected 1 or one per image (2)"),
    ([1], 1.0, dict(steps=0), "steps: got 0, expected 1 to 100"),
    ([1], 1.0, dict(steps=101), "steps: got 101, expected 1 to 100"),
    ([1] * 9, 1.0, {}, "cond: got 9 images, this server takes at most 8 per request"),
    ([1], 1.0, dict(sampler="magic"), "sampler: got 'magic', expected one of ddim, ddpm, pndm, euler"),
    ([1], 1.0, dict(negative=[0, 1]), "negative: got 2 conditions, expected 1 or one per image (1)"),
    ([1], 1.0, dict(threshold=2.0), "threshold: got 2.0, expected a percentile in (0, 1]"),
    ([1], 1.0, dict(seed=-1), "seed: got -1, expected an integer 0 <= seed < 2**63"),
    ([1], 1.0, dict(eta=0.5, sampler="ddpm"), "eta applies to the ddim sampler only (DDIMScheduler), not ddpm"),
])
def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(server, tiny_artifacts, tmp_path, cond, w,
                                                                        options, message):
    with SamplerClient(server.url, timeout=60) as client:
        with pytest.raises(CfgExportError) as info:
            client.sample(np.asarray(cond), w, **{"steps": 5, **options})
    assert str(info.value).startswith(f"{server.url}: {message}") and "\n" not in str(info.value)
    got = served(server, tmp_path, "good", [2], 1, [1.0], dict(seed=4, steps=5))
    np.testing.assert_allclose(got, solo(tiny_artifacts / "stacked", tmp_path, "want", [2], 1, [1.0],
                                         dict(seed=4, steps=5)), rtol=0, atol=ATOL)


def test_client_checks_before_sending(server, tmp_path):
    with pytest.raises(CfgExportError, match=r"--negative: got 2 negative conditions, expected 1 or one per "
                                             r"condition \(1\)"):
        request_samples(server.url, classes=[1], negative=[0, 1], npy=tmp_path / "x.npy")
    with pytest.raises(CfgExportError, match="nothing to write: give -o FILE.png and/or --npy FILE.npy"):
        request_samples(server.url, classes=[1])
    with pytest.raises(CfgExportError, match=r"--noise: got shape \[3, 3\], expected \[2, "):
        request_samples(server.url, classes=[1], n=2, noise=np.zeros((3, 3), np.float32), npy=tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()


def test_unreachable_server_is_one_line(tmp_path):
    from cfg_export.serving.server import free_port

    with pytest.raises(CfgExportError, match=r"cannot reach a Triton server at 127\.0\.0\.1:\d+ .*cfg-export serve"):
        request_samples(f"127.0.0.1:{free_port()}", classes=[0], npy=tmp_path / "x.npy", timeout=10)


KILLED_CLIENT = """
import sys
import numpy as np
from cfg_export.serving.client import SamplerClient
with SamplerClient(sys.argv[1]) as client:
    print("sending", flush=True)
    client.sample(np.zeros(8, dtype=np.int64), 3.0, steps=100)
"""


def test_a_killed_client_does_not_stall_the_others(server, tiny_artifacts, tmp_path):
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.url], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert client.stdout.readline().strip() == "sending"
        time.sleep(0.5)  # its request is running
    finally:
        os.kill(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
    others = [([i % 3], 1, [float(i)], dict(seed=10 + i, steps=20)) for i in range(3)]
    start = time.monotonic()
    with ThreadPoolExecutor(len(others)) as pool:
        results = list(pool.map(lambda a: served(server, tmp_path, f"after{a[0]}", *a[1]), enumerate(others)))
    assert time.monotonic() - start < 60
    for i, (got, r) in enumerate(zip(results, others)):
        np.testing.assert_allclose(got, solo(tiny_artifacts / "stacked", tmp_path, f"want{i}", *r), rtol=0, atol=ATOL)


def test_a_burst_beyond_the_queue_is_refused_cleanly_and_loses_no_accepted_request(server, tiny_artifacts,
                                                                                   tmp_path):
    burst = [([i % 3], 1, [1.5], dict(seed=100 + i, steps=60)) for i in range(20)]  # 4 runs + 4 waiting

    def send(i):
        try:
            return served(server, tmp_path, f"burst{i}", *burst[i])
        except CfgExportError as exc:
            return str(exc)

    with ThreadPoolExecutor(len(burst)) as pool:
        results = list(pool.map(send, range(len(burst))))
    refused = [r for r in results if isinstance(r, str)]
    accepted = [(i, r) for i, r in enumerate(results) if not isinstance(r, str)]
    assert refused and len(accepted) >= 4
    assert all(r == f"{server.url}: [503] [request id: <id_unknown>] Exceeds maximum queue size" or
               r.endswith("Exceeds maximum queue size") for r in refused), refused
    for i, got in accepted:
        np.testing.assert_allclose(got, solo(tiny_artifacts / "stacked", tmp_path, f"want{i}", *burst[i]),
                                   rtol=0, atol=ATOL)


def test_a_run_cancelled_over_grpc_stops_at_its_next_step(server):
    """gRPC carries cancellation to the model (request.is_cancelled()); over HTTP a client
    that goes away is not reported by Triton 2.51, and its run goes on to its last step."""
    grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient's gRPC client needs grpcio")
    client = grpc.InferenceServerClient(server.grpc_url)
    cond = grpc.InferInput("cond", [8], "INT64")
    cond.set_data_from_numpy(np.zeros(8, dtype=np.int64))
    steps = grpc.InferInput("steps", [1], "INT64")
    steps.set_data_from_numpy(np.array([100], dtype=np.int64))
    with SamplerClient(server.url) as http:
        before, _ = stats(http, "denoiser")
        done = []
        context = client.async_infer("sampler", [cond, steps], callback=lambda result, error: done.append(error))
        deadline = time.monotonic() + 60
        while stats(http, "denoiser")[0] - before < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the run is under way
        context.cancel()
        while not done and time.monotonic() < deadline:
            time.sleep(0.05)
        ran, last = stats(http, "denoiser")[0] - before, -1
        while ran != last and time.monotonic() < deadline:  # until the run has stopped calling the denoiser
            time.sleep(0.5)
            ran, last = stats(http, "denoiser")[0] - before, ran
    client.close()
    assert done and done[0] is not None  # the client saw its call cancelled
    assert 3 <= ran < 100, ran  # the run stopped before its 100 steps
