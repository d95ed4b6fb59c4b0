"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", sec. 4): moves the outliers of a Linear layer's
input into its weights, where per-channel INT8 scales absorb them.

For a layer Y = X W with input channels k (X [..., K], W [K, M]) the output is unchanged by
Y = (X diag(s)^-1) (diag(s) W). Choosing, per input channel,

    s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)            (paper, eq. 4; alpha = 0.5)

evens out the per-channel ranges of the activation (quantized per tensor) at the cost of
the weight rows (quantized per output channel, which the spread across input channels
hurts less). max|X_k| is taken over the recorded sampler feeds of a calibration file, all
steps and both halves. Layers that read the same tensor (the query, key and value
projections of one attention block) share one s, taken with the largest of their weights.

On the ONNX graph: the Linear layers are MatMul nodes with a constant right input
(W [K, M]) and Gemm nodes with a constant B; their weights are rescaled in place, and X is
divided by s with one Mul before them, or in the LayerNormalization that produces X
(scale and bias divided by s) when it has no other reader. The float model computes the
same function up to rounding (check it with the returned model), so the ranges are
calibrated after smoothing.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cfg_export.calibration.data import CalibrationData
from cfg_export.calibration.qdq import consumers, sort_topologically
from cfg_export.calibration.ranges import probe_session
from cfg_export.runtime.errors import CfgExportError

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
MIN_SCALE = 1e-5


@dataclass
class Smoothing:
    """What smooth_model changed."""

    alpha: float
    layers: list[str] = field(default_factory=list)  # the Linear layers whose input was smoothed
    inserted: int = 0  # Mul nodes added before them
    folded: int = 0  # LayerNormalization nodes that absorbed the division
    spread_before: float = 1.0  # median over smoothed inputs of max_k max|X_k| / median_k max|X_k|
    spread_after: float = 1.0


def linear_layers(model) -> list[tuple[object, str, int]]:
    """Returns (node, weight initializer name, input-channel axis of the weight) for every
    MatMul whose right input is an initializer of rank 2 and every Gemm with a constant B."""
    initializers = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if node.input[0] in initializers or len(initializers[node.input[1]].dims) != 2:
            continue
        axis = 0
        if node.op_type == "Gemm":
            attrs = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
            if attrs.get("transA", 0):
                continue
            axis = 1 if attrs.get("transB", 0) else 0
        found.append((node, node.input[1], axis))
    return found


def activation_channel_max(model, data: CalibrationData, tensors: Sequence[str]) -> dict[str, np.ndarray]:
    """Returns tensor -> max |x| per channel of its last axis [K], over every recorded row."""
    session = probe_session(model, tensors)
    names = [o.name for o in session.get_outputs()]
    result: dict[str, np.ndarray] = {}
    for feeds in data.batches():
        outputs = dict(zip(names, session.run(None, feeds)))
        for name in tensors:
            value = np.abs(outputs[name].astype(np.float64))
            per_channel = value.reshape(-1, value.shape[-1]).max(axis=0)
            result[name] = per_channel if name not in result else np.maximum(result[name], per_channel)
    return result


def smooth_model(model, data: CalibrationData, alpha: float | None = None,
                 skip: Sequence[str] = ()) -> Smoothing:
    """Applies SmoothQuant in place to the Linear layers (see linear_layers) of the onnx
    ModelProto `model` not named in `skip`; returns what it changed."""
    from onnx import helper, numpy_helper

    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise CfgExportError(f"--smoothquant: got alpha {alpha}, expected a migration strength in [0, 1] (0.5 is "
                             f"the paper's default)")
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    users = consumers(graph)
    by_input: dict[str, list] = defaultdict(list)
    for node, weight, axis in linear_layers(model):
        if node.name in skip or len(users[weight]) != 1:
            continue  # a weight shared with another node cannot be rescaled for this one alone
        by_input[node.input[0]].append((node, weight, axis))
    result = Smoothing(alpha)
    if not by_input:
        return result
    act = activation_channel_max(model, data, list(by_input))
    producer = {o: n for n in graph.node for o in n.output}
    before, after = [], []
    for tensor, layers in by_input.items():
        weights = {w: numpy_helper.to_array(initializers[w]).astype(np.float64) for _, w, _ in layers}
        k = act[tensor].shape[0]
        if any(weights[w].shape[axis] != k for _, w, axis in layers):
            continue
        w_max = np.max([np.abs(weights[w]).max(axis=1 - axis) for _, w, axis in layers], axis=0)
        a_max = act[tensor]
        s = np.where((a_max > 0) & (w_max > 0),
                     np.power(np.maximum(a_max, 1e-12), alpha) / np.power(np.maximum(w_max, 1e-12), 1 - alpha), 1.0)
        s = np.clip(s, MIN_SCALE, None)
        before.append(a_max.max() / max(np.median(a_max), 1e-12))
        after.append((a_max / s).max() / max(np.median(a_max / s), 1e-12))
        for node, w, axis in layers:
            shape = (-1, 1) if axis == 0 else (1, -1)
            scaled = (weights[w] * s.reshape(shape)).astype(numpy_helper.to_array(initializers[w]).dtype)
            initializers[w].CopyFrom(numpy_helper.from_array(scaled, w))
            result.layers.append(node.name)
        source = producer.get(tensor)
        readers = {id(u) for u in users[tensor]}
        if (source is not None and source.op_type == "LayerNormalization" and len(source.input) >= 3
                and all(name in initializers for name in source.input[1:3])
                and readers == {id(node) for node, _, _ in layers} and len(users[source.input[1]]) == 1
                and len(users[source.input[2]]) == 1):
            for name in source.input[1:3]:
                value = numpy_helper.to_array(initializers[name]).astype(np.float64)
                initializers[name].CopyFrom(numpy_helper.from_array((value / s).astype(np.float32), name))
            result.folded += 1
            continue
        inverse = f"{tensor}_smooth_inverse"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        smoothed = f"{tensor}_smoothed"
        graph.node.append(helper.make_node("Mul", [tensor, inverse], [smoothed],
                                           name=f"{layers[0][0].name}_smooth"))
        for node, _, _ in layers:
            node.input[0] = smoothed
        result.inserted += 1
    sort_topologically(graph)
    if before:
        result.spread_before, result.spread_after = float(np.median(before)), float(np.median(after))
    log.info("SmoothQuant alpha %.2f on %d layers (%d Mul, %d folded): channel spread %.1f -> %.1f", alpha,
             len(result.layers), result.inserted, result.folded, result.spread_before, result.spread_after)
    return result
