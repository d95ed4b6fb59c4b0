"""Scheduler configs: the dicts diffusers saves (`_class_name` and the fields of that
scheduler's __init__), resolved the way diffusers resolves them, and checked against
what cfg-export's samplers reproduce.

resolve_scheduler(config, sampler, fields) is `cls.from_config(config, **fields)`:
the target class's defaults (diffusers 0.42), overwritten by the config's own fields
that the class takes, then by the given fields; the fields the class does not take are
kept aside (diffusers keeps them too, and a few schedulers read sigma_min and sigma_max
from them). Every field the sampler does not reproduce exactly is refused, by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CfgExportError
from ..manifest import ModelFacts, Prediction
from ..schedule import BETA_KINDS, NoiseSchedule

# diffusers' prediction_type of each of ours (the flow-matching scheduler has none)
PREDICTION_TYPES = {Prediction.EPS: "epsilon", Prediction.V: "v_prediction", Prediction.X0: "sample"}


@dataclass(frozen=True)
class Rule:
    """The values of a config field that a sampler reproduces."""

    accepts: Callable[[Any], bool]
    expected: str  # for messages


def one_of(*values) -> Rule:
    def accepts(v):
        return any(v == a and type(v) is type(a) for a in values)  # True is not 1 here

    return Rule(accepts, "one of " + ", ".join(map(repr, values)))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


BOOL = one_of(True, False)
NUMBER = Rule(_number, "a finite number")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "a number > 0")
OPTIONAL_POSITIVE = Rule(lambda v: v is None or (_number(v) and v > 0), "null or a number > 0")
OFFSET = Rule(lambda v: _integer(v) and v >= 0, "an integer >= 0")
TRAIN_STEPS = Rule(lambda v: _integer(v) and v >= 2, "an integer >= 2")
RATIO = Rule(lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")
BETAS = Rule(lambda v: v is None or (isinstance(v, (list, tuple)) and all(_number(b) for b in v)),
             "null or a list of betas")
SPACING = one_of("leading", "trailing", "linspace")
FINAL_SIGMAS = one_of("zero", "sigma_min")
ANY = Rule(lambda v: True, "anything")  # fields that change nothing the sampler does

# The fields of every variance-preserving scheduler that build the schedule and the timesteps.
VP = {"num_train_timesteps": TRAIN_STEPS, "beta_start": POSITIVE, "beta_end": POSITIVE,
      "beta_schedule": one_of(*BETA_KINDS), "trained_betas": BETAS, "timestep_spacing": SPACING,
      "steps_offset": OFFSET}
THRESHOLDING = {"thresholding": BOOL, "dynamic_thresholding_ratio": RATIO, "sample_max_value": POSITIVE}
CLIPPING = {"clip_sample": BOOL, "clip_sample_range": POSITIVE}
SIGMA_SCHEDULES = {"use_karras_sigmas": BOOL, "use_exponential_sigmas": BOOL}


@dataclass(frozen=True)
class SchedulerClass:
    """A diffusers scheduler class: its __init__ defaults (diffusers 0.42) and the values
    of each field that cfg-export's sampler reproduces (other fields: only the default)."""

    name: str
    sampler: str  # the sampler that follows it
    defaults: dict
    rules: dict

    def rule(self, name: str) -> Rule:
        default = self.defaults[name]
        return self.rules.get(name, Rule(lambda v: v == default and type(v) is type(default),
                                         f"only its default {default!r}"))


_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}

