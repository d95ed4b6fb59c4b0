"""Samplers: pure-numpy functions, one per diffusers scheduler, with one signature
(k-diffusion style),

    sample_X(denoiser, x, plan, noise=None, callback=None) -> final sample

where denoiser (core.Denoiser) makes one model call and returns the x_0 and noise
predictions, x is standard normal noise [N, ...], plan (core.Plan, from plan_X(config,
steps)) holds what the scheduler's set_timesteps computes, and noise is where ancestral
and SDE samplers draw (a numpy Generator, or any object with standard_normal(shape)).
Each returns the final sample, float32 like x, and reproduces the diffusers scheduler of
the same name for every config field it accepts (config.resolve_scheduler refuses the rest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import CfgExportError
from .config import (CLASSES, SAMPLER_NAMES, SchedulerConfig, check_model, default_scheduler,
                     resolve_scheduler)
from .core import Callback, Denoiser, Noise, Plan
from .ddim import plan_ddim, sample_ddim
from .ddpm import plan_ddpm, sample_ddpm
from .dpmpp import plan_dpmpp, sample_dpmpp
from .euler import plan_euler, sample_euler
from .euler_ancestral import plan_euler_ancestral, sample_euler_ancestral
from .flow_euler import plan_flow_euler, sample_flow_euler
from .heun import plan_heun, sample_heun
from .pndm import plan_pndm, sample_pndm
from .unipc import plan_unipc, sample_unipc


@dataclass(frozen=True)
class Sampler:
    """The plan and sample functions that follow one diffusers scheduler class."""

    plan: Callable[..., Plan]
    sample: Callable[..., np.ndarray]


SAMPLERS: dict[str, Sampler] = {
    "DDIMScheduler": Sampler(plan_ddim, sample_ddim),
    "DDPMScheduler": Sampler(plan_ddpm, sample_ddpm),
    "PNDMScheduler": Sampler(plan_pndm, sample_pndm),
    "EulerDiscreteScheduler": Sampler(plan_euler, sample_euler),
    "EulerAncestralDiscreteScheduler": Sampler(plan_euler_ancestral, sample_euler_ancestral),
    "HeunDiscreteScheduler": Sampler(plan_heun, sample_heun),
    "DPMSolverMultistepScheduler": Sampler(plan_dpmpp, sample_dpmpp),
    "UniPCMultistepScheduler": Sampler(plan_unipc, sample_unipc),
    "FlowMatchEulerDiscreteScheduler": Sampler(plan_flow_euler, sample_flow_euler),
}
assert set(SAMPLERS) == set(CLASSES)
SAMPLER_CHOICES = tuple(SAMPLER_NAMES)  # the names --sampler takes


def plan_sampling(config: SchedulerConfig, steps: int, image_seq_len: int | None = None) -> Plan:
    """Returns the plan of `steps` sampling steps of the scheduler config (its set_timesteps)."""
    return SAMPLERS[config.class_name].plan(config, steps, image_seq_len)


def run_plan(plan: Plan, denoiser: Denoiser, x: np.ndarray, noise: Noise | None = None,
             callback: Callback | None = None, *, eta: float | None = None) -> np.ndarray:
    """Returns the final sample, float32 [N, ...]: the plan's sampler run from the noise x.
    eta: DDIM's (DDIMScheduler only)."""
    sample = SAMPLERS[plan.scheduler].sample
    if eta is None:
        return sample(denoiser, x, plan, noise, callback)
    if plan.scheduler != "DDIMScheduler":
        raise CfgExportError(f"eta applies to the ddim sampler only (DDIMScheduler), not {plan.sampler} "
                             f"({plan.scheduler})")
    return sample(denoiser, x, plan, noise, callback, eta=float(eta))


__all__ = ["SAMPLERS", "SAMPLER_CHOICES", "Sampler", "Denoiser", "Plan", "Noise", "SchedulerConfig",
           "resolve_scheduler", "default_scheduler", "check_model", "plan_sampling", "run_plan",
           "sample_ddim", "sample_ddpm", "sample_pndm", "sample_euler", "sample_euler_ancestral", "sample_heun",
           "sample_dpmpp", "sample_unipc", "sample_flow_euler"]
