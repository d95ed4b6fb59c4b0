"""What every sampler shares: input checks, the alpha lookup, eps -> x0, the model call, the NaN check.

Notation of Ho et al. 2020: alpha_bar_t = alphas_cumprod[t], so that
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. A sampler walks the sampling
timesteps t_0 > t_1 > ... > t_{S-1}; the step from t_i goes to t_{i+1}, and the step
from the last one goes to clean data, where alpha_bar = 1 (diffusers' set_alpha_to_one).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import CfgExportError

#: denoise(x [N, ...] float32, t training timestep, cond) -> eps [N, ...]
Denoise = Callable[[np.ndarray, int, Any], np.ndarray]
#: callback(step_index, t, x [N, ...] float32), called after each step with the new sample
Callback = Callable[[int, int, np.ndarray], None]


def prepare(x: np.ndarray, alphas_cumprod: np.ndarray, timesteps: np.ndarray,
            sampler: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (x float64 [N, ...], alphas_cumprod float64 [T], timesteps int64 [S]), checked.

    Raises CfgExportError naming the sampler when the timesteps are not a strictly
    decreasing subset of 0..T-1 or alphas_cumprod is not in (0, 1).
    """
    x = np.asarray(x)
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.floating):
        raise CfgExportError(f"{sampler}: x must be a float array [N, ...], got {x.dtype} of shape {x.shape}")
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    if alphas_cumprod.ndim != 1 or not np.all((alphas_cumprod > 0) & (alphas_cumprod < 1)):
        raise CfgExportError(
            f"{sampler}: alphas_cumprod must be a 1-D array of values in (0, 1), "
            f"got shape {alphas_cumprod.shape}; use NoiseSchedule.alphas_cumprod()"
        )
    T = len(alphas_cumprod)
    timesteps = np.asarray(timesteps)
    if (timesteps.ndim != 1 or len(timesteps) == 0 or not np.issubdtype(timesteps.dtype, np.integer)
            or np.any(np.diff(timesteps) >= 0) or timesteps[0] > T - 1 or timesteps[-1] < 0):
        raise CfgExportError(
            f"{sampler}: timesteps must be non-empty, integer, strictly decreasing and in 0..{T - 1}, "
            f"got {timesteps.tolist()}; use make_timesteps()"
        )
    return x.astype(np.float64), alphas_cumprod, timesteps.astype(np.int64)


def alphas_at(alphas_cumprod: np.ndarray, timesteps: np.ndarray, i: int) -> tuple[float, float]:
    """Returns (alpha_bar_t, alpha_bar_prev) for step i: the alpha_bar of timesteps[i] and
    of the timestep the step goes to, timesteps[i + 1], or 1 after the last one."""
    alpha_bar_t = float(alphas_cumprod[timesteps[i]])
    alpha_bar_prev = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
    return alpha_bar_t, alpha_bar_prev


def predict_x0(x: np.ndarray, eps: np.ndarray, alpha_bar_t: float) -> np.ndarray:
    """Returns the "predicted x_0" (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t),
    float64 of x's shape (Ho et al. 2020 eq. 15, Song et al. 2021 eq. 12)."""
    return (x - np.sqrt(1.0 - alpha_bar_t) * eps) / np.sqrt(alpha_bar_t)


def call_denoise(denoise: Denoise, x: np.ndarray, t: int, cond: Any, sampler: str) -> np.ndarray:
    """Returns eps_theta(x_t, t) as float64 [N, ...]: calls denoise with x as float32, t as an int."""
    eps = np.asarray(denoise(x.astype(np.float32), int(t), cond))
    if eps.shape != x.shape:
        raise CfgExportError(
            f"{sampler}: denoise returned eps of shape {eps.shape} at t={int(t)}, expected x's shape {x.shape}"
        )
    return eps.astype(np.float64)


def finish_step(x: np.ndarray, i: int, timesteps: np.ndarray, callback: Callback | None,
                sampler: str) -> None:
    """Checks the sample after step i, then calls callback(i, t, x as float32).

    Raises CfgExportError naming the sampler, the step (1-based, of S) and the timestep
    when x holds NaN or Inf: what large guidance weights do to an unthresholded sample.
    """
    t = int(timesteps[i])
    if not np.all(np.isfinite(x)) or np.abs(x).max() > np.finfo(np.float32).max:  # inf once cast to float32
        raise CfgExportError(
            f"{sampler}: NaN or Inf in the sample at step {i + 1}/{len(timesteps)} (t={t}), made by the sampler's "
            "update from finite model outputs: the guided output grew past float range, so the guidance weight "
            "is too large for this model: try a smaller w, or dynamic thresholding (--threshold 0.995)"
        )
    if callback is not None:
        callback(i, t, x.astype(np.float32))
