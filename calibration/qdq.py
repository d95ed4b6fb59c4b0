"""Arranging a Q/DQ graph so that ONNX Runtime's CPU kernels run it fast.

ONNX Runtime runs a quantized layer in INT8 only where its graph optimizer fuses the
pattern DequantizeLinear -> layer -> QuantizeLinear into one integer kernel (QLinearConv,
QLinearMatMul, QGemm). It fuses a node group only when (onnxruntime's QDQ selectors):
- each DequantizeLinear feeding the layer feeds nothing else;
- the layer's output goes to its QuantizeLinear and to nothing else (no float reader, no
  graph output);
- activations and output have one type. On x86, ONNX Runtime has no signed-by-signed
  INT8 convolution: it first turns each signed pair Q -> DQ into an unsigned one
  (QDQS8ToU8Transformer, zero point + 128, exact), and only where the Q has exactly ONE
  reader. A signed Q with two DequantizeLinear readers stays signed, and the layers on
  both sides of it then mix types and run in float.

`quantize_static` shares one Q -> DQ pair between all readers of a tensor, and the
readers of a tensor in a UNet are many (the next block's norm and skip convolution, the
skip connection of the decoder), so out of its Q/DQ graph ONNX Runtime fused 24 of the
reference model's 33 quantized convolutions; the 9 others ran as float convolutions of
dequantized weights, slower than the FP32 model's own. arrange_qdq rewrites the graph so
that every quantized layer fuses:
- every quantized layer reads its own DequantizeLinear, fed (for signed activations) by a
  QuantizeLinear of its own: a tensor read by k layers is quantized k times with the same
  scale, which gives the same integers;
- a float reader of a tensor whose producer is float reads that float tensor itself
  (no rounding is added where nothing runs in INT8); a float reader of a fused layer's
  output reads a DequantizeLinear of the layer's quantized output;
- with signed activations, a layer whose output has several readers cannot fuse at all
  (its one QuantizeLinear would need several readers): single_reader_layers finds them
  beforehand, from the float graph, so that the quantizer leaves them in float.

The result is valid explicit quantization for TensorRT as well: every tensor that enters
an INT8 layer has its Q/DQ pair, with the calibrated scale.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
FUSED_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeMatMul"}  # ONNX Runtime's integer kernels, in its optimized graph


@dataclass
class Arrangement:
    """What arrange_qdq changed."""

    layers: list[str] = field(default_factory=list)  # quantized layers (inputs through DequantizeLinear)
    private_pairs: int = 0  # Q/DQ pairs added so that each layer reads its own
    float_reads: int = 0  # float readers moved off a Q/DQ pair onto the float tensor


def consumers(graph) -> dict[str, list]:
    """Returns tensor name -> the nodes reading it, in graph order."""
    users = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def single_reader_layers(model, op_types: Sequence[str], names: Iterable[str] | None = None) -> list[str]:
    """Returns the names of the nodes of `op_types` (or of `names`) whose output is read by
    more than one node or is a graph output: with signed INT8 activations ONNX Runtime on
    x86 cannot fuse them (see the module doc); they are best left in float."""
    graph = model.graph
    users = consumers(graph)
    outputs = {o.name for o in graph.output}
    wanted = set(names) if names is not None else None
    found = []
    for node in graph.node:
        if node.op_type not in op_types or (wanted is not None and node.name not in wanted):
            continue
        out = node.output[0]
        if len(users.get(out, [])) != 1 or out in outputs:
            found.append(node.name)
    return found


def quantized_layers(model, op_types: Sequence[str]) -> list[str]:
    """Returns the names of the nodes of `op_types` with an input that comes through
    DequantizeLinear: the layers that run in INT8 (graph order)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == DEQUANTIZE for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(i in dq_outputs for i in n.input)]


