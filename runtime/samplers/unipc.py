"""UniPC: Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework
for Fast Sampling of Diffusion Models" (NeurIPS 2023): the multistep predictor UniP-p
(Algorithm 2) and corrector UniC-p (Algorithm 1), B(h) = h (bh1) or e^h - 1 (bh2)."""
from __future__ import annotations

import numpy as np

from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, clip_x0, finish, start, vp_pair
from .dpmpp import solver_plan


def plan_unipc(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """UniPCMultistepScheduler.set_timesteps (the timesteps and noise levels of DPM-Solver's)."""
    return solver_plan(config, steps, "unipc")


def _lam(sigma: float) -> float:
    alpha, sigma_vp = vp_pair(sigma)
    with np.errstate(divide="ignore"):
        return float(np.log(alpha) - np.log(sigma_vp))


def _unipc(x, m0, others, sigmas, t_index, s0_index, order, f, model_t=None):
    """x_t from x at sigmas[s0_index] to sigmas[t_index] with the predictions m0 (at s0) and
    `others` (the earlier ones, most recent first, at s0_index - 1, - 2, ...): UniP-p, or
    UniC-p when model_t (the prediction at x_t) is given. Zhao et al. 2023, eq. 8-9."""
    x0_form = f["predict_x0"]
    alpha_t, sigma_t = vp_pair(sigmas[t_index])
    alpha_s, sigma_s = vp_pair(sigmas[s0_index])
    lambda_s = _lam(sigmas[s0_index])
    h = _lam(sigmas[t_index]) - lambda_s
    rks, D1s = [], []
    for k, mk in enumerate(others[:order - 1]):
        rk = (_lam(sigmas[s0_index - 1 - k]) - lambda_s) / h
        rks.append(rk)
        D1s.append((mk - m0) / rk)
    rks.append(1.0)
    hh = -h if x0_form else h
    h_phi_1 = np.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if f["solver_type"] == "bh1" else np.expm1(hh)
    R, b, factorial = [], [], 1
    for i in range(1, order + 1):
        R.append(np.power(rks, i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(R), np.array(b)
    scale, base = (alpha_t, sigma_t / sigma_s) if x0_form else (sigma_t, alpha_t / alpha_s)
    x_t = base * x - scale * h_phi_1 * m0
    if model_t is None:  # predictor
        if not D1s:
            return x_t - scale * B_h * 0
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        return x_t - scale * B_h * sum(r * d for r, d in zip(rhos, D1s))
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    correction = sum(r * d for r, d in zip(rhos[:-1], D1s)) + rhos[-1] * (model_t - m0)
    return x_t - scale * B_h * correction


def sample_unipc(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                 callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: UniPC from the noise x.

    Zhao et al. 2023, as diffusers' UniPCMultistepScheduler: at each step the new model
    output first corrects the previous predictor step (UniC, unless the previous step is
    in disable_corrector), then the predictor (UniP) takes the next step; the order is
    solver_order once enough outputs are kept, lower at the start and, with
    lower_order_final, towards the end. predict_x0 works on data predictions (thresholded
    as the config says), else on noise predictions. Deterministic.
    """
    f = plan.fields
    S, order = len(plan), f["solver_order"]
    x = start(x, plan)
    outputs: list[np.ndarray] = []  # converted model outputs, most recent last
    last_sample, this_order, warm = None, 1, 0
    for i, t in enumerate(plan.timesteps):
        alpha, sigma_vp = vp_pair(plan.sigmas[i])
        x0, eps = denoiser(x, t, alpha, sigma_vp)
        m = clip_x0(x0, f) if f["predict_x0"] else eps
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if i > 0 and i - 1 not in f["disable_corrector"] and last_sample is not None:
                x = _unipc(last_sample, outputs[-1], outputs[-2::-1], plan.sigmas, i, i - 1, this_order, f, m)
            outputs = (outputs + [m])[-order:]
            this_order = min(order, S - i) if f["lower_order_final"] else order
            this_order = min(this_order, warm + 1)
            last_sample = x
            x = _unipc(x, outputs[-1], outputs[-2::-1], plan.sigmas, i + 1, i, this_order, f)
        warm = min(warm + 1, order)
        finish(x, i, plan, callback)
    return x.astype(np.float32)
