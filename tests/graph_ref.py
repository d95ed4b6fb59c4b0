"""Nodes of an ONNX graph found by op type and connectivity, never by the names an
exporter happens to give: the independent reference the FP16 and INT8 node-selection
tests compare with."""
from __future__ import annotations


def consumers(graph, tensor: str) -> list:
    return [n for n in graph.node if tensor in n.input]


def producer(graph, tensor: str):
    return next((n for n in graph.node if tensor in n.output), None)


def only(graph, op_type: str):
    (node,) = [n for n in graph.node if n.op_type == op_type]
    return node


def first_conv(graph, sample: str = "sample"):
    """The convolution that reads the graph input directly."""
    (node,) = [n for n in graph.node if n.op_type == "Conv" and n.input[0] == sample]
    return node


def last_conv(graph):
    """The convolution with no other convolution downstream of it."""
    convs = [n for n in graph.node if n.op_type == "Conv"]
    conv_names = {c.name for c in convs}
    (node,) = [c for c in convs if not downstream(graph, c.output[0]) & conv_names]
    return node


def downstream(graph, tensor: str) -> set[str]:
    """Names of the nodes that depend on `tensor` (breadth-first over consumers)."""
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    seen, frontier = set(), [tensor]
    while frontier:
        name = frontier.pop()
        for node in readers.get(name, []):
            if node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    return seen


def group_norm_nodes(graph) -> list:
    """GroupNorm as the exporter decomposes it: Reshape -> InstanceNormalization -> Reshape ->
    Mul (weight) -> Add (bias), found by walking from each InstanceNormalization."""
    found = []
    for norm in (n for n in graph.node if n.op_type == "InstanceNormalization"):
        before = producer(graph, norm.input[0])
        chain, node = [before, norm], norm
        for op in ("Reshape", "Mul", "Add"):
            (node,) = [c for c in consumers(graph, node.output[0]) if c.op_type == op]
            chain.append(node)
        found += chain
    return found


def float_nodes(model) -> set[str]:
    """Names of the nodes that write a float tensor (elem types from ONNX shape inference): the
    ones whose precision a keep list can change."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info,
                                                             *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return {n.name for n in model.graph.node if any(types.get(x) in floats for x in n.output if x)}


def default_kept(model, sample: str = "sample") -> list[str]:
    """The names, in graph order, of the nodes with float tensors that the default keep list
    must keep in float: everything that does not depend on the sample (time and class
    embeddings), the first and the last convolution, the decomposed GroupNorms, Softmax."""
    graph = model.graph
    dependent = downstream(graph, sample)
    keep = {n.name for n in graph.node if n.name not in dependent and n.op_type != "Constant"}
    keep |= {first_conv(graph, sample).name, last_conv(graph).name}
    keep |= {n.name for n in group_norm_nodes(graph)}
    keep |= {n.name for n in graph.node if n.op_type == "Softmax"}
    keep &= float_nodes(model)
    return [n.name for n in graph.node if n.name in keep]
