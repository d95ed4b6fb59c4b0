"""The FP16-typed ONNX of the strongly typed route (TensorRT 11), run on ONNX Runtime CPU
against the FP32 model, and read back to check which nodes really are FP32.

ONNX Runtime's CPU provider runs most FP16 nodes by casting to FP32 and back, so what it
measures is FP16 storage (weights and the activations between nodes), not FP16 arithmetic
inside kernels; the tolerances below are a few times the measured errors (README).
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import graph_ref
from onnx import TensorProto, helper

from cfg_export.export.exporter import export_onnx
from cfg_export.build.fp16 import DEFAULT_KEEP_FP32, FP16_METADATA_KEY, convert_fp16, write_fp16_model
from cfg_export.runtime.errors import CfgExportError
from tests.conftest import DIGITS

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def run(model, feeds):
    """ONNX Runtime CPU without graph optimizations (which would remove Cast pairs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def stacked_feeds(n, shape, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2 * n, *shape)).astype(np.float32),
            "timestep": rng.integers(0, 100, 2 * n).astype(np.int64),
            "cond": np.r_[rng.integers(0, num_classes, n), np.full(n, num_classes)].astype(np.int64)}


def rel_error(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def types_of(model):
    """Elem type of every tensor, read back by ONNX shape inference (independent of the converter)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info,
                                                             *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def float_types(model, node):
    types = types_of(model)
    return {types[n] for n in [*node.input, *node.output] if n and types.get(n) in (F32, F16)}


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """The digits UNet architecture with random weights, exported once."""
    out = tmp_path_factory.mktemp("unet") / "a"
    export_onnx("tests.trt_models:digits_unet", out, check=False)
    return out


def test_tiny_model_kept_nodes_are_fp32(tiny_artifacts):
    source = onnx.load(str(tiny_artifacts / "stacked" / "model.onnx"))
    before = source.SerializeToString()
    result = convert_fp16(source)
    model = result.model
    g = model.graph
    # what the default list names, found by op type and position (tests/graph_ref.py), not by name
    norm, mul = graph_ref.only(g, "InstanceNormalization"), graph_ref.group_norm_nodes(g)[3]
    assert float_types(model, norm) == {F32}
    assert float_types(model, graph_ref.first_conv(g)) == {F32}  # reads `sample`: the first conv
    assert float_types(model, graph_ref.last_conv(g)) == {F32}  # writes `eps`: the last conv
    assert float_types(model, graph_ref.only(g, "Gemm")) == {F32}  # the time embedding
    assert mul.op_type == "Mul" and float_types(model, mul) == {F32}  # GroupNorm's affine, decomposed
    assert float_types(model, graph_ref.only(g, "Sigmoid")) == {F16}  # SiLU: not kept
    features = graph_ref.first_conv(g).output[0]  # sample features + embedding: the Add after the first conv
    (add,) = [n for n in g.node if n.op_type == "Add" and any(
        i == features or (graph_ref.producer(g, i) is not None and graph_ref.producer(g, i).op_type == "Cast"
                          and graph_ref.producer(g, i).input[0] == features) for i in n.input)]
    assert float_types(model, add) == {F16}
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input] == [
        ("sample", F32), ("timestep", TensorProto.INT64), ("cond", TensorProto.INT64)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output] == [("eps", F32)]
    assert {p.key for p in model.metadata_props} >= {FP16_METADATA_KEY, "cfg_export.manifest"}
    assert source.SerializeToString() == before  # the input model is untouched


def test_tiny_model_matches_fp32_on_onnxruntime(tiny_artifacts):
    source = onnx.load(str(tiny_artifacts / "stacked" / "model.onnx"))
    feeds = stacked_feeds(4, (2, 6, 6), 3)
    want = run(source, feeds)
    kept = run(convert_fp16(source).model, feeds)
    everything = run(convert_fp16(source, ["none"]).model, feeds)
    assert kept.dtype == np.float32 and kept.shape == want.shape
    assert rel_error(kept, want) < 1e-3
    assert 1e-5 < rel_error(everything, want) < 3e-3  # FP16 weights really are FP16: the error is not zero


def test_unet_matches_fp32_and_keeps_the_right_convs(unet):
    source = onnx.load(str(unet / "model.onnx"))
    result = convert_fp16(source)
    model = result.model
    init_types = {t.name: t.data_type for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    fp32_convs = [n.name for n in convs if init_types.get(n.input[1]) == F32]
    ends = [graph_ref.first_conv(source.graph).name, graph_ref.last_conv(source.graph).name]
    assert len(convs) == 35 and fp32_convs == ends  # first and last only
    for node in model.graph.node:
        if node.op_type in ("InstanceNormalization", "Sin", "Cos", "Gemm"):  # norms, time embedding MLP
            assert float_types(model, node) == {F32}, node.name
    feeds = stacked_feeds(8, (1, 16, 16), 10)
    want = run(source, feeds)
    kept = rel_error(run(model, feeds), want)
    everything = rel_error(run(convert_fp16(source, ["none"]).model, feeds), want)
    assert kept < 3e-3 and everything < 1e-2  # measured: 6.0e-4 and 8.2e-4 (torch 2.13, ORT 1.32)
    assert kept < everything


def layer_norm_model():
    """A decomposed LayerNorm (as torch exports it below opset 17) on large activations:
    x = 400 * sample; (x - mean) / sqrt(mean((x - mean)^2) + eps). The square reaches ~1.6e5,
    past FP16's 65504."""
    const = lambda name, value: helper.make_tensor(name, F32, [], [value])  # noqa: E731
    nodes = [
        helper.make_node("Mul", ["sample", "scale"], ["x"], name="/scale/Mul"),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], name="/ln/ReduceMean"),
        helper.make_node("Sub", ["x", "mean"], ["centered"], name="/ln/Sub"),
        helper.make_node("Pow", ["centered", "two"], ["square"], name="/ln/Pow"),
        helper.make_node("ReduceMean", ["square"], ["var"], axes=[-1], name="/ln/ReduceMean_1"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="/ln/Add"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="/ln/Sqrt"),
        helper.make_node("Div", ["centered", "std"], ["normed"], name="/ln/Div"),
        helper.make_node("Tanh", ["normed"], ["eps_out"], name="/out/Tanh"),
    ]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("sample", F32, ["N", 8])],
                              [helper.make_tensor_value_info("eps_out", F32, ["N", 8])],
                              [const("scale", 400.0), const("two", 2.0), const("eps", 1e-5)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_keeping_normalizations_in_fp32_prevents_overflow():
    """ONNX Runtime's CPU provider computes FP16 nodes in FP32 (it casts around them and drops
    the cast pairs), so the overflow a strongly typed engine would hit cannot show there: the
    test reads the tensor types instead, and numpy says which values FP16 cannot hold."""
    model = layer_norm_model()
    sample = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    x = 400.0 * sample.astype(np.float64)
    square = (x - x.mean(-1, keepdims=True)) ** 2
    assert square.max() > np.finfo(np.float16).max  # this tensor overflows if it is FP16
    everything = convert_fp16(model, ["none"]).model
    assert types_of(everything)["square"] == F16
    kept = convert_fp16(model)  # default list: @norm keeps the statistics
    assert types_of(kept.model)["square"] == F32 and types_of(kept.model)["var"] == F32
    assert {"/ln/Pow", "/ln/ReduceMean_1", "/ln/Sqrt", "/ln/Div"} <= set(kept.kept)
    want = run(model, {"sample": sample})
    assert rel_error(run(kept.model, {"sample": sample}), want) < 1e-2


def test_softmax_and_native_group_norm_are_kept():
    nodes = [helper.make_node("GroupNormalization", ["sample", "gamma", "beta"], ["g"], num_groups=2, name="gn"),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["out"], axis=1, name="attn/Softmax")]
    init = [helper.make_tensor("gamma", F32, [4], [1.0] * 4), helper.make_tensor("beta", F32, [4], [0.0] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", F32, ["N", 4, 3])],
                              [helper.make_tensor_value_info("out", F32, ["N", 4, 3])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    result = convert_fp16(model)
    assert result.kept == ["gn", "attn/Softmax"]
    # ONNX inference gives no type to GroupNormalization-21's output: read the Casts instead
    producers = {o: n for n in result.model.graph.node for o in n.output}
    nodes = {n.name: n for n in result.model.graph.node}
    to = lambda cast: next(a.i for a in cast.attribute if a.name == "to")  # noqa: E731
    into_relu = producers[nodes["relu"].input[0]]
    into_softmax = producers[nodes["attn/Softmax"].input[0]]
    assert into_relu.op_type == "Cast" and to(into_relu) == F16 and into_relu.input[0] == "g"
    assert into_softmax.op_type == "Cast" and to(into_softmax) == F32 and into_softmax.input[0] == "r"
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    assert rel_error(run(result.model, {"sample": x}), run(model, {"sample": x})) < 1e-3


def test_user_patterns(tiny_artifacts):
    source = onnx.load(str(tiny_artifacts / "stacked" / "model.onnx"))
    scope = graph_ref.only(source.graph, "InstanceNormalization").name.rsplit("/", 1)[0]  # the norm's module path
    in_scope = [n.name for n in source.graph.node if n.name.startswith(scope + "/") and n.op_type != "Constant"]
    assert len(in_scope) >= 5 and convert_fp16(source, [scope + "/*"]).kept == in_scope
    with_sigmoid = convert_fp16(source, ["default", "Sigmoid"]).kept
    assert graph_ref.only(source.graph, "Sigmoid").name in with_sigmoid
    assert graph_ref.last_conv(source.graph).name in with_sigmoid
    assert convert_fp16(source, ["none"]).kept == []
    assert DEFAULT_KEEP_FP32 == ("@norm", "Softmax", "@embedding", "@first-conv", "@last-conv")


@pytest.mark.parametrize("keep,message", [
    (["/nowhere/mid/*"], r"--keep-fp32 '/nowhere/mid/\*': matches no node .*node names look like '"),
    (["@attention"], r"--keep-fp32 '@attention': no such group; groups: @norm, @embedding, @first-conv, @last-conv"),
])
def test_bad_patterns_are_refused(tiny_artifacts, keep, message):
    source = onnx.load(str(tiny_artifacts / "stacked" / "model.onnx"))
    with pytest.raises(CfgExportError, match=message):
        convert_fp16(source, keep)


def test_large_weights_are_clipped_not_inf():
    nodes = [helper.make_node("Mul", ["sample", "big"], ["m"], name="mul"),
             helper.make_node("Relu", ["m"], ["out"], name="relu")]
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("sample", F32, [2])],
                              [helper.make_tensor_value_info("out", F32, [2])],
                              [helper.make_tensor("big", F32, [2], [1e6, 3.0])])
    result = convert_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["none"])
    assert result.clipped == ["big"]
    out = run(result.model, {"sample": np.array([1.0, 1.0], np.float32)})
    assert out.tolist() == [65504.0, 3.0]


