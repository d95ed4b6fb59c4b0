"""Heun: Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (NeurIPS 2022), Algorithm 1: Heun's second-order method on the
probability flow ODE, the last step to sigma = 0 a plain Euler step."""
from __future__ import annotations

import numpy as np

from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, clip_x0, finish, start, vp_pair
from .euler import euler_plan


def plan_heun(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """HeunDiscreteScheduler.set_timesteps: Euler's timesteps and noise levels, every one
    after the first twice (2 steps - 1 model calls: the Euler step, then its correction)."""
    plan = euler_plan(config, steps, "heun")
    t, s = plan.timesteps, plan.sigmas
    return Plan(plan.scheduler, np.concatenate([t[:1], np.repeat(t[1:], 2)]),
                np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]), plan.fields,
                init_noise_sigma=plan.init_noise_sigma, sampler="heun", steps=steps)


def sample_heun(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: Heun from the noise x.

    Karras et al. 2022, Algorithm 1 (S_churn = 0): d_i = (x - D(x; sigma_i)) / sigma_i,
    x' = x + (sigma_{i+1} - sigma_i) d_i, then, where sigma_{i+1} > 0 is not the end,
    x <- x + (sigma_{i+1} - sigma_i) (d_i + d'_{i+1}) / 2 with d' taken at x'. The x_0
    prediction is clipped with clip_sample (diffusers' HeunDiscreteScheduler). Deterministic.
    """
    x = start(x, plan)
    saved = None  # (x_i, d_i, sigma_{i+1} - sigma_i) between the Euler call and its correction
    for i, t in enumerate(plan.timesteps):
        sigma = plan.sigmas[i]  # the noise level of the sample the model sees at this call
        alpha, sigma_vp = vp_pair(sigma)
        x0, _ = denoiser(x * alpha, t, alpha, sigma_vp)
        d = (x - clip_x0(x0, plan.fields)) / sigma
        if saved is None:
            dt = plan.sigmas[i + 1] - sigma
            saved = (x, d, dt)
            x = x + dt * d
        else:
            x_i, d_i, dt = saved
            x = x_i + dt * (d_i + d) / 2
            saved = None
        finish(x, i, plan, callback)
    return x.astype(np.float32)
