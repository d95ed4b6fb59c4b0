"""Building engines and running them: needs TensorRT and an NVIDIA GPU, skipped (with the
reason) everywhere else. Never run on the machines this package is developed on (no GPU,
no TensorRT): see the README's TensorRT section."""
import json
import shutil

import numpy as np
import pytest

from cfg_export.build.builder import build_engine
from cfg_export.build.plan import EngineOptions
from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.backends import open_backend


def read_engine_manifest(directory):
    return Artifact.open(directory).model_file(engine=True).manifest
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.files import sha256_file
from cfg_export.runtime.guidance import GuidanceOptions
from cfg_export.runtime.pipeline import sample_guided
from tests.conftest import has_module, run_cli


def _skip_reason():
    if not has_module("tensorrt"):
        return "tensorrt is not installed (pip install 'cfg-export[tensorrt]'; needs an NVIDIA GPU)"
    from cfg_export.runtime.backends.device_memory import open_cuda

    try:
        open_cuda().close()
    except CfgExportError as exc:
        return f"no usable NVIDIA GPU: {exc}"
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

TF32_TOLERANCE = 5e-3  # TensorRT uses TF32 for FP32 convolutions on Ampere and newer by default
FP16_TOLERANCE = 3e-2


def feeds(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2 * n, 2, 6, 6)).astype(np.float32),
            "timestep": rng.integers(0, 100, 2 * n).astype(np.int64),
            "cond": np.r_[rng.integers(0, 3, n), np.full(n, 3)].astype(np.int64)}


def onnxruntime_eps(directory, batch):
    import onnxruntime as ort

    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, batch)[0]


def rel_error(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def fp32_engine(tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "fp32"
    result = build_engine(tiny_artifacts / "stacked", out, EngineOptions(max_batch=4, interval_profile=True,
                                                                          timing_cache=str(out.parent / "t.cache")))
    return out, result


def test_fp32_engine_manifest(fp32_engine, tiny_artifacts):
    import tensorrt as trt

    out, result = fp32_engine
    m = read_engine_manifest(out)
    assert sorted(p.name for p in out.iterdir()) == ["engine.json", "model.engine"]
    assert m.model_sha256 == sha256_file(out / "model.engine") and m.precision == "fp32"
    assert m.engine["tensorrt"] == trt.__version__ and m.engine["gpu"] == result.device.name
    assert m.engine["source_onnx_sha256"] == sha256_file(tiny_artifacts / "stacked" / "model.onnx")
    assert [p["rows"] for p in m.engine["profiles"]] == [[2, 8, 8], [1, 4, 4]]
    assert (out.parent / "t.cache").stat().st_size > 0


def test_fp32_engine_matches_onnxruntime(fp32_engine, tiny_artifacts):
    out, _ = fp32_engine
    with open_backend(out, "tensorrt") as backend:
        for n in (1, 3, 4, 1):  # shapes change and come back: buffers are reused per shape
            batch = feeds(n, seed=n)
            (got,) = backend.infer(batch).values()
            assert rel_error(got, onnxruntime_eps(tiny_artifacts / "stacked", batch)) < TF32_TOLERANCE


def test_cuda_graphs_replay_the_same(fp32_engine):
    from cfg_export.runtime.backends.trt import TensorRTBackend

    out, _ = fp32_engine
    m = read_engine_manifest(out)
    batches = [feeds(2, 0), feeds(2, 1), {k: v[:2] for k, v in feeds(2, 2).items()}, feeds(2, 3)]
    with TensorRTBackend(out / "model.engine", m) as plain, TensorRTBackend(out / "model.engine", m,
                                                                            cuda_graph=True) as graphed:
        for batch in batches:  # 4 rows, 4, 2 (unguided, the second profile), 4 again
            np.testing.assert_array_equal(plain.infer(batch)["eps"], graphed.infer(batch)["eps"])


def test_sampling_with_the_engine(fp32_engine, tiny_artifacts):
    out, _ = fp32_engine
    guidance = GuidanceOptions(interval=(0.0, 0.5))  # some steps unguided: N-row calls
    want = sample_guided(tiny_artifacts / "stacked", [0, 1, 2], w=2.0, steps=10, seed=3, guidance=guidance,
                         backend="onnxruntime-cpu").samples
    got = sample_guided(out, [0, 1, 2], w=2.0, steps=10, seed=3, guidance=guidance).samples  # auto: engine only
    assert rel_error(got, want) < 1e-2


@pytest.mark.parametrize("typed", [None, True])
def test_fp16_routes(tiny_artifacts, tmp_path, typed):
    out = tmp_path / "fp16"
    result = build_engine(tiny_artifacts / "stacked", out, EngineOptions(fp16=True, max_batch=2, strongly_typed=typed))
    m = read_engine_manifest(out)
    assert m.precision == "fp16" and m.engine["route"] == result.plan.route.name
    batch = feeds(2)
    with open_backend(out, "tensorrt") as backend:
        (got,) = backend.infer(batch).values()
    assert rel_error(got, onnxruntime_eps(tiny_artifacts / "stacked", batch)) < FP16_TOLERANCE


def test_engine_for_another_gpu_is_refused(fp32_engine, tmp_path):
    out = shutil.copytree(fp32_engine[0], tmp_path / "moved")
    facts = json.loads((out / "engine.json").read_text())
    facts["engine"]["compute_capability"] = "5.0"
    (out / "engine.json").write_text(json.dumps(facts))
    with pytest.raises(CfgExportError, match=r"compute capability 5\.0.*rebuild it here with: cfg-export trt"):
        with open_backend(out, "tensorrt"):
            pass


def test_cli_build_and_sample(tiny_artifacts, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("trt", tiny_artifacts / "stacked", "-o", out, "--fp16", "--max-batch", 2)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    proc = run_cli("sample", out, "--backend", "tensorrt", "--classes", "0,1", "--n", 1, "--steps", 5,
                   "--npy", tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "x.npy").shape == (2, 2, 6, 6)


def test_onnxruntime_tensorrt_provider(tiny_artifacts, tmp_path):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT execution provider")
    from cfg_export.runtime.backends.onnxrt_trt import OnnxRuntimeTensorRTBackend
    from cfg_export.runtime.manifest import read_manifest

    directory = tiny_artifacts / "stacked"
    m = read_manifest(directory)
    batch = feeds(2)
    with OnnxRuntimeTensorRTBackend(directory / "model.onnx", m, cache_dir=tmp_path / "cache") as backend:
        got = backend.infer(batch)["eps"]
    assert rel_error(got, onnxruntime_eps(directory, batch)) < TF32_TOLERANCE
    assert any((tmp_path / "cache").iterdir())  # the engine was cached
