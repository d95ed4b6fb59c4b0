"""ONNX Runtime with its TensorRT execution provider: TensorRT speed from the plain
`model.onnx`, no `cfg-export trt` step. ONNX Runtime builds the engine on first use and
caches it (with its timing cache) in a folder, so later runs start fast.

Needs onnxruntime-gpu built with TensorRT, and TensorRT's libraries on the library path.
"""
from __future__ import annotations

from pathlib import Path

from .onnxrt import OnnxRuntimeBackend
from ..engine import input_shape, resolve_batches, shapes_text
from ..errors import CfgExportError
from ..manifest import Manifest

CACHE_DIR = "ort-trt-cache"  # beside model.onnx unless given


def ort_tensorrt_options(manifest: Manifest, cache_dir: str | Path, fp16: bool = False,
                         min_batch: int | None = None, opt_batch: int | None = None, max_batch: int | None = None,
                         workspace_mib: int | None = None) -> dict[str, str]:
    """Returns the TensorrtExecutionProvider options: engine and timing caches in `cache_dir`,
    FP16 if asked, and for a dynamic graph one explicit profile whose rows run from N_min (the
    N-row calls outside a guidance interval) to the stacked 2 N_max, so that no call shape in
    that range makes ONNX Runtime build a new engine."""
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir),
               "trt_fp16_enable": "True" if fp16 else "False"}
    if workspace_mib is not None:
        options["trt_max_workspace_size"] = str(int(workspace_mib) << 20)
    if manifest.batch is None:
        lo, opt, hi = resolve_batches(min_batch, opt_batch, max_batch)
        k = manifest.rows_per_image
        for key, rows in (("min", lo), ("opt", k * opt), ("max", k * hi)):
            options[f"trt_profile_{key}_shapes"] = shapes_text({s.name: input_shape(s, rows) for s in manifest.inputs})
    return options


class OnnxRuntimeTensorRTBackend(OnnxRuntimeBackend):
    """ONNX Runtime's TensorRT provider (CUDA, then CPU, for what TensorRT does not take),
    with device buffers reused across steps as for onnxruntime-cuda."""

    def __init__(self, path: str | Path, manifest: Manifest, cache_dir: str | Path | None = None, fp16: bool = False,
                 max_batch: int | None = None, threads: int | None = None, spinning: bool | None = None,
                 device_id: int = 0):
        super().__init__(path, manifest, device="cuda", threads=threads, spinning=spinning, device_id=device_id)
        self.name = "onnxruntime-tensorrt"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(path).parent / CACHE_DIR
        self.fp16 = fp16
        self.max_batch = max_batch

    def providers(self, ort) -> list:
        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise CfgExportError("onnxruntime-tensorrt backend: this onnxruntime has no TensorRT provider (got "
                                 f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu with TensorRT "
                                 "libraries on the library path, or use --backend tensorrt with an engine")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CfgExportError(f"engine cache {self.cache_dir}: cannot create it ({exc.strerror}); "
                                 f"make the artifact folder writable") from None
        options = ort_tensorrt_options(self.manifest, self.cache_dir, self.fp16, max_batch=self.max_batch)
        options["device_id"] = str(self.device_id)
        return [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {"device_id": str(self.device_id)}),
                "CPUExecutionProvider"]
