"""Backends: objects that run one model file. Constructed cheaply; `with backend:`
opens the session (and device buffers); `infer(feeds)` validates the feeds against the
manifest, then runs. Each backend imports its heavy package only when opened."""
from __future__ import annotations

from pathlib import Path

from .base import Backend
from ..errors import CfgExportError
from ..manifest import Manifest

BACKENDS = ("auto", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")


def make_backend(name: str | None, manifest: Manifest, directory: str | Path) -> Backend:
    """Returns an unopened backend for the artifact's model file; name None means 'auto'
    (tensorrt in a folder holding only an engine, else onnxruntime-cuda when onnxruntime-gpu
    sees a GPU, else onnxruntime-cpu). 'tensorrt' runs model.engine of engine.json (read here
    if `manifest` is the ONNX one)."""
    name = name or "auto"
    if name not in BACKENDS:
        raise CfgExportError(f"backend: got {name!r}, expected one of {', '.join(BACKENDS)}")
    from ..engine import engine_only, read_engine_manifest

    if name == "tensorrt" or (name == "auto" and engine_only(directory)):
        from .trt import TensorRTBackend
        from ..manifest import verify_model_file

        if manifest.engine is None:
            manifest = read_engine_manifest(directory)
        return TensorRTBackend(verify_model_file(manifest, directory), manifest)
    if manifest.engine is not None:
        raise CfgExportError(f"backend {name}: {directory} holds a TensorRT engine, not an ONNX model; "
                             f"use --backend tensorrt, or point at the folder made by cfg-export onnx")
    from .onnxrt import OnnxRuntimeBackend, cuda_available

    if name == "onnxruntime-tensorrt":
        from .onnxrt_trt import OnnxRuntimeTensorRTBackend

        return OnnxRuntimeTensorRTBackend(Path(directory) / manifest.model_file, manifest)

    if name == "auto":
        name = "onnxruntime-cuda" if cuda_available() else "onnxruntime-cpu"
    device = name.rsplit("-", 1)[1]
    return OnnxRuntimeBackend(Path(directory) / manifest.model_file, manifest, device=device)
