"""A real Triton server on 127.0.0.1 for the serving tests: started once per module from
a repository of the tiny test model, stopped by the fixture (and, should the test run be
killed, by the server's parent-death signal)."""
import importlib.util
import shutil

import pytest

SERVER_OPTIONS = dict(sampler_instances=2, runs_per_sampler=2, max_queue=4, max_images=8, queue_delay_us=2000)


def tritonserver_available() -> bool:
    return shutil.which("tritonserver") is not None or importlib.util.find_spec("pytriton") is not None


needs_tritonserver = pytest.mark.skipif(not tritonserver_available(),
                                        reason="no tritonserver: pip install 'cfg-export[serve]' (nvidia-pytriton)")


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory):
    """A started TritonServer serving tests.models:conv2d (stacked, T = 100): 2 sampler
    processes of 2 runs each, at most 4 requests waiting, 8 images per request; HTTP and gRPC."""
    if not tritonserver_available():
        pytest.skip("no tritonserver: pip install 'cfg-export[serve]' (nvidia-pytriton)")
    from cfg_export.serving.options import RepositoryOptions
    from cfg_export.serving.repository import write_repository
    from cfg_export.serving.server import TritonServer

    root = tmp_path_factory.mktemp("triton")
    repository = write_repository(tiny_artifacts / "stacked", root / "repo", RepositoryOptions(**SERVER_OPTIONS))
    with TritonServer(repository.directory, grpc=True, log_path=root / "triton.log", startup_timeout=120) as running:
        yield running


@pytest.fixture(scope="session")
def served_pipelines(tmp_path_factory):
    """Tiny diffusers pipelines (tests/tiny_pipelines.py) exported by cfg-export onnx:
    sd (one text encoder), sdxl (two, pooled and time_ids), dit (class labels and names)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from cfg_export.export.pipelines import export_pipeline
    from tests import tiny_pipelines

    root = tmp_path_factory.mktemp("served_pipelines")
    savers = {"sd": tiny_pipelines.save_sd, "sdxl": tiny_pipelines.save_sdxl, "dit": tiny_pipelines.save_dit}
    for name, save in savers.items():
        export_pipeline(save(root / f"{name}-diffusers"), root / name)
    return {name: root / name for name in savers}


def start_server(artifact, root, **options):
    """A started TritonServer for the artifact's repository (written under `root`)."""
    from cfg_export.serving.options import RepositoryOptions
    from cfg_export.serving.repository import write_repository
    from cfg_export.serving.server import TritonServer

    repository = write_repository(artifact, root / "repo", RepositoryOptions(**options))
    return TritonServer(repository.directory, log_path=root / "triton.log", startup_timeout=120).start()
