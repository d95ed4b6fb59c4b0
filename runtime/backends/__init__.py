"""Backends: objects that run one model file. Constructed cheaply; `with backend:`
opens the session (and device buffers); `infer(feeds)` validates the feeds against the
manifest, then runs. Each backend imports its heavy package only when opened."""
from __future__ import annotations

from pathlib import Path

from runtime.backends.base import Backend
from runtime.errors import CfgExportError
from runtime.manifest import Manifest

BACKENDS = ("auto", "onnxruntime-cpu", "onnxruntime-cuda")


def make_backend(name: str | None, manifest: Manifest, directory: str | Path) -> Backend:
    """Returns an unopened backend for the artifact's model file; name None means 'auto'
    (onnxruntime-cuda when onnxruntime-gpu sees a GPU, else onnxruntime-cpu)."""
    name = name or "auto"
    if name not in BACKENDS:
        raise CfgExportError(f"backend: got {name!r}, expected one of {', '.join(BACKENDS)}")
    from runtime.backends.onnxrt import OnnxRuntimeBackend, cuda_available

    if name == "auto":
        name = "onnxruntime-cuda" if cuda_available() else "onnxruntime-cpu"
    device = name.rsplit("-", 1)[1]
    return OnnxRuntimeBackend(Path(directory) / manifest.model_file, manifest, device=device)
