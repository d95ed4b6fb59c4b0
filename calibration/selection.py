"""select_layers: which layers run in INT8, from what each one costs in accuracy against
what it costs in time.

Each candidate layer (every Conv/Gemm/MatMul the structural keep list does not hold:
normalizations and the timestep/label embedding stay float, the first and last
convolutions are candidates like the others) gets two measured numbers:
- its sensitivity: the largest relative error of the implied x0, over recorded steps from
  the highest noise to the lowest, with only that layer in INT8 (calibration.sensitivity);
- its cost: its kernel time in the FP32 model on ONNX Runtime CPU (profiled on a
  mid-trajectory step of the calibration file, `rows` rows), i.e. what INT8 can save there.

Then, starting from every candidate in INT8, the layer with the most sensitivity per
millisecond of float time goes back to float, one at a time, until the whole model's
implied-x0 error is within `budget` at every evaluated step. Cheap sensitive layers (the
first and last convolutions) go first, expensive harmless ones stay INT8. The final
metrics (class accuracy, Frechet distance) of the result are checked by the quality report
(cfg-export quantize --report), not inside the loop: a full sampling run per layer would
take hours.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cfg_export.calibration.quantize import DEFAULT_OP_TYPES, QuantizeOptions, quantize_model
from cfg_export.calibration.sensitivity import Evaluator, each_layer_alone, evaluation_feeds, load_source
from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.errors import CfgExportError, require

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.04  # the implied-x0 error the selection aims under (the report's bound is 5%)
SELECTION_KEEP = ("@norm", "@embedding", "@attention-matmul")  # always float; the other layers are candidates
PROFILE_RUNS = 20


@dataclass
class Candidate:
    node: str
    op_type: str
    float_ms: float  # kernel time in the FP32 model
    sensitivity: float  # max implied-x0 error with only this layer in INT8

    @property
    def ratio(self) -> float:
        """Sensitivity per ms of float time: the layers to keep float first."""
        return self.sensitivity / max(self.float_ms, 1e-6)


@dataclass
class Selection:
    budget: float
    timesteps: list[int]
    candidates: list[Candidate]  # sorted by ratio, the first to go float first
    kept: list[str] = field(default_factory=list)  # candidates left in float, in the order chosen
    history: list[tuple[str, float]] = field(default_factory=list)  # (layer sent to float, max x0 error after)
    x0: list[float] = field(default_factory=list)  # the final model's x0 error at each evaluated step
    seconds: float = 0.0

    @property
    def keep_fp32(self) -> list[str]:
        """The keep list that quantizes this selection: the structural groups and the chosen layers."""
        return [*SELECTION_KEEP, *self.kept]

    def lines(self, top: int = 12) -> list[str]:
        out = [f"layer selection: budget {100 * self.budget:g}% implied x0 at t={self.timesteps}"]
        out.append(f"  {'layer':40s} {'float ms':>9s} {'x0 alone':>9s} {'per ms':>8s}")
        for c in self.candidates[:top]:
            mark = "  -> float" if c.node in self.kept else ""
            out.append(f"  {c.node:40s} {c.float_ms:9.3f} {100 * c.sensitivity:8.2f}% {100 * c.ratio:7.2f}%{mark}")
        for node, error in self.history:
            out.append(f"  {node or 'all candidates in INT8'}: max x0 error {100 * error:.2f}%")
        out.append(f"  kept in float: {len(self.kept)} of {len(self.candidates)} candidates; final max x0 error "
                   f"{100 * max(self.x0):.2f}%")
        return out

    def to_json(self) -> str:
        return json.dumps({"budget": self.budget, "timesteps": self.timesteps, "kept": self.kept,
                           "keep_fp32": self.keep_fp32, "x0": self.x0, "history": self.history,
                           "candidates": [c.__dict__ for c in self.candidates]}, indent=2)


def _node_names_by_output(model) -> dict[str, str]:
    return {node.output[0]: node.name for node in model.graph.node if node.output}


def layer_float_times(model, feeds: dict, threads: int | None = 1, runs: int = PROFILE_RUNS) -> dict[str, float]:
    """Returns node name -> its median kernel time in ms over `runs` calls in ONNX Runtime's
    CPU profile of the onnx ModelProto `model` on `feeds` (NCHWc-rewritten convolutions are
    mapped back to their nodes through their output names)."""
    import os

    ort = require("onnxruntime", "quantize")
    outputs = _node_names_by_output(model)
    names = {n.name for n in model.graph.node}
    with tempfile.TemporaryDirectory(prefix="cfg-export-profile.") as work:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(work, "profile")
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        if node not in names and node.endswith("_nchwc"):
            node = outputs.get(node[: -len("_nchwc")], node)
        durations[node].append(event["dur"] / 1e3)
    return {node: float(np.median(values)) for node, values in durations.items()}


def select_layers(artifact: "Artifact | str | Path", calib: str | Path, options: QuantizeOptions | None = None, *,
                  budget: float | None = None, eval_steps: int | None = None, rows: int | None = None,
                  threads: int | None = 1, progress: Callable[[int, int], None] | None = None) -> Selection:
    """Returns the selection (see the module doc) for the FP32 artifact and its calibration
    file: `options` give the recipe (its keep list is replaced: SELECTION_KEEP plus the
    chosen layers); budget: the x0 error to reach at every evaluated step (default 4%);
    eval_steps: recorded steps evaluated (default 8); rows: rows of the profiled call
    (default the recorded 2N); threads: ONNX Runtime threads of the profile."""
    from dataclasses import replace

    start = time.perf_counter()
    options = options or QuantizeOptions()
    budget = DEFAULT_BUDGET if budget is None else float(budget)
    if not 0 < budget < 1:
        raise CfgExportError(f"--budget: got {budget}, expected a relative x0 error in (0, 1), e.g. 0.04")
    model, source, data = load_source(artifact, calib, options)
    from cfg_export.calibration.nodes import select_float_nodes

    base = replace(options, keep_fp32=SELECTION_KEEP)
    structural = set(select_float_nodes(model, SELECTION_KEEP))
    op_types = list(DEFAULT_OP_TYPES if options.op_types is None else options.op_types)
    by_name = {n.name: n.op_type for n in model.graph.node}
    names = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in structural]
    if options.cpu_fusion is not False and (options.activation_type or "int8") == "int8":
        from cfg_export.calibration.qdq import single_reader_layers

        unfusable = set(single_reader_layers(model, op_types, names))  # float whatever the selection
        names = [name for name in names if name not in unfusable]
    feeds = evaluation_feeds(data, eval_steps)
    evaluator = Evaluator(model, source, feeds, float(data.manifest.w))
    middle = list(data.batches([data.steps // 2]))[0]
    if rows is not None:
        middle = {k: v[:rows] for k, v in middle.items()}
    times = layer_float_times(model, middle, threads)
    total = len(names) + 1
    candidates = []
    with tempfile.TemporaryDirectory(prefix="cfg-export-select.") as work:
        cache = Path(work) / "ranges.json"
        for name, x0, _ in each_layer_alone(model, data, base, names, evaluator, cache, progress, total):
            candidates.append(Candidate(name, by_name[name], times.get(name, 0.0), max(x0)))
        candidates.sort(key=lambda c: c.ratio, reverse=True)
        selection = Selection(budget, evaluator.timesteps, candidates)
        queue = [c.node for c in candidates]
        while True:
            keep = replace(base, keep_fp32=(*SELECTION_KEEP, *selection.kept))
            x0, _ = evaluator.errors(quantize_model(model, data, keep, cache=cache).model)
            selection.history.append((selection.kept[-1] if selection.kept else "", max(x0)))
            selection.x0 = x0
            log.info("selection: %d layers in float, max x0 error %.2f%%", len(selection.kept), 100 * max(x0))
            if max(x0) <= budget or not queue:
                break
            selection.kept.append(queue.pop(0))
    if progress is not None:
        progress(total, total)
    if max(selection.x0) > budget:
        log.warning("no selection reaches the x0 budget %.2f%%: %.2f%% with every candidate in float", 100 * budget,
                    100 * max(selection.x0))
    selection.seconds = time.perf_counter() - start
    return selection
