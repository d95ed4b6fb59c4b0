"""How much activation memory one row of a graph needs: computed at export from the ONNX
graph (shape inference, then the peak of the tensors alive at once in graph order) and
recorded in the manifest, so the runtime can refuse a batch that cannot fit the machine
before it starts (runtime.memory)."""
from __future__ import annotations

import logging
from pathlib import Path

from cfg_export.runtime.errors import require

log = logging.getLogger(__name__)

ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}  # TensorProto types


def activation_bytes_per_row(path: Path) -> int | None:
    """Returns the peak bytes of the intermediate tensors alive at once, per row of the
    batch axis (tensors whose first size is the symbolic row count), or None when shape
    inference cannot follow the graph."""
    onnx = require("onnx", "export")
    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    except Exception as exc:  # onnx raises InferenceError and others for graphs it cannot follow
        log.info("shape inference failed (%s): no activation estimate", exc)
        return None
    graph = model.graph
    rows = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim[:1] if d.dim_param}
    sizes = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param not in rows or not rows:
            continue
        rest = 1
        for d in dims[1:]:
            if not d.HasField("dim_value"):
                rest = None
                break
            rest *= d.dim_value
        if rest is not None:
            sizes[value.name] = rest * ITEMSIZE.get(value.type.tensor_type.elem_type, 4)
    if not sizes:
        return None
    last_use = {}
    for k, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = k
    outputs = {o.name for o in graph.output}
    live, peak = {}, 0
    for k, node in enumerate(graph.node):
        for name in node.output:
            if name in sizes:
                live[name] = sizes[name]
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, -1) <= k and n not in outputs]:
            del live[name]
    inputs = sum(sizes.get(v.name, 0) for v in graph.input)
    return int(peak + inputs)
