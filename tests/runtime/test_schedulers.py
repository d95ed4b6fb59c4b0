"""Scheduler configs: resolved as diffusers' from_config resolves them, checked against what
the samplers reproduce, and every refusal's message."""
from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")

from cfg_export.runtime.errors import CfgExportError  # noqa: E402
from cfg_export.runtime.manifest import Condition, ModelFacts  # noqa: E402
from cfg_export.runtime.samplers import SAMPLER_CHOICES, check_model, default_scheduler, resolve_scheduler  # noqa
from cfg_export.runtime.samplers.config import CLASSES, SAMPLER_NAMES  # noqa: E402
from cfg_export.runtime.schedule import NoiseSchedule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# scheduler_config.json as the model repositories ship them (written by older diffusers: fields
# added since are missing, so that each class's own default applies)
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
SD21_DDIM = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
DIT_DDIM = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02,
            "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}
UNIPC = {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "solver_order": 3,
         "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": True}
DPM_HEUN = {"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun", "algorithm_type": "deis",
            "final_sigmas_type": "sigma_min", "lambda_min_clipped": -5.1}
SD3_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
            "num_train_timesteps": 1000, "shift": 3.0}
CONFIGS = {"sd15-pndm": SD15_PNDM, "sd21-ddim": SD21_DDIM, "sdxl-euler": SDXL_EULER, "dit-ddim": DIT_DDIM,
           "unipc": UNIPC, "dpm-heun-deis": DPM_HEUN}


def test_defaults_are_those_of_diffusers():
    """The table of __init__ defaults is diffusers' own (0.42): a new field there fails here."""
    for name, cls in CLASSES.items():
        signature = inspect.signature(getattr(diffusers, name).__init__).parameters
        theirs = {k: p.default for k, p in signature.items() if k != "self"}
        assert cls.defaults == theirs, name


def equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isinf(a):
        return a == b
    return a == b or (isinstance(a, (list, tuple)) and list(a) == list(b))


@pytest.mark.parametrize("overrides", [{}, {"use_karras_sigmas": True}, {"timestep_spacing": "trailing",
                                                                         "steps_offset": 0}],
                         ids=["as-is", "karras", "trailing"])
@pytest.mark.parametrize("sampler", [None, *[s for s in SAMPLER_CHOICES if s != "flow-euler"]])
@pytest.mark.parametrize("source", CONFIGS, ids=list(CONFIGS))
def test_resolution_is_from_config(source, sampler, overrides):
    """The pipeline loads the scheduler from its file, then the user switches it:
    Target.from_config(pipe.scheduler.config, **fields). Every __init__ field must come out
    as diffusers' does (defaults where the file lacks one, renames of __init__ included)."""
    config = CONFIGS[source]
    target = CLASSES[config["_class_name"]] if sampler is None else CLASSES[SAMPLER_NAMES[sampler].scheduler]
    fields = {**(SAMPLER_NAMES[sampler].fields if sampler else {}),
              **{k: v for k, v in overrides.items() if k in target.defaults}}
    loaded = getattr(diffusers, config["_class_name"]).from_config(config)
    theirs = getattr(diffusers, target.name).from_config(loaded.config, **fields).config
    ours = resolve_scheduler(config, sampler, fields)
    assert ours.class_name == target.name
    for key in target.defaults:
        assert equal(ours.fields[key], theirs[key]), (key, ours.fields[key], theirs[key])


def test_hidden_fields_are_kept():
    """Fields the target class does not take stay in the config (diffusers registers them too):
    a PNDM config switched to Euler, saved, and switched back keeps PNDM's own fields, as
    diffusers does with the saved file."""
    import json

    euler = resolve_scheduler(SD15_PNDM, "euler")
    assert euler.hidden["skip_prk_steps"] is True and euler.hidden["set_alpha_to_one"] is False
    saved = diffusers.EulerDiscreteScheduler.from_config(diffusers.PNDMScheduler.from_config(SD15_PNDM).config)
    theirs = diffusers.PNDMScheduler.from_config(json.loads(saved.to_json_string())).config
    back = resolve_scheduler(euler.to_dict(), "pndm")
    assert all(equal(back.fields[k], theirs[k]) for k in back.fields), (back.fields, dict(theirs))


