"""CUDA device memory, streams and graphs for the TensorRT backend, through cuda-python
(`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6), or pycuda where a
board has only that. Both are imported when a device is opened, never at import time.

Only what the backend needs: device facts, device and pinned host buffers, async
copies on one stream, and CUDA graph capture (cuda-python only).
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np

from ..errors import CfgExportError
from ..trt_versions import DeviceInfo

log = logging.getLogger(__name__)

INSTALL = "pip install 'cfg-export[tensorrt]' (cuda-python; on JetPack 6, CUDA 12: pip install 'cuda-python<13')"


def _pinned_array(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A numpy view of `nbytes` of page-locked host memory at ptr."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) if shape else 1
    buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


class CudaPython:
    """cuda-python's runtime API: every call returns (error, values...)."""

    name = "cuda-python"
    graphs = True

    def __init__(self, device: int = 0):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart
        self.device = device
        self._call(cudart.cudaSetDevice, device)

    def _call(self, fn, *args):
        result = fn(*args)
        err, values = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            raise CfgExportError(f"CUDA {fn.__name__} failed: {name}; is an NVIDIA GPU and its driver present "
                                 f"(nvidia-smi, or tegrastats on Jetson)?")
        return values[0] if len(values) == 1 else values

    def device_info(self) -> DeviceInfo:
        props = self._call(self.rt.cudaGetDeviceProperties, self.device)
        name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(name, f"{props.major}.{props.minor}")

    def stream(self):
        return self._call(self.rt.cudaStreamCreate)

    def stream_handle(self, stream) -> int:
        return int(stream)

    def destroy_stream(self, stream) -> None:
        self._call(self.rt.cudaStreamDestroy, stream)

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc, nbytes))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree, ptr)

    def host_array(self, shape, dtype) -> tuple[np.ndarray, object]:
        """Returns (array, handle): a page-locked host array and what free_host needs."""
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        ptr = int(self._call(self.rt.cudaMallocHost, nbytes))
        return _pinned_array(ptr, tuple(shape), dtype), ptr

    def free_host(self, handle) -> None:
        self._call(self.rt.cudaFreeHost, handle)

    def to_device(self, ptr: int, array: np.ndarray, stream) -> None:
        self._call(self.rt.cudaMemcpyAsync, ptr, array.ctypes.data, array.nbytes,
                   self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def to_host(self, array: np.ndarray, ptr: int, stream) -> None:
        self._call(self.rt.cudaMemcpyAsync, array.ctypes.data, ptr, array.nbytes,
                   self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def synchronize(self, stream) -> None:
        self._call(self.rt.cudaStreamSynchronize, stream)

    def capture(self, stream, enqueue) -> object:
        """Returns an executable CUDA graph of what enqueue() puts on the stream."""
        self._call(self.rt.cudaStreamBeginCapture, stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
        try:
            enqueue()
        finally:
            graph = self._call(self.rt.cudaStreamEndCapture, stream)
        try:
            return self._call(self.rt.cudaGraphInstantiate, graph, 0)
        finally:
            self._call(self.rt.cudaGraphDestroy, graph)

    def launch(self, graph_exec, stream) -> None:
        self._call(self.rt.cudaGraphLaunch, graph_exec, stream)

    def destroy_graph(self, graph_exec) -> None:
        self._call(self.rt.cudaGraphExecDestroy, graph_exec)

    def close(self) -> None:
        pass


class PyCuda:
    """pycuda's driver API, for boards where only pycuda is installed; no CUDA graphs."""

    name = "pycuda"
    graphs = False

    def __init__(self, device: int = 0):
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.dev = cuda.Device(device)
        self.context = self.dev.retain_primary_context()
        self.context.push()
        self._allocations: dict[int, object] = {}

    def device_info(self) -> DeviceInfo:
        major, minor = self.dev.compute_capability()
        return DeviceInfo(self.dev.name(), f"{major}.{minor}")

    def stream(self):
        return self.cuda.Stream()

    def stream_handle(self, stream) -> int:
        return int(stream.handle)

    def destroy_stream(self, stream) -> None:
        pass

    def malloc(self, nbytes: int) -> int:
        allocation = self.cuda.mem_alloc(nbytes)
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def host_array(self, shape, dtype) -> tuple[np.ndarray, object]:
        array = self.cuda.pagelocked_empty(tuple(shape), np.dtype(dtype))
        return array, array

    def free_host(self, handle) -> None:
        base = getattr(handle, "base", None)  # pycuda's HostAllocation behind the array
        if base is not None and hasattr(base, "free"):
            base.free()

    def to_device(self, ptr: int, array: np.ndarray, stream) -> None:
        self.cuda.memcpy_htod_async(ptr, array, stream)

    def to_host(self, array: np.ndarray, ptr: int, stream) -> None:
        self.cuda.memcpy_dtoh_async(array, ptr, stream)

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def capture(self, stream, enqueue):
        raise CfgExportError("CUDA graph capture needs cuda-python, and this board has only pycuda: "
                             "pip install cuda-python, or run without --cuda-graph")

    def close(self) -> None:
        for allocation in self._allocations.values():
            allocation.free()
        self._allocations.clear()
        self.context.pop()


def open_cuda(device: int = 0):
    """Returns the CUDA API on `device`: cuda-python if installed, else pycuda; raises
    CfgExportError naming the extra when neither is, or when no GPU answers."""
    try:
        return CudaPython(device)
    except ImportError:
        pass
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        raise CfgExportError(f"neither cuda-python nor pycuda is installed: {INSTALL}") from None
    try:
        return PyCuda(device)
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError
        raise CfgExportError(f"pycuda cannot open GPU {device} ({exc}); is an NVIDIA GPU and its driver present?") \
            from None


class DeviceBuffer:
    """A device allocation with a pinned host twin of one shape and dtype, reused across calls."""

    def __init__(self, cuda, shape, dtype):
        self.cuda = cuda
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)
        self.ptr = cuda.malloc(self.nbytes)
        self.host, self._host_handle = cuda.host_array(self.shape, self.dtype)

    def free(self) -> None:
        if self.ptr is not None:
            self.cuda.free(self.ptr)
            self.cuda.free_host(self._host_handle)
            self.ptr = None
