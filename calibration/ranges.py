"""Per-step activation ranges, and the ways of turning them into the one range a static
INT8 graph holds.

A diffusion network sees different activations at each noise level: the range of a
tensor at t = 980 and at t = 0 can differ several times over. A static Q/DQ graph has one
scale per tensor, so the ranges of all steps must be aggregated into one. The methods:

  minmax       the largest |x| over every step and row (TensorRT's IInt8MinMaxCalibrator)
  percentile   ONNX Runtime's percentile of |x| over all steps pooled (one histogram)
  entropy      ONNX Runtime's KL-divergence clipping over all steps pooled
  min-mean     NVIDIA Model Optimizer's diffusion recipe (its PercentileCalibrator with
               collect_method "min-mean"): the percentile of |x| per calibration batch
               at each step, the smallest of those over the batches of a step, then the
               mean over the steps. It lets the steps with the widest ranges clip.

collect_step_ranges runs the FP32 model over the recorded steps of a calibration file
(each step's rows in `groups` batches of whole images, each batch holding its images'
conditional and null rows) and keeps, per tensor, step and batch, the percentile of |x|,
the percentiles of x at both ends and the plain min and max; aggregate turns them into
the (low, high) range of each tensor; write_range_cache writes them in the calibration
cache format of onnxruntime's quantize_static, which then skips its own calibration.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfg_export.calibration.data import CalibrationData
from cfg_export.runtime.errors import CfgExportError, require

log = logging.getLogger(__name__)

DEFAULT_PERCENTILE = 99.999
MAX_GROUPS = 4  # batches per step for min-mean: up to 4 groups of whole images


class Aggregation(enum.Enum):
    """How per-step ranges become one range (the methods computed here; see the module doc)."""

    MINMAX = "minmax"
    MIN_MEAN = "min-mean"


@dataclass
class StepRanges:
    """Statistics of each calibrated tensor at each recorded step and batch of rows."""

    tensors: list[str]
    timesteps: list[int]  # [S] the training timestep of each recorded step
    amax: np.ndarray  # [T, S, G] the percentile of |x|
    low: np.ndarray  # [T, S, G] the (100 - percentile)th percentile of x
    high: np.ndarray  # [T, S, G] the percentile-th percentile of x
    minimum: np.ndarray  # [T, S, G]
    maximum: np.ndarray  # [T, S, G]
    percentile: float

    def spread(self) -> np.ndarray:
        """Returns [T]: the largest over the smallest per-step range (percentile of |x|,
        largest batch of each step) of each tensor; 1 where the range never moves."""
        per_step = self.amax.max(axis=2)
        return per_step.max(axis=1) / np.maximum(per_step.min(axis=1), 1e-12)


def calibrated_tensors(model, op_types: Sequence[str]) -> list[str]:
    """Returns the float activation tensors that quantize_static puts Q/DQ pairs on for
    nodes of `op_types`: their inputs that are not initializers, and their outputs."""
    initializers = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for name in [*node.input[:2], *node.output[:1]]:
            if name and name not in initializers and name not in constants and name not in names:
                names.append(name)
    return names


def _groups(rows: int, n_groups: int) -> list[np.ndarray]:
    """Row indices of each batch of a stacked step of `rows` = 2N rows: batch j holds the
    images j, j + g, ... with both their conditional row i and their null row N + i."""
    n = rows // 2
    return [np.concatenate([np.arange(j, n, n_groups), n + np.arange(j, n, n_groups)]) for j in range(n_groups)]


def probe_session(model, tensors: Sequence[str], threads: int | None = None):
    """Returns an ONNX Runtime CPU session of a copy of the onnx ModelProto `model` that
    also outputs the float tensors `tensors`."""
    onnx = require("onnx", "quantize")
    ort = require("onnxruntime", "quantize")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def collect_step_ranges(model, data: CalibrationData, tensors: Sequence[str], *, percentile: float | None = None,
                        groups: int | None = None, threads: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> StepRanges:
    """Returns the statistics of `tensors` (float activations of the onnx ModelProto
    `model`) at every recorded step of `data`, its rows split in `groups` batches of whole
    images (default: up to MAX_GROUPS; stacked layouts keep each image's two rows together)."""
    p = DEFAULT_PERCENTILE if percentile is None else float(percentile)
    if not 50 < p <= 100:
        raise CfgExportError(f"--percentile: got {p}, expected a percentile in (50, 100], e.g. 99.999")
    session = probe_session(model, tensors, threads)
    stacked = data.manifest.layout == "stacked"
    stats = {key: [] for key in ("amax", "low", "high", "minimum", "maximum")}
    for s, feeds in enumerate(data.batches()):
        rows = len(feeds["sample"])
        n_groups = max(1, min(MAX_GROUPS, rows // 2 if stacked else rows) if groups is None else int(groups))
        index = _groups(rows, n_groups) if stacked and rows % 2 == 0 else np.array_split(np.arange(rows), n_groups)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        step = {key: np.zeros((len(tensors), n_groups)) for key in stats}
        for k, name in enumerate(tensors):
            value = outputs[name]
            for g, rows_g in enumerate(index):
                x = value[rows_g].astype(np.float64).reshape(-1)
                step["amax"][k, g] = np.percentile(np.abs(x), p)
                step["low"][k, g], step["high"][k, g] = np.percentile(x, [100 - p, p])
                step["minimum"][k, g], step["maximum"][k, g] = x.min(), x.max()
        for key in stats:
            stats[key].append(step[key])
        if progress is not None:
            progress(s + 1, data.steps)
    width = min(a.shape[1] for a in stats["amax"])  # steps of different row counts: the common batches
    arrays = {key: np.stack([a[:, :width] for a in value], axis=1) for key, value in stats.items()}
    return StepRanges(list(tensors), list(data.manifest.recorded_timesteps), percentile=p, **arrays)


def aggregate(ranges: StepRanges, method: Aggregation | str, symmetric: bool = True) -> dict[str, tuple[float, float]]:
    """Returns tensor -> (low, high), one range per tensor from its per-step statistics:
    minmax (the extremes over every step and batch) or min-mean (ModelOpt: the smallest
    batch percentile of each step, averaged over the steps). symmetric: (-amax, amax)."""
    from cfg_export.runtime.schedule import parse_enum

    method = parse_enum(Aggregation, method, "aggregation")
    if method is Aggregation.MINMAX:
        low, high = ranges.minimum.min(axis=(1, 2)), ranges.maximum.max(axis=(1, 2))
        amax = np.maximum(np.abs(low), np.abs(high))
    else:
        amax = ranges.amax.min(axis=2).mean(axis=1)
        low, high = ranges.low.min(axis=2).mean(axis=1), ranges.high.min(axis=2).mean(axis=1)
    if symmetric:
        return {name: (-float(a), float(a)) for name, a in zip(ranges.tensors, amax)}
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(ranges.tensors, low, high)}


def write_range_cache(ranges: dict[str, tuple[float, float]], path: str | Path) -> None:
    """Writes `ranges` (tensor -> (low, high)) as onnxruntime quantize_static's calibration
    cache (a MinMax TensorsData), so that quantize_static uses them as they are."""
    calibrate = require("onnxruntime.quantization.calibrate", "quantize")
    if not hasattr(calibrate, "save_tensors_data"):
        raise CfgExportError("this onnxruntime has no calibration cache (onnxruntime.quantization.calibrate."
                             "save_tensors_data): the min-mean method needs onnxruntime >= 1.32; use --method "
                             "percentile, or upgrade onnxruntime")
    data = {name: calibrate.TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for name, (lo, hi) in ranges.items()}
    calibrate.save_tensors_data(calibrate.TensorsData(calibrate.CalibrationMethod.MinMax, data), Path(path))