def test_default_scheduler_of_an_artifact_without_one():
    """Today's artifacts record no scheduler: DDIM on their schedule, no x_0 clipping."""
    facts = ModelFacts(Condition("class", 3, 3), "v", NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012), (2, 4, 4))
    config = resolve_scheduler(default_scheduler(facts))
    assert config.class_name == "DDIMScheduler" and config.fields["prediction_type"] == "v_prediction"
    assert config.fields["clip_sample"] is False and config.fields["set_alpha_to_one"] is True
    assert config.fields["timestep_spacing"] == "leading" and config.fields["steps_offset"] == 0
    assert config.schedule() == facts.schedule
    flow = ModelFacts(Condition("class", 3, 3), "flow", NoiseSchedule("flow_match", 1000), (2, 4, 4))
    assert resolve_scheduler(default_scheduler(flow)).class_name == "FlowMatchEulerDiscreteScheduler"


# --- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("config,sampler,fields,message", [
    ({"_class_name": "LMSDiscreteScheduler"}, None, {},
     "scheduler LMSDiscreteScheduler is not one cfg-export reproduces; known: DDIMScheduler, DDPMScheduler, "
     "PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, "
     "DPMSolverMultistepScheduler, UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler (pick one with "
     "--sampler: ddim, ddpm, pndm, euler, euler-ancestral, heun, dpmpp-2m, dpmpp-2m-sde, unipc, flow-euler)"),
    (SD15_PNDM, "dpm++", {}, "sampler: got 'dpm++', expected one of ddim, ddpm, pndm, euler, euler-ancestral, "
                            "heun, dpmpp-2m, dpmpp-2m-sde, unipc, flow-euler"),
    (SD15_PNDM, "ddim", {"use_karras_sigmas": True},
     "DDIMScheduler has no field 'use_karras_sigmas' (samplers with it: euler, heun, dpmpp-2m, dpmpp-2m-sde, "
     "unipc, flow-euler); its fields: num_train_timesteps, beta_start"),
    (SD15_PNDM, "euler", {"interpolation_type": "log_linear"},
     "EulerDiscreteScheduler interpolation_type='log_linear': cfg-export's euler sampler does not reproduce it "
     "(expected only its default 'linear')"),
    (SD15_PNDM, "euler", {"use_beta_sigmas": True},
     "EulerDiscreteScheduler use_beta_sigmas=True: cfg-export's euler sampler does not reproduce it"),
    (SD15_PNDM, "euler", {"use_karras_sigmas": True, "use_exponential_sigmas": True},
     "EulerDiscreteScheduler: use_karras_sigmas and use_exponential_sigmas are both set; choose one"),
    (SD15_PNDM, "dpmpp-2m", {"algorithm_type": "dpmsolver"},
     "DPMSolverMultistepScheduler algorithm_type='dpmsolver': cfg-export's dpmpp-2m sampler does not reproduce it "
     "(expected one of 'dpmsolver++', 'sde-dpmsolver++')"),
    (SD15_PNDM, "dpmpp-2m", {"variance_type": "learned_range"},
     "DPMSolverMultistepScheduler variance_type='learned_range': cfg-export's dpmpp-2m sampler does not "
     "reproduce it (expected only its default None)"),
    (SD15_PNDM, "dpmpp-2m", {"use_flow_sigmas": True}, "use_flow_sigmas=True: cfg-export's dpmpp-2m sampler"),
    (SD15_PNDM, "dpmpp-2m", {"use_exponential_sigmas": True},
     "DPMSolverMultistepScheduler use_exponential_sigmas=True: diffusers truncates these fractional timesteps"),
    (DIT_DDIM, "dpmpp-2m", {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"},
     "use_karras_sigmas=True with beta_schedule='squaredcos_cap_v2': diffusers truncates"),
    (SD15_PNDM, "unipc", {"solver_type": "bh1"},
     "UniPCMultistepScheduler solver_type='bh1' with final_sigmas_type='zero' ends in NaN in diffusers"),
    (SD15_PNDM, "unipc", {"predict_x0": False},
     "UniPCMultistepScheduler predict_x0=False with final_sigmas_type='zero' ends in NaN"),
    (SD15_PNDM, "ddpm", {"variance_type": "learned_range"},
     "DDPMScheduler variance_type='learned_range': cfg-export's ddpm sampler does not reproduce it (expected one "
     "of 'fixed_small', 'fixed_small_log', 'fixed_large')"),
    (SD15_PNDM, "ddim", {"beta_schedule": "sigmoid"}, "DDIMScheduler beta_schedule='sigmoid': cfg-export's"),
    (SD15_PNDM, "pndm", {"prediction_type": "sample"}, "PNDMScheduler prediction_type='sample'"),
    (SD15_PNDM, "ddim", {"trained_betas": [0.1, 0.2]},
     "schedule trained_betas: got 2 values, expected num_train_timesteps (1000) values in (0, 1)"),
    (SD3_FLOW, None, {"use_beta_sigmas": True}, "FlowMatchEulerDiscreteScheduler use_beta_sigmas=True"),
    ({"num_train_timesteps": 1000}, None, {}, "scheduler config: got dict without a _class_name"),
])
def test_refused_configs_name_the_field(config, sampler, fields, message):
    with pytest.raises(CfgExportError) as info:
        resolve_scheduler(config, sampler, fields)
    assert message in str(info.value)


