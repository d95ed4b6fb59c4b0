"""A stand-in for the `tensorrt` module and the CUDA API, for machines without either.

It follows the documented TensorRT Python API as far as cfg-export uses it, records what
the builder asks for (LAST_BUILD), and "runs" an engine by running its source ONNX on
ONNX Runtime CPU with inputs and outputs in fake device memory. The tests that use it
check the wiring of cfg_export.build.builder and runtime.backends.trt (flags, profiles,
FP32 constraints, shapes, buffers, CUDA graph capture, compatibility checks); they say
nothing about TensorRT itself, which only the GPU tests exercise.
"""
from __future__ import annotations

import enum
import itertools
import json
import types

import numpy as np

from cfg_export.runtime.trt_versions import DeviceInfo

MEMORY: dict[int, np.ndarray] = {}  # fake device memory: pointer -> bytes
LAST_BUILD: dict = {}
CALLS: list[tuple] = []  # (what, details) of the runtime calls worth counting
_pointers = itertools.count(4096, 4096)


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    WARNING = 2

    def __init__(self, level=None):
        self.level = level


class Tensor:
    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class Layer:
    def __init__(self, name, outputs):
        self.name, self._outputs = name, outputs
        self.precision, self.output_types = None, {}

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_output(self, j):
        return self._outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class Network:
    def __init__(self, flags):
        self.flags, self.layers, self.inputs, self.source = flags, [], [], None

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class OnnxParser:
    """One layer per ONNX node, named like it, with tensors named like its outputs."""

    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse_from_file(self, path):
        import onnx

        model = onnx.load(path)
        inferred = onnx.shape_inference.infer_shapes(model)
        types_ = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                                  *inferred.graph.output]}
        types_.update({t.name: t.data_type for t in model.graph.initializer})
        self.network.source = str(path)
        self.network.inputs = [Tensor(v.name, _ONNX_TYPES[v.type.tensor_type.elem_type]) for v in model.graph.input]
        for node in model.graph.node:
            outputs = [Tensor(o, _ONNX_TYPES.get(types_.get(o), DataType.FLOAT)) for o in node.output]
            self.network.layers.append(Layer(node.name, outputs))
        return True


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1
    GPU_FALLBACK = 3
    OBEY_PRECISION_CONSTRAINTS = 11
    VERSION_COMPATIBLE = 15


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class DeviceType(enum.Enum):
    GPU = 0
    DLA = 1


class HardwareCompatibilityLevel(enum.Enum):
    NONE = 0
    AMPERE_PLUS = 1
    SAME_COMPUTE_CAPABILITY = 2


class OptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class TimingCache:
    def __init__(self, data: bytes):
        self.entries = set(data.decode().split()) if data else set()

    def combine(self, other, ignore_mismatch):
        self.entries |= other.entries
        return True

    def serialize(self):
        return " ".join(sorted(self.entries)).encode()


class IInt8EntropyCalibrator2:
    def __init__(self):
        pass


class BuilderConfig:
    def __init__(self):
        self.flags, self.pools, self.profiles = set(), {}, []
        self.builder_optimization_level = 3
        self.default_device_type, self.DLA_core = DeviceType.GPU, -1
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self.int8_calibrator, self.calibration_profile, self.cache = None, None, None

    def set_flag(self, flag):
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile

    def create_timing_cache(self, data):
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return Network(flags)

    def create_builder_config(self):
        return BuilderConfig()

    def create_optimization_profile(self):
        return OptimizationProfile()

    def build_serialized_network(self, network, config):
        batches = 0
        if config.int8_calibrator is not None:
            names = [t.name for t in network.inputs]
            while config.int8_calibrator.get_batch(names) is not None:
                batches += 1
            config.int8_calibrator.write_calibration_cache(b"fake ranges")
        if config.cache is not None:
            config.cache.entries.add(f"tactic-{len(config.cache.entries)}")
        LAST_BUILD.clear()
        LAST_BUILD.update(network=network, config=config, calibration_batches=batches)
        profiles = [{n: [list(s) for s in t] for n, t in p.shapes.items()} for p in config.profiles]
        return json.dumps({"fake_plan": network.source, "profiles": profiles}).encode()


# --- runtime ---------------------------------------------------------------------------

class ExecutionContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

    def __del__(self):
        CALLS.append(("destroy", "context"))

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name] if self.engine.profiles else (shape, shape, shape)
        CALLS.append(("set_input_shape", name, tuple(shape), self.profile))
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        rows = next(iter(self.shapes.values()))[0]
        dims = self.engine.static_output_dims[name]
        if all(dims):
            return (rows, *dims)
        # named sizes besides the batch (a pipeline stage's spatial sizes): run the model on zeros
        feeds = {spec.name: np.zeros(self.shapes[spec.name], self.engine.dtypes[spec.name])
                 for spec in self.engine.session.get_inputs()}
        names = [o.name for o in self.engine.session.get_outputs()]
        return tuple(dict(zip(names, self.engine.session.run(None, feeds)))[name].shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream_handle):
        CALLS.append(("execute", self.profile, next(iter(self.shapes.values()))[0]))
        feeds = {}
        for spec in self.engine.session.get_inputs():
            memory = MEMORY[self.addresses[spec.name]]
            dtype = self.engine.dtypes[spec.name]
            feeds[spec.name] = memory.view(dtype)[:int(np.prod(self.shapes[spec.name]))].reshape(self.shapes[spec.name])
        names = [o.name for o in self.engine.session.get_outputs()]
        for name, value in zip(names, self.engine.session.run(None, feeds)):
            MEMORY[self.addresses[name]][:value.nbytes] = np.frombuffer(value.tobytes(), np.uint8)
        return True


class CudaEngine:
    def __init__(self, plan):
        import onnx
        import onnxruntime as ort

        self.source = plan["fake_plan"]
        self.profiles = [{n: tuple(tuple(s) for s in t) for n, t in p.items()} for p in plan["profiles"]]
        self.session = ort.InferenceSession(self.source, providers=["CPUExecutionProvider"])
        model = onnx.load(self.source)
        self.io = [(v.name, TensorIOMode.INPUT, v) for v in model.graph.input]
        self.io += [(v.name, TensorIOMode.OUTPUT, v) for v in model.graph.output]
        self.dtypes = {name: np.dtype(_ONNX_TYPES[v.type.tensor_type.elem_type].value) for name, _, v in self.io}
        self.static_output_dims = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim[1:])
                                   for v in model.graph.output}

    @property
    def num_io_tensors(self):
        return len(self.io)

    @property
    def num_optimization_profiles(self):
        return max(1, len(self.profiles))

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _find(self, name):
        return next(entry for entry in self.io if entry[0] == name)

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_dtype(self, name):
        return DataType(self.dtypes[name].name)

    def get_tensor_shape(self, name):
        dims = self._find(name)[2].type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)

    def create_execution_context(self):
        CALLS.append(("create_execution_context",))
        return ExecutionContext(self)

    def __del__(self):
        CALLS.append(("destroy", "engine"))


class Runtime:
    num_DLA_cores = 0

    def __init__(self, logger):
        self.engine_host_code_allowed, self.DLA_core = False, -1

    def __del__(self):
        CALLS.append(("destroy", "runtime"))

    def deserialize_cuda_engine(self, data):
        CALLS.append(("deserialize",))
        try:
            plan = json.loads(bytes(data))
        except ValueError:
            return None
        return CudaEngine(plan)


def nptype(dtype):
    return np.dtype(dtype.value).type


float32, float16, int32, int64 = DataType.FLOAT, DataType.HALF, DataType.INT32, DataType.INT64


def make_module(version: str = "10.3.0.30") -> types.ModuleType:
    """A module object that imports as `tensorrt`, reporting `version`."""
    module = types.ModuleType("tensorrt")
    for name, value in globals().items():
        if not name.startswith("_") and name not in ("make_module", "FakeCuda", "types", "annotations"):
            setattr(module, name, value)
    module.__version__ = version
    return module


class FakeCuda:
    """The subset of runtime.backends.device_memory's API the backend and builder use."""

    name = "fake-cuda"
    graphs = True

    def __init__(self, device: DeviceInfo = DeviceInfo("Fake GPU", "8.6")):
        self.info = device
        self.allocations = 0
        self.captures = 0

    def device_info(self):
        return self.info

    def stream(self):
        return object()

    def stream_handle(self, stream):
        return id(stream)

    def destroy_stream(self, stream):
        pass

    def malloc(self, nbytes):
        ptr = next(_pointers)
        MEMORY[ptr] = np.zeros(nbytes, np.uint8)
        self.allocations += 1
        return ptr

    def free(self, ptr):
        del MEMORY[ptr]

    def host_array(self, shape, dtype):
        array = np.zeros(shape, dtype)
        return array, None

    def free_host(self, handle):
        pass

    def to_device(self, ptr, array, stream):
        MEMORY[ptr][:array.nbytes] = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)

    def to_host(self, array, ptr, stream):
        array.reshape(-1).view(np.uint8)[:] = MEMORY[ptr][:array.nbytes]

    def synchronize(self, stream):
        pass

    def capture(self, stream, enqueue):
        self.captures += 1
        return enqueue  # replaying the graph = running the captured enqueue again

    def launch(self, graph, stream):
        CALLS.append(("launch",))
        graph()

    def destroy_graph(self, graph):
        pass

    def close(self):
        CALLS.append(("destroy", "cuda context"))
