"""Classifier-free guidance on the host: the w mix, done once, here.

Ho & Salimans 2021, eq. 6:  eps~(z, c) = (1 + w) eps(z, c) - w eps(z)
w = 0 is plain conditional sampling, w = -1 unconditional, w < -1 pushes away from c.
diffusers' guidance_scale s is 1 + w: eps_u + s (eps_c - eps_u) is the same mix.
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
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
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


class GuidedDenoiser:
    """denoise(x, t, cond) -> guided eps [N, *S], calling the backend once per step.

    Stacked layout: rows [x; x] with conditions [cond; null], one call, then the mix.
    Steps outside the guidance interval run only the N conditional rows (when the graph
    has a dynamic batch). Fused layout: the graph does the stacking and the mix.
    `record`, if given, receives every feed dict the backend sees (for calibration).
    Embedding conditions: the null rows hold `null_embedding` [L, D] (the artifact's,
    Artifact.null_embedding) for every image, or options.negative.
    """

    def __init__(self, backend: Backend, alphas_cumprod: np.ndarray, n: int, options: GuidanceOptions,
                 record: Callable[[dict], None] | None = None, null_embedding: np.ndarray | None = None):
        self.backend = backend
        self.manifest: Manifest = backend.manifest
        self.alphas_cumprod = alphas_cumprod
        self.options = options
        self.w = check_w(options.w, n)
        self.w_schedule = parse_enum(WSchedule, options.w_schedule, "w schedule")
        self.record = record
        self.model_seconds = 0.0  # total time inside backend calls
        self.calls = 0
        self.rows = 0  # model rows evaluated: 2N per guided stacked step, N per conditional-only one
        facts = self.manifest.facts
        if options.negative is not None and self.manifest.layout is Layout.FUSED:
            raise CfgExportError("a negative condition needs the stacked layout (the fused graph holds the null "
                                 "condition inside); re-export without --fuse-guidance")
        if facts.condition.kind is ConditionKind.CLASS:
            self.null = np.full(n, facts.condition.null, dtype=np.int64)
        elif null_embedding is not None:
            null_embedding = np.asarray(null_embedding, dtype=np.float32)
            self.null = np.broadcast_to(null_embedding, (n, *null_embedding.shape))
        else:
            self.null = None  # the fused graph holds it; the stacked layout needs null_embedding or a negative
        if options.negative is not None:
            self.null = np.asarray(options.negative)
        if self.null is None and self.manifest.layout is Layout.STACKED:
            raise CfgExportError("an embedding condition needs its null embedding [L, D] for the null rows "
                                 "(the artifact's condition.null_file) or a negative embedding")
        if options.interval is not None:
            lo, hi = options.interval
            if not (0 <= lo <= hi):
                raise CfgExportError(f"guidance interval: got ({lo}, {hi}), expected 0 <= lo <= hi (noise levels sigma)")

    def w_at(self, t: int) -> np.ndarray:
        """Returns the guidance weights [N] at training timestep t."""
        T = len(self.alphas_cumprod)
        if self.w_schedule is WSchedule.LINEAR:
            return self.w * 2 * (1 - t / T)
        return self.w

    def guided_at(self, t: int) -> bool:
        """False where the noise level sigma_t = sqrt((1 - a) / a) is outside the interval."""
        if self.options.interval is None:
            return True
        a = self.alphas_cumprod[t]
        sigma = math.sqrt((1 - a) / a)
        lo, hi = self.options.interval
        return lo <= sigma <= hi

    def _run(self, feeds: dict) -> np.ndarray:
        if self.record is not None:
            self.record(feeds)
        (eps,) = self.backend.infer(feeds).values()
        self.model_seconds += self.backend.last_seconds
        self.calls += 1
        self.rows += len(feeds["sample"]) * (2 if self.manifest.layout is Layout.FUSED else 1)
        return eps.astype(np.float64)

    def __call__(self, x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        n = len(x)
        x32 = x.astype(np.float32)
        timestep = np.full(n, t, dtype=self.manifest.facts.timestep_dtype)
        w = self.w_at(t) if self.guided_at(t) else np.zeros(n)
        if self.manifest.layout is Layout.FUSED:
            out = self._run({"sample": x32, "timestep": timestep, "cond": cond, "w": w.astype(np.float32)})
        elif not self.guided_at(t) and self.manifest.batch is None:
            out = self._run({"sample": x32, "timestep": timestep, "cond": cond})
        else:
            out = self._run({"sample": np.concatenate([x32, x32]), "timestep": np.concatenate([timestep, timestep]),
                             "cond": np.concatenate([cond, self.null])})
            out = mix(out[:n], out[n:], w)
        a = float(self.alphas_cumprod[t])
        eps = to_eps(out, x, a, self.manifest.facts.prediction)
        if self.options.threshold is not None:
            eps = dynamic_threshold(eps, x, a, self.options.threshold)
        return eps
