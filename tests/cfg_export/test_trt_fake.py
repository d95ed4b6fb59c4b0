"""build_engine and the tensorrt backend run against tests/fake_tensorrt.py: a stand-in
for the TensorRT module and CUDA that records what is asked and runs the source ONNX on
ONNX Runtime CPU. These tests check the wiring (which flags for which version, the FP32
constraints, profiles, timing cache, calibrator, files written, buffers per shape,
profile choice, CUDA graph capture, refusals); TensorRT itself is only exercised by
test_trt_build.py on a GPU."""
import shutil
import sys

import numpy as np
import pytest

from cfg_export.build.builder import build_engine
from cfg_export.build.plan import EngineOptions
from cfg_export.runtime.backends import device_memory
from cfg_export.runtime.backends import trt as trt_backend
from cfg_export.runtime.backends.trt import TensorRTBackend
from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.files import sha256_file
from cfg_export.runtime.guidance import GuidanceOptions
from cfg_export.runtime.pipeline import sample_guided
from cfg_export.runtime.trt_versions import DeviceInfo
from tests import fake_tensorrt
from tests.cfg_export.test_trt_cli import tiny_kept
from tests.fake_tensorrt import FakeCuda


@pytest.fixture
def fake(monkeypatch):
    """install(version, device) puts the fake tensorrt and CUDA in place for one test."""

    def install(version="10.3.0.30", device=DeviceInfo("Fake GPU", "8.6")):
        cuda = FakeCuda(device)
        module = fake_tensorrt.make_module(version)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(device_memory, "open_cuda", lambda device=0: cuda)
        monkeypatch.setattr(trt_backend, "open_cuda", lambda device=0: cuda)
        fake_tensorrt.CALLS.clear()
        return module, cuda

    return install


@pytest.fixture
def artifact(tiny_artifacts, tmp_path):
    return shutil.copytree(tiny_artifacts / "stacked", tmp_path / "tiny")


def feeds(rows, seed=0):
    rng = np.random.default_rng(seed)
    n = rows // 2
    return {"sample": rng.standard_normal((rows, 2, 6, 6)).astype(np.float32),
            "timestep": rng.integers(0, 100, rows).astype(np.int64),
            "cond": np.r_[rng.integers(0, 3, rows - n), np.full(n, 3)].astype(np.int64)}


def onnxruntime_eps(directory, batch):
    import onnxruntime as ort

    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, batch)[0]


def test_tensorrt_10_fp16_constrains_the_kept_layers(fake, artifact, tmp_path):
    trt, _ = fake("10.3.0.30")
    cache = tmp_path / "timing.cache"
    options = EngineOptions(fp16=True, max_batch=8, workspace_mib=1024, optimization_level=5, timing_cache=str(cache))
    result = build_engine(artifact, None, options)
    network, config = fake_tensorrt.LAST_BUILD["network"], fake_tensorrt.LAST_BUILD["config"]
    assert network.flags == 0 and network.source == str(artifact / "model.onnx")  # no EXPLICIT_BATCH from 10 on
    assert config.flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    assert config.pools == {trt.MemoryPoolType.WORKSPACE: 1024 << 20} and config.builder_optimization_level == 5
    assert [p.shapes for p in config.profiles] == [{"sample": ((2, 2, 6, 6), (8, 2, 6, 6), (16, 2, 6, 6)),
                                                     "timestep": ((2,), (8,), (16,)), "cond": ((2,), (8,), (16,))}]
    constrained = [layer for layer in network.layers if layer.precision == trt.float32]
    kept = tiny_kept(artifact)
    assert [layer.name for layer in constrained] == kept and result.constrained == len(kept)
    assert all(set(layer.output_types.values()) == {trt.float32} for layer in constrained)
    m = read_engine_manifest(artifact)
    assert m.precision == "fp16" and m.model_file == "model.engine"
    assert m.model_sha256 == sha256_file(artifact / "model.engine")
    engine = m.engine
    assert (engine["tensorrt"], engine["gpu"], engine["compute_capability"]) == ("10.3.0.30", "Fake GPU", "8.6")
    assert engine["route"] == "fp16 via builder-flag" and engine["source_onnx"] == "model.onnx"
    assert engine["source_onnx_sha256"] == sha256_file(artifact / "model.onnx")
    assert [p["rows"] for p in engine["profiles"]] == [[2, 8, 16]]
    assert engine["rebuild"] == (f"cfg-export trt {artifact} --fp16 --max-batch 8 --workspace 1024 --opt-level 5 "
                                 f"--timing-cache {cache}")
    assert sorted(p.name for p in artifact.iterdir()) == ["engine.json", "manifest.json", "model.engine", "model.onnx"]
    assert cache.read_text() == "tactic-0"
    build_engine(artifact, None, options)  # the cache is read, extended and merged back
    assert cache.read_text() == "tactic-0 tactic-1"


