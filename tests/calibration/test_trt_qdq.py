"""The Q/DQ artifact of the new recipe on TensorRT 10.x and 11.x, wired against the
stand-in for tensorrt and CUDA (tests/fake_tensorrt.py, which runs the source ONNX on ONNX
Runtime CPU). What TensorRT's ONNX parser needs of explicit quantization is checked on the
graph; that TensorRT really builds it as INT8, and how fast and accurate that is, needs a
GPU and is not checked here. A precision schedule runs as two engines."""
import shutil
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from cfg_export.build.builder import build_engine
from cfg_export.build.plan import EngineOptions
from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact
from cfg_export.runtime.backends import device_memory, open_backend
from cfg_export.runtime.backends import trt as trt_backend
from cfg_export.runtime.backends.scheduled import ScheduledBackend
from cfg_export.runtime.pipeline import sample_guided
from cfg_export.runtime.trt_versions import DeviceInfo
from tests import fake_tensorrt
from tests.fake_tensorrt import FakeCuda


@pytest.fixture
def fake(monkeypatch):
    def install(version):
        cuda = FakeCuda(DeviceInfo("Fake GPU", "8.6"))
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module(version))
        monkeypatch.setattr(device_memory, "open_cuda", lambda device=0: cuda)
        monkeypatch.setattr(trt_backend, "open_cuda", lambda device=0: cuda)
        fake_tensorrt.CALLS.clear()
        return sys.modules["tensorrt"]

    return install


def test_recipe_is_explicit_quantization_tensorrt_parses(digits_int8):
    """Signed INT8 activations with zero point 0, INT8 weights per output channel (axis 0),
    no INT32 bias (TensorRT's parser refuses a DequantizeLinear of INT32 biases), no UINT8."""
    model = onnx.load(str(digits_int8.directory / "model.onnx"))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(values[n.input[2]].dtype == np.int8 and not values[n.input[2]].any() for n in qdq)
    for n in qdq:
        if n.input[0] in values:  # a weight
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            assert values[n.input[0]].dtype == np.int8 and axis == 0 and values[n.input[1]].ndim == 1
    assert not [t for t in model.graph.initializer if t.data_type in (TensorProto.INT32, TensorProto.UINT8)]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13  # per-axis DequantizeLinear


@pytest.mark.parametrize("version,builder_flags,strongly_typed", [("10.3.0.30", {"INT8"}, False),
                                                                   ("11.4.1", set(), True)])
def test_int8_artifact_builds_on_tensorrt_10_and_11(fake, digits_int8, tmp_path, version, builder_flags,
                                                    strongly_typed):
    trt = fake(version)
    artifact = shutil.copytree(digits_int8.directory, tmp_path / "int8")
    result = build_engine(artifact, None, EngineOptions(int8=True, max_batch=4))
    build = fake_tensorrt.LAST_BUILD
    assert build["network"].source == str(artifact / "model.onnx")  # the very Q/DQ model, no FP16 rewrite
    assert {f.name for f in build["config"].flags} == builder_flags
    typed = bool(build["network"].flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
    assert typed == strongly_typed and result.plan.route.int8_source.value == "qdq"
    assert (artifact / "engine.json").is_file()


def test_a_schedule_runs_as_two_engines(fake, tiny_artifacts, tiny_calib, tmp_path):
    fake("10.3.0.30")
    out = tmp_path / "int8"
    quantize_artifact(tiny_artifacts / "stacked", tiny_calib.path, out, QuantizeOptions(keep_fp32=(), method="minmax"),
                      schedule=[[0, 45]])
    build_engine(out, None, EngineOptions(int8=True, max_batch=2))
    build_engine(out / "float", None, EngineOptions(max_batch=2))
    with open_backend(out, "tensorrt") as backend:
        assert isinstance(backend, ScheduledBackend) and backend.secondary.name == "tensorrt"
    want = sample_guided(out, [0, 1], 2.0, steps=10, seed=1, backend="onnxruntime-cpu").samples
    got = sample_guided(out, [0, 1], 2.0, steps=10, seed=1, backend="tensorrt").samples
    np.testing.assert_array_equal(got, want)  # the stand-in runs the same files: the switching is the same
