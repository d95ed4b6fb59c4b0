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
- GuidedDenoiser: the same as eps, for the samplers, with the prediction type converted
  and dynamic thresholding applied.
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
from .manifest import ConditionKind, Layout, Manifest, Prediction
from .schedule import parse_enum

log = logging.getLogger(__name__)


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


def to_eps(output: np.ndarray, x: np.ndarray, alpha_cumprod: float, prediction: Prediction) -> np.ndarray:
    """Returns eps from a model output of the given prediction type, with
    x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0."""
    a = alpha_cumprod
    if prediction is Prediction.EPS:
        return output
    if prediction is Prediction.X0:
        return (x - math.sqrt(a) * output) / math.sqrt(1 - a)
    return math.sqrt(a) * output + math.sqrt(1 - a) * x


def dynamic_threshold(eps: np.ndarray, x: np.ndarray, alpha_cumprod: float, percentile: float) -> np.ndarray:
    """Returns eps whose implied x0 is dynamically thresholded (Saharia et al. 2022, Imagen,
    sec. 2.3): s = the percentile of |x0| per sample, s = max(s, 1), x0 = clip(x0, -s, s) / s."""
    a = alpha_cumprod
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    flat = np.abs(x0.reshape(len(x0), -1))
    s = np.maximum(np.quantile(flat, percentile, axis=1), 1.0).reshape((-1,) + (1,) * (x.ndim - 1))
    x0 = np.clip(x0, -s, s) / s
    return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)


@dataclass
class GuidanceOptions:
    """How the guided eps is formed at each step; None means off."""

    w: float | np.ndarray = 0.0  # one number or [N]
    w_schedule: WSchedule | str = WSchedule.CONSTANT
    interval: tuple[float, float] | None = None  # guide only where sigma_t is in [lo, hi]
    negative: np.ndarray | None = None  # [N] labels or [N, L, D] embeddings for the null rows instead of the null
    threshold: float | None = None  # dynamic thresholding percentile, e.g. 0.995

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


def vp_sigma(alpha_cumprod: float) -> float:
    """The noise level sigma = sqrt((1 - a) / a) of a variance-preserving timestep."""
    return math.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)


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

    def _run(self, feeds: dict) -> np.ndarray:
        if self.record is not None:
            self.record(feeds)
        (out,) = self.backend.infer(feeds).values()
        self.model_seconds += self.backend.last_seconds
        self.calls += 1
        self.rows += len(feeds["sample"]) * (2 if self.manifest.layout is Layout.FUSED else 1)
        return out.astype(np.float64)

    def _timestep(self, t, rows: int) -> np.ndarray:
        return np.full(rows, t, dtype=self.manifest.facts.timestep_dtype)

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
            return self._run({"sample": x32, "timestep": self._timestep(t, n), **conds, "w": w.astype(np.float32)})
        if self.manifest.batch is not None:  # a static graph takes 2N rows whatever the plan
            guided_rows = np.ones(n, dtype=bool)
        else:
            guided_rows = guided
        g = np.flatnonzero(guided_rows)
        feeds = {"sample": np.concatenate([x32, x32[g]]), "timestep": self._timestep(t, n + len(g))}
        for name, rows in conds.items():
            feeds[name] = np.concatenate([rows, np.asarray(self.nulls[name])[g]])
        out = self._run(feeds)
        out_c, out_u = out[:n], out[n:]
        custom = self.planner.observe(guided_rows, out_c, out_u)
        if custom is not None:
            return custom
        result = out_c.copy()
        if len(g):
            result[g] = mix(out_c[g], out_u, w[g])
        return result


class GuidedDenoiser:
    """denoise(x, t, cond) -> guided eps [N, *S] for the VP samplers: the GuidedModel's
    output converted to eps with the prediction type, thresholded when asked.

    Embedding conditions: the null rows hold `null_embedding` [L, D] (the artifact's,
    Artifact.null_embedding) for every image, or options.negative.
    """

    def __init__(self, backend: Backend, alphas_cumprod: np.ndarray, n: int, options: GuidanceOptions,
                 record: Callable[[dict], None] | None = None, null_embedding: np.ndarray | None = None):
        manifest = backend.manifest
        self.manifest = manifest
        self.alphas_cumprod = alphas_cumprod
        self.options = options
        if options.negative is not None and manifest.layout is Layout.FUSED:
            raise CfgExportError("a negative condition needs the stacked layout (the fused graph holds the null "
                                 "condition inside); re-export without --fuse-guidance")
        self.model = GuidedModel(backend, n, options, self._nulls(manifest, n, options, null_embedding), record)

    @staticmethod
    def _nulls(manifest: Manifest, n: int, options: GuidanceOptions, null_embedding) -> dict | None:
        """The null rows of the 'cond' input: the negative condition, the null class, the null embedding."""
        if options.negative is not None:
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

    @property
    def model_seconds(self) -> float:
        return self.model.model_seconds

    @property
    def calls(self) -> int:
        return self.model.calls

    @property
    def rows(self) -> int:
        return self.model.rows

    def w_at(self, t: int) -> np.ndarray:
        return self.model.planner.w_at(t)

    def __call__(self, x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        a = float(self.alphas_cumprod[t])
        out = self.model(x, t, cond, sigma=vp_sigma(a))
        eps = to_eps(out, x, a, self.manifest.facts.prediction)
        if self.options.threshold is not None:
            eps = dynamic_threshold(eps, x, a, self.options.threshold)
        return eps
