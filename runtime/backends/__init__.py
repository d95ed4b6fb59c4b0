"""Backends: objects that run one model file of an Artifact. Constructed cheaply;
`with backend:` opens the session (and device buffers); `infer(feeds)` validates the
feeds against the manifest, then runs. Each backend imports its heavy package only
when opened.

open_backend(artifact, name, options) is the one way to make one: it picks the model
file the backend runs (the ONNX model, or the TensorRT engine for 'tensorrt'), checks
its sha256 through the Artifact (once per file), and hands every option on.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CfgExportError
from .base import Backend

BACKENDS = ("auto", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")


@dataclass(frozen=True)
class BackendOptions:
    """What a user can set on a backend; None means the backend's default."""

    threads: int | None = None  # ONNX Runtime intra-op threads (default: ONNX Runtime's, one per core)
    spinning: bool | None = None  # ONNX Runtime worker threads spin after a call (default: ONNX Runtime's, on)
    device: int | None = None  # GPU index (default 0)
    cuda_graph: bool | None = None  # tensorrt: capture and replay CUDA graphs per call shape (default off)
    trt_cache: str | None = None  # onnxruntime-tensorrt: engine and timing cache folder (default DIR/ort-trt-cache)
    trt_fp16: bool | None = None  # onnxruntime-tensorrt: let TensorRT use FP16 (default off)
    trt_max_batch: int | None = None  # onnxruntime-tensorrt: largest images N of its profile (default 16)

    def __post_init__(self):
        for name in ("threads", "trt_max_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CfgExportError(f"{name.replace('_', '-')}: got {value!r}, expected an integer >= 1")
        if self.device is not None and (not isinstance(self.device, int) or self.device < 0):
            raise CfgExportError(f"device: got {self.device!r}, expected a GPU index >= 0")


def resolve_backend(name: str | None) -> str:
    """Returns the backend name 'auto' (or None) stands for here: onnxruntime-cuda when the
    installed onnxruntime has CUDA, else onnxruntime-cpu; other names are checked."""
    name = name or "auto"
    if name not in BACKENDS:
        raise CfgExportError(f"backend: got {name!r}, expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        from .onnxrt import cuda_available

        return "onnxruntime-cuda" if cuda_available() else "onnxruntime-cpu"
    return name


def open_backend(artifact, name: str | None = None, options: BackendOptions | None = None,
                 stage: str = "denoiser") -> Backend:
    """Returns an unopened backend for a stage of `artifact` (an Artifact or a folder path).

    name None means 'auto': tensorrt for a folder holding only an engine, else
    onnxruntime-cuda when onnxruntime-gpu sees a GPU, else onnxruntime-cpu. 'tensorrt'
    runs the stage's engine (engine.json + model.engine), every other backend its ONNX model.
    """
    from ..artifact import as_artifact

    artifact = as_artifact(artifact)
    options = options or BackendOptions()
    name = name or "auto"
    if name not in BACKENDS:
        raise CfgExportError(f"backend: got {name!r}, expected one of {', '.join(BACKENDS)}")
    s = artifact.stage(stage)
    if name == "tensorrt" or (name == "auto" and s.onnx is None):
        from .trt import TensorRTBackend

        _refuse_unused("tensorrt", options)
        model = artifact.model_file(stage, engine=True)
        return _scheduled(s, TensorRTBackend(model.path, model.manifest, cuda_graph=bool(options.cuda_graph),
                                             device=options.device or 0), name, options)
    model = artifact.model_file(stage, engine=False)
    if name == "onnxruntime-tensorrt":
        from .onnxrt_trt import OnnxRuntimeTensorRTBackend

        _refuse_unused(name, options)
        return _scheduled(s, OnnxRuntimeTensorRTBackend(
            model.path, model.manifest, cache_dir=options.trt_cache, fp16=bool(options.trt_fp16),
            max_batch=options.trt_max_batch, threads=options.threads, spinning=options.spinning,
            device_id=options.device or 0), name, options)
    from .onnxrt import OnnxRuntimeBackend

    name = resolve_backend(name)
    _refuse_unused(name, options)
    return _scheduled(s, OnnxRuntimeBackend(model.path, model.manifest, device=name.rsplit("-", 1)[1],
                                            threads=options.threads, spinning=options.spinning,
                                            device_id=options.device or 0), name, options)


def _scheduled(stage, backend: Backend, name: str, options: BackendOptions) -> Backend:
    """The backend itself, or, for a model whose manifest has a precision schedule, a
    ScheduledBackend that runs the scheduled steps on the same backend kind of the model
    in the schedule's folder (opened once per stage)."""
    schedule = backend.manifest.precision_schedule
    if not schedule:
        return backend
    from ..artifact import Artifact
    from .scheduled import ScheduledBackend

    folder = schedule.get("folder") if isinstance(schedule, dict) else None
    if not isinstance(folder, str) or not folder or ".." in folder or folder.startswith("/"):
        raise CfgExportError(f"{stage.directory}: precision_schedule has no valid 'folder' ({folder!r}); quantize "
                             f"the model again")
    key = f"schedule:{folder}"
    if key not in stage._cache:
        stage._cache[key] = Artifact.open(stage.directory / folder)
    other = stage._cache[key]
    if other.manifest.precision_schedule:
        raise CfgExportError(f"{other.directory}: a scheduled model has a schedule of its own; quantize again")
    return ScheduledBackend(backend, open_backend(other, name, options), schedule.get("float_timesteps"))


# the backends each option applies to, and its command-line flag
_OPTION_USERS = {
    "threads": ("--threads", ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt")),
    "spinning": ("--no-spinning", ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt")),
    "cuda_graph": ("--cuda-graph", ("tensorrt",)),
    "device": ("--device", ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")),
    "trt_cache": ("--trt-cache", ("onnxruntime-tensorrt",)),
    "trt_fp16": ("--trt-fp16", ("onnxruntime-tensorrt",)),
    "trt_max_batch": ("--trt-max-batch", ("onnxruntime-tensorrt",)),
}


def _refuse_unused(name: str, options: BackendOptions) -> None:
    """Refuses options that the chosen backend would silently ignore, naming the backends they are for."""
    for field_name, (flag, users) in _OPTION_USERS.items():
        if getattr(options, field_name) is not None and name not in users:
            raise CfgExportError(f"{flag} applies to the {' and '.join(users)} backend{'s' * (len(users) > 1)}, "
                                 f"not {name}: choose one with --backend, or drop {flag}")


__all__ = ["BACKENDS", "Backend", "BackendOptions", "open_backend", "resolve_backend"]
