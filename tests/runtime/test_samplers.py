"""Every sampler against the diffusers scheduler of the same name, run in its own loop
(scale_model_input, model, step) on the same model function, the same initial noise and,
for the ancestral and SDE samplers, the same noise: diffusers' own generator, handed to
our samplers through their replaceable noise source.

The model is a fixed numpy function of (sample, timestep): the exact x_0 posterior mean of
data x_0 ~ N(0.5, 0.5^2) plus a nonlinear term that mixes neighbours and depends on t,
returned as the prediction type of the config. Final samples must agree to 1e-5 of their
largest value; diffusers keeps its schedule (alphas_cumprod, sigmas) in float32, which is
what the difference is made of.
"""
from __future__ import annotations

import inspect
import re
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from cfg_export.runtime.errors import CfgExportError  # noqa: E402
from cfg_export.runtime.samplers import Denoiser, plan_sampling, resolve_scheduler, run_plan  # noqa: E402
from cfg_export.runtime.samplers.config import CLASSES  # noqa: E402
from cfg_export.runtime.schedule import NoiseSchedule  # noqa: E402

TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|
SHAPE = (2, 3, 8, 8)
SD = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "original_sample": "x0", "v_prediction": "v"}

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def vp_model(prediction: str, alphas_cumprod: np.ndarray):
    """model(x, t) -> the output of the given prediction type, float32: x_0 is the posterior
    mean of N(0.5, 0.5^2) data at the noise level of (fractional) timestep t, plus 0.1 tanh
    of the shifted sample; eps and v follow from x_t = sqrt(a) x_0 + sqrt(1 - a) eps."""

    def model(x: np.ndarray, t: float) -> np.ndarray:
        x = x.astype(np.float64)
        a = float(np.interp(t, np.arange(len(alphas_cumprod)), alphas_cumprod))
        x0 = 0.5 + np.sqrt(a) * 0.25 * (x - np.sqrt(a) * 0.5) / (0.25 * a + 1 - a)
        x0 = x0 + 0.1 * np.tanh(np.roll(x, 1, axis=-1) * (1 + abs(t) / 500))
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        out = {"epsilon": eps, "sample": x0, "original_sample": x0,
               "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction]
        return out.astype(np.float32)

    return model


def flow_model(x: np.ndarray, t: float) -> np.ndarray:
    """The flow-matching velocity eps - x_0 at s = t / 1000, with x_0 as in vp_model."""
    s = t / 1000.0
    x = x.astype(np.float64)
    x0 = 0.5 + (1 - s) * 0.25 * (x - (1 - s) * 0.5) / ((1 - s) ** 2 * 0.25 + s**2)
    x0 = x0 + 0.1 * np.tanh(np.roll(x, 1, axis=-1) * (1 + s))
    eps = (x - (1 - s) * x0) / max(s, 1e-3)
    return (eps - x0).astype(np.float32)


class TorchNoise:
    """A noise source that draws what diffusers' schedulers draw: torch.randn from a seeded
    CPU generator, in the same order and dtype."""

    def __init__(self, seed: int, dtype=torch.float32):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def standard_normal(self, shape) -> np.ndarray:
        return torch.randn(tuple(shape), generator=self.generator, dtype=self.dtype).numpy()


# the dtype of the noise each scheduler draws when fed float64 samples (diffusers_loop):
# the model output's, except DPM-Solver's SDE and the flow-matching scheduler (float32)
NOISE_DTYPE = {"DPMSolverMultistepScheduler": torch.float32, "FlowMatchEulerDiscreteScheduler": torch.float32}


def diffusers_loop(scheduler, model, x_T: torch.Tensor, steps: int, seed: int, set_kwargs=None, eta=None,
                   patch=None):
    """The loop of diffusers' pipelines: init_noise_sigma, scale_model_input, model, step
    (with the seeded generator, and eta for DDIM); returns the final sample. The sample and
    the model outputs are float64 tensors: the schedulers that do not cast the sample to
    float32 themselves (DDIM, DDPM, PNDM, Heun, UniPC) then step in float64 too, so that
    their float32 rounding at large noise levels (|x| ~ 60 at sigma 14.6) stays out of the
    comparison; their schedule (alphas_cumprod, sigmas) stays float32 unless `patch` (called
    after set_timesteps) replaces it."""
    scheduler.set_timesteps(steps, **(set_kwargs or {}))
    if patch is not None:
        patch(scheduler)
    generator = torch.Generator().manual_seed(seed)
    accepts = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if "generator" in accepts else {}
    if eta is not None:
        kwargs["eta"] = eta
    x = x_T.double() * getattr(scheduler, "init_noise_sigma", 1.0)  # the flow-matching scheduler has neither
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            out = model(scale(x, t).numpy(), float(t))
            x = scheduler.step(torch.from_numpy(out.astype(np.float64)), t, x, **kwargs).prev_sample
    return x.numpy().astype(np.float32)


def compare(config: dict, fields: dict, steps: int, sampler: str | None = None, eta: float | None = None,
            seed: int = 7, float64_schedule: bool = False):
    """Runs ours and diffusers' (from_config of `config` with `fields`); returns
    (ours, theirs, plan, scheduler). float64_schedule: diffusers gets our float64 schedule
    (DDIM its alphas_cumprod, the others their sigmas), so that only the stepping is
    compared (the schedules are compared on their own, to float32 precision)."""
    resolved = resolve_scheduler(config, sampler, fields)
    scheduler = getattr(diffusers, resolved.class_name).from_config(config, **fields)
    plan = plan_sampling(resolved, steps)
    if resolved.class_name == "DDIMScheduler" and float64_schedule:
        scheduler.alphas_cumprod = torch.from_numpy(resolved.schedule().alphas_cumprod())
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if resolved.fields[
            "set_alpha_to_one"] else scheduler.alphas_cumprod[0]

    def patch(s):
        if len(plan.sigmas):
            # diffusers' float32 sigmas: sqrt((1 - a) / a) of float32 a near 1 keeps ~eps32 / (2 (1 - a)),
            # up to ~3.5e-5 relative at the first training timestep of Stable Diffusion's schedule
            np.testing.assert_allclose(plan.sigmas, s.sigmas.numpy(), rtol=5e-5, atol=1e-9)
            if float64_schedule:
                s.sigmas = torch.from_numpy(plan.sigmas)

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    if resolved.is_flow:
        model, prediction = flow_model, "flow"
    else:
        pred = resolved.fields["prediction_type"]
        model, prediction = vp_model(pred, resolved.schedule().alphas_cumprod()), PREDICTIONS[pred]
    theirs = diffusers_loop(scheduler, model, x_T, steps, seed, eta=eta, patch=patch)
    denoiser = Denoiser(lambda x, t, cond, sigma: model(x, t), None, prediction)
    noise = TorchNoise(seed, NOISE_DTYPE.get(resolved.class_name, torch.float64))
    ours = run_plan(plan, denoiser, x_T.numpy(), noise, eta=eta)
    return ours, theirs, plan, scheduler


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.abs(theirs).max() > 0.1  # not a collapse to zero that anything would match
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


PNDM_SD15 = {"_class_name": "PNDMScheduler", **SD, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "clip_sample": False, "trained_betas": None}
DDIM_LINEAR = {"_class_name": "DDIMScheduler", **LINEAR, "clip_sample": False}
V = {"prediction_type": "v_prediction"}
ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}

