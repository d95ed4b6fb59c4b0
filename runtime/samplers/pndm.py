"""PNDM: Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds" (ICLR 2022): the pseudo linear multistep method (PLMS, eq. 12, the sampler of
Stable Diffusion 1.x), started by pseudo Runge-Kutta steps (PRK, eq. 13) or, with
skip_prk_steps, by a pseudo improved Euler step."""
from __future__ import annotations

import numpy as np

from ..errors import CfgExportError
from ..schedule import make_timesteps
from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, finish, start


def plan_pndm(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """PNDMScheduler.set_timesteps: with skip_prk_steps, the steps' timesteps with the
    second one repeated (steps + 1 model calls); otherwise 12 PRK calls at and between
    the 4 highest timesteps, then PLMS over the others."""
    f = config.fields
    T = f["num_train_timesteps"]
    ascending = make_timesteps(T, steps, f["timestep_spacing"], f["steps_offset"])[::-1]
    if f["skip_prk_steps"]:
        timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    else:
        if steps < 4:
            raise CfgExportError(f"PNDMScheduler without skip_prk_steps takes at least 4 steps (its Runge-Kutta "
                                 f"start), got {steps}: give more steps, or set skip_prk_steps")
        prk = np.repeat(ascending[-4:], 2) + np.tile([0, T // steps // 2], 4)
        timesteps = np.concatenate([np.repeat(prk[:-1], 2)[1:-1][::-1], ascending[:-3][::-1]])
    return Plan(config.class_name, timesteps.astype(np.float64), np.empty(0), f,
                alphas_cumprod=config.schedule().alphas_cumprod(), sampler="pndm", steps=steps)


def _transfer(denoiser: Denoiser, x: np.ndarray, t: int, prev: int, output: np.ndarray, plan: Plan) -> np.ndarray:
    """Returns x_{prev} from x_t along the noise prediction made of `output`: Liu et al.
    2022, eq. 9 (the transfer part phi). The final alpha stands in for prev < 0."""
    ac = plan.alphas_cumprod
    a_t = ac[t]
    a_prev = ac[prev] if prev >= 0 else (1.0 if plan.fields["set_alpha_to_one"] else ac[0])
    _, eps = denoiser.split(output, x, np.sqrt(a_t), np.sqrt(1.0 - a_t))
    denominator = a_t * np.sqrt(1.0 - a_prev) + np.sqrt(a_t * (1.0 - a_t) * a_prev)
    return np.sqrt(a_prev / a_t) * x - (a_prev - a_t) * eps / denominator


def sample_pndm(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: PNDM from the noise x.

    Liu et al. 2022, over the model calls of the plan, as diffusers' PNDMScheduler runs
    them. The multistep weights combine raw model outputs, turned into noise predictions
    at the step's own sample (v-prediction). PLMS: 1st order and a pseudo improved Euler
    correction (2 calls) to start, then (3 e_1 - e_2) / 2, (23, -16, 5) / 12 and
    (55, -59, 37, -9) / 24 (eq. 12). PRK: the classical 4-stage Runge-Kutta weights on
    half steps (eq. 13). Deterministic: noise is never drawn from.
    """
    stride = len(plan.alphas_cumprod) // plan.steps
    timesteps = plan.timesteps.astype(np.int64)
    prk_calls = 0 if plan.fields["skip_prk_steps"] else 12
    x = start(x, plan)
    outputs: list[np.ndarray] = []  # e_1, e_2, ...: the model outputs the multistep formulas use
    partial, x_start = 0.0, None
    for i, t in enumerate(timesteps):
        out = denoiser.output(x, t, np.sqrt(plan.alphas_cumprod[t]), np.sqrt(1.0 - plan.alphas_cumprod[t]))
        if i < prk_calls:  # PRK: stages k1..k4 of one Runge-Kutta step over 2 half steps, eq. 13
            stage, t_step = i % 4, timesteps[i // 4 * 4]
            prev = t - (stride // 2 if i % 2 == 0 else 0)
            if stage == 0:
                outputs.append(out)
                x_start, partial = x, out / 6
            elif stage < 3:
                partial = partial + out / 3
            else:
                out, partial = partial + out / 6, 0.0
            x = _transfer(denoiser, x_start, t_step, prev, out, plan)
        elif prk_calls == 0 and i == 1:  # the pseudo improved Euler correction of the first step
            x = _transfer(denoiser, x_start, t + stride, t, (out + outputs[-1]) / 2, plan)
        else:  # PLMS, eq. 12
            outputs = outputs[-3:] + [out]
            if len(outputs) == 1:
                x_start, combined = x, out
            elif len(outputs) == 2:
                combined = (3 * outputs[-1] - outputs[-2]) / 2
            elif len(outputs) == 3:
                combined = (23 * outputs[-1] - 16 * outputs[-2] + 5 * outputs[-3]) / 12
            else:
                combined = (55 * outputs[-1] - 59 * outputs[-2] + 37 * outputs[-3] - 9 * outputs[-4]) / 24
            x = _transfer(denoiser, x, t, t - stride, combined, plan)
        finish(x, i, plan, callback)
    return x.astype(np.float32)
