"""Classifier-free guidance on the host: the w mix, done once, here.

Ho & Salimans 2021, eq. 6:  eps~(z, c) = (1 + w) eps(z, c) - w eps(z)
w = 0 is plain conditional sampling, w = -1 unconditional, w < -1 pushes away from c.
diffusers' guidance_scale s is 1 + w: eps_u + s (eps_c - eps_u) is the same mix.

Two layers:
- GuidedModel: model(x, t, cond) -> the guided raw model output [N, *S] (eps, v, x0 or a
  flow velocity: the mix is linear, so it is the same mix whatever the model predicts).
  One backend call per step on [cond rows; null rows]; a RowPlanner decides, per step and
  image, whether the image runs its null rows (not where its w is 0, nor outside the
  guidance interval, nor where a strategy of runtime.strategies says they do not help).
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
from .engine import engine_profiles
from .errors import CfgExportError
from .manifest import ConditionKind, Layout, Manifest, Prediction
from .samplers.core import Denoiser, vp_pair
from .schedule import parse_enum
from .strategies import AdaptiveStop, DirectionCache, check_adaptive, check_cache_every, check_noise_interval

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


def to_eps(output: np.ndarray, x: np.ndarray, alpha_cumprod: float, prediction: Prediction) -> np.ndarray:
    """Returns the noise eps a VP model output of the given prediction type implies at the
    sample x = sqrt(a) x0 + sqrt(1 - a) eps (samplers.Denoiser reads the output)."""
    a = float(alpha_cumprod)
    return Denoiser(None, None, prediction).split(output, x, math.sqrt(a), math.sqrt(1 - a))[1]


def to_x0(output: np.ndarray, x: np.ndarray, sigma: float, prediction: Prediction) -> np.ndarray:
    """Returns the clean sample x0 a model output of the given prediction type implies at
    the sample x of noise level sigma (= sigma / alpha of the step): a VP sample
    (alpha = 1 / sqrt(1 + sigma^2)), or for a flow model x = (1 - s) x0 + s eps with
    s = sigma / (1 + sigma) (samplers.Denoiser reads the output)."""
    if prediction is Prediction.FLOW:
        s = sigma / (1.0 + sigma)
        alpha, noise = 1.0 - s, s
    else:
        alpha, noise = vp_pair(sigma)
    return Denoiser(None, None, prediction).split(output, x, alpha, noise)[0]


@dataclass
class GuidanceOptions:
    """How the guided eps is formed at each step; None means off."""

    w: float | np.ndarray = 0.0  # one number or [N]
    w_schedule: WSchedule | str = WSchedule.CONSTANT
    interval: tuple[float, float] | None = None  # guide only where sigma_t is in [lo, hi]
    negative: np.ndarray | None = None  # [N] labels or [N, L, D] embeddings for the null rows instead of the null
    threshold: float | None = None  # dynamic thresholding percentile, e.g. 0.995 (the scheduler's thresholding)
    rescale: float | None = None  # guidance_rescale phi in [0, 1] (Lin et al. 2024), e.g. 0.7
    adaptive: float | None = None  # stop an image's null rows once cos(x0_c, x0_u) >= this (runtime.strategies)
    cache_every: int | None = None  # inside cache_interval, run the null rows every k-th call, reuse out_c - out_u
    cache_interval: tuple[float, float] | None = None  # noise levels sigma [lo, hi] of the cache; None: all steps

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
        if self.adaptive is not None:
            check_adaptive(self.adaptive)
        if self.cache_every is not None:
            check_cache_every(self.cache_every)
        if self.cache_interval is not None:
            if self.cache_every is None:
                raise CfgExportError("cache interval: given without the cache (cache_every, --strategy cache:K); "
                                     "add it, or drop the interval")
            check_noise_interval(self.cache_interval, "cache interval")

    @property
    def strategies(self) -> bool:
        """True when adaptive guidance or the cached direction is on."""
        return self.adaptive is not None or self.cache_every is not None


class RowPlanner:
    """Decides, call by call, which images run their null rows, and the w each image is
    guided with: the w schedule, no null rows where w is 0 or outside the guidance
    interval, and the strategies of runtime.strategies (adaptive guidance, the cached
    direction), which see each call's outputs (plan, then observe)."""

    def __init__(self, options: GuidanceOptions, n: int, num_train_timesteps: int):
        options.check()
        self.options = options
        self.w = check_w(options.w, n)
        self.w_schedule = parse_enum(WSchedule, options.w_schedule, "w schedule")
        self.T = num_train_timesteps
        self.adaptive = AdaptiveStop(options.adaptive, n) if options.adaptive is not None else None
        self.cache = (DirectionCache(options.cache_every, options.cache_interval, n)
                      if options.cache_every is not None else None)
        self._step: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (guided, reuse, w) of this call

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

    def row_counts(self) -> set[int]:
        """Returns the row counts of the calls this planner can ask of a dynamic stacked
        graph: N + the images that run their null rows."""
        n, g = len(self.w), int(np.count_nonzero(self.w))
        if self.adaptive is not None or self.cache is not None:
            return {n + k for k in range(g + 1)}  # the batch shrinks one image at a time
        return {n + g, n} if self.options.interval is not None else {n + g}

    def plan(self, t: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """Returns (guided [N] bool: the images that run their null rows this call, w [N])."""
        w = self.w_at(t)
        guided = (w != 0) & self.guided_at(sigma)
        if self.adaptive is not None:
            guided &= ~self.adaptive.stopped
        reuse = self.cache.plan(guided, sigma) if self.cache is not None else np.zeros_like(guided)
        self._step = (guided, reuse, w)
        return guided & ~reuse, w

    def observe(self, guided: np.ndarray, out_c: np.ndarray, out_u: np.ndarray,
                denoised: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray | None:
        """Sees the call's conditional outputs [N, *S] and the null outputs [G, *S] of the
        images that ran them (`guided` [N]: all of them on a static graph); returns the
        guided output of every image [N, *S], or None for the plain mix (images that ran
        their null rows mixed with w, the others conditional only). denoised(outputs
        [K, *S], images [K]) -> the x0 they imply (adaptive guidance compares those; without
        it, the raw outputs)."""
        if self.adaptive is None and self.cache is None:
            return None
        planned, reuse, w = self._step
        fresh = np.flatnonzero(planned & ~reuse)
        out_u = out_u[(np.cumsum(guided) - 1)[fresh]]  # the null rows of the images planned to run them
        result = out_c.copy()
        mixed = np.ones(len(fresh), dtype=bool)
        if self.adaptive is not None:
            c, u = out_c[fresh], out_u
            if denoised is not None:
                c, u = denoised(c, fresh), denoised(u, fresh)
            mixed = ~self.adaptive.observe(fresh, c, u)  # those that agree now: conditional only
            self.adaptive.advance()
        if self.cache is not None:
            self.cache.store(fresh, out_c[fresh] - out_u)
            self.cache.advance(bool(reuse.any()))
        kept = fresh[mixed]
        result[kept] = mix(out_c[kept], out_u[mixed], w[kept])
        reused = np.flatnonzero(reuse)
        if len(reused):
            scale = w[reused].reshape((-1,) + (1,) * (out_c.ndim - 1))
            result[reused] = out_c[reused] + scale * self.cache.direction[reused]  # = mix with the kept eps_u
        return result


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
        if self.manifest.layout is Layout.FUSED and options.strategies:
            raise CfgExportError("adaptive and cached guidance need the stacked layout (the fused graph returns only "
                                 "the mix, not the conditional and null outputs); re-export without --fuse-guidance")
        self._check_profiles()

    def _check_profiles(self) -> None:
        """Refuses, before any step, an engine whose profiles miss a row count this guidance asks for."""
        if self.manifest.layout is not Layout.STACKED or self.manifest.batch is not None:
            return
        profiles = engine_profiles(self.manifest)
        if not profiles:
            return
        missing = sorted(r for r in self.planner.row_counts() if not any(p.covers(r) for p in profiles))
        if missing:
            ranges = ", ".join(f"{p.rows[0]}..{p.rows[2]}" for p in profiles)
            counts = ", ".join(map(str, missing[:4])) + (", ..." if len(missing) > 4 else "")
            raise CfgExportError(f"engine: this guidance makes calls of {counts} rows for N={self.n} images, outside "
                                 f"its profiles (rows {ranges}); rebuild it with --interval-profile (a profile for "
                                 f"the calls of fewer than 2N rows)")

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
        guided, w_planned = self.planner.plan(t, sigma)
        w = np.where(guided, w_planned, 0.0)
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
        prediction = self.manifest.facts.prediction
        result = self.planner.observe(guided_rows, out_c, out_u,
                                      lambda out, images: to_x0(out, x[images], sigma, prediction))
        if result is None:
            result = out_c.copy()
            if len(g):
                result[g] = mix(out_c[g], out_u, w[g])
        # rescale leaves an unguided image (result = out_c) as it is; cached directions count as guided
        mixed = np.flatnonzero(w_planned != 0) if self.planner.options.strategies else g
        if self.rescale and len(mixed):
            result[mixed] = rescale(result[mixed], out_c[mixed], self.rescale)
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
