"""sample_guided and `python -m runtime sample` with the scheduler a manifest records, on tiny
exported models (float timesteps, v-prediction, flow matching), against diffusers' loop run
on the same PyTorch module: rows [cond; null] in one call, the guidance mix, guidance_rescale
(diffusers' own rescale_noise_cfg), and the scheduler's step, with diffusers' noise."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from cfg_export.runtime.errors import CfgExportError  # noqa: E402
from cfg_export.runtime.guidance import GuidanceOptions  # noqa: E402
from cfg_export.runtime.manifest import ModelFacts, read_manifest  # noqa: E402
from cfg_export.runtime.pipeline import sample_guided  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.models import TinyConv  # noqa: E402
from tests.runtime.test_samplers import TorchNoise  # noqa: E402

TOLERANCE = 1e-5
SD_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
EULER_V = {"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "prediction_type": "v_prediction",
           "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
LABELS, NULL = [0, 2], 3

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _facts(prediction, schedule, scheduler, timestep_dtype="float32"):
    return {"condition": {"kind": "class", "num_classes": 3, "null": NULL}, "prediction": prediction,
            "schedule": schedule, "sample_shape": [2, 6, 6], "timestep_dtype": timestep_dtype,
            "scheduler": scheduler}


def v_model():
    """A v-prediction model with float timesteps that ships an Euler (Karras) scheduler config."""
    torch.manual_seed(1)
    schedule = {"kind": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    return TinyConv(), _facts("v", schedule, EULER_V)


def v_model_int():
    """The same, exported with int64 timesteps."""
    module, facts = v_model()
    return module, {**facts, "timestep_dtype": "int64"}


def flow_model():
    """A flow-matching model (velocity, timestep s x 1000) that ships FlowMatchEulerDiscreteScheduler."""
    torch.manual_seed(2)
    return TinyConv(), _facts("flow", {"kind": "flow_match", "num_train_timesteps": 1000}, FLOW)


def flow_model_dynamic():
    """A flow-matching transformer-like model (patch size 2) whose scheduler shifts by the
    image's token count (use_dynamic_shifting), as Flux and some SD3 variants ship."""
    module, facts = flow_model()
    return module, {**facts, "patch_size": 2,
                    "scheduler": {**FLOW, "use_dynamic_shifting": True, "base_image_seq_len": 4,
                                  "max_image_seq_len": 64, "base_shift": 0.5, "max_shift": 1.15}}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from cfg_export.export.exporter import export_onnx

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and fair to shared CPUs
    root = tmp_path_factory.mktemp("sampler_artifacts")
    for name in ("v_model", "v_model_int", "flow_model", "flow_model_dynamic"):
        export_onnx(f"tests.runtime.test_samplers_pipeline:{name}", root / name)
    yield root
    torch.set_num_threads(threads)


