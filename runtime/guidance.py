"""Classifier-free guidance on the host: the w mix, done once, here.

Ho & Salimans 2021, eq. 6:  eps~(z, c) = (1 + w) eps(z, c) - w eps(z)
w = 0 is plain conditional sampling, w = -1 unconditional, w < -1 pushes away from c.
diffusers' guidance_scale s is 1 + w: eps_u + s (eps_c - eps_u) is the same mix.

Two layers:
- GuidedModel: model(x, t, cond) -> the guided raw model output [N, *S] (eps, v, x0 or a
  flow velocity: the mix is linear, so it is the same mix whatever the model predicts).
  One backend call per step on [cond rows; null rows]; a RowPlanner decides, per step and
  image, whether the image runs its null rows (the guidance interval, and the strategies
  that skip null rows where they do not help).
The samplers (runtime.samplers) call a GuidedModel through their Denoiser, which reads
the output by the model's prediction type; guidance_rescale (phi) rescales the guided
output here, on the raw outputs, as diffusers' pipelines do.
"""
from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .backends.base import Backend
from .errors import CfgExportError
from .manifest import ConditionKind, Layout, Manifest
from .schedule import parse_enum

log = logging.getLogger(__name__)

HUGE_INPUT = 1e4  # a model input this far outside the data range means the sample has diverged


class WSchedule(enum.Enum):
    """How w varies over the trajectory, t the training timestep, T their number."""

    CONSTANT = "constant"  # w at every step
    LINEAR = "linear"  # 2 w (1 - t/T): weak at high noise, strong at low; same mean
    # (the "linear" scheduler of Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight Schedulers")


