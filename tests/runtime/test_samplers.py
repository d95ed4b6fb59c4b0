"""The numpy samplers against diffusers' own schedulers, run on the same model, timesteps and noise.

The model is a fixed numpy function of (x, t) handed to both loops. Unless a test says
otherwise the diffusers scheduler is given our float64 alphas_cumprod, so what is compared
is the stepping arithmetic alone (test_schedule.py compares the schedules); diffusers then
steps a float32 sample, which is what the tolerances absorb.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm, sample_dpmpp_2m
from cfg_export.runtime.schedule import NoiseSchedule, make_timesteps

T = 1000
SCHEDULES = {
    "linear": NoiseSchedule("linear", T, 1e-4, 0.02),  # Ho et al. 2020
    "scaled_linear": NoiseSchedule("scaled_linear", T, 0.00085, 0.012),  # Stable Diffusion
}
# (spacing, steps, steps_offset): uniform strides, a non-uniform trailing one, linspace
STEPPINGS = [("leading", 1, 0), ("leading", 10, 0), ("leading", 25, 1), ("trailing", 25, 0),
             ("trailing", 30, 0), ("linspace", 10, 0), ("linspace", 25, 0)]
COND = object()  # the samplers must pass cond through untouched
SHAPE = (2, 3, 8, 8)
RTOL = ATOL = 1e-5

# diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array on a torch tensor
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def make_denoise(alphas_cumprod: np.ndarray):
    """Returns denoise(x, t, cond) -> eps: the exact eps of data x_0 ~ N(0.5, 0.5^2) per
    element, plus a nonlinear term that mixes neighbours and depends on t, so that the x_0
    prediction moves with x and t. Checks the call convention the samplers promise."""

    def denoise(x: np.ndarray, t: int, cond) -> np.ndarray:
        assert x.dtype == np.float32 and type(t) is int and cond is COND
        a = alphas_cumprod[t]
        x = x.astype(np.float64)
        gaussian = np.sqrt(1 - a) * (x - np.sqrt(a) * 0.5) / (0.25 * a + 1 - a)
        return (gaussian + 0.2 * np.tanh(np.roll(x, 1, axis=-1) * (1 + t / 500))).astype(np.float32)

    return denoise


def noise(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class RecordingRng:
    """A numpy Generator that keeps every standard_normal draw, to hand the same noise to diffusers."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.draws: list[np.ndarray] = []

    def standard_normal(self, shape):
        z = self.rng.standard_normal(shape)
        self.draws.append(z)
        return z


def scheduler_with(cls, kind: str, alphas_cumprod: np.ndarray | None, **config):
    """Returns a diffusers scheduler of the named training schedule; with our alphas_cumprod
    (float64) in place of its float32 one unless alphas_cumprod is None."""
    schedule = SCHEDULES[kind]
    scheduler = cls(num_train_timesteps=T, beta_schedule=kind, beta_start=schedule.beta_start,
                    beta_end=schedule.beta_end, **config)
    if alphas_cumprod is not None:
        scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod)
    return scheduler


def run_diffusers(scheduler, denoise, x_T: np.ndarray, step_kwargs=lambda i: {}) -> np.ndarray:
    """Returns the final sample of diffusers' loop: model, then scheduler.step, per timestep."""
    x = torch.from_numpy(x_T)
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.from_numpy(denoise(x.numpy(), int(t), COND))
        x = scheduler.step(eps, t, x, **step_kwargs(i)).prev_sample
    return x.numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, rtol: float = RTOL, atol: float = ATOL):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # not a collapse to zero that anything would match
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol)