def diffusers_guided_loop(module, scheduler, x_T, s, steps, phi=0.0, generator=None, set_kwargs=None):
    """The guided loop of diffusers' Stable Diffusion pipelines on a module(sample, t, labels):
    rows [cond; null] in one call, uncond + s (cond - uncond), rescale_noise_cfg with phi,
    scheduler.step (with the generator)."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg  # the pipelines' own (no transformers import)

    scheduler.set_timesteps(steps, **(set_kwargs or {}))
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    labels = torch.tensor(LABELS + [NULL] * len(LABELS))
    accepts = inspect.signature(scheduler.step).parameters  # as the pipelines' prepare_extra_step_kwargs
    kwargs = {"generator": generator} if generator is not None and "generator" in accepts else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            x_in = torch.cat([x] * 2)
            if hasattr(scheduler, "scale_model_input"):
                x_in = scheduler.scale_model_input(x_in, t)
            out_c, out_u = module(x_in, t.float().expand(len(x_in)), labels).chunk(2)
            out = out_u + s * (out_c - out_u)
            if phi > 0:
                out = rescale_noise_cfg(out, out_c, guidance_rescale=phi)
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x.numpy()


def relative_error(ours, theirs) -> float:
    assert np.abs(theirs).max() > 0.1
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def noise(seed=0):
    return torch.randn((len(LABELS), 2, 6, 6), generator=torch.Generator().manual_seed(seed))


def test_manifest_records_the_scheduler(artifacts):
    facts = read_manifest(artifacts / "v_model").facts
    assert facts.scheduler == EULER_V and facts.timestep_dtype == "float32"
    assert ModelFacts.from_dict(facts.to_dict()) == facts
    flow = read_manifest(artifacts / "flow_model").facts
    assert flow.prediction.value == "flow" and flow.schedule.is_flow and flow.scheduler == FLOW


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_recorded_euler_karras_with_guidance_rescale(artifacts, phi):
    """No --sampler: the manifest's Euler with Karras sigmas (fractional timesteps, fed as
    float32) on a v-prediction model, with and without guidance_rescale."""
    x_T, s, steps = noise(), 4.0, 8
    module, _ = v_model()
    theirs = diffusers_guided_loop(module.eval(), diffusers.EulerDiscreteScheduler.from_config(EULER_V), x_T, s,
                                   steps, phi)
    result = sample_guided(artifacts / "v_model", LABELS, s - 1, steps=steps, noise=x_T.numpy(),
                           guidance=GuidanceOptions(rescale=phi or None))
    assert result.sampler == "euler" and result.scheduler["use_karras_sigmas"] is True
    assert np.any(result.timesteps != np.round(result.timesteps))  # fractional timesteps were fed
    assert relative_error(result.samples, theirs) < TOLERANCE
    if phi:
        plain = sample_guided(artifacts / "v_model", LABELS, s - 1, steps=steps, noise=x_T.numpy()).samples
        assert relative_error(plain, theirs) > 1e-3  # the rescale moves the result


@pytest.mark.parametrize("sampler,fields,cls", [
    ("dpmpp-2m-sde", {"use_karras_sigmas": True}, "DPMSolverMultistepScheduler"),
    ("euler-ancestral", {"timestep_spacing": "trailing"}, "EulerAncestralDiscreteScheduler"),
    ("unipc", {}, "UniPCMultistepScheduler"),
])
def test_switched_sampler_with_diffusers_noise(artifacts, sampler, fields, cls):
    """--sampler NAME as from_config of the recorded config; the stochastic ones draw from the
    noise source, here diffusers' own generator."""
    x_T, s, steps = noise(1), 3.0, 6
    module, _ = v_model()
    extra = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpmpp-2m-sde" else {}
    scheduler = getattr(diffusers, cls).from_config(EULER_V, **extra, **fields)
    theirs = diffusers_guided_loop(module.eval(), scheduler, x_T, s, steps, generator=torch.Generator().manual_seed(5))
    ours = sample_guided(artifacts / "v_model", LABELS, s - 1, steps=steps, sampler=sampler, scheduler=fields,
                         noise=x_T.numpy(), noise_source=TorchNoise(5)).samples
    assert relative_error(ours, theirs) < TOLERANCE


@pytest.mark.parametrize("shift", [None, 1.0])
def test_flow_matching_model(artifacts, shift):
    """The flow-matching model samples with its recorded FlowMatchEulerDiscreteScheduler
    (shift 3), or with the shift overridden; guidance mixes velocities."""
    x_T, s, steps = noise(2), 5.0, 6
    module, _ = flow_model()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLOW, **({"shift": shift} if shift else {}))
    theirs = diffusers_guided_loop(module.eval(), scheduler, x_T, s, steps)
    ours = sample_guided(artifacts / "flow_model", LABELS, s - 1, steps=steps, noise=x_T.numpy(),
                         scheduler={"shift": shift} if shift else None)
    assert ours.sampler == "flow-euler" and relative_error(ours.samples, theirs) < TOLERANCE


