"""What every sampler shares: the plan (what a scheduler's set_timesteps computes), the
denoiser (one model call, its output turned into the x_0 and noise predictions), the
x_0 clipping and thresholding of diffusers' schedulers, the source of noise, the step check.

One parametrization covers every schedule: a sample is x = alpha x_0 + sigma eps, with
(alpha, sigma) = (sqrt(a_t), sqrt(1 - a_t)) for a variance-preserving schedule
(alphas_cumprod a_t, Ho et al. 2020) and (1 - s, s) for flow matching (Lipman et al.
2023). The model's output (eps, x_0, v or a flow velocity) is converted to the pair
(x_0, eps) in that parametrization; sigma / alpha is the noise level of Karras et al.
2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"), the sigma
of the Euler-family samplers, which run on x / alpha = x_0 + (sigma / alpha) eps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from ..errors import CfgExportError
from ..manifest import Prediction

#: model(x [N, ...] float32, t, cond, sigma=...) -> raw model output [N, ...]: the
#: guidance.GuidedModel signature; t is the timestep fed to the network, sigma the
#: step's noise level sigma / alpha (for the guidance interval).
Model = Callable[..., np.ndarray]
#: callback(i, t, x [N, ...] float32), called after each model call with the sample
Callback = Callable[[int, float, np.ndarray], None]


class Noise(Protocol):
    """Where ancestral and SDE samplers draw their noise: numpy's Generator, or anything
    with its standard_normal(shape) (a test hands diffusers' own noise this way)."""

    def standard_normal(self, shape) -> np.ndarray: ...


@dataclass(frozen=True)
class Plan:
    """What a diffusers scheduler's set_timesteps computes, for one sampling run."""

    scheduler: str  # the diffusers class it follows
    timesteps: np.ndarray  # float64 [K]: the timestep fed to the model at each of the K model calls
    sigmas: np.ndarray  # float64: the scheduler's noise levels, laid out as it keeps them
    fields: Mapping[str, Any] = field(default_factory=dict)  # the scheduler config the steps read
    init_noise_sigma: float = 1.0  # x_T = init_noise_sigma * standard normal noise
    alphas_cumprod: np.ndarray | None = None  # float64 [T], for samplers that index it by timestep
    sampler: str = ""  # the sampler's name, for messages
    steps: int = 0  # the sampling steps asked for (model calls may be more: Heun, PNDM)

    def __len__(self) -> int:
        return len(self.timesteps)


def vp_pair(sigma: float) -> tuple[float, float]:
    """Returns (alpha, sigma) of the variance-preserving sample at Karras noise level
    sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma alpha."""
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


class Denoiser:
    """denoiser(x, t, alpha, sigma) -> (x0, eps), float64 [N, ...] each: one model call.

    x = alpha x_0 + sigma eps is the sample and also the model's input (a VP model takes
    the variance-preserving sample, a flow model the interpolation); the model's raw
    output is read by `prediction`:
      eps:  eps = out,  x0 = (x - sigma eps) / alpha
      x0:   x0 = out,   eps = (x - alpha x0) / sigma
      v:    x0 = alpha x - sigma out, eps = alpha out + sigma x  (Salimans & Ho 2022; VP only)
      flow: x0 = x - sigma out, eps = x + alpha out  (velocity out = eps - x0; alpha = 1 - sigma)
    """

    def __init__(self, model: Model, cond: Any, prediction: Prediction | str):
        self.model = model
        self.cond = cond
        self.prediction = Prediction(prediction)
        self.calls = 0

    def output(self, x: np.ndarray, t: float, alpha: float, sigma: float) -> np.ndarray:
        """Returns the model's raw output at x, float64 of x's shape."""
        with np.errstate(divide="ignore"):
            level = sigma / alpha if alpha > 0 else np.inf
        out = np.asarray(self.model(x.astype(np.float32), t, self.cond, sigma=float(level)))
        if out.shape != x.shape:
            raise CfgExportError(f"the model returned shape {out.shape} at t={t:g}, expected the sample's "
                                 f"shape {x.shape}")
        self.calls += 1
        return out.astype(np.float64)

    def split(self, out: np.ndarray, x: np.ndarray, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """Returns (x0, eps) of a raw model output at the sample x."""
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.prediction is Prediction.EPS:
                return (x - sigma * out) / alpha, out
            if self.prediction is Prediction.X0:
                return out, (x - alpha * out) / sigma
            if self.prediction is Prediction.V:
                return alpha * x - sigma * out, alpha * out + sigma * x
            return x - sigma * out, x + alpha * out

    def __call__(self, x: np.ndarray, t: float, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        return self.split(self.output(x, t, alpha, sigma), x, alpha, sigma)


def dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Returns x0 dynamically thresholded (Saharia et al. 2022, Imagen, sec. 2.3): s = the
    ratio-quantile of |x0| per sample, clamped to [1, max_value]; x0 = clip(x0, -s, s) / s."""
    flat = np.abs(x0.reshape(len(x0), -1))
    s = np.clip(np.quantile(flat, ratio, axis=1), 1.0, max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


def clip_x0(x0: np.ndarray, fields: Mapping[str, Any]) -> np.ndarray:
    """Returns the x_0 prediction as the scheduler config processes it: dynamic
    thresholding (thresholding, dynamic_thresholding_ratio, sample_max_value), else
    clipping to [-clip_sample_range, clip_sample_range] (clip_sample), else unchanged."""
    if fields.get("thresholding"):
        return dynamic_threshold(x0, fields["dynamic_thresholding_ratio"], fields["sample_max_value"])
    if fields.get("clip_sample"):
        return np.clip(x0, -fields["clip_sample_range"], fields["clip_sample_range"])
    return x0


def start(x: np.ndarray, plan: Plan) -> np.ndarray:
    """Returns x_T = init_noise_sigma * x, float64 [N, ...]; x is standard normal noise."""
    x = np.asarray(x)
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.floating):
        raise CfgExportError(f"{plan.sampler}: x must be a float array [N, ...], got {x.dtype} of shape {x.shape}")
    return x.astype(np.float64) * plan.init_noise_sigma


def draw(noise: Noise | None, shape) -> np.ndarray:
    """Returns standard normal noise of `shape`, float64, from the noise source."""
    if noise is None:
        raise CfgExportError("this sampler draws noise: give it a source (a numpy Generator)")
    return np.asarray(noise.standard_normal(shape), dtype=np.float64)


def finish(x: np.ndarray, i: int, plan: Plan, callback: Callback | None) -> None:
    """Checks the sample after model call i, then calls callback(i, t, x as float32).

    Raises CfgExportError naming the sampler, the call (1-based, of K) and the timestep
    when x holds NaN or Inf: what large guidance weights do to an unthresholded sample.
    """
    t = float(plan.timesteps[i])
    if not np.all(np.isfinite(x)) or np.abs(x).max() > np.finfo(np.float32).max:  # inf once cast to float32
        raise CfgExportError(
            f"{plan.sampler}: NaN or Inf in the sample at step {i + 1}/{len(plan)} (t={t:g}), made by the sampler's "
            "update from finite model outputs: the guided output grew past float range, so the guidance weight "
            "is too large for this model: try a smaller w, or dynamic thresholding (--threshold 0.995)"
        )
    if callback is not None:
        callback(i, t, x.astype(np.float32))
