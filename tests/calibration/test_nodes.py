"""The keep-list groups on the reference model's graph, checked against facts measured here:
tensor shapes from running the model, and the graph's own inputs."""
import onnx
import onnxruntime as ort
import numpy as np
import pytest

from cfg_export.calibration.nodes import DEFAULT_KEEP_FLOAT, select_float_nodes
from cfg_export.runtime.errors import CfgExportError


@pytest.fixture(scope="module")
def graph_model(digits_artifact):
    return onnx.load(str(digits_artifact / "model.onnx"))


def conv_input_shapes(model):
    """The shapes of every Conv's input, from running the model on 2 rows."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    convs = [n for n in probe.graph.node if n.op_type == "Conv"]
    for n in convs:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.input[0]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"sample": np.zeros((2, 1, 16, 16), np.float32), "timestep": np.array([5, 5]), "cond": np.array([1, 10])}
    names = [n.input[0] for n in convs]
    return {n.name: v.shape for n, v in zip(convs, session.run(names, feeds))}


def test_full_res_group_is_the_convolutions_at_the_sample_resolution(graph_model):
    measured = {name for name, shape in conv_input_shapes(graph_model).items() if shape[2:] == (16, 16)}
    assert len(measured) == 12
    assert set(select_float_nodes(graph_model, ["@full-res"])) == measured


def test_groups_by_structure(graph_model):
    nodes = {n.name: n for n in graph_model.graph.node}
    first = select_float_nodes(graph_model, ["@first-conv"])
    last = select_float_nodes(graph_model, ["@last-conv"])
    assert len(first) == len(last) == 1 and "sample" in nodes[first[0]].input
    convs = [n.name for n in graph_model.graph.node if n.op_type == "Conv"]
    assert last[0] == convs[-1] and first[0] == convs[0]  # ONNX stores nodes in topological order
    embedding = {nodes[n].op_type for n in select_float_nodes(graph_model, ["@embedding"])}
    assert {"Gather", "Sin", "Cos", "Gemm"} <= embedding and "Conv" not in embedding
    norm = {nodes[n].op_type for n in select_float_nodes(graph_model, ["@norm"])}
    assert norm == {"InstanceNormalization", "Reshape", "Mul", "Add"}
    default = set(select_float_nodes(graph_model, None))
    assert default == set(select_float_nodes(graph_model, list(DEFAULT_KEEP_FLOAT[:4])))  # no Softmax here
    assert set(select_float_nodes(graph_model, ["default", "Conv"])) > default


def test_unknown_group_and_unmatched_entry_are_refused(graph_model):
    with pytest.raises(CfgExportError, match=r"--keep-fp32 '@attention': no such group; groups: @norm, @embedding, "
                                             r"@first-conv, @last-conv, @full-res, @attention-matmul"):
        select_float_nodes(graph_model, ["@attention"])
    assert select_float_nodes(graph_model, ["@attention-matmul"]) == []  # a group the model lacks matches nothing
    with pytest.raises(CfgExportError, match=r"--keep-fp32 'Softmax': matches no node"):
        select_float_nodes(graph_model, ["Softmax"])