def test_flow_dynamic_shifting_by_the_image_tokens(artifacts):
    """mu of the image's token count, (H / p) (W / p) = 9 here, as diffusers' SD3 pipeline computes it."""
    from cfg_export.runtime.schedule import calculate_shift

    x_T, s, steps = noise(3), 4.0, 5
    module, facts = flow_model_dynamic()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(facts["scheduler"])
    c = scheduler.config
    mu = calculate_shift(9, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    theirs = diffusers_guided_loop(module.eval(), scheduler, x_T, s, steps, set_kwargs={"mu": mu})
    ours = sample_guided(artifacts / "flow_model_dynamic", LABELS, s - 1, steps=steps, noise=x_T.numpy()).samples
    assert relative_error(ours, theirs) < TOLERANCE
    fixed = sample_guided(artifacts / "flow_model", LABELS, s - 1, steps=steps, noise=x_T.numpy()).samples
    assert relative_error(fixed, theirs) > 1e-3


def test_threshold_is_the_schedulers_dynamic_thresholding(artifacts):
    """--threshold P: thresholding=True, dynamic_thresholding_ratio=P (diffusers' sample_max_value
    caps s, 1.0 by default: --set sample_max_value=V raises it)."""
    x_T, s, steps = noise(4), 6.0, 5
    module, _ = v_model()
    fields = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}
    scheduler = diffusers.DDIMScheduler.from_config(EULER_V, **fields)
    theirs = diffusers_guided_loop(module.eval(), scheduler, x_T, s, steps)
    ours = sample_guided(artifacts / "v_model", LABELS, s - 1, steps=steps, sampler="ddim", noise=x_T.numpy(),
                         scheduler={"sample_max_value": 1.5}, guidance=GuidanceOptions(threshold=0.9))
    assert ours.scheduler["thresholding"] is True and relative_error(ours.samples, theirs) < TOLERANCE
    plain = sample_guided(artifacts / "v_model", LABELS, s - 1, steps=steps, sampler="ddim", noise=x_T.numpy())
    assert relative_error(plain.samples, theirs) > 1e-3


@pytest.mark.parametrize("kwargs,message", [
    ({}, "EulerDiscreteScheduler with use_karras_sigmas=True feeds fractional timesteps (e.g. "),
    ({"scheduler": {"use_karras_sigmas": False, "timestep_spacing": "linspace"}},
     "EulerDiscreteScheduler with timestep_spacing='linspace' feeds fractional timesteps"),
    ({"sampler": "flow-euler"}, "the flow-euler sampler samples flow-matching models; this one predicts v"),
    ({"sampler": "euler", "guidance": GuidanceOptions(threshold=0.99)},
     "--threshold: EulerDiscreteScheduler (euler) has no dynamic thresholding; the samplers with it: ddim, ddpm"),
    ({"sampler": "ddim", "scheduler": {"use_karras_sigmas": True}}, "DDIMScheduler has no field 'use_karras_sigmas'"),
    ({"sampler": "pndm", "eta": 0.5}, "eta applies to the ddim sampler only (DDIMScheduler), not pndm"),
    ({"sampler": "ddim", "guidance": GuidanceOptions(rescale=1.5)}, "guidance rescale: got 1.5, expected phi in"),
])
def test_refusals(artifacts, kwargs, message):
    with pytest.raises(CfgExportError) as info:
        sample_guided(artifacts / "v_model_int", LABELS, 1.0, steps=5, **kwargs)
    assert message in str(info.value)
    if not kwargs:
        assert "whose graph takes int64 timesteps: re-export the model with float timesteps" in str(info.value)


