"""An FP16-typed copy of an FP32 ONNX model, for strongly typed TensorRT builds.

TensorRT 11 builds only strongly typed networks: the precision of every layer is the
type of its tensors in the ONNX. This module writes that model: float32 weights and
activations become float16, except in the nodes kept in FP32, with Cast nodes at every
boundary between the two. The graph's inputs and outputs stay float32, so the runtime
and the manifest see the same I/O as the FP32 model.

Which nodes stay in FP32 is a list of entries, each one of:
  @norm          normalization ops (GroupNormalization, LayerNormalization,
                 InstanceNormalization, ...) and the ops around them where the exporter
                 decomposes GroupNorm (Reshape -> InstanceNormalization -> Reshape -> Mul -> Add)
                 or LayerNorm (ReduceMean, Pow, Sqrt and the Sub/Div between them)
  @embedding     every node that does not depend on the sample: the time embedding
                 (the sinusoid and its MLP), the class embedding, the w of a fused graph
  @first-conv    the first convolution the sample goes through
  @last-conv     the last convolution of the graph
  an op type     e.g. Softmax: every node of that type
  a name glob    e.g. '/model/mid/*': every node whose name matches (fnmatch)
'default' stands for DEFAULT_KEEP_FP32 and 'none' for nothing. Nodes whose operator has no
float16 kernel in the ONNX standard at the model's opset (Range, QuantizeLinear at opset
< 19, ...) stay in FP32 whatever the list says.

Uses onnx and numpy only; never imports torch.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.calibration.nodes import expand_keep, select_nodes
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.files import staged_file

log = logging.getLogger(__name__)

DEFAULT_KEEP_FP32 = ("@norm", "Softmax", "@embedding", "@first-conv", "@last-conv")  # same set as INT8's
FP16_METADATA_KEY = "cfg_export.build.fp16"
FP16_MAX = float(np.finfo(np.float16).max)  # 65504


@dataclass
class Fp16Result:
    model: object  # onnx.ModelProto, FP16-typed
    kept: list[str] = field(default_factory=list)  # nodes with float tensors kept in FP32, graph order
    forced: list[str] = field(default_factory=list)  # of those, kept because their op has no FP16 form
    casts: int = 0  # Cast nodes inserted at precision boundaries
    clipped: list[str] = field(default_factory=list)  # weights clipped to the FP16 range (+-65504)


def select_fp32_nodes(model, keep: Sequence[str] | None = None, sample: str | None = None) -> set[int]:
    """Returns the indices of the nodes the keep list keeps in FP32 (None means
    DEFAULT_KEEP_FP32): the same selection as INT8's, see calibration.nodes."""
    return select_nodes(model, keep, sample)  # None: DEFAULT_KEEP_FLOAT, the same set


def kept_float_nodes(model, keep: Sequence[str] | None = None) -> list:
    """Returns the named nodes that the keep list keeps in FP32 and that compute float
    tensors, in graph order: the layers the builder-flag route (TensorRT 10) constrains to
    FP32 by name and by output tensor."""
    onnx = require("onnx", "export")
    kept = select_fp32_nodes(model, keep)
    types = _infer_types(model, onnx)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return [node for i, node in enumerate(model.graph.node) if i in kept and node.name
            and node.op_type != "Constant" and any(types.get(o) in floats for o in node.output)]


def _float_vars(schema) -> tuple[dict[str, bool], list, list]:
    """For an op schema: {type var: allows float16}, and the formal inputs and outputs."""
    allows = {c.type_param_str: "tensor(float16)" in c.allowed_type_strs for c in schema.type_constraints}
    return allows, list(schema.inputs), list(schema.outputs)


def _formal(params, index: int):
    """The formal parameter an actual input/output index binds to (the last one is variadic)."""
    if index < len(params):
        return params[index]
    last = params[-1] if params else None
    return last if last is not None and last.option.name == "Variadic" else None


def _fp16_slots(node, schema, types: dict[str, int], float32: int) -> tuple[bool, set[int], set[int]]:
    """Returns (possible, inputs, outputs): whether `node` can run in FP16 under the ONNX
    standard, and the indices of its float32 inputs and outputs that become float16."""
    if node.op_type in ("Cast", "ConstantOfShape"):  # the output type is an attribute, not a type variable
        ins = {0} if node.op_type == "Cast" and types.get(node.input[0]) == float32 else set()
        return True, ins, {0} if types.get(node.output[0]) == float32 else set()
    allows, inputs, outputs = _float_vars(schema)
    ins, outs, used_vars = set(), set(), set()
    for slots, params, names in ((ins, inputs, node.input), (outs, outputs, node.output)):
        for k, name in enumerate(names):
            param = _formal(params, k)
            if not name or param is None or types.get(name) != float32:
                continue
            if param.type_str in allows:  # a type variable: follows the node's precision
                used_vars.add(param.type_str)
                slots.add(k)
    possible = all(allows[v] for v in used_vars)
    return possible, ins, outs


def _infer_types(model, onnx) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    _propagate_types(model, onnx, types)
    return types