CLASSES = {c.name: c for c in [
    SchedulerClass("DDIMScheduler", "ddim", {
        **_BETAS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
        "sample_max_value": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
        {**VP, **THRESHOLDING, **CLIPPING, "set_alpha_to_one": BOOL, "rescale_betas_zero_snr": BOOL,
         "prediction_type": one_of("epsilon", "sample", "v_prediction")}),
    SchedulerClass("DDPMScheduler", "ddpm", {
        **_BETAS, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
        "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False},
        {**VP, **THRESHOLDING, **CLIPPING, "rescale_betas_zero_snr": BOOL,
         "variance_type": one_of("fixed_small", "fixed_small_log", "fixed_large"),
         "prediction_type": one_of("epsilon", "sample", "v_prediction")}),
    SchedulerClass("PNDMScheduler", "pndm", {
        **_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "steps_offset": 0},
        {**VP, "skip_prk_steps": BOOL, "set_alpha_to_one": BOOL, "prediction_type": one_of("epsilon", "v_prediction")}),
    SchedulerClass("EulerDiscreteScheduler", "euler", {
        **_BETAS, "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
        "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
        {**VP, **SIGMA_SCHEDULES, "sigma_min": OPTIONAL_POSITIVE, "sigma_max": OPTIONAL_POSITIVE,
         "timestep_type": one_of("discrete", "continuous"), "rescale_betas_zero_snr": BOOL,
         "final_sigmas_type": FINAL_SIGMAS,
         "prediction_type": one_of("epsilon", "sample", "original_sample", "v_prediction")}),
    SchedulerClass("EulerAncestralDiscreteScheduler", "euler-ancestral", {
        **_BETAS, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False},
        {**VP, "rescale_betas_zero_snr": BOOL, "prediction_type": one_of("epsilon", "v_prediction")}),
    SchedulerClass("HeunDiscreteScheduler", "heun", {
        **_BETAS, "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace", "steps_offset": 0},
        {**VP, **CLIPPING, "use_karras_sigmas": BOOL, "prediction_type": one_of("epsilon", "sample", "v_prediction")}),
    SchedulerClass("DPMSolverMultistepScheduler", "dpmpp-2m", {
        **_BETAS, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
        "variance_type": None, "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential"},
        {**VP, **THRESHOLDING, "use_karras_sigmas": BOOL, "use_exponential_sigmas": BOOL,
         "solver_order": one_of(1, 2, 3),
         "algorithm_type": one_of("dpmsolver++", "sde-dpmsolver++"), "solver_type": one_of("midpoint", "heun"),
         "lower_order_final": BOOL, "euler_at_final": BOOL, "use_lu_lambdas": BOOL, "flow_shift": ANY,
         "final_sigmas_type": FINAL_SIGMAS, "lambda_min_clipped": Rule(lambda v: _number(v) or v == -math.inf,
                                                                       "a number or -inf"),
         "rescale_betas_zero_snr": BOOL, "time_shift_type": ANY,
         "prediction_type": one_of("epsilon", "sample", "v_prediction")}),
    SchedulerClass("UniPCMultistepScheduler", "unipc", {
        **_BETAS, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential",
        "sigma_min": None, "sigma_max": None, "shift_terminal": None},
        {**VP, **THRESHOLDING, **SIGMA_SCHEDULES, "solver_order": Rule(lambda v: _integer(v) and v >= 1,
                                                                       "an integer >= 1"),
         "predict_x0": BOOL, "solver_type": one_of("bh1", "bh2"), "lower_order_final": BOOL,
         "disable_corrector": Rule(lambda v: isinstance(v, (list, tuple)) and all(_integer(i) for i in v),
                                   "a list of step indices"),
         "flow_shift": ANY, "final_sigmas_type": FINAL_SIGMAS, "rescale_betas_zero_snr": BOOL,
         "time_shift_type": ANY, "sigma_min": OPTIONAL_POSITIVE, "sigma_max": OPTIONAL_POSITIVE,
         "prediction_type": one_of("epsilon", "sample", "v_prediction")}),
    SchedulerClass("FlowMatchEulerDiscreteScheduler", "flow-euler", {
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False},
        {**SIGMA_SCHEDULES, "num_train_timesteps": TRAIN_STEPS, "shift": POSITIVE, "use_dynamic_shifting": BOOL,
         "base_shift": NUMBER, "max_shift": NUMBER, "base_image_seq_len": TRAIN_STEPS,
         "max_image_seq_len": TRAIN_STEPS, "invert_sigmas": BOOL,
         "shift_terminal": Rule(lambda v: v is None or (_number(v) and 0 <= v < 1), "null or a number in [0, 1)"),
         "time_shift_type": one_of("exponential", "linear"), "stochastic_sampling": BOOL}),
]}


@dataclass(frozen=True)
class SamplerName:
    """A name for --sampler: a scheduler class, and the fields the name fixes."""

    scheduler: str
    fields: dict = field(default_factory=dict)


SAMPLER_NAMES = {
    "ddim": SamplerName("DDIMScheduler"),
    "ddpm": SamplerName("DDPMScheduler"),
    "pndm": SamplerName("PNDMScheduler"),
    "euler": SamplerName("EulerDiscreteScheduler"),
    "euler-ancestral": SamplerName("EulerAncestralDiscreteScheduler"),
    "heun": SamplerName("HeunDiscreteScheduler"),
    "dpmpp-2m": SamplerName("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-sde": SamplerName("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "solver_order": 2}),
    "unipc": SamplerName("UniPCMultistepScheduler"),
    "flow-euler": SamplerName("FlowMatchEulerDiscreteScheduler"),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """A resolved scheduler config: the class, every field of its __init__, and the
    config's other keys."""

    class_name: str
    fields: dict
    hidden: dict = field(default_factory=dict)

    @property
    def scheduler(self) -> SchedulerClass:
        return CLASSES[self.class_name]

    @property
    def is_flow(self) -> bool:
        return self.class_name == "FlowMatchEulerDiscreteScheduler"

    @property
    def sampler(self) -> str:
        """The sampler's name, as --sampler writes it."""
        if self.class_name == "DPMSolverMultistepScheduler" and self.fields["algorithm_type"] == "sde-dpmsolver++":
            return "dpmpp-2m-sde"
        return self.scheduler.sampler

    def to_dict(self) -> dict:
        """The config as diffusers would save it (JSON-ready)."""
        return {"_class_name": self.class_name, **self.fields, **self.hidden}

    def sigma_bound(self, name: str) -> float | None:
        """sigma_min or sigma_max as diffusers' _convert_to_karras reads it: the field, or a
        key of that name the config carried from another class."""
        value = self.fields.get(name, self.hidden.get(name))
        return None if value is None else float(value)

    def schedule(self) -> NoiseSchedule:
        """The training schedule these fields build (variance-preserving schedulers)."""
        f = self.fields
        return NoiseSchedule(kind=f["beta_schedule"], num_train_timesteps=f["num_train_timesteps"],
                             beta_start=f["beta_start"], beta_end=f["beta_end"], trained_betas=f["trained_betas"],
                             rescale_betas_zero_snr=f.get("rescale_betas_zero_snr", False))


def known_classes() -> str:
    return ", ".join(CLASSES)


def _normalize(name: str, fields: dict) -> None:
    """The renames diffusers' __init__ makes (register_to_config): DPM-Solver takes the
    solver types of UniPC and DEIS as midpoint, UniPC those of DPM-Solver as bh2."""
    if name == "DPMSolverMultistepScheduler":
        if fields["algorithm_type"] == "deis":
            fields["algorithm_type"] = "dpmsolver++"
        if fields["solver_type"] in ("logrho", "bh1", "bh2"):
            fields["solver_type"] = "midpoint"
    elif name == "UniPCMultistepScheduler" and fields["solver_type"] in ("midpoint", "heun", "logrho"):
        fields["solver_type"] = "bh2"


def resolve_scheduler(config: dict, sampler: str | None = None, fields: dict | None = None) -> SchedulerConfig:
    """Returns the scheduler config that diffusers builds with
    `SAMPLER_CLASS.from_config(config, **fields)` (the config's own class when sampler is
    None), checked: raises CfgExportError naming the class, sampler or field that
    cfg-export does not reproduce exactly."""
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise CfgExportError(f"scheduler config: got {type(config).__name__} without a _class_name, expected "
                             "the dict diffusers saves as scheduler_config.json")
    source = config["_class_name"]
    if sampler is not None:
        if sampler not in SAMPLER_NAMES:
            raise CfgExportError(f"sampler: got {sampler!r}, expected one of {', '.join(SAMPLER_NAMES)}")
        target, forced = SAMPLER_NAMES[sampler].scheduler, SAMPLER_NAMES[sampler].fields
    elif source not in CLASSES:
        raise CfgExportError(f"scheduler {source} is not one cfg-export reproduces; known: {known_classes()} "
                             f"(pick one with --sampler: {', '.join(SAMPLER_NAMES)})")
    else:
        target, forced = source, {}
    cls = CLASSES[target]
    given = {k: v for k, v in config.items() if not k.startswith("_")}
    resolved = {**cls.defaults, **{k: v for k, v in given.items() if k in cls.defaults}, **forced}
    for key, value in (fields or {}).items():
        if key not in cls.defaults:
            having = [name for name, s in SAMPLER_NAMES.items() if key in CLASSES[s.scheduler].defaults]
            where = f" (samplers with it: {', '.join(having)})" if having else ""
            raise CfgExportError(f"{target} has no field {key!r}{where}; its fields: {', '.join(cls.defaults)}")
        resolved[key] = value
    _normalize(target, resolved)
    hidden = {k: v for k, v in given.items() if k not in cls.defaults}
    resolved = SchedulerConfig(target, resolved, hidden)
    check_fields(resolved)
    return resolved


def check_fields(config: SchedulerConfig) -> None:
    """Raises CfgExportError naming the first field whose value the sampler does not reproduce."""
    cls = config.scheduler
    for key, value in config.fields.items():
        rule = cls.rule(key)
        if not rule.accepts(value):
            raise CfgExportError(f"{cls.name} {key}={value!r}: cfg-export's {config.sampler} sampler does not "
                                 f"reproduce it (expected {rule.expected})")
    chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
              if config.fields.get(k)]
    if len(chosen) > 1:
        raise CfgExportError(f"{cls.name}: {' and '.join(chosen)} are both set; choose one sigma schedule")
    f = config.fields
    if cls.name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler") and f["use_exponential_sigmas"]:
        raise CfgExportError(f"{cls.name} use_exponential_sigmas=True: diffusers truncates these fractional "
                             "timesteps to integers, and its first lands within float32 rounding of 999 (998 or "
                             "999): not reproducible exactly; use use_karras_sigmas")
    if cls.name == "DPMSolverMultistepScheduler" and f["beta_schedule"] == "squaredcos_cap_v2" and \
            (f["use_karras_sigmas"] or f["use_lu_lambdas"]):
        option = "use_karras_sigmas" if f["use_karras_sigmas"] else "use_lu_lambdas"
        raise CfgExportError(f"{cls.name} {option}=True with beta_schedule='squaredcos_cap_v2': diffusers truncates "
                             "these fractional timesteps to integers, where they can repeat and skip a step: not "
                             "reproducible exactly; use another beta schedule or sigma schedule")
    if cls.name == "UniPCMultistepScheduler" and f["final_sigmas_type"] == "zero" and \
            (f["solver_type"] == "bh1" or not f["predict_x0"]):
        setting = "solver_type='bh1'" if f["solver_type"] == "bh1" else "predict_x0=False"
        raise CfgExportError(f"UniPCMultistepScheduler {setting} with final_sigmas_type='zero' ends in NaN in "
                             "diffusers (its last step meets lambda = inf); set final_sigmas_type='sigma_min'")
    if not config.is_flow and f["trained_betas"] is not None:
        config.schedule()  # checks their number


def default_scheduler(facts: ModelFacts) -> dict:
    """The scheduler config of an artifact that records none: DDIM with the model's
    schedule, no x_0 clipping, alpha 1 after the last step (flow matching: its Euler)."""
    schedule = facts.schedule
    if schedule.is_flow:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": schedule.num_train_timesteps}
    beta_schedule = schedule.kind.value
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": schedule.num_train_timesteps,
            "beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "beta_schedule": beta_schedule,
            "trained_betas": list(schedule.trained_betas) if schedule.trained_betas else None,
            "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
            "prediction_type": PREDICTION_TYPES.get(facts.prediction, "epsilon"), "clip_sample": False}


def check_model(config: SchedulerConfig, facts: ModelFacts) -> None:
    """Raises CfgExportError when the scheduler cannot sample this model: a flow-matching
    model with a variance-preserving sampler or the other way round, or a prediction type
    other than the model's."""
    flow_model = facts.schedule.is_flow or facts.prediction is Prediction.FLOW
    if flow_model and not config.is_flow:
        raise CfgExportError(f"this model is trained with flow matching; the {config.sampler} sampler "
                             f"({config.class_name}) samples variance-preserving models only: use flow-euler")
    if config.is_flow and not flow_model:
        raise CfgExportError(f"the flow-euler sampler samples flow-matching models; this one predicts "
                             f"{facts.prediction.value} on a {facts.schedule.kind.value} schedule: choose another "
                             f"sampler")
    if config.is_flow:
        return
    expected = PREDICTION_TYPES[facts.prediction]
    got = config.fields["prediction_type"]
    if got != expected and not (got == "original_sample" and expected == "sample"):
        raise CfgExportError(f"{config.class_name} prediction_type={got!r}, but the model predicts "
                             f"{facts.prediction.value} ({expected!r}, its manifest says): the prediction type is "
                             f"the model's and cannot be changed")
