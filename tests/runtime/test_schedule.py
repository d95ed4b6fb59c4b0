"""NoiseSchedule and make_timesteps against diffusers' schedulers, and their error messages."""
from __future__ import annotations

import re

import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.schedule import BetaSchedule, NoiseSchedule, Spacing, make_timesteps

# (kind, beta_start, beta_end, rtol): diffusers keeps betas and their cumprod in float32.
# For the cosine schedule the last betas are near 0.999, where 1 - beta in float32 keeps
# few digits (relative error up to ~1.3e-5 seen at the tail); the others agree to ~1e-6.
SCHEDULES = [("linear", 1e-4, 0.02, 3e-6), ("scaled_linear", 0.00085, 0.012, 3e-6),
             ("squaredcos_cap_v2", 1e-4, 0.02, 3e-5)]


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("kind,beta_start,beta_end,rtol", SCHEDULES)
def test_alphas_cumprod_match_diffusers(kind, beta_start, beta_end, rtol, T):
    schedule = NoiseSchedule(kind, T, beta_start, beta_end)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=kind, beta_start=beta_start, beta_end=beta_end)
    alphas_cumprod = schedule.alphas_cumprod()
    assert alphas_cumprod.dtype == np.float64 and alphas_cumprod.shape == (T,)
    np.testing.assert_allclose(schedule.betas(), ref.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=rtol, atol=0)


def test_linear_schedule_from_its_definition():
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 over T = 1000, alpha_bar_t = prod (1 - beta_s)."""
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    np.testing.assert_allclose(NoiseSchedule().alphas_cumprod(), np.cumprod(1 - betas), rtol=1e-12)


def test_schedule_round_trips_through_a_dict():
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    d = schedule.to_dict()
    assert d == {"kind": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    assert NoiseSchedule.from_dict(d) == schedule and schedule.kind is BetaSchedule.SCALED_LINEAR


STEPS = [1, 3, 7, 10, 25, 50, 999, 1000]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timesteps_match_ddim_scheduler(spacing, offset, steps):
    if offset and steps == 1000:
        pytest.skip("leading with steps_offset=1 and 1000 steps reaches t=1000: see test_offset_beyond_T")
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    timesteps = make_timesteps(1000, steps, spacing, steps_offset=offset)
    assert timesteps.dtype == np.int64
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("T", [1000, 50])
def test_timesteps_for_every_step_count(spacing, T):
    """Every steps in 1..T gives `steps` strictly decreasing timesteps in 0..T-1."""
    for steps in range(1, T + 1):
        timesteps = make_timesteps(T, steps, spacing)
        assert timesteps.shape == (steps,), (steps, timesteps)
        assert np.all(np.diff(timesteps) < 0) and 0 <= timesteps[-1] and timesteps[0] <= T - 1


@pytest.mark.parametrize("T", [1000, 50])
def test_trailing_for_every_step_count(T):
    """np.arange(T, 0, -T / steps) yields steps + 1 values for some counts (61, 103, ... of
    T = 1000): diffusers then steps to t = -1. Those counts are refused; the others match."""
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    refused = []
    for steps in range(1, T + 1):
        ref.set_timesteps(steps)
        if ref.timesteps.min() < 0:
            with pytest.raises(CfgExportError, match=f"{steps} trailing steps of {T} training timesteps give "
                                                     "diffusers one timestep too many"):
                make_timesteps(T, steps, "trailing")
            refused.append(steps)
            continue
        np.testing.assert_array_equal(make_timesteps(T, steps, "trailing"), ref.timesteps.numpy())
    assert (T != 1000) or refused[:3] == [61, 103, 121]


def test_offset_beyond_T():
    with pytest.raises(CfgExportError, match="steps_offset"):
        make_timesteps(1000, 1000, "leading", steps_offset=1)


@pytest.mark.parametrize("steps", [0, 1001])
def test_steps_out_of_range(steps):
    with pytest.raises(CfgExportError, match=re.escape(f"steps: got {steps}, expected 1..1000")):
        make_timesteps(1000, steps, "leading")


def test_unknown_spacing():
    with pytest.raises(CfgExportError, match=re.escape(
            "timestep spacing: got 'uniform', expected one of leading, trailing, linspace")):
        make_timesteps(1000, 10, "uniform")
    assert [s.value for s in Spacing] == ["leading", "trailing", "linspace"]


def test_unknown_schedule_kind():
    with pytest.raises(CfgExportError, match=re.escape(
            "schedule kind: got 'cosine', expected one of linear, scaled_linear, squaredcos_cap_v2")):
        NoiseSchedule("cosine")


def test_too_few_training_timesteps():
    with pytest.raises(CfgExportError, match=re.escape("schedule num_train_timesteps: got 1, expected an integer in 2..100000")):
        NoiseSchedule("linear", 1)


def test_unknown_keys_in_a_schedule_dict():
    with pytest.raises(CfgExportError, match=re.escape("schedule: unknown key 'beta_max'; expected keys: beta_end, beta_start, kind")):
        NoiseSchedule.from_dict({"kind": "linear", "beta_max": 0.02})