# --- DDIM -------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing,steps,offset", [s for s in STEPPINGS if s[:2] != ("trailing", 30)
                                                  and s[0] != "linspace"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_ddim_matches_diffusers(kind, spacing, steps, offset, eta):
    alphas_cumprod = SCHEDULES[kind].alphas_cumprod()
    timesteps = make_timesteps(T, steps, spacing, steps_offset=offset)
    # DDIMScheduler steps t -> t - T // steps; here that is the next element of timesteps.
    assert np.array_equal(timesteps[1:], timesteps[:-1] - T // steps)
    denoise, x_T, rng = make_denoise(alphas_cumprod), noise(), RecordingRng(1)

    ours = sample_ddim(denoise, x_T, COND, alphas_cumprod, timesteps, rng, eta=eta)

    scheduler = scheduler_with(DDIMScheduler, kind, alphas_cumprod, clip_sample=False,
                               set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(steps)
    assert np.array_equal(scheduler.timesteps.numpy(), timesteps)
    # our sampler draws no noise at the last step, where sigma_t = 0; diffusers' is multiplied by 0
    assert len(rng.draws) == (steps - 1 if eta > 0 else 0)
    draws = [torch.from_numpy(z.astype(np.float32)) for z in rng.draws] + [torch.zeros(SHAPE)]
    ref = run_diffusers(scheduler, denoise, x_T,
                        lambda i: {"eta": eta, "variance_noise": draws[i] if eta > 0 else None})
    assert_close(ours, ref)


@pytest.mark.parametrize("spacing,steps,offset", [("linspace", 10, 0), ("linspace", 25, 0),
                                                  ("trailing", 30, 0)])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_ddim_on_non_uniform_timesteps(kind, spacing, steps, offset, monkeypatch):
    """Where the stride varies DDIMScheduler (t -> t - T // steps) cannot serve; two peers that
    take custom timesteps can: first-order DPM-Solver++ is DDIM with eta = 0 (Lu et al. 2022,
    and diffusers' docstring), and the DDPM posterior step is DDIM with eta = 1 (Song et al.
    2021, eq. 16)."""
    alphas_cumprod = SCHEDULES[kind].alphas_cumprod()
    timesteps = make_timesteps(T, steps, spacing, steps_offset=offset)
    assert not np.array_equal(timesteps[1:], timesteps[:-1] - T // steps)
    denoise, x_T = make_denoise(alphas_cumprod), noise()

    ours = sample_ddim(denoise, x_T, COND, alphas_cumprod, timesteps, np.random.default_rng(1), eta=0.0)
    scheduler = scheduler_with(DPMSolverMultistepScheduler, kind, alphas_cumprod, solver_order=1,
                               algorithm_type="dpmsolver++", final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    assert_close(ours, run_diffusers(scheduler, denoise, x_T))

    rng = RecordingRng(1)
    ours = sample_ddim(denoise, x_T, COND, alphas_cumprod, timesteps, rng, eta=1.0)
    feed_ddpm_noise(monkeypatch, rng.draws)
    scheduler = scheduler_with(DDPMScheduler, kind, alphas_cumprod, clip_sample=False,
                               variance_type="fixed_small")
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    assert_close(ours, run_diffusers(scheduler, denoise, x_T))


# --- DDPM -------------------------------------------------------------------------------


def feed_ddpm_noise(monkeypatch, draws: list[np.ndarray]) -> list:
    """Makes diffusers' DDPM step take our draws, in order, instead of torch.randn; returns the
    list of shapes it asked for. Its step adds noise whenever t > 0, the last step included
    (times sqrt(1e-20), its clamp of a zero variance): that extra draw gets zeros."""
    calls = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        z = draws[len(calls)] if len(calls) < len(draws) else np.zeros(shape)
        calls.append(tuple(shape))
        return torch.from_numpy(np.asarray(z)).to(dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
    return calls


@pytest.mark.parametrize("spacing,steps,offset", STEPPINGS)
@pytest.mark.parametrize("kind", SCHEDULES)
def test_ddpm_matches_diffusers(kind, spacing, steps, offset, monkeypatch):
    alphas_cumprod = SCHEDULES[kind].alphas_cumprod()
    timesteps = make_timesteps(T, steps, spacing, steps_offset=offset)
    denoise, x_T, rng = make_denoise(alphas_cumprod), noise(), RecordingRng(1)

    ours = sample_ddpm(denoise, x_T, COND, alphas_cumprod, timesteps, rng)

    assert len(rng.draws) == steps - 1  # no noise at the last step
    calls = feed_ddpm_noise(monkeypatch, rng.draws)
    scheduler = scheduler_with(DDPMScheduler, kind, alphas_cumprod, clip_sample=False,
                               variance_type="fixed_small")
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    ref = run_diffusers(scheduler, denoise, x_T)
    assert len(calls) == len(rng.draws) + int(timesteps[-1] > 0)
    assert_close(ours, ref)


# --- DPM-Solver++(2M) -------------------------------------------------------------------


@pytest.mark.parametrize("spacing,steps,offset", STEPPINGS)
@pytest.mark.parametrize("kind", SCHEDULES)
def test_dpmpp_2m_matches_diffusers(kind, spacing, steps, offset):
    alphas_cumprod = SCHEDULES[kind].alphas_cumprod()
    timesteps = make_timesteps(T, steps, spacing, steps_offset=offset)
    denoise, x_T = make_denoise(alphas_cumprod), noise()

    ours = sample_dpmpp_2m(denoise, x_T, COND, alphas_cumprod, timesteps, np.random.default_rng(1))

    scheduler = scheduler_with(DPMSolverMultistepScheduler, kind, alphas_cumprod,
                               algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                               lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    assert_close(ours, run_diffusers(scheduler, denoise, x_T))


# --- End to end: diffusers with its own float32 schedule --------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("kind", SCHEDULES)
def test_samplers_match_diffusers_with_its_own_schedule(kind, name, monkeypatch):
    """Schedule and sampler together against diffusers as users run it: its alphas_cumprod is
    a float32 cumprod, whose ~1e-6 relative error the x_0 prediction at t near T amplifies,
    hence the looser tolerance."""
    alphas_cumprod = SCHEDULES[kind].alphas_cumprod()
    timesteps = make_timesteps(T, 25, "leading")
    denoise, x_T, rng = make_denoise(alphas_cumprod), noise(), RecordingRng(1)
    if name == "ddim":
        ours = sample_ddim(denoise, x_T, COND, alphas_cumprod, timesteps, rng)
        scheduler = scheduler_with(DDIMScheduler, kind, None, clip_sample=False, set_alpha_to_one=True)
        scheduler.set_timesteps(25)
    elif name == "ddpm":
        ours = sample_ddpm(denoise, x_T, COND, alphas_cumprod, timesteps, rng)
        feed_ddpm_noise(monkeypatch, rng.draws)
        scheduler = scheduler_with(DDPMScheduler, kind, None, clip_sample=False)
        scheduler.set_timesteps(timesteps=timesteps.tolist())
    else:
        ours = sample_dpmpp_2m(denoise, x_T, COND, alphas_cumprod, timesteps, rng)
        scheduler = scheduler_with(DPMSolverMultistepScheduler, kind, None)
        scheduler.set_timesteps(timesteps=timesteps.tolist())
    assert_close(ours, run_diffusers(scheduler, denoise, x_T), rtol=0, atol=5e-5)


# --- Contract ---------------------------------------------------------------------------


ALPHAS_CUMPROD = SCHEDULES["linear"].alphas_cumprod()
TIMESTEPS = make_timesteps(T, 10, "leading")


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("shape", [(2, 3, 16), (2, 5, 4), (3, 7)], ids=["N,C,L", "N,L,D", "N,D"])
def test_output_is_float32_of_x_shape(name, shape):
    x_T = noise(0, shape).astype(np.float64)  # float64 in, float32 out
    out = get_sampler(name)(make_denoise(ALPHAS_CUMPROD), x_T, COND, ALPHAS_CUMPROD, TIMESTEPS,
                            np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == shape and np.all(np.isfinite(out))


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_sees_every_step(name):
    seen = []
    out = get_sampler(name)(make_denoise(ALPHAS_CUMPROD), noise(), COND, ALPHAS_CUMPROD, TIMESTEPS,
                            np.random.default_rng(0), lambda i, t, x: seen.append((i, t, x)))
    assert [(i, t) for i, t, _ in seen] == list(enumerate(TIMESTEPS.tolist()))
    assert all(x.dtype == np.float32 and x.shape == SHAPE for _, _, x in seen)
    np.testing.assert_array_equal(seen[-1][2], out)


@pytest.mark.parametrize("sampler,kwargs", [(sample_ddpm, {}), (sample_ddim, {"eta": 1.0})])
def test_seed_decides_the_noise(sampler, kwargs):
    def run(seed):
        return sampler(make_denoise(ALPHAS_CUMPROD), noise(), COND, ALPHAS_CUMPROD, TIMESTEPS,
                       np.random.default_rng(seed), **kwargs)

    np.testing.assert_array_equal(run(7), run(7))
    assert np.abs(run(7) - run(8)).max() > 1e-3


@pytest.mark.parametrize("sampler,kwargs", [(sample_dpmpp_2m, {}), (sample_ddim, {"eta": 0.0})])
def test_deterministic_samplers_leave_rng_alone(sampler, kwargs):
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    sampler(make_denoise(ALPHAS_CUMPROD), noise(), COND, ALPHAS_CUMPROD, TIMESTEPS, rng, **kwargs)
    assert rng.bit_generator.state == before


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", SAMPLERS)
def test_nan_or_inf_names_sampler_and_step(name):
    denoise = make_denoise(ALPHAS_CUMPROD)
    bad_t = int(TIMESTEPS[3])

    def exploding(x, t, cond):
        eps = denoise(x, t, cond)
        return np.full_like(eps, np.inf) if t == bad_t else eps

    expected = f"{name}: NaN or Inf in the sample at step 4/10 (t={bad_t}), made by the sampler's update"
    with pytest.raises(CfgExportError, match=re.escape(expected)):
        get_sampler(name)(exploding, noise(), COND, ALPHAS_CUMPROD, TIMESTEPS, np.random.default_rng(0))


def test_samplers_never_import_torch():
    code = "import sys, cfg_export.runtime.samplers; assert 'torch' not in sys.modules, 'runtime.samplers imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_registry_and_unknown_sampler():
    assert SAMPLERS == {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp-2m": sample_dpmpp_2m}
    assert get_sampler("dpmpp-2m") is sample_dpmpp_2m
    with pytest.raises(CfgExportError, match=r"sampler: got 'euler', expected one of ddpm, ddim, dpmpp-2m"):
        get_sampler("euler")


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_eta_out_of_range(eta):
    with pytest.raises(CfgExportError, match=rf"ddim: eta must be in \[0, 1\].*got {eta}"):
        sample_ddim(make_denoise(ALPHAS_CUMPROD), noise(), COND, ALPHAS_CUMPROD, TIMESTEPS,
                    np.random.default_rng(0), eta=eta)


@pytest.mark.parametrize("timesteps", [TIMESTEPS[::-1], np.array([1000, 500]), np.array([], dtype=np.int64),
                                       np.array([900.0, 100.0])], ids=["increasing", "beyond T-1", "empty", "float"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_bad_timesteps(name, timesteps):
    with pytest.raises(CfgExportError, match=rf"{name}: timesteps must be .* in 0\.\.999, got .*make_timesteps"):
        get_sampler(name)(make_denoise(ALPHAS_CUMPROD), noise(), COND, ALPHAS_CUMPROD, timesteps,
                          np.random.default_rng(0))


@pytest.mark.parametrize("name", SAMPLERS)
def test_eps_of_the_wrong_shape(name):
    def denoise(x, t, cond):
        return x[:, :1]

    with pytest.raises(CfgExportError, match=re.escape(
            f"{name}: denoise returned eps of shape (2, 1, 8, 8) at t={TIMESTEPS[0]}, expected x's shape (2, 3, 8, 8)")):
        get_sampler(name)(denoise, noise(), COND, ALPHAS_CUMPROD, TIMESTEPS, np.random.default_rng(0))
