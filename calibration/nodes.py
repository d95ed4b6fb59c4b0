"""Which nodes of a graph stay in float when the rest is quantized to INT8, found by
graph structure and op type (never by the names a particular exporter happens to give).

Post-training quantization of diffusion networks loses most where the signal is
smallest or most spread: the first convolution (it reads the raw noisy sample), the
last one (it writes eps, which the sampler divides by small numbers and the w mix
amplifies), the time and class embeddings (a sinusoid of the timestep and its MLP,
the label lookup: tiny cost, large effect on every block), and normalizations
(Q-Diffusion, Li et al. 2023; PTQ4DM, Shang et al. 2023; TensorRT's and ModelOpt's
diffusion recipes keep the same set in higher precision). Entries of a keep list:

  @norm          normalization ops and the ops around them where the exporter
                 decomposes GroupNorm (Reshape -> InstanceNormalization -> Reshape ->
                 Mul -> Add, at opset 17) or LayerNorm (ReduceMean, Pow, Sqrt, ...)
  @embedding     every node that does not depend on the sample: the time embedding
                 (Cast, Sin, Cos, its Gemm/MatMul MLP), the class embedding Gather, a fused w
  @first-conv    the first convolution the sample goes through, in topological order
  @last-conv     the last convolution of the graph
  @attention-matmul
                 every MatMul of two activations (the attention scores Q K^T and their
                 product with V): no constant weight to quantize per channel, and the
                 Softmax between them stays float only when they do (INT8's default)
  @full-res      every convolution that reads activations at the sample's own resolution
                 (not in the default: on the reference model these are the layers that
                 lose the most at low noise, and most of the speed; see README)
  an op type     e.g. Softmax: every node of that type
  a name glob    e.g. '/model/mid/*' (fnmatch on node names)

'default' stands for DEFAULT_KEEP_FLOAT, 'none' for nothing. Works on the ONNX graph
protobuf only; never imports torch.
"""
from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict
from typing import Sequence

from cfg_export.runtime.errors import CfgExportError

log = logging.getLogger(__name__)

DEFAULT_KEEP_FLOAT = ("@norm", "@embedding", "@first-conv", "@last-conv", "Softmax")
GROUPS = ("@norm", "@embedding", "@first-conv", "@last-conv", "@full-res", "@attention-matmul")
NORM_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
            "LpNormalization", "MeanVarianceNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
NORM_STATS_OPS = ("ReduceMean", "Pow", "Sqrt", "Reciprocal", "ReduceSumSquare", "ReduceL2")
CONV_OPS = ("Conv", "ConvTranspose")


