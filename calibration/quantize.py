"""quantize_artifact: an FP32 artifact + its calibration file -> a new artifact whose
model.onnx is explicitly quantized (QuantizeLinear/DequantizeLinear pairs, "Q/DQ").

The recipe, in order:
1. exact graph pre-processing (calibration.simplify): constant reshapes instead of
   Shape nodes, GroupNorm's affine as one op, Linear layers of one input merged;
2. optionally SmoothQuant on the Linear layers (calibration.smoothquant);
3. ONNX Runtime's static quantization (onnxruntime.quantization.quantize_static,
   QuantFormat.QDQ): weights per output channel, activation ranges from the recorded
   sampler feeds (one batch per recorded step: the stacked 2N rows of both halves) by
   min-max, entropy (KL divergence, TensorRT's entropy calibrator), a percentile of the
   pooled histogram (the default), or ModelOpt's min-mean of per-step percentiles
   (calibration.ranges). Only the compute-heavy ops are quantized (Conv, ConvTranspose,
   Gemm, MatMul: inputs, weights, outputs); the keep list stays float (INT8_KEEP_FLOAT:
   calibration.nodes' default list and the attention MatMuls), or the layers chosen by
   calibration.selection;
4. the Q/DQ arrangement ONNX Runtime's CPU kernels fuse (calibration.qdq): each quantized
   layer its own Q/DQ pair, float readers on float tensors, and, with signed activations,
   layers whose output has several readers left float (ONNX Runtime cannot fuse them).

The form is the one TensorRT 10 and 11 build as INT8 from Q/DQ nodes (`cfg-export trt
DIR --int8 --int8-onnx OUT/model.onnx`) and ONNX Runtime runs on the CPU: signed INT8
activations with symmetric ranges (zero point 0), INT8 weights per output channel,
biases left in float (TensorRT's parser refuses a DequantizeLinear of INT32 biases).
'uint8' gives asymmetric activations, which only ONNX Runtime runs. A precision schedule
(calibration.precision) adds the FP32 model for the steps that need it.
"""
from __future__ import annotations

import contextlib
import enum
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfg_export.calibration.data import CalibrationData, read_calibration
from cfg_export.calibration.nodes import expand_keep, select_float_nodes
from cfg_export.calibration.qdq import arrange_qdq, quantized_layers, read_float_inputs, single_reader_layers
from cfg_export.calibration.ranges import DEFAULT_PERCENTILE
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.files import check_export_target, staged_dir
from cfg_export.runtime.manifest import METADATA_KEY, Manifest
from cfg_export.runtime.schedule import parse_enum

log = logging.getLogger(__name__)

PRECISION = "int8-qdq"
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # inputs, weights and outputs get Q/DQ
DEFAULT_METHOD = "percentile"
INT8_KEEP_FLOAT = ("default", "@attention-matmul")  # the default keep list of INT8 (calibration.nodes)
MOVEMENT_OPS = ("Resize",)  # ops that move values without arithmetic: INT8 in, INT8 out, one scale
EXTRA = "quantize"  # pip install 'cfg-export[quantize]': onnx + onnxruntime


class CalibrationMethod(enum.Enum):
    """How activation ranges are taken from the recorded feeds (see calibration.ranges)."""

    MINMAX = "minmax"  # the largest |value| seen (TensorRT's IInt8MinMaxCalibrator)
    ENTROPY = "entropy"  # the clipping that minimizes KL divergence (IInt8EntropyCalibrator2)
    PERCENTILE = "percentile"  # the 99.999th percentile of |value|, all steps pooled
    MIN_MEAN = "min-mean"  # ModelOpt's diffusion recipe: per-step percentiles, min over batches, mean over steps


class ActivationType(enum.Enum):
    INT8 = "int8"  # signed, symmetric (zero point 0): TensorRT and ONNX Runtime
    UINT8 = "uint8"  # unsigned, asymmetric: ONNX Runtime only


