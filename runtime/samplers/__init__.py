"""Samplers: pure-numpy functions with one signature (k-diffusion style),

    sample_X(denoise, x, cond, alphas_cumprod, timesteps, rng, callback=None) -> x_0

where denoise(x float32 [N, ...], t: int, cond) -> eps [N, ...] already holds the
guidance mix, x is the initial noise x_T, alphas_cumprod float64 [T] comes from
NoiseSchedule.alphas_cumprod(), timesteps int64 [S] from make_timesteps(), and rng is
the only source of randomness. Each returns the final sample, float32 like x.
"""
from __future__ import annotations

from typing import Callable

from ..errors import CfgExportError
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .dpmpp_2m import sample_dpmpp_2m

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp-2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable:
    """Returns the sampler function registered under name, or raises CfgExportError listing the names."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise CfgExportError(f"sampler: got {name!r}, expected one of {', '.join(SAMPLERS)}") from None


__all__ = ["SAMPLERS", "get_sampler", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m"]
