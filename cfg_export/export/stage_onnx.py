"""One pipeline stage (a torch module with named inputs) -> model.onnx + manifest.json
in a stage folder, checked against PyTorch. Models over the protobuf limit (2 GB)
are written with ONNX external data: model.onnx + model.onnx.data, both hashed in
the manifest.

Only the export path imports this module; torch and onnx are imported when used.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cfg_export import __version__
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.manifest import METADATA_KEY, Manifest

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 2**31 - 2**26  # weights above this go to external data (the protobuf limit is 2 GiB)
DATA_FILE = "model.onnx.data"


@dataclass
class StageCheck:
    """ONNX Runtime against PyTorch on one set of example feeds."""

    stage: str
    what: str  # the feeds, e.g. "N=2, 16x16"
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|, over all outputs


def _weights_bytes(model) -> int:
    """Bytes of the model's initializers (raw or typed fields)."""
    numpy_helper = require("onnx.numpy_helper", "export")
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def export_stage(module, manifest: Manifest, directory: Path, example: dict[str, np.ndarray], opset: int,
                 external_data_bytes: int | None = None) -> Manifest:
    """Writes `directory/model.onnx` (and model.onnx.data when the weights exceed
    external_data_bytes, default EXTERNAL_DATA_BYTES) and `directory/manifest.json`;
    returns the manifest with the files' sha256. Named sizes of the manifest's tensors
    ('2N', 'H', ...) are the graph's dynamic axes; `example` holds one feed per input."""
    torch = require("torch", "export")
    onnx = require("onnx", "export")
    names = [s.name for s in manifest.inputs]
    dynamic_axes = {spec.name: {i: size for i, size in enumerate(spec.shape) if isinstance(size, str)}
                    for spec in manifest.inputs + manifest.outputs}
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if v}
    args = tuple(torch.from_numpy(example[n]) for n in names)
    threshold = EXTERNAL_DATA_BYTES if external_data_bytes is None else int(external_data_bytes)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / "raw.onnx"  # the exporter may write external data files beside it
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(raw), input_names=names,
                                  output_names=[s.name for s in manifest.outputs], dynamic_axes=dynamic_axes,
                                  opset_version=opset, dynamo=False, do_constant_folding=True)
        except torch.onnx.errors.OnnxExporterError as exc:
            raise CfgExportError(f"ONNX export of {directory.name} failed at opset {opset}: "
                                 f"{str(exc).splitlines()[0]}") from None
        model = onnx.load(str(raw))  # with its external data, if the exporter wrote any
        external = _weights_bytes(model) > threshold
        manifest = replace(manifest, data_file=DATA_FILE if external else None)
        name_sizes(model, manifest)
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(manifest.to_dict(with_sha=False), sort_keys=True)
        model.producer_name, model.producer_version = "cfg-export", __version__
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / manifest.model_file
        if external:
            log.info("%s: %.1f MB of weights, written as external data %s", directory.name,
                     _weights_bytes(model) / 1e6, DATA_FILE)
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE, size_threshold=0)
        else:
            onnx.save_model(model, str(path))
    manifest = manifest.with_sha(directory)
    manifest.write(directory)
    return manifest


def name_sizes(model, manifest: Manifest) -> None:
    """Gives the graph's inputs and outputs the manifest's sizes (names for dynamic ones)."""
    for value, spec in zip([*model.graph.input, *model.graph.output], manifest.inputs + manifest.outputs):
        for dim, size in zip(value.type.tensor_type.shape.dim, spec.shape):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def checked_session(path: Path, what: str):
    """Returns an ONNX Runtime CPU session of the written model at `path`, after
    onnx.checker has passed on it (its refusal names `what`)."""
    onnx = require("onnx", "export")
    ort = require("onnxruntime", "onnxruntime")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CfgExportError(f"onnx.checker rejects {what}: {str(exc).splitlines()[0]}") from None
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_stage(module, manifest: Manifest, directory: Path, feeds: list[tuple[str, dict[str, np.ndarray]]],
                stage: str) -> list[StageCheck]:
    """Returns ONNX Runtime's (CPU) errors against PyTorch for each (label, feeds), after
    onnx.checker has passed on the written model."""
    torch = require("torch", "export")
    session = checked_session(directory / manifest.model_file, f"the {stage} model")
    checks = []
    for label, feed in feeds:
        got = session.run(None, feed)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feed[s.name]) for s in manifest.inputs))
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        max_abs = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
        scale = max(float(np.abs(w.numpy()).max()) for w in want)
        checks.append(StageCheck(stage, label, max_abs, max_abs / max(scale, 1e-12)))
    return checks