@dataclass
class QuantizeOptions:
    """How the model is quantized; None means the default."""

    method: CalibrationMethod | str | None = None  # default percentile
    keep_fp32: Sequence[str] | None = None  # calibration.nodes entries; None: INT8_KEEP_FLOAT; () quantize all
    op_types: Sequence[str] | None = None  # default DEFAULT_OP_TYPES
    per_channel: bool | None = None  # default True
    reduce_range: bool | None = None  # 7-bit weights, for x86 CPUs without VNNI; default False
    activation_type: ActivationType | str | None = None  # default int8 (symmetric)
    percentile: float | None = None  # for the percentile and min-mean methods; default 99.999
    cpu_fusion: bool | None = None  # arrange the graph for ONNX Runtime's CPU fusions (calibration.qdq); default on
    smoothquant: float | None = None  # SmoothQuant's alpha for the Linear layers (calibration.smoothquant); None: off
    simplify: bool | None = None  # exact graph pre-processing first (calibration.simplify); default on


@dataclass
class QuantizeResult:
    directory: Path
    manifest: Manifest
    kept: list[str]  # nodes left in float (the keep list, and layers ONNX Runtime could not fuse)
    quantized: list[str]  # layers whose inputs come through DequantizeLinear (run in INT8)
    calibration: CalibrationData
    seconds: float
    notes: list[str] = field(default_factory=list)


