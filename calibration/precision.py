"""Per-step precision schedules: INT8 for most sampler steps, float for the steps where the
INT8 model moves the implied x0 too far.

The schedule is a list of inclusive training-timestep intervals run by the float model
(runtime.backends.scheduled); an INT8 artifact with a schedule carries its FP32 source in
a subfolder (`float/`, a whole artifact: model, manifest, null embedding) and says so in
its manifest's `precision_schedule`. Intervals are in training timesteps, so the schedule
holds for any number of sampler steps: each run of consecutive steps over the bound
becomes one interval reaching halfway to the neighbouring steps that are within it.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.manifest import MANIFEST_NAME, METADATA_KEY, Manifest

log = logging.getLogger(__name__)

FLOAT_FOLDER = "float"


def parse_schedule(text: str) -> list[list[int]]:
    """Returns the intervals of 'LO-HI[,LO-HI...]' (training timesteps, inclusive)."""
    intervals = []
    for part in (p.strip() for p in text.split(",")):
        try:
            lo, hi = (int(v) for v in part.split("-"))
        except ValueError:
            raise CfgExportError(f"--schedule: got {part!r}, expected auto, none, or timestep intervals LO-HI[,LO-HI], "
                                 f"e.g. 0-160") from None
        if lo > hi or lo < 0:
            raise CfgExportError(f"--schedule: interval {part!r} has LO > HI or LO < 0; expected e.g. 0-160")
        intervals.append([lo, hi])
    return intervals


def schedule_from_errors(timesteps: Sequence[int], errors: Sequence[float], bound: float) -> list[list[int]]:
    """Returns the float intervals for steps at `timesteps` (decreasing, one per step) whose
    error is above `bound`: one interval per run of consecutive such steps, reaching
    halfway to the neighbouring steps (to 0 below the last step, to the step itself above
    the first)."""
    ts = [int(t) for t in timesteps]
    over = [e > bound for e in errors]
    intervals = []
    i = 0
    while i < len(ts):
        if not over[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(ts) and over[j + 1]:
            j += 1
        hi = ts[i] if i == 0 else (ts[i] + ts[i - 1]) // 2
        lo = 0 if j == len(ts) - 1 else (ts[j] + ts[j + 1]) // 2 + 1
        intervals.append([lo, hi])
        i = j + 1
    return intervals


def add_schedule(directory: Path, manifest: Manifest, source_dir: Path, source: Manifest,
                 intervals: list[list[int]]) -> Manifest:
    """Copies the FP32 artifact `source_dir` into directory/float, records the schedule in
    the model file's metadata and returns the new manifest (its sha256 updated; written
    by the caller)."""
    onnx = require("onnx", "quantize")
    target = directory / FLOAT_FOLDER
    target.mkdir()
    shutil.copyfile(source_dir / source.model_file, target / source.model_file)
    shutil.copyfile(source_dir / MANIFEST_NAME, target / MANIFEST_NAME)
    if source.facts.condition.null_file:
        shutil.copyfile(source_dir / source.facts.condition.null_file, target / source.facts.condition.null_file)
    manifest = replace(manifest, precision_schedule={"folder": FLOAT_FOLDER, "float_timesteps": intervals,
                                                     "float_precision": source.precision})
    path = directory / manifest.model_file
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest.to_dict(with_sha=False), sort_keys=True)
    onnx.save(model, str(path))
    log.info("precision schedule: float at t in %s (%s)", intervals, target)
    return manifest.with_sha(directory)
