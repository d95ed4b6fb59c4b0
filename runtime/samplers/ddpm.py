"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
(NeurIPS 2020), Algorithm 2, generalised to strided timesteps."""
from __future__ import annotations

from typing import Any

import numpy as np

from .common import (Callback, Denoise, alphas_at, call_denoise, finish_step,
                                     predict_x0, prepare)

NAME = "ddpm"


def sample_ddpm(denoise: Denoise, x: np.ndarray, cond: Any, alphas_cumprod: np.ndarray,
                timesteps: np.ndarray, rng: np.random.Generator,
                callback: Callback | None = None) -> np.ndarray:
    """Returns x_0, float32 [N, ...] like x: ancestral sampling from the noise x = x_T.

    Ho et al. 2020, Algorithm 2, with each step t -> prev (the next element of
    `timesteps`, int64 [S]; clean data after the last) drawing from the posterior
    q(x_prev | x_t, x_0) of eq. 6-7 at the predicted x_0, with its variance beta_tilde
    ("fixed_small"). One rng.standard_normal draw per step except the last, which adds
    no noise. Matches diffusers' DDPMScheduler (variance_type="fixed_small",
    clip_sample=False) run on the same timesteps.
    """
    x, alphas_cumprod, timesteps = prepare(x, alphas_cumprod, timesteps, NAME)
    for i, t in enumerate(timesteps):
        # Notation (variable -> Ho et al. 2020, for the strided pair t -> prev):
        # - alpha_bar_t, alpha_bar_prev -> alpha-bar_t, alpha-bar_{t-1}
        # - alpha_t, beta_t -> alpha_t = alpha-bar_t / alpha-bar_{t-1}, beta_t = 1 - alpha_t
        # - x0 -> "predicted x_0";  mean, variance -> mu-tilde_t, beta-tilde_t of eq. 7

        # 1. alphas and betas of the step
        alpha_bar_t, alpha_bar_prev = alphas_at(alphas_cumprod, timesteps, i)
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1.0 - alpha_t

        # 2. predicted x_0 from predicted noise, eq. 15
        eps = call_denoise(denoise, x, t, cond, NAME)
        x0 = predict_x0(x, eps, alpha_bar_t)

        # 3. posterior mean mu-tilde_t(x_t, x_0), eq. 7
        mean = (np.sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar_t)) * x0 \
            + (np.sqrt(alpha_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)) * x

        # 4. x_prev = mu-tilde_t + sqrt(beta-tilde_t) z, z ~ N(0, I), and z = 0 at the last step
        if i + 1 < len(timesteps):
            variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t
            x = mean + np.sqrt(variance) * rng.standard_normal(x.shape)
        else:
            x = mean

        finish_step(x, i, timesteps, callback, NAME)
    return x.astype(np.float32)