def make_data_reader(data: CalibrationData):
    """Returns an onnxruntime CalibrationDataReader that yields one feed dict per recorded
    step and supports the strided collection of quantize_static (len and set_range), so
    that the calibrator holds one step's activations at a time."""
    quantization = require("onnxruntime.quantization", EXTRA)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.start, self.end = 0, data.steps
            self._iter = None

        def __len__(self) -> int:
            return data.steps

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end = start_index, end_index
            self._iter = None

        def get_next(self) -> dict | None:
            if self._iter is None:
                self._iter = data.batches(list(range(self.start, min(self.end, data.steps))))
            return next(self._iter, None)

        def rewind(self) -> None:
            self._iter = None

    return Reader()


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def quantized_nodes(model, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> list[str]:
    """Returns the names of the nodes of `op_types` whose inputs come through
    DequantizeLinear: the layers that run in INT8 (graph order)."""
    return quantized_layers(model, op_types)


@dataclass
class QuantizedModel:
    model: object  # onnx.ModelProto with Q/DQ nodes
    kept: list[str]  # nodes left in float
    settings: dict  # what was done, for the manifest's producer.quantization


def keep_list(keep: Sequence[str] | None) -> list[str]:
    """Returns the keep list of INT8: for None, and in place of 'default', the nodes keep
    list's default and @attention-matmul."""
    if keep is None:
        return list(INT8_KEEP_FLOAT)
    return [e for entry in keep for e in (INT8_KEEP_FLOAT if entry.strip() == "default" else (entry,))]


def check_options(options: QuantizeOptions) -> tuple[CalibrationMethod, ActivationType]:
    """Returns the parsed method and activation type; raises CfgExportError for bad options."""
    method = parse_enum(CalibrationMethod, DEFAULT_METHOD if options.method is None else options.method, "--method")
    act = parse_enum(ActivationType, ActivationType.INT8 if options.activation_type is None else options.activation_type,
                     "--activation-type")
    if options.op_types is not None and (not options.op_types or not all(t and t.strip() for t in options.op_types)):
        raise CfgExportError(f"--op-types: got {','.join(options.op_types)!r}, expected ONNX op types separated by "
                             f"commas, like Conv,MatMul")
    expand_keep(keep_list(options.keep_fp32))  # an empty pattern or an unknown group, before the work
    if options.percentile is not None and not 50 < float(options.percentile) <= 100:
        raise CfgExportError(f"--percentile: got {options.percentile}, expected a percentile in (50, 100], "
                             f"e.g. 99.999")
    return method, act


def quantize_model(model, data: CalibrationData, options: QuantizeOptions | None = None, *,
                   nodes_to_quantize: Sequence[str] | None = None, cache: str | Path | None = None,
                   progress: Callable[[int, int], None] | None = None) -> QuantizedModel:
    """Returns the Q/DQ INT8 form of the FP32 onnx ModelProto `model` (left unchanged, its
    nodes get names where they have none), calibrated on the feeds of `data`.
    nodes_to_quantize: quantize only these nodes (and ignore the keep list), for
    sensitivity analysis. cache: a JSON file of ranges onnxruntime writes, or reads
    instead of calibrating (the ranges of one calibration shared by several calls)."""
    import inspect

    options = options or QuantizeOptions()
    method, act = check_options(options)
    per_channel = True if options.per_channel is None else bool(options.per_channel)
    reduce_range = bool(options.reduce_range)
    op_types = list(DEFAULT_OP_TYPES if options.op_types is None else options.op_types)
    onnx = require("onnx", EXTRA)
    quantization = require("onnxruntime.quantization", EXTRA)
    select_float_nodes(model, ())  # names the unnamed nodes of the caller's model: names are how nodes are picked
    source = onnx.ModelProto()
    source.CopyFrom(model)
    simplified = None
    if options.simplify is not False:
        from cfg_export.calibration.simplify import simplify_graph

        simplified = simplify_graph(source)
    smoothing = None
    if options.smoothquant is not None:
        from cfg_export.calibration.smoothquant import smooth_model

        smoothing = smooth_model(source, data, options.smoothquant)
    kept = select_float_nodes(source, keep_list(options.keep_fp32)) if nodes_to_quantize is None else []
    single: list[str] = []
    quantize_all = options.keep_fp32 is not None and len(options.keep_fp32) == 0
    if act is ActivationType.INT8 and options.cpu_fusion is not False and not quantize_all:  # see calibration.qdq
        candidates = [n.name for n in source.graph.node if n.op_type in op_types and n.name not in set(kept)]
        if nodes_to_quantize is not None:
            candidates = [name for name in candidates if name in set(nodes_to_quantize)]
        single = single_reader_layers(source, op_types, candidates)
        kept = kept + single
    types = {ActivationType.INT8: quantization.QuantType.QInt8, ActivationType.UINT8: quantization.QuantType.QUInt8}
    percentile = DEFAULT_PERCENTILE if options.percentile is None else float(options.percentile)
    extra = {"ActivationSymmetric": act is ActivationType.INT8, "WeightSymmetric": True, "QuantizeBias": False,
             "CalibStridedMinMax": 1,  # one recorded step per collection: bounded memory, any method
             "CalibPercentile": percentile,
             # data-movement ops (Resize) in op_types: quantize them even where their input is float
             "ForceQuantizeNoInputCheck": bool(set(op_types) & set(MOVEMENT_OPS))}
    reader = make_data_reader(data)
    if progress is not None:
        reader = _counting(reader, data.steps, progress)
    calibrate_method = {CalibrationMethod.MINMAX: quantization.CalibrationMethod.MinMax,
                        CalibrationMethod.ENTROPY: quantization.CalibrationMethod.Entropy,
                        CalibrationMethod.PERCENTILE: quantization.CalibrationMethod.Percentile,
                        CalibrationMethod.MIN_MEAN: quantization.CalibrationMethod.MinMax}[method]
    has_cache = "calibration_cache_path" in inspect.signature(quantization.quantize_static).parameters
    more = {}
    spread = None
    with tempfile.TemporaryDirectory(prefix="cfg-export-quantize.") as work:
        if method is CalibrationMethod.MIN_MEAN:
            from cfg_export.calibration.ranges import (aggregate, calibrated_tensors, collect_step_ranges,
                                                       write_range_cache)

            cache = Path(cache) if cache is not None else Path(work) / "ranges.json"
            if not cache.is_file():
                ranges = collect_step_ranges(source, data, calibrated_tensors(source, op_types),
                                             percentile=percentile, progress=progress)
                spread = float(np.median(ranges.spread()))
                write_range_cache(aggregate(ranges, "min-mean", symmetric=act is ActivationType.INT8), cache)
        if cache is not None and has_cache:
            more["calibration_cache_path"] = str(cache)
        elif method is CalibrationMethod.MIN_MEAN:
            raise CfgExportError("--method min-mean needs onnxruntime's calibration cache (quantize_static's "
                                 "calibration_cache_path, onnxruntime >= 1.32); use --method percentile")
        named = Path(work) / "named.onnx"
        onnx.save(source, str(named))
        quantized_path = Path(work) / "model.onnx"
        _quiet_root_logger(lambda: quantization.quantize_static(
            str(named), str(quantized_path), reader, quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=op_types, per_channel=per_channel, reduce_range=reduce_range,
            activation_type=types[act], weight_type=quantization.QuantType.QInt8, nodes_to_exclude=kept,
            nodes_to_quantize=list(nodes_to_quantize or []), calibrate_method=calibrate_method,
            extra_options=extra, **more))
        qmodel = onnx.load(str(quantized_path))
    if options.cpu_fusion is False:
        private = 0
        read_float_inputs(qmodel, kept)
    else:
        private = arrange_qdq(qmodel, op_types, signed=act is ActivationType.INT8).private_pairs
    settings = {"method": method.value, "per_channel": per_channel, "reduce_range": reduce_range,
                "activation_type": act.value, "op_types": op_types,
                "keep_fp32": list(options.keep_fp32) if options.keep_fp32 is not None else None,
                "kept_nodes": len(kept), "several_readers_float": single,
                "cpu_fusion": options.cpu_fusion is not False, "private_qdq_pairs": private,
                "calibration_steps": data.steps, "calibration_rows": int(sum(data.manifest.rows)),
                "sampler": data.manifest.sampler, "w": data.manifest.w}
    if method in (CalibrationMethod.PERCENTILE, CalibrationMethod.MIN_MEAN):
        settings["percentile"] = percentile
    if spread is not None:
        settings["median_range_spread_over_steps"] = spread
    if simplified is not None:
        settings["simplified"] = simplified.__dict__
    if smoothing is not None:
        settings["smoothquant"] = {"alpha": smoothing.alpha, "layers": len(smoothing.layers),
                                   "inserted_mul": smoothing.inserted, "folded": smoothing.folded}
    return QuantizedModel(qmodel, kept, settings)


def quantize_artifact(artifact: "Artifact | str | Path", calib: str | Path, out_dir: str | Path,
                      options: QuantizeOptions | None = None, overwrite: bool = False, *, select: bool = False,
                      budget: float | None = None, schedule: "str | Sequence[Sequence[int]] | None" = None,
                      progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Returns the new artifact written to `out_dir` (whole or not at all): a Q/DQ INT8
    model.onnx of the FP32 artifact (an Artifact or its folder), calibrated on the recorded feeds of
    `calib` (which must come from that very model file), and its manifest.json with
    precision 'int8-qdq', its own sha256 and the source's in producer.quantized_from.
    The model's inputs and outputs stay float32 [2N, ...] (stacked) as in the source.

    select: choose the layers left in float by sensitivity against float time
    (calibration.selection, x0 `budget`, default 4%) instead of the keep list of `options`.
    schedule: 'auto' (float at the recorded timesteps whose implied-x0 error is above 5%,
    if any), None or 'none' (INT8 at every step), or float timestep intervals [[lo, hi], ...]:
    the FP32 model is then copied into OUT/float and runs those steps (calibration.precision).
    progress(done, total) is called after each recorded step is calibrated.
    """
    from cfg_export.calibration.precision import add_schedule

    start = time.perf_counter()
    options = options or QuantizeOptions()
    check_options(options)  # bad input before the work
    if isinstance(schedule, str) and schedule not in ("auto", "none"):
        raise CfgExportError(f"schedule: got {schedule!r}, expected 'auto', 'none' or [[lo, hi], ...] intervals")
    artifact = as_artifact(artifact)
    directory = artifact.directory
    check_export_target(directory, out_dir, overwrite)  # before the work: never the source, never a user's folder
    source = artifact.model_file(engine=False).manifest
    if source.engine is not None or source.precision != "fp32":
        raise CfgExportError(f"{directory}: the model is {source.precision}; quantize the FP32 ONNX export "
                             f"(cfg-export onnx)")
    data = read_calibration(calib, source)
    onnx = require("onnx", EXTRA)
    ort = require("onnxruntime", EXTRA)
    notes = []
    selection = None
    if select:
        from cfg_export.calibration.selection import select_layers

        selection = select_layers(artifact, calib, options, budget=budget)
        options = replace(options, keep_fp32=selection.keep_fp32)
        notes.append(f"selection: {len(selection.kept)} of {len(selection.candidates)} layers left in float, max x0 "
                     f"error {100 * max(selection.x0):.2f}% at the evaluated steps (budget "
                     f"{100 * selection.budget:g}%)")
    model = onnx.load(str(directory / source.model_file))
    done = quantize_model(model, data, options, progress=progress)
    qmodel = done.model
    settings = dict(done.settings)
    if selection is not None:
        settings["selection"] = {"budget": selection.budget, "kept": selection.kept, "x0": selection.x0}
    intervals = _schedule(model, qmodel, source, data, schedule)
    if intervals:
        notes.append(f"precision schedule: float at t in {intervals} (FP32 model in {out_dir}/float)")
    producer = {**source.producer, "onnxruntime": ort.__version__, "quantized_from": source.model_sha256,
                "quantization": settings}
    manifest = replace(source, precision=PRECISION, opset=_opset(qmodel), producer=producer, model_sha256="")
    del qmodel.metadata_props[:]
    entry = qmodel.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest.to_dict(with_sha=False), sort_keys=True)
    result = QuantizeResult(Path(out_dir), manifest, done.kept, quantized_nodes(qmodel, done.settings["op_types"]),
                            data, 0.0, notes)
    if not result.quantized:
        result.notes.append("no node was quantized: the keep list and op types leave the whole graph in float")
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        onnx.save(qmodel, str(tmp / manifest.model_file))
        null_file = source.facts.condition.null_file
        if null_file:
            shutil.copyfile(directory / null_file, tmp / null_file)
        result.manifest = manifest.with_sha(tmp)
        if intervals:
            result.manifest = add_schedule(tmp, result.manifest, directory, source, intervals)
        result.manifest.write(tmp)
        _check_runs(tmp, result.manifest, data)
    result.seconds = time.perf_counter() - start
    log.info("quantized %s: %d nodes in INT8, %d kept in float, %s calibration over %d steps, in %.1f s",
             directory, len(result.quantized), len(result.kept), done.settings["method"], data.steps, result.seconds)
    return result


def _schedule(model, qmodel, source: Manifest, data: CalibrationData, schedule) -> list[list[int]]:
    """The float intervals: given, none, or (auto) from the implied-x0 error at every
    recorded step of the calibration file."""
    from cfg_export.calibration.precision import schedule_from_errors
    from cfg_export.calibration.report import TARGET_X0_ERROR
    from cfg_export.runtime.backends.scheduled import check_intervals

    if schedule is None or schedule == "none":
        return []
    if schedule != "auto":
        return [[int(lo), int(hi)] for lo, hi in check_intervals(schedule)]
    if source.layout.value != "stacked":
        raise CfgExportError("--schedule auto measures the implied x0 on the stacked layout; give the intervals")
    from cfg_export.calibration.sensitivity import Evaluator

    evaluator = Evaluator(model, source, list(data.batches()), float(data.manifest.w))
    x0, _ = evaluator.errors(qmodel)
    return schedule_from_errors(evaluator.timesteps, x0, TARGET_X0_ERROR)


def _counting(reader, total: int, progress: Callable[[int, int], None]):
    """Wraps the reader's get_next to report each batch handed out."""
    done = 0
    get_next = reader.get_next

    def counted():
        nonlocal done
        feeds = get_next()
        if feeds is not None:
            done += 1
            progress(min(done, total), total)
        return feeds

    reader.get_next = counted
    return reader


def _quiet_root_logger(fn):
    """Runs fn with the root logger above WARNING and stdout captured: quantize_static logs
    through the root logger (a pre-processing hint on every call) and its histogram
    calibrators print; what they print goes to this module's debug log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return fn()
    except (ValueError, RuntimeError) as exc:
        raise CfgExportError(f"ONNX Runtime's quantization failed: {str(exc).splitlines()[0]}") from None
    finally:
        root.setLevel(level)
        if printed.getvalue():
            log.debug("onnxruntime.quantization printed: %s", printed.getvalue().strip())


def _check_runs(directory: Path, manifest: Manifest, data: CalibrationData) -> None:
    """Opens the new artifact with the runtime's ONNX Runtime CPU backend (which checks the
    ONNX metadata against the manifest) and runs the first recorded step through it."""
    from cfg_export.runtime.backends.onnxrt import OnnxRuntimeBackend

    feeds = next(data.batches())
    with OnnxRuntimeBackend(directory / manifest.model_file, manifest) as backend:
        backend.infer(feeds)
