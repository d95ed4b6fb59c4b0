"""TensorRT 10's implicit INT8 calibration, fed by a calibration file (calibration.record).

TensorRT 10 (JetPack 6) can take INT8 ranges from a calibrator object that hands the
builder batches of real inputs in device memory: IInt8EntropyCalibrator2 (the KL
divergence clipping; TensorRT's recommended one for CNNs) or IInt8MinMaxCalibrator
(the full range). TensorRT 11 removed both: there, INT8 comes only from the Q/DQ
model of calibration.quantize. The class is defined inside make_calibrator, so
importing this module never imports tensorrt; device memory goes through
runtime.backends.device_memory (cuda-python, or pycuda).

The builder calls get_batch until it returns None; each batch is `rows` consecutive
recorded rows (the calibration profile's shape, e.g. the opt shape 2N of the stacked
batch). The ranges are written to a cache file that later builds read instead of
calibrating again; delete it to recalibrate.
"""
from __future__ import annotations

import enum
import logging
from pathlib import Path

import numpy as np

from cfg_export.calibration.data import read_calibration
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.files import staged_file
from cfg_export.runtime.manifest import Manifest

log = logging.getLogger(__name__)


class TrtCalibrator(enum.Enum):
    """TensorRT 10's implicit calibrators, by the names --method takes."""

    ENTROPY = "entropy"  # IInt8EntropyCalibrator2
    MINMAX = "minmax"  # IInt8MinMaxCalibrator


BASES = {TrtCalibrator.ENTROPY: "IInt8EntropyCalibrator2", TrtCalibrator.MINMAX: "IInt8MinMaxCalibrator"}


def batch_slices(total: int, rows: int) -> list[slice]:
    """Returns the row slices of the calibration batches: whole batches of `rows` rows,
    in order; the remainder (fewer than `rows`) is left out."""
    if rows < 1:
        raise CfgExportError(f"calibration batch: got {rows} rows, expected at least 1")
    return [slice(start, start + rows) for start in range(0, total - rows + 1, rows)]


def make_calibrator(calib: str | Path, manifest: Manifest, rows: int, cache: str | Path,
                    method: str | None = None, cuda=None):
    """Returns a TensorRT 10 calibrator (IInt8EntropyCalibrator2 for method 'entropy', the
    default, or IInt8MinMaxCalibrator for 'minmax') that feeds the builder batches of
    `rows` rows ([rows, *S] sample, [rows] timestep, [rows] cond) of the calibration file
    `calib`, checked against the FP32 `manifest` it was recorded from, and reads and
    writes its ranges at `cache`. cuda: a runtime.backends.device_memory API (default:
    open_cuda()). Call .free() when the build is done.
    """
    valid = [m.value for m in TrtCalibrator]
    if (method or "entropy") not in valid:
        raise CfgExportError(f"--method {method!r}: TensorRT 10's calibrators are {', '.join(valid)} "
                             f"(percentile is for the Q/DQ model of cfg-export quantize)")
    kind = TrtCalibrator(method or "entropy")
    trt = require("tensorrt", "tensorrt")
    base = getattr(trt, BASES[kind], None)
    if base is None:
        raise CfgExportError(f"TensorRT {getattr(trt, '__version__', '?')} has no {BASES[kind]} (TensorRT 11 removed "
                             f"the implicit calibrators): build from the Q/DQ model of cfg-export quantize "
                             f"(cfg-export trt DIR --int8 --int8-onnx OUT/model.onnx)")
    data = read_calibration(calib, manifest)
    names = [spec.name for spec in manifest.inputs]
    total = int(sum(data.manifest.rows))
    slices = batch_slices(total, int(rows))
    if not slices:
        raise CfgExportError(f"{data.path.name} holds {total} rows, fewer than one calibration batch of {rows} "
                             f"rows: re-run cfg-export calibrate with more --n, or calibrate at a smaller batch")
    arrays = {name: np.ascontiguousarray(data.arrays[name]) for name in names}
    cache = Path(cache)
    if cuda is None:
        from cfg_export.runtime.backends.device_memory import open_cuda

        cuda = open_cuda()

    class Calibrator(base):
        def __init__(self):
            base.__init__(self)
            from cfg_export.runtime.backends.device_memory import DeviceBuffer

            self.next = 0
            self.batches = slices
            self.buffers = {name: DeviceBuffer(cuda, (rows, *arrays[name].shape[1:]), arrays[name].dtype)
                            for name in names}

        def get_batch_size(self) -> int:
            return 1  # explicit batch: the rows are in the shapes

        def get_batch(self, requested, *args):
            if self.next >= len(self.batches):
                return None
            rows_slice = self.batches[self.next]
            self.next += 1
            stream = cuda.stream()
            try:
                for name in requested:
                    buffer = self.buffers[name]
                    np.copyto(buffer.host, arrays[name][rows_slice])
                    cuda.to_device(buffer.ptr, buffer.host, stream)
                cuda.synchronize(stream)
            finally:
                cuda.destroy_stream(stream)
            log.debug("calibration batch %d/%d", self.next, len(self.batches))
            return [int(self.buffers[name].ptr) for name in requested]

        def read_calibration_cache(self):
            if cache.is_file():
                log.info("reading INT8 ranges from %s (delete it to calibrate again)", cache)
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, ranges) -> None:
            with staged_file(cache) as tmp:
                tmp.write_bytes(bytes(ranges))

        def free(self) -> None:
            for buffer in self.buffers.values():
                buffer.free()
            self.buffers = {}

    return Calibrator()
