"""Euler ancestral: the ancestral Euler sampler of k-diffusion (Crowson), on the noise levels
of Karras et al. 2022; each step is an Euler step down to sigma_down, then fresh noise
sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_{i+1}^2 (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", ancestral sampling)."""
from __future__ import annotations

import numpy as np

from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, draw, finish, start
from .euler import denoise_ve, euler_plan


def plan_euler_ancestral(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """EulerAncestralDiscreteScheduler.set_timesteps."""
    return euler_plan(config, steps, "euler-ancestral")


def sample_euler_ancestral(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                           callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: Euler ancestral from the noise x.

    sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2),
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2); x <- x + (sigma_down - sigma_i) d + sigma_up z,
    with z drawn from `noise` at every step (as diffusers' EulerAncestralDiscreteScheduler).
    """
    x = start(x, plan)
    for i, t in enumerate(plan.timesteps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = np.sqrt(sigma_next**2 - sigma_up**2)
        d = (x - denoise_ve(denoiser, x, t, sigma)) / sigma
        x = x + (sigma_down - sigma) * d + sigma_up * draw(noise, x.shape)
        finish(x, i, plan, callback)
    return x.astype(np.float32)