def _propagate_types(model, onnx, types: dict[str, int]) -> None:
    """Fills in output types that ONNX inference leaves out (function ops such as
    GroupNormalization-21): an output bound to the same type variable as a typed input
    has that input's type."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    for node in model.graph.node:
        missing = [k for k, name in enumerate(node.output) if name and name not in types]
        if not missing:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            continue
        bound = {}
        for k, name in enumerate(node.input):
            param = _formal(list(schema.inputs), k)
            if name and param is not None and name in types:
                bound.setdefault(param.type_str, types[name])
        for k in missing:
            param = _formal(list(schema.outputs), k)
            if param is not None and param.type_str in bound:
                types[node.output[k]] = bound[param.type_str]
            else:
                log.debug("FP16: no type for %s (output of %s); it stays as it is", node.output[k], node.name)


def _constants_to_initializers(model, onnx) -> None:
    """Turns Constant nodes holding a tensor into initializers, so weights and constants
    are converted alike (at conversion time, not by Cast nodes at run time)."""
    graph = model.graph
    keep = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attrs["value"].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def convert_fp16(model, keep_fp32: Sequence[str] | None = None) -> Fp16Result:
    """Returns an FP16-typed copy of an FP32 ONNX model (the input is not changed): float32
    tensors become float16 except in the nodes `keep_fp32` keeps (None means
    DEFAULT_KEEP_FP32), with Casts at the boundaries; graph inputs and outputs stay float32."""
    onnx = require("onnx", "export")
    from onnx import TensorProto, helper, numpy_helper

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        raise CfgExportError("FP16 conversion: the graph has control flow (If/Loop/Scan); export the model "
                             "without data-dependent branches, or build FP32")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    kept = select_fp32_nodes(work, keep_fp32)
    kept_names = {graph.node[i].name for i in kept}
    _constants_to_initializers(work, onnx)
    types = _infer_types(work, onnx)
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    opset = max((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), default=17)
    result = Fp16Result(work)

    # 1. each node's precision, and the float32 tensors it reads and writes in FP16
    plans = []
    for node in graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            schema = None
        possible, ins, outs = (False, set(), set()) if schema is None else _fp16_slots(node, schema, types, F32)
        fp16 = possible and node.name not in kept_names
        if not possible and node.name not in kept_names and (ins or outs or schema is None):
            result.forced.append(node.name)
        plans.append((node, fp16, ins if fp16 else set(), outs if fp16 else set()))
        if not fp16 and (ins or outs or schema is None):
            result.kept.append(node.name)
    stored = {name: F32 for name, t in types.items() if t == F32}  # dtype each float tensor will have
    for node, fp16, _, outs in plans:
        for k in outs:
            stored[node.output[k]] = F16

    # 2. rewrite: converted weights, Casts at boundaries, Cast/ConstantOfShape retyped
    initializers = {t.name: t for t in graph.initializer}
    converted: dict[tuple[str, int], str] = {}
    new_nodes = []

    def as_dtype(name: str, dtype: int) -> str:
        key = (name, dtype)
        if key in converted:
            return converted[key]
        suffix = "fp16" if dtype == F16 else "fp32"
        new = f"{name}__{suffix}"
        if name in initializers:
            values = numpy_helper.to_array(initializers[name])
            if dtype == F16:
                too_big = np.isfinite(values) & (np.abs(values) > FP16_MAX)
                if too_big.any():
                    result.clipped.append(name)
                    values = np.where(too_big, np.sign(values) * FP16_MAX, values)
            graph.initializer.append(numpy_helper.from_array(values.astype(np.float16 if dtype == F16 else np.float32),
                                                             new))
        else:
            new_nodes.append(helper.make_node("Cast", [name], [new], to=dtype, name=f"{new}__cast"))
            result.casts += 1
        converted[key] = new
        return new

    for node, fp16, ins, outs in plans:
        for k, name in enumerate(node.input):
            if not name or stored.get(name) not in (F32, F16):
                continue
            want = F16 if k in ins else F32  # kept nodes, and fixed float inputs (Resize scales), read float32
            if stored[name] != want:
                node.input[k] = as_dtype(name, want)
        if outs and node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = F16
        if outs and node.op_type == "ConstantOfShape":
            attrs = {a.name: a for a in node.attribute}
            value = numpy_helper.to_array(attrs["value"].t) if "value" in attrs else np.zeros(1, np.float32)
            if value.dtype == np.float32:
                for attr in list(node.attribute):
                    if attr.name == "value":
                        node.attribute.remove(attr)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value.astype(np.float16))))
        new_nodes.append(node)

    # 3. graph outputs stay float32
    for output in graph.output:
        if stored.get(output.name) == F16:
            inner = f"{output.name}__fp16"
            for node in new_nodes:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [output.name], to=F32, name=f"{output.name}__cast"))
            result.casts += 1
    del graph.node[:]
    graph.node.extend(new_nodes)  # still topological: each Cast sits right before its first reader
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    del graph.value_info[:]
    entry = next((p for p in work.metadata_props if p.key == FP16_METADATA_KEY), None) or work.metadata_props.add()
    entry.key = FP16_METADATA_KEY
    entry.value = json.dumps({"keep_fp32": list(expand_keep(keep_fp32)[0]), "kept": result.kept})
    try:
        onnx.checker.check_model(work, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CfgExportError(f"FP16 conversion made an invalid model ({str(exc).splitlines()[0]}); keep the node "
                             f"it names in FP32 with --keep-fp32 NAME_OR_OP_TYPE") from None
    if result.clipped:
        log.warning("FP16: %d weight tensors clipped to +-65504: %s", len(result.clipped), ", ".join(result.clipped))
    log.info("FP16: %d of %d nodes kept in FP32, %d casts inserted", len(result.kept), len(plans), result.casts)
    return result


def write_fp16_model(source: str | Path, target: str | Path, keep_fp32: Sequence[str] | None = None) -> Fp16Result:
    """Returns the conversion of the ONNX file `source`, written whole (or not at all) to `target`."""
    onnx = require("onnx", "export")
    result = convert_fp16(onnx.load(str(source)), keep_fp32)
    with staged_file(target) as tmp:
        onnx.save(result.model, str(tmp))
    return result
