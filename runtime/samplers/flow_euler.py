"""Flow-matching Euler: the Euler method on the flow ODE dx/ds = v(x, s) of Lipman et al.
2023, "Flow Matching for Generative Modeling", and Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis" (Stable Diffusion 3), with its
shifted noise levels (sec. 5.3.2); x_s = (1 - s) x_0 + s eps, velocity v = eps - x_0."""
from __future__ import annotations

import numpy as np

from ..errors import CfgExportError
from ..schedule import calculate_shift, exponential_sigmas, karras_sigmas, shift_sigmas, time_shift
from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, draw, finish, start


def plan_flow_euler(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """FlowMatchEulerDiscreteScheduler.set_timesteps: `steps` noise levels evenly spaced
    from the scheduler's sigma_max down to its sigma_min (those of the training timesteps
    T..1, shifted when the shift is fixed), shifted by `shift`, or by mu of the image's
    token count (use_dynamic_shifting), stretched to end at shift_terminal, made Karras or
    exponential, inverted (invert_sigmas); timesteps s T (float32, fractional); a final 0."""
    f = config.fields
    T = f["num_train_timesteps"]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise CfgExportError(f"steps: got {steps}, expected an integer >= 1")
    # the first and last training noise levels, in float32 as diffusers keeps them
    s_max, s_min = np.float32(1), np.float32(1) / np.float32(T)
    if not f["use_dynamic_shifting"]:
        shift, shift_1 = np.float32(f["shift"]), np.float32(f["shift"] - 1)
        s_max, s_min = (shift * s / (np.float32(1) + shift_1 * s) for s in (s_max, s_min))
    sigmas = np.linspace(float(s_max) * T, float(s_min) * T, steps) / T
    if f["use_dynamic_shifting"]:
        if image_seq_len is None:
            raise CfgExportError("FlowMatchEulerDiscreteScheduler use_dynamic_shifting=True shifts by the image's "
                                 "token count; the model's manifest does not give its patch size")
        mu = calculate_shift(image_seq_len, f["base_image_seq_len"], f["max_image_seq_len"], f["base_shift"],
                             f["max_shift"])
        sigmas = time_shift(mu, sigmas, f["time_shift_type"])
    else:
        sigmas = shift_sigmas(sigmas, f["shift"])
    if f["shift_terminal"]:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - f["shift_terminal"]))
    lo, hi = config.sigma_bound("sigma_min"), config.sigma_bound("sigma_max")
    lo, hi = sigmas[-1] if lo is None else lo, sigmas[0] if hi is None else hi
    if f["use_karras_sigmas"]:
        sigmas = karras_sigmas(lo, hi, steps)
    elif f["use_exponential_sigmas"]:
        sigmas = exponential_sigmas(lo, hi, steps)
    sigmas = sigmas.astype(np.float32).astype(np.float64)
    if f["invert_sigmas"]:
        sigmas = (np.float32(1) - sigmas.astype(np.float32)).astype(np.float64)
    timesteps = (sigmas.astype(np.float32) * np.float32(T)).astype(np.float64)
    final = 1.0 if f["invert_sigmas"] else 0.0
    return Plan(config.class_name, timesteps, np.append(sigmas, final), f, sampler="flow-euler", steps=steps)


def sample_flow_euler(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                      callback: Callback | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: flow-matching Euler from the noise x.

    x <- x + (s_{i+1} - s_i) v(x, s_i) (Esser et al. 2024, eq. 1 integrated by Euler), as
    diffusers' FlowMatchEulerDiscreteScheduler; with stochastic_sampling the step instead
    re-noises the x_0 prediction to the next level, x <- (1 - s_{i+1}) x_0 + s_{i+1} z,
    drawing z from `noise`.
    """
    stochastic = plan.fields["stochastic_sampling"]
    x = start(x, plan)
    for i, t in enumerate(plan.timesteps):
        s, s_next = plan.sigmas[i], plan.sigmas[i + 1]
        x0, eps = denoiser(x, t, 1.0 - s, s)
        if stochastic:
            x = (1.0 - s_next) * x0 + s_next * draw(noise, x.shape)
        else:
            x = x + (s_next - s) * (eps - x0)
        finish(x, i, plan, callback)
    return x.astype(np.float32)