def expand_keep(keep: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Returns (entries, strict): the keep list with 'default' and 'none' expanded (None
    means DEFAULT_KEEP_FLOAT), and the op types and globs the user named, which must match a node."""
    if keep is None:
        return list(DEFAULT_KEEP_FLOAT), []
    entries, strict = [], []
    for entry in keep:
        entry = entry.strip()
        if not entry:
            raise CfgExportError("--keep-fp32: got an empty pattern; give @norm, @first-conv, ..., an op type, a "
                                 "node-name glob, 'default' or 'none'")
        if entry == "default":
            entries += [e for e in DEFAULT_KEEP_FLOAT if e not in entries]
        elif entry != "none":
            if entry.startswith("@") and entry not in GROUPS:
                raise CfgExportError(f"--keep-fp32 {entry!r}: no such group; groups: {', '.join(GROUPS)}")
            entries.append(entry)
            if not entry.startswith("@"):  # a group the model lacks is no typo; an op type or glob may be
                strict.append(entry)
    return entries, strict


def _producers(graph) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _consumers(graph) -> dict[str, list[int]]:
    users = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                users[name].append(i)
    return users


def sample_dependent(graph, sample: str) -> set[int]:
    """Returns the indices of the nodes that (transitively) read the graph input `sample`."""
    reached, dependent = {sample}, set()
    for i, node in enumerate(graph.node):  # ONNX nodes are stored in topological order
        if any(name in reached for name in node.input):
            dependent.add(i)
            reached.update(node.output)
    return dependent


def norm_nodes(graph) -> set[int]:
    """Returns the indices of normalization nodes and of the nodes of their usual decompositions."""
    nodes = graph.node
    constants = {t.name for t in graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    producers, consumers = _producers(graph), _consumers(graph)
    keep = set()
    for i, node in enumerate(nodes):
        if node.op_type in NORM_OPS:
            keep.add(i)
            if node.op_type == "InstanceNormalization":  # GroupNorm: Reshape -> IN -> Reshape -> Mul -> Add
                before = producers.get(node.input[0])
                if before is not None and nodes[before].op_type == "Reshape":
                    keep.add(before)
                current = i
                for op in ("Reshape", "Mul", "Add"):
                    users = consumers.get(nodes[current].output[0], [])
                    if len(users) != 1 or nodes[users[0]].op_type != op:
                        break
                    following = nodes[users[0]]
                    if op != "Reshape" and not any(n in constants for n in following.input):
                        break  # the affine Mul/Add takes a weight
                    current = users[0]
                    keep.add(current)
        elif node.op_type in NORM_STATS_OPS:  # decomposed LayerNorm / RMSNorm statistics
            keep.add(i)
            for user in consumers.get(node.output[0], []):
                if nodes[user].op_type in ("Sub", "Div", "Add", "Mul"):
                    keep.add(user)
    return keep


def full_resolution_convs(model, sample: str) -> set[int]:
    """Returns the indices of the convolutions whose input has the spatial size of the graph
    input `sample` (from ONNX shape inference with data propagation; unknown sizes never match)."""
    from cfg_export.runtime.errors import require

    onnx = require("onnx", "quantize")
    try:
        graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception as exc:  # onnx raises InferenceError and others for graphs it cannot follow
        log.info("shape inference failed (%s): @full-res matches nothing", exc)
        return set()

    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    shapes = {v.name: dims(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    spatial = shapes.get(sample, [])[2:]
    if not spatial or None in spatial:
        return set()
    return {i for i, n in enumerate(model.graph.node)
            if n.op_type in CONV_OPS and shapes.get(n.input[0], [])[2:] == spatial}


def select_nodes(model, keep: Sequence[str] | None = None, sample: str | None = None) -> set[int]:
    """Returns the indices of the graph's nodes that the keep list keeps in float (None
    means DEFAULT_KEEP_FLOAT); raises CfgExportError naming an entry the user gave that
    matches no node. sample: the input the sample enters by (default 'sample', else the
    first input). Used for INT8 here and for FP16 by cfg_export.fp16."""
    graph = model.graph
    entries, strict = expand_keep(keep)
    input_names = [v.name for v in graph.input]
    sample = sample or ("sample" if "sample" in input_names else input_names[0])
    dependent = sample_dependent(graph, sample)
    convs = [i for i in sorted(dependent) if graph.node[i].op_type in CONV_OPS]
    kept: set[int] = set()
    for entry in entries:
        if entry == "@norm":
            matched = norm_nodes(graph)
        elif entry == "@embedding":
            matched = {i for i, n in enumerate(graph.node) if i not in dependent and n.op_type != "Constant"}
        elif entry == "@first-conv":
            matched = set(convs[:1])
        elif entry == "@last-conv":
            matched = set(convs[-1:])
        elif entry == "@full-res":
            matched = full_resolution_convs(model, sample)
        elif entry == "@attention-matmul":
            constants = {t.name for t in graph.initializer} | {
                o for n in graph.node if n.op_type == "Constant" for o in n.output}
            matched = {i for i, n in enumerate(graph.node)
                       if n.op_type == "MatMul" and not any(name in constants for name in n.input)}
        else:
            matched = {i for i, n in enumerate(graph.node)
                       if n.op_type == entry or fnmatch.fnmatchcase(n.name, entry)}
        if not matched and entry in strict:
            example = next((n.name for n in graph.node if n.name), "")
            raise CfgExportError(f"--keep-fp32 {entry!r}: matches no node (got neither an op type of the graph nor a "
                                 f"node name); node names look like {example!r}, groups: {', '.join(GROUPS)}")
        kept |= matched
    return kept


def select_float_nodes(model, keep: Sequence[str] | None = None, sample: str | None = None) -> list[str]:
    """Returns the names of the nodes the keep list leaves in float, in graph order (see
    select_nodes). Unnamed nodes are named OpType_index first (the quantizer needs names)."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return [model.graph.node[i].name for i in sorted(select_nodes(model, keep, sample))]