def test_int64_graph_with_integer_timesteps(artifacts):
    """Integer timesteps (Euler, leading spacing, no Karras) run on the int64 graph as on the
    float one."""
    fields = {"use_karras_sigmas": False}
    a = sample_guided(artifacts / "v_model_int", LABELS, 2.0, steps=5, scheduler=fields, seed=1).samples
    b = sample_guided(artifacts / "v_model", LABELS, 2.0, steps=5, scheduler=fields, seed=1).samples
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def run_runtime(*args):
    return subprocess.run([sys.executable, "-m", "runtime", "sample", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_scheduler_options(artifacts, tmp_path):
    """--sampler, --karras, --spacing, --steps-offset, --set and --guidance-rescale are the
    library's scheduler fields and guidance options."""
    proc = run_runtime(artifacts / "v_model", "--classes", "0,2", "--n", 1, "--w", 2, "--steps", 5, "--sampler",
                       "dpmpp-2m", "--karras", "--spacing", "trailing", "--steps-offset", 0, "--set",
                       "final_sigmas_type=sigma_min", "--set", "solver_order=3", "--guidance-rescale", 0.5,
                       "--npy", tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
    assert "steps on onnxruntime-cpu (dpmpp-2m)" in proc.stdout
    want = sample_guided(artifacts / "v_model", LABELS, 2.0, steps=5, sampler="dpmpp-2m", spacing="trailing",
                         scheduler={"use_karras_sigmas": True, "steps_offset": 0, "final_sigmas_type": "sigma_min",
                                    "solver_order": 3}, guidance=GuidanceOptions(rescale=0.5))
    assert want.scheduler["solver_order"] == 3 and want.scheduler["final_sigmas_type"] == "sigma_min"
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want.samples)


@pytest.mark.parametrize("args,message", [
    (["--sampler", "lms"], "sampler: got 'lms', expected one of ddim, ddpm, pndm, euler"),
    (["--sampler", "ddim", "--karras"], "DDIMScheduler has no field 'use_karras_sigmas' (samplers with it: euler, "
                                        "heun, dpmpp-2m, dpmpp-2m-sde, unipc, flow-euler)"),
    (["--set", "final_sigmas_type"], "--set: got 'final_sigmas_type', expected FIELD=VALUE"),
    (["--set", "interpolation_type=log_linear"],
     "EulerDiscreteScheduler interpolation_type='log_linear': cfg-export's euler sampler does not reproduce it"),
    (["--no-karras", "--spacing", "linspace"],
     "EulerDiscreteScheduler with timestep_spacing='linspace' feeds fractional timesteps"),
    (["--sampler", "flow-euler"], "the flow-euler sampler samples flow-matching models"),
    (["--guidance-rescale", "2"], "guidance rescale: got 2.0, expected phi in [0, 1]"),
])
def test_cli_refusals_are_one_line(artifacts, tmp_path, args, message):
    proc = run_runtime(artifacts / "v_model_int", "--classes", "0", "--n", 1, "--steps", 5, *args,
                       "--npy", tmp_path / "x.npy")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "x.npy").exists()


def test_flow_model_refuses_vp_samplers(artifacts, tmp_path):
    proc = run_runtime(artifacts / "flow_model", "--classes", "0", "--n", 1, "--steps", 3, "--sampler", "dpmpp-2m",
                       "--npy", tmp_path / "x.npy")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert ("Error: this model is trained with flow matching; the dpmpp-2m sampler (DPMSolverMultistepScheduler) "
            "samples variance-preserving models only: use flow-euler") in proc.stderr


def test_fused_graph_refuses_guidance_rescale(tiny_artifacts):
    with pytest.raises(CfgExportError, match="guidance rescale needs the conditional output, which the fused graph "
                                             "does not return; re-export without --fuse-guidance"):
        sample_guided(tiny_artifacts / "fused", [0, 1], 2.0, steps=3, guidance=GuidanceOptions(rescale=0.7))


def test_flow_manifest_round_trip():
    facts = ModelFacts.from_dict(_facts("flow", {"kind": "flow_match", "num_train_timesteps": 1000}, FLOW))
    d = json.loads(json.dumps(facts.to_dict()))
    assert d["scheduler"] == FLOW and d["prediction"] == "flow" and "patch_size" not in d
    with pytest.raises(CfgExportError, match="a flow-matching schedule has no betas"):
        facts.schedule.alphas_cumprod()
