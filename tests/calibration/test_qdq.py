"""calibration.qdq: the arrangement of a Q/DQ graph that ONNX Runtime's CPU kernels fuse.

A hand-built graph with the fan-out a UNet has everywhere (one tensor read by two
quantized convolutions and a float op, behind one shared Q/DQ pair as onnxruntime's
quantizer writes it): after arrange_qdq each convolution must run as ONNX Runtime's
QLinearConv, the numbers must stay those of the shared pair (the same integers), and the
float reader must read the float tensor. Then the reference model's default recipe: every
quantized convolution fuses, and each activation QuantizeLinear has one reader."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cfg_export.calibration.qdq import (arrange_qdq, fused_kernels, quantized_layers, read_float_inputs,
                                        single_reader_layers)

SCALE = 0.02


def fanout_graph() -> onnx.ModelProto:
    """x -> Relu -> r; r -> Q -> DQ (shared) -> conv_a, conv_b, and r -> Sigmoid (float);
    conv outputs -> Q -> DQ -> Add -> y; Sigmoid -> s. Weights INT8 per tensor, within
    +-60: x86 AVX2 kernels without VNNI add pairs of 8-bit products in 16 bits, which
    overflows for larger weights (the reason for --reduce-range), and the check is exact."""
    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(SCALE), "s_act"), numpy_helper.from_array(np.int8(0), "z_act"),
             numpy_helper.from_array(np.float32(0.01), "s_w"), numpy_helper.from_array(np.int8(0), "z_w"),
             numpy_helper.from_array(np.float32(0.05), "s_out"), numpy_helper.from_array(np.int8(0), "z_out")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s_act", "z_act"], ["r_q"], name="r_q"),
             helper.make_node("DequantizeLinear", ["r_q", "s_act", "z_act"], ["r_dq"], name="r_dq"),
             helper.make_node("Sigmoid", ["r_dq"], ["s"], name="sigmoid")]
    for name in ("a", "b"):
        inits.append(numpy_helper.from_array(g.integers(-60, 61, (8, 4, 3, 3)).astype(np.int8), f"w_{name}"))
        nodes += [helper.make_node("DequantizeLinear", [f"w_{name}", "s_w", "z_w"], [f"w_{name}_dq"],
                                   name=f"w_{name}_dq"),
                  helper.make_node("Conv", ["r_dq", f"w_{name}_dq"], [f"c_{name}"], name=f"conv_{name}", pads=[1] * 4),
                  helper.make_node("QuantizeLinear", [f"c_{name}", "s_out", "z_out"], [f"c_{name}_q"],
                                   name=f"c_{name}_q"),
                  helper.make_node("DequantizeLinear", [f"c_{name}_q", "s_out", "z_out"], [f"c_{name}_dq"],
                                   name=f"c_{name}_dq")]
    nodes.append(helper.make_node("Add", ["c_a_dq", "c_b_dq"], ["y"], name="add"))
    graph = helper.make_graph(nodes, "fanout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})


def test_shared_pair_blocks_fusion_and_the_arrangement_fuses_every_conv():
    model = fanout_graph()
    assert fused_kernels(model).get("QLinearConv", 0) == 0  # one signed Q with several readers: no fusion on x86
    arranged = fanout_graph()
    result = arrange_qdq(arranged, ["Conv"])
    assert sorted(result.layers) == ["conv_a", "conv_b"] and result.private_pairs == 2
    assert fused_kernels(arranged)["QLinearConv"] == 2
    users = {}
    for node in arranged.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for q in (n for n in arranged.graph.node if n.op_type == "QuantizeLinear"):
        assert len(users[q.output[0]]) == 1  # what ONNX Runtime's signed-to-unsigned conversion needs
    sigmoid = next(n for n in arranged.graph.node if n.op_type == "Sigmoid")
    assert list(sigmoid.input) == ["r"]  # the float reader reads the float tensor


def test_arrangement_keeps_the_quantized_numbers():
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    arranged = fanout_graph()
    arrange_qdq(arranged, ["Conv"])
    (y0, s0), (y1, s1) = run(fanout_graph(), x), run(arranged, x)
    np.testing.assert_allclose(y1, y0, atol=1e-6)  # the convolutions read the same integers
    r = np.maximum(x, 0)
    np.testing.assert_allclose(s1, 1 / (1 + np.exp(-r)), rtol=1e-6)  # sigmoid of the float tensor
    rounded = np.clip(np.round(r / SCALE), -128, 127) * SCALE
    np.testing.assert_allclose(s0, 1 / (1 + np.exp(-rounded)), rtol=1e-6)  # before: of its rounding


def test_layers_with_several_readers_and_the_former_arrangement():
    model = fanout_graph()
    assert quantized_layers(model, ["Conv"]) == ["conv_a", "conv_b"]
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    float_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
         helper.make_node("Conv", ["r", "w"], ["y"], name="last")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s", "y")], [w])
    two_readers = helper.make_model(float_graph, opset_imports=[helper.make_opsetid("", 17)])
    assert single_reader_layers(two_readers, ["Conv"]) == ["conv", "last"]  # two readers; a graph output
    legacy = fanout_graph()
    read_float_inputs(legacy, ["sigmoid"])
    assert list(next(n for n in legacy.graph.node if n.op_type == "Sigmoid").input) == ["r"]


def test_reference_model_default_recipe_fuses_every_quantized_conv(digits_int8):
    model = onnx.load(str(digits_int8.directory / "model.onnx"))
    kernels = fused_kernels(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    quantized = set(quantized_layers(model, ["Conv"]))
    assert len(quantized) >= 30 and kernels["QLinearConv"] == len(quantized)
    assert kernels.get("Conv", 0) == len(convs) - len(quantized)  # the others stay float convolutions
    settings = digits_int8.manifest.producer["quantization"]
    assert settings["cpu_fusion"] and set(settings["several_readers_float"]).isdisjoint(quantized)


@pytest.mark.parametrize("op", ["Conv"])
def test_former_arrangement_fuses_fewer(digits_artifact, digits_calib, op):
    from cfg_export.calibration.quantize import QuantizeOptions, quantize_model

    model = onnx.load(str(digits_artifact / "model.onnx"))
    legacy = quantize_model(model, digits_calib_data(digits_calib), QuantizeOptions(cpu_fusion=False, simplify=False))
    fused = fused_kernels(legacy.model).get("QLinear" + op, 0)
    assert fused < len(quantized_layers(legacy.model, [op]))  # shared pairs: some layers run in float


def digits_calib_data(result):
    from cfg_export.calibration.data import load_calibration

    return load_calibration(result.path)
