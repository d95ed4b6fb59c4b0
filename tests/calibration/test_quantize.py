"""quantize_artifact on the reference model: a new artifact that the runtime samples on
ONNX Runtime CPU, whose guided eps stays close to FP32, and whose kept layers really are
left in float (checked on the graph, found by structure here, not by the library's list)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.files import sha256_file
from cfg_export.runtime.manifest import METADATA_KEY, read_manifest
from cfg_export.runtime.pipeline import sample_guided

W = 3.0


def guided(session, feeds, n):
    eps = session.run(None, feeds)[0].astype(np.float64)
    return (1 + W) * eps[:n] - W * eps[n:]


def dq_fed(graph):
    """Names of the nodes with an input that is a DequantizeLinear output."""
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if any(i in dq for i in n.input)}


def structure(graph):
    """The nodes the default recipe must leave in float, found from the graph: the first
    Conv the sample reaches, the Conv that writes eps, the label Gather, Sin/Cos, the
    InstanceNormalization of each GroupNorm with its Reshapes and affine Mul/Add. The last
    Conv is the one nearest to eps going upstream (the model may mix it with the sample after)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def skip_qdq_down(name):  # the readers of a tensor, through Q/DQ pairs
        found, frontier = [], [name]
        while frontier:
            nodes = [c for n in frontier for c in consumers.get(n, [])]
            found += [c for c in nodes if c.op_type not in ("QuantizeLinear", "DequantizeLinear")]
            frontier = [c.output[0] for c in nodes if c.op_type in ("QuantizeLinear", "DequantizeLinear")]
        return found

    def nearest_conv_up(name):  # breadth first from the output towards the inputs
        frontier = [name]
        while frontier:
            nodes = [producer[i] for i in frontier if i in producer]
            convs = [n for n in nodes if n.op_type == "Conv"]
            if convs:
                return convs[0]
            frontier = [i for n in nodes for i in n.input]

    first = [n for n in skip_qdq_down("sample") if n.op_type == "Conv"]
    last = nearest_conv_up(graph.output[0].name)
    norms = [n for n in graph.node if n.op_type == "InstanceNormalization"]
    around = [producer[n.input[0]] for n in norms] + [c for n in norms for c in consumers[n.output[0]]]
    kept = first + [last] + norms + around + [n for n in graph.node if n.op_type in ("Gather", "Sin", "Cos")]
    return first, last, kept


