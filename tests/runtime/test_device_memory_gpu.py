"""The TensorRT backend's CUDA layer (runtime/backends/device_memory.py) on a real GPU:
device facts, pinned host buffers, async copies on a stream, CUDA graph capture and replay,
teardown. Skipped where no GPU and cuda-python answer."""
import numpy as np
import pytest

from cfg_export.runtime.errors import CfgExportError

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    from cfg_export.runtime.backends.device_memory import CudaPython

    try:
        api = CudaPython(0)
        api.device_info()
    except (ImportError, CfgExportError) as exc:
        pytest.skip(f"no GPU with cuda-python here ({str(exc).splitlines()[0] if str(exc) else exc})")
    yield api
    api.close()


def test_device_facts(cuda):
    info = cuda.device_info()
    major, minor = info.cc
    assert info.name and major >= 5 and minor >= 0


def test_round_trip_through_device_memory(cuda):
    from cfg_export.runtime.backends.device_memory import DeviceBuffer

    stream = cuda.stream()
    a, b = DeviceBuffer(cuda, (64, 3, 8), np.float32), DeviceBuffer(cuda, (64, 3, 8), np.float32)
    try:
        data = np.random.default_rng(0).standard_normal((64, 3, 8)).astype(np.float32)
        np.copyto(a.host, data)
        cuda.to_device(a.ptr, a.host, stream)
        cuda._call(cuda.rt.cudaMemcpyAsync, b.ptr, a.ptr, a.nbytes,
                   cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)
        cuda.to_host(b.host, b.ptr, stream)
        cuda.synchronize(stream)
        np.testing.assert_array_equal(b.host, data)
    finally:
        a.free()
        b.free()
        cuda.destroy_stream(stream)


def test_a_captured_graph_replays_the_copies(cuda):
    """What the backend captures is the enqueue of one call shape; replaying it after new
    host data was copied in gives the new result."""
    from cfg_export.runtime.backends.device_memory import DeviceBuffer

    stream = cuda.stream()
    src, dst = DeviceBuffer(cuda, (1024,), np.float32), DeviceBuffer(cuda, (1024,), np.float32)

    def enqueue():
        cuda._call(cuda.rt.cudaMemcpyAsync, dst.ptr, src.ptr, src.nbytes,
                   cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)

    try:
        graph = cuda.capture(stream, enqueue)
        for value in (1.5, -2.0):
            src.host[:] = value
            cuda.to_device(src.ptr, src.host, stream)
            cuda.launch(graph, stream)
            cuda.to_host(dst.host, dst.ptr, stream)
            cuda.synchronize(stream)
            assert np.all(dst.host == value)
        cuda.destroy_graph(graph)
    finally:
        src.free()
        dst.free()
        cuda.destroy_stream(stream)


def test_open_cuda_prefers_cuda_python(cuda):
    from cfg_export.runtime.backends.device_memory import open_cuda

    api = open_cuda(0)
    assert api.name == "cuda-python" and api.graphs
    api.close()
