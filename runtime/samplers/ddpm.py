"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
(NeurIPS 2020), Algorithm 2, over strided timesteps."""
from __future__ import annotations

import numpy as np

from ..schedule import make_timesteps
from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, clip_x0, draw, finish, start


def plan_ddpm(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """DDPMScheduler.set_timesteps(steps): timesteps by timestep_spacing and steps_offset."""
    f = config.fields
    timesteps = make_timesteps(f["num_train_timesteps"], steps, f["timestep_spacing"], f["steps_offset"])
    return Plan(config.class_name, timesteps.astype(np.float64), np.empty(0), f,
                alphas_cumprod=config.schedule().alphas_cumprod(), sampler="ddpm", steps=steps)


def sample_ddpm(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: ancestral sampling from the noise x.

    Ho et al. 2020, Algorithm 2, each step t -> prev (the next timestep; clean data after
    the last) drawing from the posterior q(x_prev | x_t, x_0) of eq. 6-7 at the predicted
    x_0, with variance beta-tilde (fixed_small; fixed_large: beta). As diffusers' DDPMScheduler,
    noise is drawn whenever t > 0, the last step included (its variance is clamped to 1e-20).
    """
    f, ac = plan.fields, plan.alphas_cumprod
    timesteps = plan.timesteps.astype(np.int64)
    x = start(x, plan)
    for i, t in enumerate(timesteps):
        # Notation (variable -> Ho et al. 2020, for the strided pair t -> prev):
        # alpha_bar_t, alpha_bar_prev -> alpha-bar_t, alpha-bar_{t-1};  alpha_t, beta_t of the pair
        # x0 -> "predicted x_0";  mean, variance -> mu-tilde_t, beta-tilde_t of eq. 7

        # 1. alphas and betas of the step
        alpha_bar_t = ac[t]
        alpha_bar_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1.0 - alpha_t

        # 2. predicted x_0, eq. 15, clipped or thresholded as the config says
        x0, _ = denoiser(x, t, np.sqrt(alpha_bar_t), np.sqrt(1.0 - alpha_bar_t))
        x0 = clip_x0(x0, f)

        # 3. posterior mean mu-tilde_t(x_t, x_0), eq. 7
        x = (np.sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar_t)) * x0 \
            + (np.sqrt(alpha_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)) * x

        # 4. x_prev = mu-tilde_t + sqrt(variance) z, z ~ N(0, I), where t > 0
        if t > 0:
            variance = max((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t, 1e-20)
            if f["variance_type"] == "fixed_large":
                variance = beta_t
            x = x + np.sqrt(variance) * draw(noise, x.shape)
        finish(x, i, plan, callback)
    return x.astype(np.float32)
