"""TensorRT backend: runs `model.engine` described by `engine.json`.

Opening it checks the engine against this machine first (TensorRT version and GPU
compute capability, runtime.trt_compat.check_engine) and refuses a mismatch with the
command that rebuilds it here; then it deserializes the engine and checks its I/O
against the manifest. Per call shape (2N rows for guided steps, N for the steps outside
a guidance interval) it keeps one slot: device buffers with pinned host twins,
allocated once and reused, the input shapes set on the execution context, and
optionally a CUDA graph of the enqueue. Calls run `execute_async_v3` on one stream.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .base import Backend, describe_differences
from .device_memory import DeviceBuffer, open_cuda
from ..engine import engine_profiles, input_shape, named_sizes, pick_profile
from ..errors import CfgExportError, require
from ..manifest import Manifest, TensorSpec
from ..trt_versions import INT64_IO_SINCE, DeviceInfo, TrtVersion, check_engine

log = logging.getLogger(__name__)


def _tensorrt():
    return require("tensorrt", "tensorrt")


def compatibility_error(manifest: Manifest, path: Path, installed, device: DeviceInfo) -> CfgExportError | None:
    """Returns the error to raise when the engine cannot run here (None when it can): what it
    was built for, what this machine has, why they differ, and the command that rebuilds it."""
    engine = manifest.engine or {}
    problems = check_engine(engine, installed, device)
    if not problems:
        return None
    rebuild = engine.get("rebuild") or f"cfg-export trt {path.parent}"
    return CfgExportError(
        f"{path}: built for TensorRT {engine.get('tensorrt')} on {engine.get('gpu')} (compute capability "
        f"{engine.get('compute_capability')}), this machine has TensorRT {installed} on {device.name} "
        f"({device.compute_capability}): {'; '.join(problems)}; rebuild it here with: {rebuild}")


@dataclass
class _Slot:
    """Everything one call shape needs, made once: context, buffers, optional CUDA graph."""

    rows: int
    context: object
    profile: int
    sizes: dict = field(default_factory=dict)  # named sizes other than the batch ('H', 'W' of a pipeline stage)
    buffers: dict[str, DeviceBuffer] = field(default_factory=dict)
    graph: object = None  # executable CUDA graph of the enqueue, while the context holds these shapes


def _key(rows: int, sizes: dict) -> tuple:
    return (rows, *sorted(sizes.items()))


class TensorRTBackend(Backend):
    """A TensorRT engine on GPU `device`; cuda_graph captures the enqueue of each call shape
    and replays it while that shape stays bound."""

    def __init__(self, path: str | Path, manifest: Manifest, cuda_graph: bool = False, device: int = 0):
        super().__init__(manifest)
        if manifest.engine is None:
            raise CfgExportError(f"{path}: its manifest has no 'engine' block; open engine.json, not manifest.json")
        self.path = Path(path)
        self.cuda_graph = cuda_graph
        self.device = device
        self.name = "tensorrt"
        self.profiles = engine_profiles(manifest)
        self._cuda = self._stream = self._engine = self._runtime = None
        self._contexts: dict[int, object] = {}  # profile -> execution context
        self._slots: dict[tuple, _Slot] = {}  # (rows, named sizes) -> slot
        self._active: dict[int, tuple] = {}  # profile -> the slot key whose shapes and addresses its context holds
        self._dtypes: dict[str, np.dtype] = {}

    def activate(self) -> None:
        trt = _tensorrt()
        cuda = open_cuda(self.device)
        try:
            self._open(trt, cuda)
        except BaseException:
            cuda.close()
            raise
        self._cuda = cuda
        self._stream = cuda.stream()

    def _open(self, trt, cuda) -> None:
        """Checks the engine against this machine, deserializes it and checks its I/O."""
        if self.cuda_graph and not cuda.graphs:
            raise CfgExportError(f"CUDA graphs need cuda-python, this board has {cuda.name}: pip install cuda-python")
        installed = TrtVersion.parse(trt.__version__)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        info = cuda.device_info()
        device = DeviceInfo(info.name, info.compute_capability, int(getattr(runtime, "num_DLA_cores", 0)))
        error = compatibility_error(self.manifest, self.path, installed, device)
        if error is not None:
            raise error
        engine_facts = self.manifest.engine
        if engine_facts.get("version_compatible"):
            runtime.engine_host_code_allowed = True  # the plan carries its lean runtime: trusted, we built it
        if engine_facts.get("dla_core") is not None:
            runtime.DLA_core = int(engine_facts["dla_core"])
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise CfgExportError(f"{self.path}: TensorRT {installed} cannot deserialize it (see the log above); "
                                 f"rebuild it here with: {engine_facts.get('rebuild') or 'cfg-export trt'}")
        self._check_io(trt, engine, installed)
        self._runtime, self._engine, self._logger = runtime, engine, logger

    def _check_io(self, trt, engine, installed: TrtVersion) -> None:
        specs = {"input": [], "output": []}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self._dtypes[name] = dtype
            shape = tuple("dynamic" if d < 0 else int(d) for d in engine.get_tensor_shape(name))
            kind = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            specs[kind].append(TensorSpec(name, shape, dtype.name))
        declared = {"input": self.manifest.inputs, "output": self.manifest.outputs}
        if installed < INT64_IO_SINCE:  # TensorRT 8.x/9.x turn int64 I/O into int32; we convert on the host
            for kind in specs:
                wanted = {s.name: s.dtype for s in declared[kind]}
                specs[kind] = [TensorSpec(s.name, s.shape, "int64" if s.dtype == "int32" and wanted.get(s.name) ==
                                          "int64" else s.dtype) for s in specs[kind]]
        diffs = []
        for kind in specs:
            order = {s.name: k for k, s in enumerate(declared[kind])}
            actual = sorted(specs[kind], key=lambda s: order.get(s.name, len(order)))
            diffs += describe_differences(declared[kind], actual, kind)
        if diffs:
            raise CfgExportError(f"{self.path} does not match its manifest: {'; '.join(diffs)}; rebuild the engine")

    def deactivate(self) -> None:
        """Releases everything in the reverse order of creation: CUDA graphs and buffers, the
        stream, the execution contexts, the engine and its runtime, and the CUDA context last
        (an engine or context destroyed after its CUDA context would touch freed state)."""
        cuda = self._cuda
        if cuda is not None and self._stream is not None:
            cuda.synchronize(self._stream)
        for slot in self._slots.values():
            if slot.graph is not None:
                cuda.destroy_graph(slot.graph)
            for buffer in slot.buffers.values():
                buffer.free()
            slot.context = None
        if cuda is not None and self._stream is not None:
            cuda.destroy_stream(self._stream)
        self._slots.clear()
        self._active.clear()
        self._contexts.clear()
        self._engine = None
        self._runtime = None
        self._stream = None
        self._cuda = None
        if cuda is not None:
            cuda.close()

    def _context_for(self, profile: int):
        """The execution context of `profile`, made on first use (TensorRT lets one context
        at a time use a profile, so there is one per profile)."""
        if profile in self._contexts:
            return self._contexts[profile]
        context = self._engine.create_execution_context()
        if context is None:
            raise CfgExportError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        if self._engine.num_optimization_profiles > 1:
            context.set_optimization_profile_async(profile, self._cuda.stream_handle(self._stream))
        self._contexts[profile] = context
        return context

    def _bind(self, slot: _Slot) -> None:
        """Puts the slot's input shapes and tensor addresses on its profile's context. Graphs
        captured for other shapes on that context are dropped: they recorded its old state."""
        for spec in self.manifest.inputs:
            shape = input_shape(spec, slot.rows, slot.sizes)
            if not slot.context.set_input_shape(spec.name, shape):
                raise CfgExportError(f"engine rejects input {spec.name!r} of shape {shape}; rebuild it with profiles "
                                     f"that cover {slot.rows} rows{' and sizes ' + str(slot.sizes) if slot.sizes else ''}")
        for name, buffer in slot.buffers.items():
            slot.context.set_tensor_address(name, buffer.ptr)
        for other in self._slots.values():
            if other.profile == slot.profile and other is not slot and other.graph is not None:
                self._cuda.destroy_graph(other.graph)
                other.graph = None
        self._active[slot.profile] = _key(slot.rows, slot.sizes)

    def _slot(self, rows: int, sizes: dict | None = None) -> _Slot:
        sizes = sizes or {}
        key = _key(rows, sizes)
        if key in self._slots:
            return self._slots[key]
        profile = pick_profile(self.profiles, rows) if self.profiles else 0
        slot = _Slot(rows, self._context_for(profile), profile, sizes)
        for spec in self.manifest.inputs:
            shape = input_shape(spec, rows, sizes)
            slot.buffers[spec.name] = DeviceBuffer(self._cuda, shape, self._dtypes[spec.name])
            slot.context.set_input_shape(spec.name, shape)
        self._active.pop(profile, None)  # the context's shapes changed: bind before the next run
        for spec in self.manifest.outputs:
            shape = tuple(slot.context.get_tensor_shape(spec.name))
            slot.buffers[spec.name] = DeviceBuffer(self._cuda, shape, self._dtypes[spec.name])
        self._slots[key] = slot
        log.debug("tensorrt: buffers for %d rows on profile %d", rows, profile)
        return slot

    def _enqueue(self, slot: _Slot) -> None:
        if not slot.context.execute_async_v3(self._cuda.stream_handle(self._stream)):
            raise CfgExportError(f"{self.path}: TensorRT failed to run a call of {slot.rows} rows (see the log above)")

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, stream = self._cuda, self._stream
        slot = self._slot(next(iter(feeds.values())).shape[0], named_sizes(self.manifest, feeds))
        if self._active.get(slot.profile) != _key(slot.rows, slot.sizes):
            self._bind(slot)
        for name, value in feeds.items():
            buffer = slot.buffers[name]
            np.copyto(buffer.host, value, casting="unsafe")  # int64 -> int32 for TensorRT < 10 engines
            cuda.to_device(buffer.ptr, buffer.host, stream)
        if slot.graph is not None:
            cuda.launch(slot.graph, stream)
        else:
            self._enqueue(slot)
            if self.cuda_graph:  # capture after a plain run, which did the shape-dependent setup
                slot.graph = cuda.capture(stream, lambda: self._enqueue(slot))
        for spec in self.manifest.outputs:
            buffer = slot.buffers[spec.name]
            cuda.to_host(buffer.host, buffer.ptr, stream)
        cuda.synchronize(stream)
        return {spec.name: np.array(slot.buffers[spec.name].host, dtype=spec.dtype) for spec in self.manifest.outputs}