def mix(eps_c: np.ndarray, eps_u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Returns (1 + w) * eps_c - w * eps_u, [N, *S]; w is [N] (one weight per image)."""
    w = np.asarray(w, dtype=np.float64).reshape((-1,) + (1,) * (eps_c.ndim - 1))
    return (1 + w) * eps_c - w * eps_u


def check_w(w, n: int) -> np.ndarray:
    """Returns w as float64 [n] (from one number or one per image); refuses NaN and infinity."""
    try:
        arr = np.asarray(w, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CfgExportError(f"w: got {w!r}, expected a number or one number per image") from None
    if arr.size == 1:
        arr = np.full(n, arr[0])
    if arr.size != n:
        raise CfgExportError(f"w: got {arr.size} values, expected 1 or one per image ({n})")
    if not np.all(np.isfinite(arr)):
        bad = arr[~np.isfinite(arr)][0]
        raise CfgExportError(f"w: got {bad}, expected a finite number (NaN and infinity are refused)")
    return arr


def rescale(guided: np.ndarray, out_c: np.ndarray, phi: float) -> np.ndarray:
    """Returns the guided output [N, *S] rescaled towards the standard deviation of the
    conditional output (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", sec. 3.4, eq. 15-16; diffusers' rescale_noise_cfg): per image,
    phi guided std(out_c) / std(guided) + (1 - phi) guided, std over all but the first axis."""
    axes = tuple(range(1, guided.ndim))
    ratio = out_c.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True)
    return phi * guided * ratio + (1 - phi) * guided


@dataclass
class GuidanceOptions:
    """How the guided eps is formed at each step; None means off."""

    w: float | np.ndarray = 0.0  # one number or [N]
    w_schedule: WSchedule | str = WSchedule.CONSTANT
    interval: tuple[float, float] | None = None  # guide only where sigma_t is in [lo, hi]
    negative: np.ndarray | None = None  # [N] labels or [N, L, D] embeddings for the null rows instead of the null
    threshold: float | None = None  # dynamic thresholding percentile, e.g. 0.995 (the scheduler's thresholding)
    rescale: float | None = None  # guidance_rescale phi in [0, 1] (Lin et al. 2024), e.g. 0.7

    def check(self) -> None:
        """Raises CfgExportError for option values no sampling can use."""
        if self.interval is not None:
            try:
                lo, hi = (float(v) for v in self.interval)
            except (TypeError, ValueError):
                raise CfgExportError(f"guidance interval: got {self.interval!r}, expected two noise levels "
                                     f"(lo, hi)") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
                raise CfgExportError(f"guidance interval: got ({lo}, {hi}), expected 0 <= lo <= hi (noise levels "
                                     f"sigma)")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and
                                               0 < float(self.threshold) <= 1):
            raise CfgExportError(f"threshold: got {self.threshold!r}, expected a percentile in (0, 1], e.g. 0.995")
        if self.rescale is not None and not (isinstance(self.rescale, (int, float)) and
                                             0 <= float(self.rescale) <= 1):
            raise CfgExportError(f"guidance rescale: got {self.rescale!r}, expected phi in [0, 1], e.g. 0.7")


class RowPlanner:
    """Decides, step by step, which images run their null rows, and the w each image is
    guided with. This one applies the w schedule and the guidance interval; strategies
    that skip null rows where they do not help extend it (plan, then observe)."""

    def __init__(self, options: GuidanceOptions, n: int, num_train_timesteps: int):
        options.check()
        self.options = options
        self.w = check_w(options.w, n)
        self.w_schedule = parse_enum(WSchedule, options.w_schedule, "w schedule")
        self.T = num_train_timesteps

    def w_at(self, t: float) -> np.ndarray:
        """Returns the guidance weights [N] at (training) timestep t."""
        if self.w_schedule is WSchedule.LINEAR:
            return self.w * 2 * (1 - t / self.T)
        return self.w

    def guided_at(self, sigma: float) -> bool:
        """False where the noise level sigma is outside the guidance interval."""
        if self.options.interval is None:
            return True
        lo, hi = self.options.interval
        return lo <= sigma <= hi

    def plan(self, t: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """Returns (guided [N] bool: the images that run their null rows this step, w [N])."""
        guided = self.guided_at(sigma)
        return np.full(len(self.w), guided), self.w_at(t)

    def observe(self, guided: np.ndarray, out_c: np.ndarray, out_u: np.ndarray) -> np.ndarray | None:
        """Sees the step's conditional outputs [N, *S] and the null outputs of the guided
        images [G, *S]; returns the guided output of every image, or None for the plain
        mix (guided images mixed with w, the others conditional only)."""
        return None


class GuidedModel:
    """model(x, t, cond) -> the guided raw model output [N, *S] float64, one backend call.

    Stacked layout: rows [x; x[guided]] with conditions [cond; null[guided]] in one call,
    then the mix; images the planner leaves unguided this step run only their
    conditional row (when the graph has a dynamic batch; a static graph always runs 2N
    rows and mixes them with w = 0). Fused layout: the graph does the stacking and the mix.
    `nulls` holds the null rows [N, ...] of each condition input (or None where the fused
    graph holds them); `record`, if given, receives every feed dict the backend sees.
    """

    def __init__(self, backend: Backend, n: int, options: GuidanceOptions, nulls: dict[str, np.ndarray] | None,
                 record: Callable[[dict], None] | None = None, planner: RowPlanner | None = None):
        self.backend = backend
        self.manifest: Manifest = backend.manifest
        self.n = n
        self.planner = planner or RowPlanner(options, n, self.manifest.facts.schedule.num_train_timesteps)
        self.nulls = nulls
        self.record = record
        self.model_seconds = 0.0  # total time inside backend calls
        self.calls = 0
        self.rows = 0  # model rows evaluated: 2N per fully guided step, N per conditional-only one
        if self.manifest.layout is Layout.STACKED and nulls is None:
            raise CfgExportError("the stacked layout needs the null condition of every condition input")
        self.rescale = None if options.rescale is None else float(options.rescale)
        if self.rescale and self.manifest.layout is Layout.FUSED:
            raise CfgExportError("guidance rescale needs the conditional output, which the fused graph does not "
                                 "return; re-export without --fuse-guidance")

    def _run(self, feeds: dict) -> np.ndarray:
        if self.record is not None:
            self.record(feeds)
        (out,) = self.backend.infer(feeds).values()
        self.model_seconds += self.backend.last_seconds
        self.calls += 1
        self.rows += len(feeds["sample"]) * (2 if self.manifest.layout is Layout.FUSED else 1)
        return out.astype(np.float64)

    def _check_finite(self, out: np.ndarray, t, n: int, guided: np.ndarray, x: np.ndarray) -> None:
        """Raises CfgExportError naming the timestep and the rows (conditional or null, which
        images) when the model's output holds NaN or infinity, and whether the input had
        already left the data range (a too large guidance weight) or the model failed."""
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        if not bad.any():
            return
        largest = float(np.abs(x).max()) if x.size else 0.0
        if not np.isfinite(largest) or largest > HUGE_INPUT:
            raise CfgExportError(f"the model's output holds NaN or infinity at model call {self.calls} (timestep "
                                 f"{t:g}) after the sample had grown to |x| = {largest:.3g}: the guidance weight is "
                                 f"too large for this model; try a smaller w, or --threshold 0.995")
        cond_rows = np.flatnonzero(bad[:n]).tolist()
        null_rows = guided[np.flatnonzero(bad[n:])].tolist()
        where = "; ".join(part for part in (
            f"conditional rows of images {cond_rows[:8]}" if cond_rows else "",
            f"null rows of images {null_rows[:8]}" if null_rows else "") if part)
        raise CfgExportError(f"the model's output holds NaN or infinity at model call {self.calls} (timestep "
                             f"{t:g}) in the {where}, on a finite input: the model itself fails there (its "
                             f"weights, or an FP16/INT8 build overflowing); the guidance weight is not the cause")

    def _timestep(self, t, rows: int) -> np.ndarray:
        dtype = self.manifest.facts.timestep_dtype
        if dtype == "int64" and t != round(t):
            raise CfgExportError(f"timestep {t}: this graph takes int64 timesteps; re-export the model with float "
                                 "timesteps to sample fractional ones")
        return np.full(rows, t, dtype=dtype)

    def __call__(self, x: np.ndarray, t, cond, sigma: float) -> np.ndarray:
        """x: the model input [N, *S]; t: the timestep fed to the model; cond: the condition
        rows, an array for the 'cond' input or a dict by input name; sigma: the noise level
        of the step (for the guidance interval and the strategies)."""
        n = len(x)
        conds = cond if isinstance(cond, dict) else {"cond": cond}
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        guided, w = self.planner.plan(t, sigma)
        w = np.where(guided, w, 0.0)
        if self.manifest.layout is Layout.FUSED:
            out = self._run({"sample": x32, "timestep": self._timestep(t, n), **conds, "w": w.astype(np.float32)})
            self._check_finite(out, t, n, np.arange(n), x32)
            return out
        if self.manifest.batch is not None:  # a static graph takes 2N rows whatever the plan
            guided_rows = np.ones(n, dtype=bool)
        else:
            guided_rows = guided
        g = np.flatnonzero(guided_rows)
        feeds = {"sample": np.concatenate([x32, x32[g]]), "timestep": self._timestep(t, n + len(g))}
        for name, rows in conds.items():
            feeds[name] = np.concatenate([rows, np.asarray(self.nulls[name])[g]])
        out = self._run(feeds)
        self._check_finite(out, t, n, g, x32)
        out_c, out_u = out[:n], out[n:]
        result = self.planner.observe(guided_rows, out_c, out_u)
        if result is None:
            result = out_c.copy()
            if len(g):
                result[g] = mix(out_c[g], out_u, w[g])
        if self.rescale and len(g):
            result[g] = rescale(result[g], out_c[g], self.rescale)
        return result


def null_rows(manifest: Manifest, n: int, options: GuidanceOptions,
              null_embedding: np.ndarray | None = None) -> dict | None:
    """The null rows [N, ...] of the 'cond' input: the negative condition, the null class,
    or the null embedding [L, D] (Artifact.null_embedding) for every image; None for a
    fused graph, which holds its null condition."""
    if options.negative is not None:
        if manifest.layout is Layout.FUSED:
            raise CfgExportError("a negative condition needs the stacked layout (the fused graph holds the null "
                                 "condition inside); re-export without --fuse-guidance")
        return {"cond": np.asarray(options.negative)}
    if manifest.layout is Layout.FUSED:
        return None
    condition = manifest.facts.condition
    if condition.kind is ConditionKind.CLASS:
        return {"cond": np.full(n, condition.null, dtype=np.int64)}
    if null_embedding is None:
        raise CfgExportError("an embedding condition needs its null embedding [L, D] for the null rows "
                             "(the artifact's condition.null_file) or a negative embedding")
    null_embedding = np.asarray(null_embedding, dtype=np.float32)
    return {"cond": np.broadcast_to(null_embedding, (n, *null_embedding.shape))}


def guided_model(backend: Backend, n: int, options: GuidanceOptions, null_embedding: np.ndarray | None = None,
                 record: Callable[[dict], None] | None = None,
                 nulls: dict[str, np.ndarray] | None = None) -> GuidedModel:
    """Returns the GuidedModel of a backend for n images whose null rows hold the negative
    condition, the null class or the null embedding; or, for a model with several condition
    inputs (a pipeline's denoiser), the null rows [N, ...] of each input by name in `nulls`."""
    if nulls is None:
        nulls = null_rows(backend.manifest, n, options, null_embedding)
    return GuidedModel(backend, n, options, nulls, record)
