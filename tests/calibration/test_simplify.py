"""Graph pre-processing (calibration.simplify) and SmoothQuant (calibration.smoothquant):
each leaves the float model's function as it was (checked against the unprocessed model in
ONNX Runtime), and does what it says to the graph (checked on the graph and, for
SmoothQuant, against the paper's equation computed here)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cfg_export.calibration.data import load_calibration
from cfg_export.calibration.simplify import simplify_graph
from cfg_export.calibration.smoothquant import activation_channel_max, smooth_model


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_reference_model_keeps_its_function_with_fewer_nodes(digits_artifact, digits_calib):
    model = onnx.load(str(digits_artifact / "model.onnx"))
    before = onnx.ModelProto()
    before.CopyFrom(model)
    result = simplify_graph(model)
    ops = [n.op_type for n in model.graph.node]
    assert result.reshapes == 23 and result.unsqueezes == 11 and result.affines == 23  # 23 GroupNorms, 11 blocks
    assert "Shape" not in ops and ops.count("BatchNormalization") == 23 and len(ops) < len(before.graph.node) - 70
    onnx.checker.check_model(model)
    for feeds in load_calibration(digits_calib.path).batches([0, 5, 9]):
        np.testing.assert_allclose(run(model, feeds), run(before, feeds), rtol=1e-5, atol=1e-5)


def attention_graph(outlier: float = 40.0):
    """LayerNorm(x) -> three MatMuls (q, k, v) -> Add; x [2, 5, 8], the LayerNorm's scale
    making channel 7 an outlier."""
    g = np.random.default_rng(0)
    gamma = np.abs(g.standard_normal(8)) + 0.5
    gamma[7] = outlier
    inits = [numpy_helper.from_array(gamma.astype(np.float32), "gamma"),
             numpy_helper.from_array(g.standard_normal(8).astype(np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1)]
    for name in "qkv":
        inits.append(numpy_helper.from_array(g.standard_normal((8, 6)).astype(np.float32), f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["h", f"w_{name}"], [name], name=f"to_{name}"))
    nodes += [helper.make_node("Add", ["q", "k"], ["qk"]), helper.make_node("Add", ["qk", "v"], ["y"])]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_linear_layers_of_one_input_become_one_matmul():
    model = attention_graph()
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    want = run(model, {"x": x})
    result = simplify_graph(model)
    assert result.merged_linears == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 1 and "Split" in ops
    np.testing.assert_allclose(run(model, {"x": x}), want, rtol=1e-5, atol=1e-5)


class Recorded:
    """A stand-in for CalibrationData: batches of feeds."""

    def __init__(self, feeds):
        self.feeds = feeds

    def batches(self, order=None):
        yield from self.feeds


def test_smoothquant_moves_the_outlier_into_the_weights():
    model = attention_graph()
    g = np.random.default_rng(2)
    data = Recorded([{"x": g.standard_normal((2, 5, 8)).astype(np.float32)} for _ in range(3)])
    x = data.feeds[0]
    want = run(model, x)
    a_max = activation_channel_max(model, data, ["h"])["h"]
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w_max = np.max([np.abs(weights[f"w_{n}"]).max(axis=1) for n in "qkv"], axis=0)
    s = np.sqrt(a_max) / np.sqrt(w_max)  # paper eq. 4, alpha 0.5
    result = smooth_model(model, data, 0.5)
    assert sorted(result.layers) == ["to_k", "to_q", "to_v"] and result.folded == 1 and result.inserted == 0
    smoothed = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in "qkv":
        np.testing.assert_allclose(smoothed[f"w_{n}"], weights[f"w_{n}"] * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(smoothed["gamma"], weights["gamma"] / s, rtol=1e-5)  # folded into the LayerNorm
    np.testing.assert_allclose(run(model, x), want, rtol=1e-4, atol=1e-4)
    after = activation_channel_max(model, data, ["h"])["h"]
    assert after.max() / np.median(after) < a_max.max() / np.median(a_max) / 3  # the outlier channel evened out
    assert result.spread_after < result.spread_before


def test_smoothquant_inserts_a_mul_where_it_cannot_fold():
    model = attention_graph()
    model.graph.node[0].op_type = "Identity"  # no LayerNormalization to fold into: x itself is the input
    del model.graph.node[0].input[1:]
    del model.graph.node[0].attribute[:]
    x = {"x": np.random.default_rng(3).standard_normal((2, 5, 8)).astype(np.float32)}
    want = run(model, x)
    result = smooth_model(model, Recorded([x]), 0.8)
    assert result.inserted == 1 and result.folded == 0
    np.testing.assert_allclose(run(model, x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match=r"--smoothquant: got alpha 1.5, expected a migration strength in \[0, 1\]"):
        smooth_model(model, Recorded([x]), 1.5)
