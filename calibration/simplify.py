"""simplify_graph: pre-processing of an exported graph before quantization, exact rewrites
that leave ONNX Runtime fewer nodes to run and the quantized layers fewer readers.

PyTorch exports GroupNorm as Reshape -> InstanceNormalization -> Reshape(x, Shape(x)), so
every normalization reads its input twice (Reshape and Shape) and runs a Shape node per
call; a per-channel embedding added to a feature map is two chained Unsqueeze nodes. With
the sizes known from shape inference (all but the batch; onnxruntime's symbolic shape
inference):
- Reshape(y, Shape(x)) becomes Reshape(y, [0, d1, d2, ...]) when x has static sizes after
  its first axis and y's first size is the same (the same symbolic batch): 0 copies it;
- Unsqueeze(Unsqueeze(e, a), b) becomes one Unsqueeze with both axes when the axes are
  constants;
- GroupNorm's affine, Add(Mul(x, gamma), beta) with one value per channel, becomes one
  inference-mode BatchNormalization (mean 0, variance 1, epsilon 0): the same product and
  sum per element, one pass over the tensor instead of two;
- Linear layers reading one tensor (an attention block's query, key and value
  projections) become one MatMul with the weights side by side, and a Split: one larger
  GEMM, and one reader of the tensor instead of three (ONNX Runtime's common-subexpression
  elimination would merge three quantizations of it into one with three readers, which
  its x86 INT8 kernels cannot fuse, see calibration.qdq).
A reader less matters for INT8: a quantized layer whose output has one reader fuses
(calibration.qdq). The FP32 model gains the same node count; benchmarks/int8_cpu.py
times it as a control.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cfg_export.calibration.qdq import consumers, sort_topologically
from cfg_export.runtime.errors import require

log = logging.getLogger(__name__)


@dataclass
class Simplified:
    reshapes: int = 0  # Reshape(y, Shape(x)) made constant
    unsqueezes: int = 0  # Unsqueeze pairs merged
    affines: int = 0  # Mul(x, a) -> Add(., b) per-channel pairs made one BatchNormalization
    merged_linears: int = 0  # MatMuls of one input merged into one (and a Split)
    removed: int = 0  # nodes removed


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def simplify_graph(model) -> Simplified:
    """Applies the rewrites of the module doc to the onnx ModelProto `model` in place;
    returns what it changed."""
    onnx = require("onnx", "quantize")
    from onnx import helper, numpy_helper

    graph = model.graph
    result = Simplified()
    try:  # onnxruntime's symbolic inference follows broadcasts that onnx's leaves unknown
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True).graph
    except Exception as exc:  # both raise assorted errors for graphs they cannot follow
        log.info("symbolic shape inference failed (%s): onnx's shape inference instead", exc)
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception as exc2:
            log.info("shape inference failed (%s): graph left as it is", exc2)
            return result
    shapes = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    producer = {o: n for n in graph.node for o in n.output}
    constants = _constants(graph)
    for node in list(graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        source = producer.get(node.input[1])
        if source is None or source.op_type != "Shape" or source.attribute:
            continue
        dims, given = shapes.get(source.input[0]), shapes.get(node.input[0])
        if (not dims or not given or any(not isinstance(d, int) for d in dims[1:]) or dims[0] is None
                or dims[0] != given[0] or any(a.name == "allowzero" and a.i for a in node.attribute)):
            continue  # 0 would copy y's first size: only where it is x's first size
        name = f"{node.name}_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([0, *dims[1:]], dtype=np.int64), name))
        node.input[1] = name
        result.reshapes += 1
    users = consumers(graph)
    for node in list(graph.node):
        if node.op_type != "Unsqueeze" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        first = producer.get(node.input[0])
        if (first is None or first.op_type != "Unsqueeze" or len(first.input) < 2 or first.input[1] not in constants
                or len(users.get(first.output[0], [])) != 1):
            continue
        rank = len(shapes.get(first.input[0]) or [])
        if not rank:
            continue
        a = [int(v) % (rank + 1) for v in np.atleast_1d(constants[first.input[1]])]
        b = [int(v) % (rank + 1 + len(a)) for v in np.atleast_1d(constants[node.input[1]])]
        if len(a) != 1 or len(b) != 1 or b[0] <= a[0]:
            continue  # only the plain case: the second axis after the first, as .unsqueeze(-1).unsqueeze(-1)
        name = f"{node.name}_axes"
        graph.initializer.append(numpy_helper.from_array(np.array([a[0], b[0]], dtype=np.int64), name))
        merged = helper.make_node("Unsqueeze", [first.input[0], name], list(node.output), name=node.name)
        graph.node.remove(node)
        graph.node.remove(first)
        graph.node.append(merged)
        producer[node.output[0]] = merged
        result.unsqueezes += 1
    result.affines = _merge_affines(graph, shapes, constants)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= 13:  # Split takes its sizes as an input from opset 13
        result.merged_linears = _merge_shared_linears(graph)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type in ("Shape", "Constant") and not any(o in used for o in n.output)]
    for node in dead:
        graph.node.remove(node)
    result.removed = len(dead) + result.unsqueezes
    used = {i for n in graph.node for i in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    sort_topologically(graph)
    log.info("simplified: %d Reshape(Shape) made constant, %d Unsqueeze pairs merged, %d nodes removed",
             result.reshapes, result.unsqueezes, result.removed)
    return result


def _merge_affines(graph, shapes: dict, constants: dict) -> int:
    """Replaces Add(Mul(x, a), b), a and b constants of shape [C, 1, ...] (one value per
    channel of x [B, C, ...], as GroupNorm's exported affine), by one inference-mode
    BatchNormalization(x, scale a, bias b, mean 0, var 1, epsilon 0): x * a / sqrt(1) + b,
    the same products and sums in one pass over x. Returns how many."""
    from onnx import helper, numpy_helper

    users = consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    merged = 0
    for add in [n for n in graph.node if n.op_type == "Add"]:
        mul = producer.get(add.input[0])
        bias_name = add.input[1]
        if mul is None or mul.op_type != "Mul" or bias_name not in constants or len(users.get(mul.output[0], [])) != 1:
            continue
        x, scale_name = mul.input
        dims = shapes.get(x) or []
        if scale_name not in constants or len(dims) < 3 or not isinstance(dims[1], int):
            continue
        channels = dims[1]
        scale, bias = constants[scale_name], constants[bias_name]
        want = (channels,) + (1,) * (len(dims) - 2)
        if scale.shape != want or bias.shape != want or scale.dtype != np.float32 or bias.dtype != np.float32:
            continue
        names = {k: f"{add.name}_bn_{k}" for k in ("scale", "bias", "mean", "var")}
        values = {"scale": scale.reshape(-1), "bias": bias.reshape(-1), "mean": np.zeros(channels, np.float32),
                  "var": np.ones(channels, np.float32)}
        for k, v in values.items():
            graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), names[k]))
        node = helper.make_node("BatchNormalization", [x, names["scale"], names["bias"], names["mean"], names["var"]],
                                list(add.output), name=f"{add.name}_affine", epsilon=0.0)
        graph.node.remove(mul)
        graph.node.remove(add)
        graph.node.append(node)
        merged += 1
    return merged


def _merge_shared_linears(graph) -> int:
    """Merges the MatMuls that read one tensor, each with its own constant weight [K, M_i]
    of one dtype, into MatMul(x, [W_1 | W_2 | ...]) and a Split of the last axis into the
    original outputs. Returns how many groups were merged."""
    from onnx import helper, numpy_helper

    users = consumers(graph)
    initializers = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = {}
    for node in graph.node:
        if (node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers
                and node.input[0] not in initializers and len(initializers[node.input[1]].dims) == 2
                and len(users[node.input[1]]) == 1):
            groups.setdefault(node.input[0], []).append(node)
    merged = 0
    for x, nodes in groups.items():
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        if len(nodes) < 2 or len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            continue
        first = nodes[0]
        name = f"{first.name}_merged"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}_weight"))
        graph.initializer.append(numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64),
                                                         f"{name}_split"))
        graph.node.append(helper.make_node("MatMul", [x, f"{name}_weight"], [f"{name}_output"], name=name))
        graph.node.append(helper.make_node("Split", [f"{name}_output", f"{name}_split"],
                                           [n.output[0] for n in nodes], name=f"{name}_split", axis=-1))
        for n in nodes:
            graph.node.remove(n)
        merged += 1
    return merged
