"""Embedding conditions through a real Triton server: the tiny text-style UNet
(diffusers' UNet2DConditionModel, cond [N, 5, 16]) served and sampled concurrently with
its null embedding and with a negative embedding, against `cfg-export sample`'s library
call. Tolerance as in test_server.py."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.grid import sample_grid
from cfg_export.serving.client import SamplerClient, request_samples
from tests.cfg_export.serving.conftest import needs_tritonserver

pytestmark = needs_tritonserver


@pytest.fixture(scope="module")
def sd_server(diffusers_artifacts, tmp_path_factory):
    from cfg_export.serving.options import RepositoryOptions
    from cfg_export.serving.repository import write_repository
    from cfg_export.serving.server import TritonServer

    root = tmp_path_factory.mktemp("triton-sd")
    repository = write_repository(diffusers_artifacts["sd"], root / "repo",
                                  RepositoryOptions(sampler_instances=2, queue_delay_us=2000))
    with TritonServer(repository.directory, log_path=root / "triton.log", startup_timeout=120) as running:
        yield running


def test_embedding_requests_equal_sample(sd_server, diffusers_artifacts, tmp_path):
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((2, 5, 16)).astype(np.float32)
    negative = rng.standard_normal((5, 16)).astype(np.float32)
    np.save(tmp_path / "cond.npy", cond)
    np.save(tmp_path / "negative.npy", negative)
    runs = [dict(cond=tmp_path / "cond.npy", n=2, w=[2.0, 4.0], steps=8, seed=1),
            dict(cond=tmp_path / "cond.npy", negative=tmp_path / "negative.npy", n=1, w=[3.0], steps=6, seed=2)]

    def served(i):
        request_samples(sd_server.url, npy=tmp_path / f"served{i}.npy", timeout=120, **runs[i])
        return np.load(tmp_path / f"served{i}.npy")

    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(served, range(len(runs))))
    for i, got in enumerate(results):
        sample_grid(diffusers_artifacts["sd"], npy=tmp_path / f"want{i}.npy", backend="onnxruntime-cpu", **runs[i])
        np.testing.assert_allclose(got, np.load(tmp_path / f"want{i}.npy"), rtol=0, atol=1e-5)


def test_a_bad_embedding_is_one_line(sd_server):
    with SamplerClient(sd_server.url, timeout=60) as client:
        with pytest.raises(CfgExportError) as info:
            client.sample(np.full((1, 5, 16), np.nan, dtype=np.float32), 1.0, steps=3)
        assert str(info.value) == f"{sd_server.url}: cond: contains NaN or infinity"
        with pytest.raises(CfgExportError) as info:
            client.sample(np.zeros((1, 5, 15), dtype=np.float32), 1.0, steps=3)
        assert "unexpected shape for input 'cond'" in str(info.value)  # Triton checks dims against the config
