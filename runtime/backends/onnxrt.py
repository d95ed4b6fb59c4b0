"""ONNX Runtime backend: CPU, or CUDA with IO binding and device buffers reused across steps."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import Backend, describe_differences
from ..errors import CfgExportError, require
from ..manifest import Manifest, TensorSpec, compare_metadata

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(double)": "float64"}


def _onnxruntime():
    return require("onnxruntime", "onnxruntime")


def cuda_available() -> bool:
    """True when the installed onnxruntime has the CUDA execution provider."""
    try:
        return "CUDAExecutionProvider" in _onnxruntime().get_available_providers()
    except CfgExportError:
        return False


# ONNX Runtime's x86 NhwcTransformer rewrites every QLinearConv of a Q/DQ model to NHWC
# with Transposes around it; the float GroupNorm and activations between this package's
# quantized convolutions break every chain, so the Transposes stay. Without it the
# reference model's INT8 call ran 8-13% faster at 2 rows and 9% at 32 (README, INT8).
INT8_CPU_DISABLED_OPTIMIZERS = ("NhwcTransformer",)


def _specs(args) -> list[TensorSpec]:
    return [TensorSpec(a.name, tuple(s if isinstance(s, int) else str(s) for s in a.shape),
                       _ORT_DTYPES.get(a.type, a.type)) for a in args]


class OnnxRuntimeBackend(Backend):
    """An ONNX Runtime session over one .onnx file, on 'cpu' or 'cuda'."""

    def __init__(self, path: str | Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 spinning: bool | None = None, device_id: int = 0):
        super().__init__(manifest)
        if device not in ("cpu", "cuda"):
            raise CfgExportError(f"onnxruntime device: got {device!r}, expected cpu or cuda")
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.spinning = spinning
        self.device_id = device_id
        self.name = f"onnxruntime-{device}"
        self.session = None
        self._buffers: dict[tuple, object] = {}  # (name, shape) -> OrtValue on the GPU

    def activate(self) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.spinning is not None:  # worker threads spin after a call unless told not to
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        providers = self.providers(ort)
        disabled = list(INT8_CPU_DISABLED_OPTIMIZERS) if self.device == "cpu" and \
            self.manifest.precision.startswith("int8") else []
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers,
                                                disabled_optimizers=disabled)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CfgExportError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        diffs = describe_differences(self.manifest.inputs, _specs(self.session.get_inputs()), "input")
        diffs += describe_differences(self.manifest.outputs, _specs(self.session.get_outputs()), "output")
        diffs += compare_metadata(self.manifest, self.session.get_modelmeta().custom_metadata_map)
        if diffs:
            self.session = None
            raise CfgExportError(f"{self.path} does not match its manifest: {'; '.join(diffs)}")
        if self.device == "cuda":
            self._binding = self.session.io_binding()

    def providers(self, ort) -> list:
        """The execution providers of the session, first choice first."""
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CfgExportError("onnxruntime-cuda backend: this onnxruntime has no CUDA provider; "
                                     "pip install 'cfg-export[onnxruntime-gpu]' (without onnxruntime), or use onnxruntime-cpu")
            return [("CUDAExecutionProvider", {"device_id": str(self.device_id)}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def deactivate(self) -> None:
        self.session = None
        self._buffers.clear()

    def _device_buffer(self, name: str, shape: tuple, dtype) -> object:
        """An OrtValue on the GPU, allocated once per (name, shape) and reused."""
        key = (name, shape)
        if key not in self._buffers:
            ort = _onnxruntime()
            self._buffers[key] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", self.device_id)
        return self._buffers[key]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cpu":
            names = [o.name for o in self.manifest.outputs]
            return dict(zip(names, self.session.run(names, feeds)))
        binding = self._binding
        for name, value in feeds.items():
            buffer = self._device_buffer(name, value.shape, value.dtype)
            buffer.update_inplace(np.ascontiguousarray(value))
            binding.bind_ortvalue_input(name, buffer)
        rows = next(iter(feeds.values())).shape[0]
        outputs = {}
        for spec in self.manifest.outputs:
            shape = (rows, *spec.shape[1:])
            outputs[spec.name] = self._device_buffer(spec.name, shape, np.dtype(spec.dtype))
            binding.bind_ortvalue_output(spec.name, outputs[spec.name])
        self.session.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in outputs.items()}
