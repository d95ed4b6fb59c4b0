"""DPM-Solver++: Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models": the multistep data-prediction solver
(Algorithm 2, 2M; 3M), and its SDE variant (sec. 5 and Appendix; Gonzalez et al. 2023)."""
from __future__ import annotations

import numpy as np

from ..schedule import exponential_sigmas, karras_sigmas, sigma_to_t, solver_timesteps
from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, clip_x0, draw, finish, start, vp_pair
from .euler import training_sigmas


def solver_plan(config: SchedulerConfig, steps: int, sampler: str) -> Plan:
    """set_timesteps of diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler:
    the solver spacing over the timesteps left by lambda_min_clipped, their noise levels;
    or Karras / exponential / Lu (evenly spaced in log sigma) noise levels over the whole
    training range with their timesteps (rounded, except exponential and, for the
    DPM-Solver, the cosine schedule; truncated to integers); then the final noise level."""
    f = config.fields
    all_sigmas = training_sigmas(config)
    log_sigmas = np.log(all_sigmas)
    T = f["num_train_timesteps"]
    last = T
    if f.get("lambda_min_clipped", -np.inf) > -np.inf:  # lambda = -log sigma
        last = T - int(np.searchsorted(np.flip(-log_sigmas), f["lambda_min_clipped"]))
    timesteps = solver_timesteps(T, steps, f["timestep_spacing"], f["steps_offset"], last).astype(np.float64)
    lo, hi = config.sigma_bound("sigma_min"), config.sigma_bound("sigma_max")
    lo, hi = all_sigmas[0] if lo is None else lo, all_sigmas[-1] if hi is None else hi
    rounded = config.class_name == "UniPCMultistepScheduler" or f["beta_schedule"] != "squaredcos_cap_v2"
    if f.get("use_karras_sigmas"):
        sigmas = karras_sigmas(lo, hi, steps)
        timesteps = sigma_to_t(sigmas, log_sigmas)
        timesteps = timesteps.round() if rounded else timesteps
    elif f.get("use_lu_lambdas"):
        sigmas = np.exp(np.linspace(log_sigmas[-1], log_sigmas[0], steps))
        timesteps = sigma_to_t(sigmas, log_sigmas)
        timesteps = timesteps.round() if rounded else timesteps
    elif f.get("use_exponential_sigmas"):
        sigmas = exponential_sigmas(lo, hi, steps)
        timesteps = sigma_to_t(sigmas, log_sigmas)
    else:
        sigmas = all_sigmas[timesteps.astype(np.int64)]
    if f["final_sigmas_type"] == "zero":
        final = 0.0
    elif config.class_name == "UniPCMultistepScheduler" and (f["use_karras_sigmas"] or f["use_exponential_sigmas"]):
        final = sigmas[-1]
    else:
        final = all_sigmas[0]
    return Plan(config.class_name, np.trunc(timesteps), np.append(sigmas, final), f, sampler=sampler, steps=steps)


def plan_dpmpp(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """DPMSolverMultistepScheduler.set_timesteps."""
    return solver_plan(config, steps, config.sampler)


def _lambda(sigma: float) -> tuple[float, float, float]:
    """(alpha, sigma_vp, lambda = log(alpha / sigma_vp)) at Karras noise level sigma."""
    alpha, sigma_vp = vp_pair(sigma)
    with np.errstate(divide="ignore"):
        return alpha, sigma_vp, np.log(alpha) - np.log(sigma_vp)


def _update(x, m, sigmas, i, order, f, z):
    """One DPM-Solver++ step of the given order from sigmas[i] to sigmas[i + 1], with the
    data predictions m = [..., x0 at sigmas[i - 1], x0 at sigmas[i]] and SDE noise z."""
    alpha_t, sigma_t, lambda_t = _lambda(sigmas[i + 1])
    _, sigma_s, lambda_s = _lambda(sigmas[i])
    h = lambda_t - lambda_s
    e = np.exp(-h)  # e^{-h}
    sde = f["algorithm_type"] == "sde-dpmsolver++"
    D0 = m[-1]
    if order == 1:
        D = [D0]
    elif order == 2:
        r0 = (lambda_s - _lambda(sigmas[i - 1])[2]) / h
        D = [D0, (m[-1] - m[-2]) / r0]
    else:
        lambda_s1, lambda_s2 = _lambda(sigmas[i - 1])[2], _lambda(sigmas[i - 2])[2]
        r0, r1 = (lambda_s - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
        d1_0, d1_1 = (m[-1] - m[-2]) / r0, (m[-2] - m[-3]) / r1
        D = [D0, d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)]
    if not sde:  # Lu et al. 2022, eq. 8 and its multistep forms
        x = (sigma_t / sigma_s) * x - alpha_t * (e - 1.0) * D[0]
        if order == 2 and f["solver_type"] == "midpoint":
            x = x - 0.5 * alpha_t * (e - 1.0) * D[1]
        elif order >= 2:
            x = x + alpha_t * ((e - 1.0) / h + 1.0) * D[1]
        if order == 3:
            x = x - alpha_t * ((e - 1.0 + h) / h**2 - 0.5) * D[2]
        return x
    e2 = np.exp(-2.0 * h)
    x = (sigma_t / sigma_s * e) * x + alpha_t * (1.0 - e2) * D[0]
    if order == 2 and f["solver_type"] == "midpoint":
        x = x + 0.5 * alpha_t * (1.0 - e2) * D[1]
    elif order >= 2:
        x = x + alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0) * D[1]
    if order == 3:
        x = x + alpha_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * D[2]
    return x + sigma_t * np.sqrt(1.0 - e2) * z


def sample_dpmpp(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                 callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: DPM-Solver++ from the noise x.

    Lu et al. 2022, multistep, in lambda = log(alpha / sigma) with the data prediction
    x_theta (thresholded as the config says); order solver_order (1-3) once enough
    predictions are kept, lower at the first steps, and first order at the last step
    (lower_order_final with fewer than 15 steps, euler_at_final, or a final sigma of 0),
    second order before it (lower_order_final, fewer than 15 steps). midpoint or heun
    second-order terms (solver_type). sde-dpmsolver++ draws noise from `noise` at every step.
    """
    f = plan.fields
    S, order = len(plan), f["solver_order"]
    x = start(x, plan)
    m: list[np.ndarray] = []
    warm = 0  # lower_order_nums: the steps taken so far, up to the order
    for i, t in enumerate(plan.timesteps):
        final = i == S - 1 and (f["euler_at_final"] or (f["lower_order_final"] and S < 15)
                                or f["final_sigmas_type"] == "zero")
        second = i == S - 2 and f["lower_order_final"] and S < 15
        alpha, sigma_vp = vp_pair(plan.sigmas[i])
        x0, _ = denoiser(x, t, alpha, sigma_vp)
        m = (m + [clip_x0(x0, f)])[-order:]
        z = draw(noise, x.shape) if f["algorithm_type"] == "sde-dpmsolver++" else None
        if order == 1 or warm < 1 or final:
            step_order = 1
        elif order == 2 or warm < 2 or second:
            step_order = 2
        else:
            step_order = 3
        with np.errstate(divide="ignore", invalid="ignore"):
            x = _update(x, m, plan.sigmas, i, step_order, f, z)
        warm = min(warm + 1, order)
        finish(x, i, plan, callback)
    return x.astype(np.float32)
