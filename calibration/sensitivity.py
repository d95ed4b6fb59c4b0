"""layer_sensitivity: which layers an INT8 model loses its accuracy in.

One layer at a time is quantized (its inputs, weights and outputs, as quantize_model
would) and everything else left in float; the error that one layer alone adds to the
guided eps is measured at a few recorded steps of the calibration file, from the
highest noise level to the lowest. The layers with the largest errors are the ones to
keep in float (--keep-fp32). Ranges are calibrated once and reused (where onnxruntime
can cache them), so each layer costs one graph rewrite and a few model calls.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfg_export.calibration.data import read_calibration
from cfg_export.calibration.quantize import DEFAULT_OP_TYPES, QuantizeOptions, quantize_model
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.guidance import mix
from cfg_export.runtime.manifest import Layout

log = logging.getLogger(__name__)

DEFAULT_EVAL_STEPS = 6


@dataclass
class LayerError:
    node: str
    op_type: str
    errors: list[float]  # relative error of the guided eps at each evaluated timestep

    @property
    def worst(self) -> float:
        return max(self.errors)


@dataclass
class Sensitivity:
    timesteps: list[int]  # the evaluated timesteps, highest noise first
    layers: list[LayerError]  # sorted, the worst first

    def lines(self, top: int = 10) -> list[str]:
        head = " ".join(f"t={t:<5d}" for t in self.timesteps)
        out = [f"guided eps error with only this layer in INT8, at {head}"]
        for layer in self.layers[:top]:
            out.append(f"  {layer.node:40s} " + " ".join(f"{100 * e:6.2f}%" for e in layer.errors))
        return out


def _guided(output: np.ndarray, w: float) -> np.ndarray:
    n = len(output) // 2
    return mix(output[:n].astype(np.float64), output[n:].astype(np.float64), np.full(n, w))


def layer_sensitivity(artifact: "Artifact | str | Path", calib: str | Path, options: QuantizeOptions | None = None, *,
                      nodes: Sequence[str] | None = None, eval_steps: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """Returns the error each layer adds alone when quantized, worst first: for every node
    of `nodes` (default: those of the quantized op types that the keep list of `options`
    does not keep), the relative error of the guided eps (w of the calibration file) at
    `eval_steps` (default 6) recorded steps spread from the first to the last."""
    from cfg_export.calibration.nodes import select_float_nodes

    options = options or QuantizeOptions()
    artifact = as_artifact(artifact)
    source = artifact.model_file(engine=False).manifest
    if source.layout is not Layout.STACKED:
        raise CfgExportError("layer sensitivity is measured on stacked-layout artifacts (the w mix on the host)")
    data = read_calibration(calib, source)
    onnx = require("onnx", "quantize")
    ort = require("onnxruntime", "quantize")
    model = onnx.load(str(artifact.directory / source.model_file))
    kept = set(select_float_nodes(model, options.keep_fp32))
    op_types = set(DEFAULT_OP_TYPES if options.op_types is None else options.op_types)
    candidates = list(nodes) if nodes is not None else [
        n.name for n in model.graph.node if n.op_type in op_types and n.name not in kept]
    by_name = {n.name: n.op_type for n in model.graph.node}
    unknown = [name for name in candidates if name not in by_name]
    if unknown:
        raise CfgExportError(f"no node named {unknown[0]!r}; node names look like {next(iter(by_name))!r}")
    k = DEFAULT_EVAL_STEPS if eval_steps is None else int(eval_steps)
    picks = sorted({int(i) for i in np.round(np.linspace(0, data.steps - 1, min(k, data.steps)))})
    feeds = list(data.batches(picks))
    w = float(data.manifest.w)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = [_guided(reference.run(None, f)[0], w) for f in feeds]
    layers = []
    with tempfile.TemporaryDirectory(prefix="cfg-export-sensitivity.") as work:
        cache = Path(work) / "ranges.json"
        for i, name in enumerate(candidates):
            quantized = quantize_model(model, data, options, nodes_to_quantize=[name], cache=cache).model
            session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
            errors = [float(np.linalg.norm(_guided(session.run(None, f)[0], w) - ref) / np.linalg.norm(ref))
                      for f, ref in zip(feeds, want)]
            layers.append(LayerError(name, by_name[name], errors))
            if progress is not None:
                progress(i + 1, len(candidates))
    layers.sort(key=lambda layer: layer.worst, reverse=True)
    return Sensitivity([int(f["timestep"][0]) for f in feeds], layers)