def test_write_is_whole_and_fused_layout_converts(tiny_artifacts, tmp_path):
    result = write_fp16_model(tiny_artifacts / "fused" / "model.onnx", tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    rng = np.random.default_rng(2)
    feeds = {"sample": rng.standard_normal((3, 2, 6, 6)).astype(np.float32), "timestep": np.array([5, 50, 95]),
             "cond": np.array([0, 1, 2]), "w": np.array([0.0, 1.0, 3.0], np.float32)}
    want = run(tiny_artifacts / "fused" / "model.onnx", feeds)
    assert rel_error(run(tmp_path / "m.onnx", feeds), want) < 1e-3 and result.kept


@pytest.mark.skipif(not (DIGITS / "config.json").is_file(), reason="the digits reference model is not trained yet "
                                                                   "(examples/digits/denoiser)")
def test_reference_model_fp16(digits_artifact):
    source = onnx.load(str(digits_artifact / "model.onnx"))
    feeds = stacked_feeds(8, (1, 16, 16), 10)
    assert rel_error(run(convert_fp16(source).model, feeds), run(source, feeds)) < 3e-3


def test_ops_without_fp16_form_stay_fp32_and_attribute_types_follow():
    """Range has no float16 type in the ONNX standard: it stays FP32 whatever the list says;
    ConstantOfShape's value (an attribute, not an input) becomes FP16 with its node."""
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["ramp"], name="ramp"),
             helper.make_node("Shape", ["sample"], ["shape"], name="shape"),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"], name="ones",
                              value=helper.make_tensor("v", F32, [1], [1.0])),
             helper.make_node("Add", ["sample", "ones"], ["shifted"], name="add"),
             helper.make_node("Mul", ["shifted", "ramp"], ["out"], name="mul")]
    init = [helper.make_tensor(n, F32, [], [v]) for n, v in (("start", 0.0), ("limit", 3.0), ("delta", 1.0))]
    graph = helper.make_graph(nodes, "r", [helper.make_tensor_value_info("sample", F32, [2, 3])],
                              [helper.make_tensor_value_info("out", F32, [2, 3])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert_fp16(model, ["none"])
    assert result.forced == ["ramp"] and result.kept == ["ramp"]
    types = types_of(result.model)
    assert types["ramp"] == F32 and types["ones"] == F16 and types["out"] == F32
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(run(result.model, {"sample": x}), (x + 1) * np.arange(3), rtol=1e-3)