@pytest.fixture(scope="module")
def sessions(digits_artifact, digits_int8):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    make = lambda d: ort.InferenceSession(str(d / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return make(digits_artifact), make(digits_int8.directory)


def test_quantized_artifact_is_a_new_consistent_artifact(digits_artifact, digits_int8):
    source = read_manifest(digits_artifact)
    m = read_manifest(digits_int8.directory)
    assert m.precision == "int8-qdq" and m.model_sha256 == sha256_file(digits_int8.directory / "model.onnx")
    assert m.model_sha256 != source.model_sha256 and m.producer["quantized_from"] == source.model_sha256
    assert m.inputs == source.inputs and m.outputs == source.outputs and m.facts == source.facts
    model = onnx.load(str(digits_int8.directory / "model.onnx"))
    stored = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    assert stored == m.to_dict(with_sha=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights and all(t.data_type != onnx.TensorProto.INT32 for t in model.graph.initializer)  # float biases
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert any(len(t.dims) == 1 and t.dims[0] > 1 for t in model.graph.initializer if t.name in scales)  # per channel


def test_runtime_samples_the_int8_artifact_close_to_fp32(digits_artifact, digits_int8, sessions):
    labels = np.arange(10)
    feeds = []
    fp32 = sample_guided(digits_artifact, labels, W, steps=10, seed=7, record=feeds.append)
    int8 = sample_guided(digits_int8.directory, labels, W, steps=10, seed=7, backend="onnxruntime-cpu")
    assert int8.backend == "onnxruntime-cpu" and np.all(np.isfinite(int8.samples))
    a, b = sessions
    errors = {}
    for f in feeds:
        want, got = guided(a, f, 10), guided(b, f, 10)
        errors[int(f["timestep"][0])] = np.linalg.norm(got - want) / np.linalg.norm(want)
    # quality bounds (INT8 may only get better): the guided eps within 3.5% at high noise, where
    # the sampler divides it by little; the final images within 8% of FP32 (relative L2)
    assert all(errors[t] < 0.035 for t in errors if t >= 400), errors
    x, y = fp32.samples.reshape(10, -1), int8.samples.reshape(10, -1)
    distance = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    assert distance.mean() < 0.08, distance


def test_kept_layers_are_left_in_float(digits_artifact, digits_int8):
    graph = onnx.load(str(digits_int8.directory / "model.onnx")).graph
    first, last, kept = structure(graph)
    assert len(first) == 1 and last.op_type == "Conv" and len(kept) > 40
    fed = dq_fed(graph)
    assert not [n.name for n in kept if n.name in fed]  # no Q/DQ pair feeds a kept node
    weights = {t.name: t.data_type for t in graph.initializer}
    for conv in (first[0], last):
        assert weights[conv.input[1]] == onnx.TensorProto.FLOAT
    quantized = [n for n in graph.node if n.op_type == "Conv" and n.name in fed]
    several = digits_int8.manifest.producer["quantization"]["several_readers_float"]
    source = onnx.load(str(digits_artifact / "model.onnx")).graph
    readers = {o: sum(o in n.input for n in source.node) for n in source.node for o in n.output}
    assert several and all(readers[n.output[0]] > 1 for n in source.node if n.name in several)
    assert len(quantized) == len([n for n in graph.node if n.op_type == "Conv"]) - 2 - len(several)
    assert sorted(n.name for n in quantized) == sorted(digits_int8.quantized)


def test_quantize_all_leaves_nothing_in_float(digits_artifact, digits_calib, tmp_path):
    result = quantize_artifact(digits_artifact, digits_calib.path, tmp_path / "all",
                               QuantizeOptions(keep_fp32=(), method="minmax"))
    graph = onnx.load(str(tmp_path / "all" / "model.onnx")).graph
    first, last, _ = structure(graph)
    fed = dq_fed(graph)
    assert first[0].name in fed and last.name in fed and result.kept == []
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert gemms and all(n.name in fed for n in gemms)  # the time embedding MLP too


def test_keep_pattern_matching_nothing_is_refused(digits_artifact, digits_calib, tmp_path):
    with pytest.raises(CfgExportError, match=r"--keep-fp32 '/model/nowhere/\*': matches no node"):
        quantize_artifact(digits_artifact, digits_calib.path, tmp_path / "q",
                          QuantizeOptions(keep_fp32=["default", "/model/nowhere/*"]))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("options, message", [
    ({"method": ""}, "--method: got '', expected one of"),  # an empty value was the default before
    ({"activation_type": ""}, "--activation-type: got '', expected one of"),
    ({"op_types": [""]}, "--op-types: got '', expected ONNX op types"),
    ({"op_types": ["Conv", ""]}, "--op-types: got 'Conv,', expected ONNX op types"),
    ({"keep_fp32": ["@norm", " "]}, "--keep-fp32: got an empty pattern"),
])
def test_empty_option_values_are_refused(tiny_artifacts, tmp_path, options, message):
    with pytest.raises(CfgExportError, match=message):
        quantize_artifact(tiny_artifacts / "stacked", tmp_path / "none.npz", tmp_path / "q", QuantizeOptions(**options))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("method", ["minmax", "entropy", "min-mean"])
def test_each_method_gives_a_runnable_artifact(tiny_artifacts, tiny_calib, tmp_path, method):
    result = quantize_artifact(tiny_artifacts / "stacked", tiny_calib.path, tmp_path / method,
                               QuantizeOptions(method=method, keep_fp32=()))
    assert result.quantized
    assert result.manifest.producer["quantization"]["method"] == method
    out = sample_guided(tmp_path / method, [0, 1, 2], 2.0, steps=4, seed=1)
    assert np.all(np.isfinite(out.samples))


def test_cpu_sessions_of_int8_artifacts_skip_the_nhwc_transformer(digits_artifact, digits_int8, sessions, monkeypatch):
    """The runtime opens Q/DQ models on the CPU without ONNX Runtime's NhwcTransformer
    (faster for this package's graphs, README INT8) and FP32 models with every
    optimizer; the INT8 outputs equal those of a session with the transformer."""
    from cfg_export.runtime.backends import open_backend

    seen = {}
    real = ort.InferenceSession

    def recording(path, *args, **kwargs):
        seen[path] = kwargs.get("disabled_optimizers")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((4, 1, 16, 16)).astype(np.float32),
             "timestep": np.array([900, 900, 300, 300]), "cond": np.array([1, 10, 2, 10])}
    outputs = {}
    for directory in (digits_artifact, digits_int8.directory):
        with open_backend(directory, "onnxruntime-cpu") as backend:
            outputs[directory] = backend.infer(dict(feeds))["eps"]
    assert seen[str(digits_int8.directory / "model.onnx")] == ["NhwcTransformer"]
    assert not seen[str(digits_artifact / "model.onnx")]
    want = sessions[1].run(["eps"], feeds)[0]  # a session with every optimizer
    got = outputs[digits_int8.directory]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
