"""layer_sensitivity: which layers an INT8 model loses its accuracy in.

One layer at a time is quantized (its inputs, weights and outputs, as quantize_model
would) and everything else left in float; the error that one layer alone adds is measured
at a few recorded steps of the calibration file, from the highest noise level to the
lowest: the relative error of the implied x0 (what the sampler moves toward, see
calibration.report) and of the guided eps. Ranges are calibrated once and reused through
onnxruntime's calibration cache, so each layer costs one graph rewrite and a few model
calls. calibration.selection weighs these errors against each layer's time in float.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cfg_export.calibration.data import CalibrationData, read_calibration
from cfg_export.calibration.quantize import DEFAULT_OP_TYPES, QuantizeOptions, keep_list, quantize_model
from cfg_export.calibration.report import implied_x0, relative_error
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.guidance import mix, to_eps
from cfg_export.runtime.manifest import Layout, Manifest

log = logging.getLogger(__name__)

DEFAULT_EVAL_STEPS = 8


@dataclass
class LayerError:
    node: str
    op_type: str
    x0: list[float]  # relative error of the implied x0 at each evaluated timestep
    guided: list[float]  # relative error of the guided eps there

    @property
    def worst(self) -> float:
        """The largest x0 error over the evaluated steps."""
        return max(self.x0)


@dataclass
class Sensitivity:
    timesteps: list[int]  # the evaluated timesteps, highest noise first
    layers: list[LayerError]  # sorted, the worst first

    def lines(self, top: int = 10) -> list[str]:
        head = " ".join(f"t={t:<5d}" for t in self.timesteps)
        out = [f"implied-x0 error with only this layer in INT8, at {head}"]
        for layer in self.layers[:top]:
            out.append(f"  {layer.node:40s} " + " ".join(f"{100 * e:6.2f}%" for e in layer.x0))
        return out


class Evaluator:
    """Measures the x0 and guided-eps errors of candidate models against the FP32 model on
    fixed stacked feeds (recorded steps of a calibration file)."""

    def __init__(self, model, manifest: Manifest, feeds: Sequence[dict], w: float, threads: int | None = 1):
        self.ort = require("onnxruntime", "quantize")
        self.manifest = manifest
        self.feeds = list(feeds)
        self.w = w
        self.threads = threads
        self.alphas = manifest.facts.schedule.alphas_cumprod()
        self.timesteps = [int(np.asarray(f["timestep"]).reshape(-1)[0]) for f in self.feeds]
        self.reference = [self._guided(f, out) for f, out in zip(self.feeds, self._run(model))]

    def _run(self, model) -> list[np.ndarray]:
        options = self.ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        session = self.ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [session.run(None, f)[0] for f in self.feeds]

    def _guided(self, feeds: dict, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(guided eps [N, ...], implied x0 [N, ...]) of one stacked output."""
        n = len(output) // 2
        t = int(np.asarray(feeds["timestep"]).reshape(-1)[0])
        a = float(self.alphas[t])
        x = feeds["sample"].astype(np.float64)
        prediction = self.manifest.facts.prediction
        eps = [to_eps(output[rows].astype(np.float64), x[rows], a, prediction)
               for rows in (slice(0, n), slice(n, None))]
        guided = mix(eps[0], eps[1], np.full(n, self.w))
        return guided, implied_x0(x[:n], guided, a)

    def errors(self, model) -> tuple[list[float], list[float]]:
        """Returns (x0 errors, guided eps errors) of `model` at each feed."""
        x0, guided = [], []
        for f, out, (g_ref, x0_ref) in zip(self.feeds, self._run(model), self.reference):
            g, x = self._guided(f, out)
            x0.append(relative_error(x, x0_ref))
            guided.append(relative_error(g, g_ref))
        return x0, guided


def evaluation_feeds(data: CalibrationData, k: int | None = None) -> list[dict]:
    """Returns the feeds of `k` (default 8) recorded steps spread from the first to the last."""
    k = DEFAULT_EVAL_STEPS if k is None else int(k)
    picks = sorted({int(i) for i in np.round(np.linspace(0, data.steps - 1, min(k, data.steps)))})
    return list(data.batches(picks))


def load_source(artifact, calib, options: QuantizeOptions | None = None) -> tuple[object, Manifest, CalibrationData]:
    """(FP32 onnx ModelProto, its manifest, the checked calibration data) of a stacked
    artifact; the model pre-processed as quantize_model would (calibration.simplify), so
    that its node names are those of the layers quantize_model quantizes."""
    artifact = as_artifact(artifact)
    source = artifact.model_file(engine=False).manifest
    if source.layout is not Layout.STACKED:
        raise CfgExportError("layer sensitivity is measured on stacked-layout artifacts (the w mix on the host)")
    data = read_calibration(calib, source)
    onnx = require("onnx", "quantize")
    model = onnx.load(str(artifact.directory / source.model_file))
    if options is None or options.simplify is not False:
        from cfg_export.calibration.simplify import simplify_graph

        simplify_graph(model)
    return model, source, data


def each_layer_alone(model, data, options: QuantizeOptions, names: Sequence[str], evaluator: "Evaluator",
                     cache: Path, progress: Callable[[int, int], None] | None = None,
                     total: int | None = None) -> Iterator[tuple[str, list[float], list[float]]]:
    """Yields (node, x0 errors, guided eps errors) of the model with only that node of
    `names` quantized, one node after the other; `cache` holds the calibrated ranges
    between them; progress(done, total or len(names)) after each."""
    for i, name in enumerate(names):
        quantized = quantize_model(model, data, options, nodes_to_quantize=[name], cache=cache).model
        x0, guided = evaluator.errors(quantized)
        yield name, x0, guided
        if progress is not None:
            progress(i + 1, total or len(names))


def layer_sensitivity(artifact: "Artifact | str | Path", calib: str | Path, options: QuantizeOptions | None = None, *,
                      nodes: Sequence[str] | None = None, eval_steps: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """Returns the error each layer adds alone when quantized, worst first: for every node
    of `nodes` (default: those of the quantized op types that the keep list of `options`
    does not keep), the relative error of the implied x0 and of the guided eps (w of the
    calibration file) at `eval_steps` (default 8) recorded steps spread from the first to the last."""
    from cfg_export.calibration.nodes import select_float_nodes

    options = options or QuantizeOptions()
    model, source, data = load_source(artifact, calib, options)
    kept = set(select_float_nodes(model, keep_list(options.keep_fp32)))
    op_types = set(DEFAULT_OP_TYPES if options.op_types is None else options.op_types)
    candidates = list(nodes) if nodes is not None else [
        n.name for n in model.graph.node if n.op_type in op_types and n.name not in kept]
    by_name = {n.name: n.op_type for n in model.graph.node}
    unknown = [name for name in candidates if name not in by_name]
    if unknown:
        raise CfgExportError(f"no node named {unknown[0]!r}; node names look like {next(iter(by_name))!r}")
    evaluator = Evaluator(model, source, evaluation_feeds(data, eval_steps), float(data.manifest.w))
    with tempfile.TemporaryDirectory(prefix="cfg-export-sensitivity.") as work:
        layers = [LayerError(name, by_name[name], x0, guided) for name, x0, guided in
                  each_layer_alone(model, data, options, candidates, evaluator, Path(work) / "ranges.json", progress)]
    layers.sort(key=lambda layer: layer.worst, reverse=True)
    return Sensitivity(evaluator.timesteps, layers)
