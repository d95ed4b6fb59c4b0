"""A per-step precision schedule: the sampler steps at some timesteps run another model file.

An artifact whose manifest has a `precision_schedule` block (cfg-export quantize --schedule)
holds, in a subfolder, a second artifact of the same model (the FP32 one an INT8 model was
quantized from) and says at which training timesteps that one runs:

    "precision_schedule": {"folder": "float", "float_timesteps": [[0, 160]]}

(inclusive intervals). ScheduledBackend holds an open backend of each (two ONNX Runtime
sessions, or two TensorRT engines) and picks one per call from the timestep of the feeds:
every row of one call has the same timestep, so one sampler step runs one model.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..errors import CfgExportError
from .base import Backend

log = logging.getLogger(__name__)


def check_intervals(intervals) -> list[tuple[float, float]]:
    """Returns the timestep intervals as (lo, hi) pairs; refuses anything else."""
    try:
        pairs = [(float(lo), float(hi)) for lo, hi in intervals]
    except (TypeError, ValueError):
        raise CfgExportError(f"precision schedule: got float_timesteps {intervals!r}, expected a list of "
                             f"[lo, hi] timestep intervals, e.g. [[0, 160]]") from None
    bad = [p for p in pairs if not (np.isfinite(p[0]) and np.isfinite(p[1]) and p[0] <= p[1])]
    if bad:
        raise CfgExportError(f"precision schedule: interval {list(bad[0])} has lo > hi or is not finite; "
                             f"expected [lo, hi] with lo <= hi")
    return pairs


class ScheduledBackend(Backend):
    """Runs `primary` at every step except those whose timestep lies in one of `intervals`,
    which `secondary` runs. Both must take the same feeds (same inputs and outputs)."""

    def __init__(self, primary: Backend, secondary: Backend, intervals: Sequence[Sequence[float]]):
        super().__init__(primary.manifest)
        names = lambda m: ([(s.name, s.dtype) for s in m.inputs], [(s.name, s.dtype) for s in m.outputs])
        if names(primary.manifest) != names(secondary.manifest):
            raise CfgExportError("precision schedule: the scheduled model's inputs/outputs differ from the "
                                 "artifact's; quantize it again from its own FP32 source")
        self.primary, self.secondary = primary, secondary
        self.intervals = check_intervals(intervals)
        self.name = primary.name
        self.calls = {"primary": 0, "secondary": 0}

    def runs_secondary(self, timestep: float) -> bool:
        """True when the step at training timestep `timestep` runs the secondary model."""
        return any(lo <= timestep <= hi for lo, hi in self.intervals)

    def activate(self) -> None:
        self.primary.__enter__()
        try:
            self.secondary.__enter__()
        except BaseException:
            self.primary.__exit__(None, None, None)
            raise

    def deactivate(self) -> None:
        try:
            self.secondary.__exit__(None, None, None)
        finally:
            self.primary.__exit__(None, None, None)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = float(np.asarray(feeds["timestep"]).reshape(-1)[0])
        which = "secondary" if self.runs_secondary(t) else "primary"
        self.calls[which] += 1
        return getattr(self, which).infer(feeds)
