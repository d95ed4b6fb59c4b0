"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (ICLR 2021), eq. 12."""
from __future__ import annotations

import numpy as np

from ..errors import CfgExportError
from ..schedule import make_timesteps
from .config import SchedulerConfig
from .core import Callback, Denoiser, Noise, Plan, clip_x0, draw, finish, start


def plan_ddim(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """DDIMScheduler.set_timesteps: `steps` timesteps by timestep_spacing and steps_offset."""
    f = config.fields
    timesteps = make_timesteps(f["num_train_timesteps"], steps, f["timestep_spacing"], f["steps_offset"])
    return Plan(config.class_name, timesteps.astype(np.float64), np.empty(0), f,
                alphas_cumprod=config.schedule().alphas_cumprod(), sampler="ddim", steps=steps)


def sample_ddim(denoiser: Denoiser, x: np.ndarray, plan: Plan, noise: Noise | None = None,
                callback: Callback | None = None, *, eta: float = 0.0) -> np.ndarray:
    """Returns the final sample, float32 [N, ...] like x: DDIM from the noise x.

    Song et al. 2021, eq. 12, stepping t -> t - T // S as diffusers' DDIMScheduler does
    (whatever the spacing), alpha 1 after the last step (set_alpha_to_one) or
    alphas_cumprod[0]. eta = 0 is deterministic DDIM; eta = 1 the DDPM posterior variance
    (eq. 16), drawn from `noise` at every step.
    """
    if not 0.0 <= eta <= 1.0:
        raise CfgExportError(f"ddim: eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM noise), got {eta}")
    f, ac = plan.fields, plan.alphas_cumprod
    final_alpha = 1.0 if f["set_alpha_to_one"] else ac[0]
    stride = len(ac) // plan.steps
    x = start(x, plan)
    for i, t in enumerate(plan.timesteps.astype(np.int64)):
        # Notation (variable -> Song et al. 2021; their alpha is alphas_cumprod here):
        # alpha_t, alpha_prev -> alpha_t, alpha_{t-1};  eps -> eps_theta(x_t);  x0 -> f_theta(x_t)

        # 1. alpha_t, and alpha_{t-1} of t - T // S (the final alpha past the start)
        alpha_t = ac[t]
        alpha_prev = ac[t - stride] if t - stride >= 0 else final_alpha

        # 2. predicted x_0 and eps, eq. 12; x_0 clipped or thresholded as the config says
        x0, eps = denoiser(x, t, np.sqrt(alpha_t), np.sqrt(1.0 - alpha_t))
        x0 = clip_x0(x0, f)

        # 3. sigma_t(eta) = eta sqrt((1 - alpha_{t-1}) / (1 - alpha_t)) sqrt(1 - alpha_t / alpha_{t-1}), eq. 16
        std = eta * np.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev))

        # 4. x_{t-1} = sqrt(alpha_{t-1}) x_0 + sqrt(1 - alpha_{t-1} - sigma_t^2) eps + sigma_t z, eq. 12
        x = np.sqrt(alpha_prev) * x0 + np.sqrt(1.0 - alpha_prev - std**2) * eps
        if eta > 0:
            x = x + std * draw(noise, x.shape)
        finish(x, i, plan, callback)
    return x.astype(np.float32)