# (id, scheduler class the config is switched to, config fields)
CASES = [
    ("ddim", "DDIMScheduler", {}),
    ("ddim-trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("ddim-linspace", "DDIMScheduler", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    ("ddim-v", "DDIMScheduler", V),
    ("ddim-x0", "DDIMScheduler", {"prediction_type": "sample"}),
    ("ddim-clip", "DDIMScheduler", {"clip_sample": True, "clip_sample_range": 0.8}),
    ("ddim-threshold", "DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                         "sample_max_value": 1.5}),
    ("ddim-zero-snr", "DDIMScheduler", ZERO_SNR),
    ("ddim-trained-betas", "DDIMScheduler", {"trained_betas": list(np.linspace(2e-4, 0.03, 1000))}),
    ("ddim-cosine", "DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "steps_offset": 0}),
    ("ddpm", "DDPMScheduler", {}),
    ("ddpm-fixed-large", "DDPMScheduler", {"variance_type": "fixed_large", "timestep_spacing": "trailing"}),
    ("ddpm-fixed-small-log", "DDPMScheduler", {"variance_type": "fixed_small_log"}),
    ("ddpm-clip-v", "DDPMScheduler", {"clip_sample": True, **V}),
    ("ddpm-threshold", "DDPMScheduler", {"thresholding": True, "timestep_spacing": "linspace"}),
    ("pndm-plms", "PNDMScheduler", {}),
    ("pndm-prk", "PNDMScheduler", {"skip_prk_steps": False}),
    ("pndm-v", "PNDMScheduler", V),
    ("pndm-trailing-alpha-one", "PNDMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ("pndm-prk-linspace", "PNDMScheduler", {"timestep_spacing": "linspace", "skip_prk_steps": False}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("euler-linspace", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("euler-trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("euler-karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("euler-karras-bounds", "EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 0.05,
                                                       "sigma_max": 10.0}),
    ("euler-exponential", "EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("euler-sigma-min", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}),
    ("euler-v", "EulerDiscreteScheduler", V),
    ("euler-v-continuous", "EulerDiscreteScheduler", {**V, "timestep_type": "continuous"}),
    ("euler-x0", "EulerDiscreteScheduler", {"prediction_type": "sample"}),
    ("euler-zero-snr", "EulerDiscreteScheduler", ZERO_SNR),
    ("euler-ancestral", "EulerAncestralDiscreteScheduler", {}),
    ("euler-ancestral-trailing-v", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing", **V}),
    ("euler-ancestral-zero-snr", "EulerAncestralDiscreteScheduler", ZERO_SNR),
    ("heun", "HeunDiscreteScheduler", {}),
    ("heun-karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("heun-clip-x0", "HeunDiscreteScheduler", {"clip_sample": True, "prediction_type": "sample"}),
    ("heun-v-trailing", "HeunDiscreteScheduler", {**V, "timestep_spacing": "trailing"}),
    ("dpmpp-2m", "DPMSolverMultistepScheduler", {}),
    ("dpmpp-2m-karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("dpmpp-2m-sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp-2m-sde-karras", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    ("dpmpp-2m-heun", "DPMSolverMultistepScheduler", {"solver_type": "heun"}),
    ("dpmpp-2m-sde-heun", "DPMSolverMultistepScheduler", {"solver_type": "heun", "algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp-3m", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("dpmpp-3m-sde", "DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    ("dpmpp-1", "DPMSolverMultistepScheduler", {"solver_order": 1}),
    ("dpmpp-leading", "DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}),
    ("dpmpp-trailing", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("dpmpp-sigma-min", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp-no-lower-order-final", "DPMSolverMultistepScheduler", {"lower_order_final": False,
                                                                   "final_sigmas_type": "sigma_min"}),
    ("dpmpp-euler-at-final", "DPMSolverMultistepScheduler", {"euler_at_final": True,
                                                             "final_sigmas_type": "sigma_min"}),
    ("dpmpp-lu-lambdas", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("dpmpp-lambda-min-clipped", "DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1}),
    ("dpmpp-threshold", "DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.2}),
    ("dpmpp-v", "DPMSolverMultistepScheduler", V),
    ("dpmpp-x0", "DPMSolverMultistepScheduler", {"prediction_type": "sample"}),
    ("dpmpp-zero-snr", "DPMSolverMultistepScheduler", ZERO_SNR),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("unipc-karras", "UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    ("unipc-karras-sigma-min", "UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                                           "sigma_min": 0.05}),
    ("unipc-bh1", "UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc-3", "UniPCMultistepScheduler", {"solver_order": 3}),
    ("unipc-eps-3", "UniPCMultistepScheduler", {"predict_x0": False, "solver_order": 3,
                                                "final_sigmas_type": "sigma_min"}),
    ("unipc-disable-corrector", "UniPCMultistepScheduler", {"disable_corrector": [0, 2]}),
    ("unipc-no-lower-order-final", "UniPCMultistepScheduler", {"lower_order_final": False,
                                                               "final_sigmas_type": "sigma_min"}),
    ("unipc-threshold-v", "UniPCMultistepScheduler", {"thresholding": True, **V}),
    ("unipc-leading-offset", "UniPCMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("unipc-zero-snr", "UniPCMultistepScheduler", ZERO_SNR),
]
SAMPLER_OF = {name: cls.sampler for name, cls in CLASSES.items()}
# Cases where diffusers' float32 schedule moves the result by more than 1e-5, so that it gets
# ours (float64): the cosine schedule's last betas are near 0.999, where float32 1 - beta keeps
# few digits (alphas_cumprod off by up to ~1e-5); Heun on clipped x_0 predictions turns the
# ~4e-7 relative error of diffusers' largest sigma into ~2e-5 of the result.
FLOAT64_SCHEDULE = {"ddim-cosine", "heun-clip-x0"}


def sampler_name(cls: str, fields: dict) -> str:
    if cls == "DPMSolverMultistepScheduler":
        return "dpmpp-2m-sde" if fields.get("algorithm_type") == "sde-dpmsolver++" else "dpmpp-2m"
    return SAMPLER_OF[cls]


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sampler_matches_diffusers(case, steps):
    name, cls, fields = case
    base = DDIM_LINEAR if "cosine" in name or "trained" in name else PNDM_SD15
    ours, theirs, plan, scheduler = compare(base, fields, steps, sampler_name(cls, fields),
                                            float64_schedule=name in FLOAT64_SCHEDULE)
    timesteps = scheduler.timesteps.numpy().astype(np.float64)
    if cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler") and (
            fields.get("use_karras_sigmas") or fields.get("use_exponential_sigmas")
            or fields.get("timestep_type") == "continuous"):
        # fractional timesteps from diffusers' float32 sigmas: they agree to ~1e-3 of a step
        np.testing.assert_allclose(plan.timesteps, timesteps, rtol=0, atol=2e-3)
    else:
        np.testing.assert_array_equal(plan.timesteps, timesteps)
    assert relative_error(ours, theirs) < TOLERANCE


@pytest.mark.parametrize("steps", [16, 25])
@pytest.mark.parametrize("fields", [{}, {"solver_order": 3}, {"solver_order": 3, "lower_order_final": False,
                                                               "final_sigmas_type": "sigma_min"}],
                         ids=["2m", "3m", "3m-no-lower-order-final"])
@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_multistep_solvers_with_15_steps_or_more(cls, fields, steps):
    """From 15 steps DPM-Solver keeps its order to the end (lower_order_final applies below 15)."""
    ours, theirs, _, _ = compare(PNDM_SD15, fields, steps, SAMPLER_OF[cls])
    assert relative_error(ours, theirs) < TOLERANCE


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_draws_diffusers_noise(eta):
    """DDIM with eta > 0 draws at every step, the last included, as diffusers' DDIMScheduler."""
    ours, theirs, _, _ = compare(PNDM_SD15, {}, 6, "ddim", eta=eta)
    assert relative_error(ours, theirs) < TOLERANCE


# --- flow matching -------------------------------------------------------------------------

FLOW_CASES = [
    ("plain", {}), ("shift-3", {"shift": 3.0}), ("shift-3.1", {"shift": 3.1}),
    ("dynamic", {"use_dynamic_shifting": True}),
    ("dynamic-linear", {"use_dynamic_shifting": True, "time_shift_type": "linear", "max_shift": 1.16}),
    ("stochastic", {"shift": 3.0, "stochastic_sampling": True}),
    ("shift-terminal", {"shift": 3.0, "shift_terminal": 0.02}),
    ("karras", {"shift": 3.0, "use_karras_sigmas": True}),
    ("exponential", {"shift": 3.0, "use_exponential_sigmas": True}),
    ("inverted", {"shift": 2.0, "invert_sigmas": True}),
]


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("case", FLOW_CASES, ids=[c[0] for c in FLOW_CASES])
def test_flow_euler_matches_flow_match_euler_discrete(case, steps):
    """Velocity prediction, timestep s x 1000, shift or dynamic shifting by mu of the image's
    token count (image_seq_len 1024 here), as diffusers' SD3 pipeline computes it."""
    from cfg_export.runtime.schedule import calculate_shift

    fields, seq = case[1], 1024
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **fields}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    set_kwargs = {}
    if fields.get("use_dynamic_shifting"):
        c = scheduler.config
        set_kwargs["mu"] = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    theirs = diffusers_loop(scheduler, flow_model, x_T, steps, 9, set_kwargs)
    resolved = resolve_scheduler(config)
    plan = plan_sampling(resolved, steps, image_seq_len=seq)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy().astype(np.float64))
    ours = run_plan(plan, Denoiser(lambda x, t, c, sigma: flow_model(x, t), None, "flow"), x_T.numpy(),
                    TorchNoise(9))
    assert relative_error(ours, theirs) < TOLERANCE


# --- schedules -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [SD, LINEAR, {**LINEAR, "beta_schedule": "squaredcos_cap_v2"}])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_with_zero_snr_match_diffusers(kind, zero_snr):
    """Lin et al. 2024, Algorithm 1: the last alphas_cumprod is 0 (diffusers' DDIM keeps it so;
    its Euler and DPM-Solver set 2^-24 there, as our samplers do)."""
    schedule = NoiseSchedule(kind["beta_schedule"], 1000, kind["beta_start"], kind["beta_end"],
                             rescale_betas_zero_snr=zero_snr)
    ref = diffusers.DDIMScheduler(**kind, rescale_betas_zero_snr=zero_snr).alphas_cumprod.numpy()
    ours = schedule.alphas_cumprod()
    np.testing.assert_allclose(ours, ref, rtol=3e-5, atol=1e-9)
    assert (ours[-1] == 0) == zero_snr


def test_trained_betas_schedule_matches_diffusers():
    betas = np.linspace(2e-4, 0.03, 1000) ** 1.1
    schedule = NoiseSchedule(num_train_timesteps=1000, trained_betas=betas)
    ref = diffusers.DDIMScheduler(trained_betas=betas.tolist()).alphas_cumprod.numpy()
    np.testing.assert_allclose(schedule.alphas_cumprod(), ref, rtol=3e-6)
    assert NoiseSchedule.from_dict(schedule.to_dict()) == schedule


# --- the core, and what every sampler promises ---------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_denoiser_reads_each_prediction_type(prediction):
    """x = alpha x0 + sigma eps; v = alpha eps - sigma x0 (VP); velocity = eps - x0 (flow)."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 2, 4))
    alpha, sigma = (0.6, 0.8) if prediction != "flow" else (0.3, 0.7)
    x = alpha * x0 + sigma * eps
    out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "flow": eps - x0}[prediction]
    got_x0, got_eps = Denoiser(None, None, prediction).split(out, x, alpha, sigma)
    np.testing.assert_allclose(got_x0, x0, atol=1e-12)
    np.testing.assert_allclose(got_eps, eps, atol=1e-12)


def test_dynamic_threshold_matches_diffusers():
    from cfg_export.runtime.samplers.core import dynamic_threshold

    x0 = np.random.default_rng(1).standard_normal((3, 4, 5, 5)) * np.array([0.3, 2.0, 6.0])[:, None, None, None]
    ref = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=4.0)
    np.testing.assert_allclose(dynamic_threshold(x0, 0.9, 4.0), ref._threshold_sample(torch.from_numpy(x0)).numpy(),
                               rtol=1e-12, atol=1e-12)


def test_guidance_rescale_matches_diffusers():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    from cfg_export.runtime.guidance import rescale

    rng = np.random.default_rng(2)
    guided, cond = rng.standard_normal((2, 3, 4, 6, 6)) * np.array([1.0, 3.0])[:, None, None, None, None]
    theirs = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    np.testing.assert_allclose(rescale(guided, cond, 0.7), theirs, rtol=1e-12)


ANY_SAMPLER = [(s, {}) for s in ("ddim", "ddpm", "pndm", "euler", "euler-ancestral", "heun", "dpmpp-2m",
                                 "dpmpp-2m-sde", "unipc")]


def run_sampler(sampler, shape=SHAPE, noise=None, callback=None, model=None, steps=5):
    resolved = resolve_scheduler(PNDM_SD15, sampler)
    f = model or vp_model("epsilon", resolved.schedule().alphas_cumprod())
    x_T = np.random.default_rng(0).standard_normal(shape)
    plan = plan_sampling(resolved, steps)
    out = run_plan(plan, Denoiser(lambda x, t, c, sigma: f(x, t), None, "eps"), x_T, noise, callback)
    return out, plan


@pytest.mark.parametrize("shape", [(2, 3, 16), (2, 5, 4), (3, 7)], ids=["N,C,L", "N,L,D", "N,D"])
@pytest.mark.parametrize("sampler", [s for s, _ in ANY_SAMPLER])
def test_output_is_float32_of_x_shape(sampler, shape):
    out, _ = run_sampler(sampler, shape, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == shape and np.all(np.isfinite(out))


@pytest.mark.parametrize("sampler", [s for s, _ in ANY_SAMPLER])
def test_callback_sees_every_model_call(sampler):
    seen = []
    out, plan = run_sampler(sampler, noise=np.random.default_rng(0), callback=lambda i, t, x: seen.append((i, t, x)))
    assert [(i, t) for i, t, _ in seen] == list(enumerate(plan.timesteps.tolist()))
    assert all(x.dtype == np.float32 and x.shape == SHAPE for _, _, x in seen)
    np.testing.assert_array_equal(seen[-1][2], out)


@pytest.mark.parametrize("sampler", ["ddpm", "euler-ancestral", "dpmpp-2m-sde"])
def test_seed_decides_the_noise(sampler):
    def run(seed):
        return run_sampler(sampler, noise=np.random.default_rng(seed))[0]

    np.testing.assert_array_equal(run(7), run(7))
    assert np.abs(run(7) - run(8)).max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler", "heun", "dpmpp-2m", "unipc"])
def test_deterministic_samplers_draw_no_noise(sampler):
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    run_sampler(sampler, noise=rng)
    assert rng.bit_generator.state == before
    run_sampler(sampler, noise=None)  # and need no source


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("sampler", [s for s, _ in ANY_SAMPLER])
def test_nan_or_inf_names_sampler_and_step(sampler):
    _, plan = run_sampler(sampler, noise=np.random.default_rng(0))
    bad_t = float(plan.timesteps[2])
    base = vp_model("epsilon", resolve_scheduler(PNDM_SD15).schedule().alphas_cumprod())

    calls = []

    def exploding(x, t):
        calls.append(t)
        return np.full_like(x, np.inf) if len(calls) == 3 else base(x, t)

    with pytest.raises(CfgExportError, match=re.escape(f"{sampler}: NaN or Inf in the sample at step 3/{len(plan)} "
                                                       f"(t={bad_t:g}), made by the sampler's update")):
        run_sampler(sampler, noise=np.random.default_rng(0), model=exploding)


def test_model_output_of_the_wrong_shape():
    with pytest.raises(CfgExportError, match=re.escape("the model returned shape (2, 1, 8, 8) at t=801, expected the "
                                                       "sample's shape (2, 3, 8, 8)")):
        run_sampler("ddim", model=lambda x, t: x[:, :1])


def test_samplers_never_import_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, cfg_export.runtime.samplers; assert 'torch' not in sys.modules, 'samplers imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_eta_out_of_range(eta):
    resolved = resolve_scheduler(PNDM_SD15, "ddim")
    with pytest.raises(CfgExportError, match=rf"ddim: eta must be in \[0, 1\].*got {eta}"):
        run_plan(plan_sampling(resolved, 3), Denoiser(None, None, "eps"), np.zeros(SHAPE), eta=eta)
