"""The TensorRT 10 calibrator: importing its module needs no tensorrt, the factory without
tensorrt is one line naming the extra, and its batching and cache logic, driven here by
stand-ins for tensorrt and the CUDA API (a real build needs a GPU: not tested here)."""
import sys
import types

import numpy as np
import pytest

from cfg_export.calibration.trt_calibrator import batch_slices, make_calibrator
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import read_manifest
from tests.conftest import run_without

def run(code: str):
    return run_without("tensorrt", code)


def test_import_does_not_import_tensorrt():
    proc = run("""
        import cfg_export.calibration.trt_calibrator, cfg_export.calibration.quantize, cfg_export.calibration.record, cfg_export.calibration.report
        assert "tensorrt" not in sys.modules
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_factory_without_tensorrt_names_the_extra(tiny_artifacts, tiny_calib):
    proc = run(f"""
        from cfg_export.calibration.trt_calibrator import make_calibrator
        from cfg_export.runtime.errors import CfgExportError
        from cfg_export.runtime.manifest import read_manifest
        try:
            make_calibrator({str(tiny_calib.path)!r}, read_manifest({str(tiny_artifacts / "stacked")!r}), 12, "c.cache")
        except CfgExportError as exc:
            print(exc)
    """)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith("tensorrt is not installed") and "cfg-export[tensorrt]" in line


def test_unknown_calibrator_lists_the_valid_ones(tiny_artifacts, tiny_calib):
    with pytest.raises(CfgExportError, match=r"--method 'percentile': TensorRT 10's calibrators are entropy, minmax"):
        make_calibrator(tiny_calib.path, read_manifest(tiny_artifacts / "stacked"), 12, "c.cache", method="percentile")


@pytest.mark.parametrize("total,rows,expected", [(48, 12, 4), (48, 16, 3), (50, 16, 3), (10, 16, 0)])
def test_batches_are_whole_and_in_order(total, rows, expected):
    slices = batch_slices(total, rows)
    assert len(slices) == expected
    covered = np.concatenate([np.arange(total)[s] for s in slices]) if slices else np.array([])
    np.testing.assert_array_equal(covered, np.arange(expected * rows))


class FakeCuda:
    """The device_memory API over host arrays: 'device pointers' index a dict."""

    def __init__(self):
        self.memory, self.freed = {}, 0

    def malloc(self, nbytes):
        ptr = 1000 + len(self.memory)
        self.memory[ptr] = None
        return ptr

    def free(self, ptr):
        self.freed += 1

    def host_array(self, shape, dtype):
        return np.zeros(shape, dtype), None

    def free_host(self, handle):
        pass

    def stream(self):
        return object()

    def destroy_stream(self, stream):
        pass

    def to_device(self, ptr, array, stream):
        self.memory[ptr] = array.copy()

    def synchronize(self, stream):
        pass


@pytest.fixture
def fake_tensorrt(monkeypatch):
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.3.0"

    class Base:
        def __init__(self):
            pass
    module.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (Base,), {})
    module.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (Base,), {})
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def test_calibrator_feeds_the_recorded_rows_and_keeps_its_cache(fake_tensorrt, tiny_artifacts, tiny_calib, tmp_path):
    cuda = FakeCuda()
    cache = tmp_path / "calibration.cache"
    calibrator = make_calibrator(tiny_calib.path, read_manifest(tiny_artifacts / "stacked"), 16, cache, cuda=cuda)
    assert isinstance(calibrator, fake_tensorrt.IInt8EntropyCalibrator2) and calibrator.get_batch_size() == 1
    names = ["cond", "sample", "timestep"]  # the builder's order, not the file's
    seen = []
    while (pointers := calibrator.get_batch(names)) is not None:
        seen.append({name: cuda.memory[p] for name, p in zip(names, pointers)})
    assert len(seen) == 3  # 48 recorded rows in whole batches of 16
    for name in names:
        np.testing.assert_array_equal(np.concatenate([b[name] for b in seen]), tiny_calib.arrays[name][:48])
    assert calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(memoryview(b"TRT-1003-EntropyCalibration2\n"))
    assert cache.read_bytes() == b"TRT-1003-EntropyCalibration2\n"
    assert calibrator.read_calibration_cache() == cache.read_bytes()
    calibrator.free()
    assert cuda.freed == 3


def test_minmax_calibrator_and_too_few_rows(fake_tensorrt, tiny_artifacts, tiny_calib, tmp_path):
    manifest = read_manifest(tiny_artifacts / "stacked")
    calibrator = make_calibrator(tiny_calib.path, manifest, 12, tmp_path / "c", method="minmax", cuda=FakeCuda())
    assert isinstance(calibrator, fake_tensorrt.IInt8MinMaxCalibrator)
    with pytest.raises(CfgExportError, match=r"tiny.npz holds 48 rows, fewer than one calibration batch of 64 rows"):
        make_calibrator(tiny_calib.path, manifest, 64, tmp_path / "c", cuda=FakeCuda())
    del fake_tensorrt.IInt8EntropyCalibrator2  # TensorRT 11
    fake_tensorrt.__version__ = "11.0.0"
    with pytest.raises(CfgExportError, match=r"TensorRT 11.0.0 has no IInt8EntropyCalibrator2 \(TensorRT 11 removed"):
        make_calibrator(tiny_calib.path, manifest, 12, tmp_path / "c", cuda=FakeCuda())