def test_tensorrt_11_builds_the_fp16_typed_onnx(fake, artifact, tmp_path):
    trt, _ = fake("11.1.0")
    out = tmp_path / "engine"
    result = build_engine(artifact, out, EngineOptions(fp16=True, max_batch=2))
    network, config = fake_tensorrt.LAST_BUILD["network"], fake_tensorrt.LAST_BUILD["config"]
    assert network.source == str(out / "model.fp16.onnx")
    assert network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) and config.flags == set()
    assert result.constrained == 0 and len(result.fp16.kept) == 16
    m = read_engine_manifest(out)
    assert m.engine["source_onnx"] == "model.fp16.onnx" and m.engine["strongly_typed"]
    assert m.engine["source_onnx_sha256"] == sha256_file(out / "model.fp16.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["engine.json", "model.engine", "model.fp16.onnx"]


def test_tensorrt_8_6_dla_and_compatibility(fake, artifact, tmp_path):
    trt, _ = fake("8.6.1.6")
    build_engine(artifact, tmp_path / "dla", EngineOptions(dla_core=1, max_batch=1))
    network, config = fake_tensorrt.LAST_BUILD["network"], fake_tensorrt.LAST_BUILD["config"]
    assert network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert config.default_device_type == trt.DeviceType.DLA and config.DLA_core == 1
    assert config.flags == {trt.BuilderFlag.GPU_FALLBACK}
    assert read_engine_manifest(tmp_path / "dla").engine["dla_core"] == 1
    build_engine(artifact, tmp_path / "portable", EngineOptions(hardware_compat="ampere+", version_compatible=True,
                                                                max_batch=1))
    config = fake_tensorrt.LAST_BUILD["config"]
    assert config.hardware_compatibility_level == trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert config.flags == {trt.BuilderFlag.VERSION_COMPATIBLE}


def test_implicit_calibrator_on_tensorrt_10(fake, artifact, tmp_path):
    from cfg_export.calibration.record import record_calibration

    trt, _ = fake("10.3.0.30")
    data = tmp_path / "calib.npz"
    record_calibration(artifact, data, classes=[0, 1], n=1, steps=5)  # 5 steps x 4 rows of the stacked batch
    build_engine(artifact, None, EngineOptions(int8=True, calibration_data=str(data), opt_batch=2, max_batch=4))
    config = fake_tensorrt.LAST_BUILD["config"]
    assert config.flags == {trt.BuilderFlag.INT8} and config.calibration_profile is config.profiles[0]
    assert fake_tensorrt.LAST_BUILD["calibration_batches"] == 5  # 20 rows in batches of the opt shape, 4 rows
    assert (artifact / "calibration.cache").read_bytes() == b"fake ranges"
    assert read_engine_manifest(artifact).precision == "int8"
    np.savez(data, sample=np.zeros((20, 2, 6, 6), np.float32))
    with pytest.raises(CfgExportError, match=r"calib.npz: got arrays \['sample'\], expected a calibration file"):
        build_engine(artifact, None, EngineOptions(int8=True, calibration_data=str(data)))


def test_failed_build_writes_no_engine(fake, artifact, tmp_path, monkeypatch):
    trt, _ = fake("10.3.0.30")
    monkeypatch.setattr(trt.Builder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(CfgExportError, match=r"TensorRT 10\.3\.0\.30 could not build the engine"):
        build_engine(artifact, tmp_path / "out", EngineOptions())
    assert not any((tmp_path / "out").iterdir())


@pytest.fixture
def fp32_engine(fake, artifact):
    fake("10.3.0.30")
    build_engine(artifact, None, EngineOptions(max_batch=8, interval_profile=True))
    return artifact


def test_sampling_through_the_engine_backend(fake, fp32_engine):
    _, cuda = fake("10.3.0.30")
    guidance = GuidanceOptions(interval=(0.0, 0.5))  # steps outside it call N rows, not 2N
    want = sample_guided(fp32_engine, [0, 1, 2], w=2.0, steps=8, seed=3, guidance=guidance,
                         backend="onnxruntime-cpu").samples
    fake_tensorrt.CALLS.clear()
    result = sample_guided(fp32_engine, [0, 1, 2], w=2.0, steps=8, seed=3, guidance=guidance, backend="tensorrt")
    np.testing.assert_array_equal(result.samples, want)  # the fake runs the same ONNX: the wiring is exact
    executes = [c for c in fake_tensorrt.CALLS if c[0] == "execute"]
    assert len(executes) == 8 and {(profile, rows) for _, profile, rows in executes} == {(0, 6), (1, 3)}
    assert [c[0] for c in fake_tensorrt.CALLS].count("create_execution_context") == 2  # one per profile
    assert cuda.allocations == 2 * 4  # two call shapes x (3 inputs + 1 output), allocated once each
    assert result.backend == "tensorrt"


def test_cuda_graphs_are_recaptured_after_a_shape_change(fake, fp32_engine):
    _, cuda = fake("10.3.0.30")
    m = read_engine_manifest(fp32_engine)
    with TensorRTBackend(fp32_engine / "model.engine", m, cuda_graph=True) as backend:
        for rows, seed in ((4, 0), (4, 1), (2, 2), (2, 3), (4, 4)):  # both shapes run on profile 1 (opt 4)
            batch = feeds(rows, seed)
            np.testing.assert_array_equal(backend.infer(batch)["eps"], onnxruntime_eps(fp32_engine, batch))
    assert cuda.captures == 3 and [c[0] for c in fake_tensorrt.CALLS].count("launch") == 2


def test_engine_for_another_gpu_is_refused_before_deserializing(fake, fp32_engine):
    fake("10.3.0.30", DeviceInfo("NVIDIA H100", "9.0"))
    with pytest.raises(CfgExportError, match=r"built for TensorRT 10\.3\.0\.30 on Fake GPU \(compute capability "
                                             r"8\.6\), this machine has TensorRT 10\.3\.0\.30 on NVIDIA H100 \(9\.0\).*"
                                             r"rebuild it here with: cfg-export trt .* --max-batch 8 "
                                             r"--interval-profile$"):
        sample_guided(fp32_engine, [0], steps=2, backend="tensorrt")
    assert ("deserialize",) not in fake_tensorrt.CALLS
    fake("10.7.0.23")
    with pytest.raises(CfgExportError, match=r"built with TensorRT 10\.3\.0\.30, and this TensorRT is 10\.7\.0\.23"):
        sample_guided(fp32_engine, [0], steps=2, backend="tensorrt")


def test_unreadable_engine_is_refused(fake, fp32_engine):
    fake("10.3.0.30")
    (fp32_engine / "model.engine").write_bytes(b"garbage")
    m = read_engine_manifest(fp32_engine).with_sha(fp32_engine)
    m.write(fp32_engine, "engine.json")
    with pytest.raises(CfgExportError, match=r"TensorRT 10\.3\.0\.30 cannot deserialize it .*rebuild it here with"):
        with TensorRTBackend(fp32_engine / "model.engine", m):
            pass


def test_calls_outside_the_profiles_are_refused(fake, fp32_engine):
    fake("10.3.0.30")
    m = read_engine_manifest(fp32_engine)
    with TensorRTBackend(fp32_engine / "model.engine", m) as backend:
        with pytest.raises(CfgExportError, match=r"got a call of 18 rows, expected rows in its profiles \(2\.\.16, "
                                                 r"1\.\.8\); rebuild it with a larger --max-batch"):
            backend.infer(feeds(18))


def read_engine_manifest(directory):
    return Artifact.open(directory).stage().engine.manifest


def test_teardown_releases_in_reverse_order_of_creation(fake, fp32_engine):
    """Execution contexts, then the engine, then its runtime, and the CUDA context last:
    TensorRT objects destroyed after their CUDA context touch freed state."""
    fake("10.3.0.30")
    with TensorRTBackend(fp32_engine / "model.engine", read_engine_manifest(fp32_engine)) as backend:
        backend.infer(feeds(4))
        backend.infer(feeds(8))
        fake_tensorrt.CALLS.clear()
    destroyed = [what for call, *rest in fake_tensorrt.CALLS if call == "destroy" for what in rest]
    order = [what for k, what in enumerate(destroyed) if k == 0 or destroyed[k - 1] != what]  # one per kind
    assert order == ["context", "engine", "runtime", "cuda context"], destroyed
