"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (ICLR 2021), eq. 12."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CfgExportError
from .common import (Callback, Denoise, alphas_at, call_denoise, finish_step,
                                     predict_x0, prepare)

NAME = "ddim"


def sample_ddim(denoise: Denoise, x: np.ndarray, cond: Any, alphas_cumprod: np.ndarray,
                timesteps: np.ndarray, rng: np.random.Generator, callback: Callback | None = None,
                *, eta: float = 0.0) -> np.ndarray:
    """Returns x_0, float32 [N, ...] like x: DDIM sampling from the noise x = x_T.

    Song et al. 2021, eq. 12, over the sub-sequence `timesteps` (int64 [S], decreasing);
    after the last timestep alpha_prev = 1. eta = 0 is the deterministic DDIM, eta = 1
    the DDPM posterior variance (eq. 16); noise is drawn from rng only when sigma_t > 0.
    Matches diffusers' DDIMScheduler (set_alpha_to_one=True, clip_sample=False) where its
    previous timestep, t - T // S, is the next element of `timesteps`.
    """
    if not 0.0 <= eta <= 1.0:
        raise CfgExportError(f"{NAME}: eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM noise), got {eta}")
    x, alphas_cumprod, timesteps = prepare(x, alphas_cumprod, timesteps, NAME)
    for i, t in enumerate(timesteps):
        # Notation (variable -> Song et al. 2021; their alpha is alphas_cumprod here):
        # - alpha_t, alpha_prev -> alpha_t, alpha_{t-1}
        # - eps -> eps_theta(x_t, t);  x0 -> "predicted x_0" = f_theta(x_t, t)
        # - sigma -> sigma_t(eta);  direction -> "direction pointing to x_t"

        # 1. alpha_t, and alpha_{t-1} of the next sampling timestep (1 after the last)
        alpha_t, alpha_prev = alphas_at(alphas_cumprod, timesteps, i)

        # 2. predicted x_0 from predicted noise, eq. 12
        eps = call_denoise(denoise, x, t, cond, NAME)
        x0 = predict_x0(x, eps, alpha_t)

        # 3. sigma_t(eta) = eta sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_{t-1}), eq. 16
        sigma = eta * np.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev))

        # 4. x_{t-1} = sqrt(alpha_{t-1}) x_0 + sqrt(1 - alpha_{t-1} - sigma_t^2) eps + sigma_t z, eq. 12
        direction = np.sqrt(1.0 - alpha_prev - sigma**2) * eps
        x = np.sqrt(alpha_prev) * x0 + direction
        if sigma > 0:
            x = x + sigma * rng.standard_normal(x.shape)

        finish_step(x, i, timesteps, callback, NAME)
    return x.astype(np.float32)