VP_FACTS = ModelFacts(Condition("class", 3, 3), "eps", NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012), (2, 4, 4))
FLOW_FACTS = ModelFacts(Condition("class", 3, 3), "flow", NoiseSchedule("flow_match", 1000), (2, 4, 4))


@pytest.mark.parametrize("config,sampler,facts,message", [
    (SD3_FLOW, "euler", FLOW_FACTS, "this model is trained with flow matching; the euler sampler "
                                    "(EulerDiscreteScheduler) samples variance-preserving models only: use flow-euler"),
    (SD15_PNDM, "flow-euler", VP_FACTS, "the flow-euler sampler samples flow-matching models; this one predicts eps "
                                        "on a scaled_linear schedule: choose another sampler"),
    (SD21_DDIM, None, VP_FACTS, "DDIMScheduler prediction_type='v_prediction', but the model predicts eps "
                                "('epsilon', its manifest says): the prediction type is the model's"),
])
def test_scheduler_must_fit_the_model(config, sampler, facts, message):
    with pytest.raises(CfgExportError) as info:
        check_model(resolve_scheduler(config, sampler), facts)
    assert message in str(info.value)


def test_fitting_schedulers_pass():
    check_model(resolve_scheduler(SD3_FLOW), FLOW_FACTS)
    check_model(resolve_scheduler(SD21_DDIM, "euler", {"prediction_type": "epsilon"}), VP_FACTS)
    for sampler in SAMPLER_CHOICES[:-1]:
        check_model(resolve_scheduler(SD15_PNDM, sampler), VP_FACTS)


def test_plans_refuse_what_diffusers_cannot_run():
    from cfg_export.runtime.samplers import plan_sampling

    with pytest.raises(CfgExportError, match=re.escape("PNDMScheduler without skip_prk_steps takes at least 4 steps "
                                                       "(its Runge-Kutta start), got 3")):
        plan_sampling(resolve_scheduler(SD15_PNDM, fields={"skip_prk_steps": False}), 3)
    with pytest.raises(CfgExportError, match=re.escape("use_dynamic_shifting=True shifts by the image's token count; "
                                                       "the model's manifest does not give its patch size")):
        plan_sampling(resolve_scheduler(SD3_FLOW, fields={"use_dynamic_shifting": True}), 4)
    with pytest.raises(CfgExportError, match="steps: got 0, expected 1..1000"):
        plan_sampling(resolve_scheduler(SDXL_EULER), 0)
    np.testing.assert_array_equal(plan_sampling(resolve_scheduler(SDXL_EULER), 4).timesteps, [751, 501, 251, 1])
