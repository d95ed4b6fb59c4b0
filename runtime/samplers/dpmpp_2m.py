"""DPM-Solver++(2M): Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Algorithm 2 (multistep, second order, data prediction)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .common import (Callback, Denoise, alphas_at, call_denoise, finish_step,
                                     predict_x0, prepare)

NAME = "dpmpp-2m"


def sample_dpmpp_2m(denoise: Denoise, x: np.ndarray, cond: Any, alphas_cumprod: np.ndarray,
                    timesteps: np.ndarray, rng: np.random.Generator,
                    callback: Callback | None = None) -> np.ndarray:
    """Returns x_0, float32 [N, ...] like x: DPM-Solver++(2M) from the noise x = x_T.

    Lu et al. 2022, Algorithm 2, over `timesteps` (int64 [S], decreasing), in the
    variance-preserving form alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t).
    The first step is first order (there is no earlier x_0 yet); so is the last, which
    goes to sigma = 0, where lambda is infinite and the update returns the x_0
    prediction. Deterministic: rng is never drawn from. Matches diffusers'
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero").
    """
    x, alphas_cumprod, timesteps = prepare(x, alphas_cumprod, timesteps, NAME)
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        # Notation (variable -> Lu et al. 2022; s is the current time t_{i-1}, t the next t_i):
        # - alpha_s, sigma_s / alpha_t, sigma_t -> alpha, sigma of the VP noise schedule
        # - lambda = log(alpha / sigma), the half log-SNR;  h -> h_i = lambda_t - lambda_s
        # - x0 -> x_theta(x_s, s), the data prediction;  r -> r_i = h_{i-1} / h_i;  D -> D_i

        # 1. alpha and sigma now and at the next sampling time (alpha = 1, sigma = 0 after the last)
        alpha_bar_s, alpha_bar_t = alphas_at(alphas_cumprod, timesteps, i)
        alpha_s, sigma_s = np.sqrt(alpha_bar_s), np.sqrt(1.0 - alpha_bar_s)
        alpha_t, sigma_t = np.sqrt(alpha_bar_t), np.sqrt(1.0 - alpha_bar_t)
        # e^{-h} = (sigma_t / alpha_t) / (sigma_s / alpha_s): 0 at the last step, where h = inf
        exp_neg_h = (sigma_t / alpha_t) / (sigma_s / alpha_s)

        # 2. data prediction x_theta(x_s, s) from predicted noise
        eps = call_denoise(denoise, x, t, cond, NAME)
        x0 = predict_x0(x, eps, alpha_bar_s)

        # 3. D_i: x_theta itself on the first and the last step (first order, the DDIM step);
        #    otherwise D_i = (1 + 1/(2 r_i)) x_theta(s) - 1/(2 r_i) x_theta(previous s)
        last = i + 1 == len(timesteps)
        h = None if last else -np.log(exp_neg_h)
        if x0_prev is None or last:
            D = x0
        else:
            r = h_prev / h
            D = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev

        # 4. x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h_i} - 1) D_i
        x = (sigma_t / sigma_s) * x - alpha_t * (exp_neg_h - 1.0) * D
        x0_prev, h_prev = x0, h

        finish_step(x, i, timesteps, callback, NAME)
    return x.astype(np.float32)