def arrange_qdq(model, op_types: Sequence[str], signed: bool = True) -> Arrangement:
    """Rewrites the Q/DQ onnx ModelProto `model` in place so that ONNX Runtime fuses every
    quantized layer (see the module doc); returns what it changed. signed: the activations
    are INT8 (each QuantizeLinear must then have one reader); with UINT8 activations one
    QuantizeLinear serves all readers of a tensor."""
    from onnx import helper

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users = consumers(graph)
    result = Arrangement(layers=quantized_layers(model, op_types))
    layers = set(result.layers)
    graph_outputs = {o.name for o in graph.output}
    added: list = []
    count = 0

    def copy(node, inputs: list[str], what: str):
        nonlocal count
        count += 1
        made = helper.make_node(node.op_type, inputs, [f"{node.output[0]}_{what}{count}"],
                                name=f"{node.name}_{what}{count}", domain=node.domain or None)
        made.attribute.extend(node.attribute)
        added.append(made)
        return made

    for q in [n for n in graph.node if n.op_type == QUANTIZE]:
        x = q.input[0]
        if x in initializers:
            continue
        dqs = [u for u in users.get(q.output[0], []) if u.op_type == DEQUANTIZE]
        if not dqs:
            continue
        dq = dqs[0]
        via = {d.output[0] for d in dqs}
        reads = [(u, k) for d in dqs for u in users.get(d.output[0], []) for k, name in enumerate(u.input)
                 if name == d.output[0]]
        reads += [(u, k) for u in users.get(x, []) if u is not q and u.op_type != QUANTIZE
                  for k, name in enumerate(u.input) if name == x]
        layer_reads = [(u, k) for u, k in reads if u.name in layers]
        float_reads = [(u, k) for u, k in reads if u.name not in layers]
        source = producer.get(x)
        fused_source = source is not None and source.name in layers and x not in graph_outputs
        if fused_source:  # the layer's output leaves through its one Q; every reader reads a DQ of it
            if float_reads:
                shared = copy(dq, [q.output[0], *dq.input[1:]], "float")
                for u, k in float_reads:
                    u.input[k] = shared.output[0]
            for u, k in layer_reads:
                u.input[k] = copy(dq, [q.output[0], *dq.input[1:]], "dq").output[0]
                result.private_pairs += 1
            continue
        for u, k in float_reads:  # a float producer: float readers read the float tensor
            if u.input[k] in via:
                u.input[k] = x
                result.float_reads += 1
        for j, (u, k) in enumerate(layer_reads):
            params = list(q.input[1:])
            if signed and j > 0 and len(params) > 1:  # see _own_zero_point
                params[1] = _own_zero_point(graph, params[1], f"{q.name}_zp{j}")
            quantized = copy(q, [x, *params], "q").output[0] if signed else q.output[0]
            u.input[k] = copy(dq, [quantized, *(params if signed else dq.input[1:])], "dq").output[0]
            result.private_pairs += 1
    graph.node.extend(added)
    remove_dead_qdq(graph)
    sort_topologically(graph)
    return result


def read_float_inputs(model, kept: Iterable[str]) -> int:
    """The arrangement without --cpu-fusion (the recipe before calibration.qdq): the kept
    nodes read float tensors, an input X' = DequantizeLinear(QuantizeLinear(X)) (a pair
    onnxruntime shares between all readers of X) becoming X again; the pairs are otherwise
    left shared. Returns how many inputs were rewired."""
    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output}
    kept, count = set(kept), 0
    for node in graph.node:
        if node.name not in kept:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == DEQUANTIZE else None
            if q is not None and q.op_type == QUANTIZE:
                node.input[k] = q.input[0]
                count += 1
    remove_dead_qdq(graph)
    return count


def _own_zero_point(graph, name: str, new_name: str) -> str:
    """Adds a copy of the zero-point initializer `name` as `new_name`; returns new_name.

    Two QuantizeLinear nodes of one tensor with the same scale and zero point are merged
    by ONNX Runtime's common-subexpression elimination (after its ConstantSharing has
    made equal scalar initializers one), which gives the merged one several readers again.
    A zero point of its own, the same value under another name, keeps them apart: ONNX
    Runtime (1.32) shares float scalars but not INT8 ones. tests/calibration/test_qdq.py
    checks that the layers still fuse."""
    for tensor in graph.initializer:
        if tensor.name == name:
            copy = type(tensor)()
            copy.CopyFrom(tensor)
            copy.name = new_name
            graph.initializer.append(copy)
            return new_name
    return name


def remove_dead_qdq(graph) -> int:
    """Removes QuantizeLinear/DequantizeLinear nodes whose outputs nothing reads; returns how many."""
    removed = 0
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in (QUANTIZE, DEQUANTIZE) and not any(o in read for o in n.output)]
        if not dead:
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def sort_topologically(graph) -> None:
    """Reorders graph.node so that every node comes after the producers of its inputs
    (stable: nodes already in order keep it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"the graph has a cycle or a missing input at node {waiting[0].name!r}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def fused_kernels(model, threads: int = 1) -> dict[str, int]:
    """Returns the op types of ONNX Runtime's CPU graph after its optimizations (all
    levels), counted: how many QLinearConv etc. a Q/DQ model really runs as."""
    import os
    import tempfile

    from cfg_export.runtime.errors import require

    onnx = require("onnx", "quantize")
    ort = require("onnxruntime", "quantize")
    with tempfile.TemporaryDirectory(prefix="cfg-export-fused.") as work:
        path = os.path.join(work, "optimized.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = path
        options.log_severity_level = 3  # the hardware-specific optimizations warning
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for node in onnx.load(path).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
