"""Euler: Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (NeurIPS 2022), Algorithm 2 without churn: Euler steps of the probability
flow ODE dx/dsigma = (x - D(x; sigma)) / sigma on x / alpha = x_0 + sigma eps."""
from __future__ import annotations

import numpy as np

from ..schedule import euler_timesteps, exponential_sigmas, karras_sigmas, sigma_to_t, vp_sigmas
from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, finish, start, vp_pair


def training_sigmas(config: SchedulerConfig) -> np.ndarray:
    """The Karras noise level of every training timestep, float64 [T]; with
    rescale_betas_zero_snr the last alphas_cumprod is 2^-24 instead of 0 (as diffusers)."""
    alphas_cumprod = config.schedule().alphas_cumprod()
    if config.fields.get("rescale_betas_zero_snr"):
        alphas_cumprod[-1] = 2.0**-24
    return vp_sigmas(alphas_cumprod)


def euler_plan(config: SchedulerConfig, steps: int, sampler: str) -> Plan:
    """set_timesteps of diffusers' Euler, Euler ancestral and Heun: the timesteps of the
    spacing, their noise levels interpolated in the training sigmas, or Karras / exponential
    noise levels (sigma_min, sigma_max: the config's, else those of the first and last
    timestep) and their fractional timesteps; then the final noise level (0, or the
    first training timestep's with final_sigmas_type sigma_min)."""
    f = config.fields
    all_sigmas = training_sigmas(config)
    timesteps = euler_timesteps(f["num_train_timesteps"], steps, f["timestep_spacing"], f["steps_offset"])
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    for option, build in (("use_karras_sigmas", karras_sigmas), ("use_exponential_sigmas", exponential_sigmas)):
        if f.get(option):
            lo, hi = config.sigma_bound("sigma_min"), config.sigma_bound("sigma_max")
            sigmas = build(sigmas[-1] if lo is None else lo, sigmas[0] if hi is None else hi, steps)
            timesteps = sigma_to_t(sigmas, np.log(all_sigmas))
    last = all_sigmas[0] if f.get("final_sigmas_type") == "sigma_min" else 0.0
    sigmas = np.append(sigmas, last)
    if f.get("timestep_type") == "continuous" and f["prediction_type"] == "v_prediction":
        timesteps = 0.25 * np.log(sigmas[:-1])
    peak = sigmas.max()
    init = peak if f["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(peak**2 + 1)
    return Plan(config.class_name, timesteps.astype(np.float32).astype(np.float64), sigmas, f,
                init_noise_sigma=float(init), sampler=sampler, steps=steps)


def plan_euler(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """EulerDiscreteScheduler.set_timesteps."""
    return euler_plan(config, steps, "euler")


def denoise_ve(denoiser: Denoiser, x: np.ndarray, t: float, sigma: float) -> np.ndarray:
    """Returns D(x; sigma), the x_0 prediction at the sample x = x_0 + sigma eps: the model
    sees x / sqrt(sigma^2 + 1), the variance-preserving sample."""
    alpha, sigma_vp = vp_pair(sigma)
    x0, _ = denoiser(x * alpha, t, alpha, sigma_vp)
    return x0


def sample_euler(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                 callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: Euler from the noise x.

    Karras et al. 2022, Algorithm 2 with S_churn = 0 (diffusers' EulerDiscreteScheduler):
    d = (x - D(x; sigma_i)) / sigma_i, x <- x + (sigma_{i+1} - sigma_i) d. Deterministic.
    """
    x = start(x, plan)
    for i, t in enumerate(plan.timesteps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        d = (x - denoise_ve(denoiser, x, t, sigma)) / sigma
        x = x + (sigma_next - sigma) * d
        finish(x, i, plan, callback)
    return x.astype(np.float32)
