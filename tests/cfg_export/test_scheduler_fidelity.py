"""The scheduler fidelity table: tiny random diffusers models saved with save_pretrained beside
the scheduler config their family ships (Stable Diffusion 1.5's PNDM, 2.1's v-prediction
DDIM, DiT's DDIM), exported by cfg-export, and sampled by the runtime with that scheduler,
or with another made from_config of it, against diffusers on the same model, latents,
prompt embeddings (negative: the null embedding), guidance and noise.

The references: DiTPipeline.__call__ itself; for the text-conditioned UNet, the denoising
loop of StableDiffusionPipeline.__call__ written out (the pipeline needs transformers'
CLIP for its text encoder, which the runtime's rows replace with given embeddings):
init_noise_sigma, [negative; prompt] rows, scale_model_input, uncond + s (text - uncond),
rescale_noise_cfg, scheduler.step with the pipeline's extra_step_kwargs (its generator).

Each row: final latents within 1e-5 of the largest latent value. The rows on whole
pipelines (tokenizers, text encoders, SDXL's added conditions, SD3's transformer) and
`cfg-export sample --prompt` are in tests/cfg_export/pipelines/test_scheduler_rows.py;
benchmarks/scheduler_fidelity.py prints both tables.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from cfg_export.runtime.guidance import GuidanceOptions  # noqa: E402
from cfg_export.runtime.pipeline import sample_guided  # noqa: E402
from tests import tiny_diffusers, tiny_pipelines  # noqa: E402

TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|
STEPS = 8
S = 7.5  # diffusers' guidance_scale; our w = S - 1
N = 2

# the scheduler configs of the model repositories (stable-diffusion-v1-5, stable-diffusion-2-1,
# DiT-XL-2-256), as written by the diffusers of their day
SD15_PNDM, SD21_DDIM = tiny_pipelines.SD15_PNDM, tiny_pipelines.SD21_DDIM
DIT_DDIM = {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
            "steps_offset": 0, "trained_betas": None}
FAMILIES = {"sd1": SD15_PNDM, "sd2": SD21_DDIM, "dit": DIT_DDIM}

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@dataclass
class Model:
    """A family's pipeline folder, its artifact, its PyTorch denoiser and an open backend."""

    folder: Path
    artifact: Path
    module: torch.nn.Module
    backend: object


def build_models(root: Path, stack: contextlib.ExitStack) -> dict[str, Model]:
    """Saves each family's tiny model with its scheduler (save_pretrained) and exports it;
    returns {family: Model}, the backends open in `stack`."""
    from cfg_export.export.exporter import export_onnx
    from cfg_export.runtime.artifact import Artifact
    from cfg_export.runtime.backends import BackendOptions, open_backend

    null = root / "null_embedding.npy"
    np.save(null, tiny_diffusers.null_embedding())
    built = {}
    for family, config in FAMILIES.items():
        folder = root / family
        model = tiny_diffusers.dit() if family == "dit" else tiny_diffusers.unet2d_condition()
        subfolder = "transformer" if family == "dit" else "unet"
        model.save_pretrained(folder / subfolder, safe_serialization=True)
        getattr(diffusers, config["_class_name"]).from_config(config).save_pretrained(folder / "scheduler")
        artifact = root / f"{family}-artifact"
        export_onnx(str(folder / subfolder), artifact, null_embedding=None if family == "dit" else null)
        cls = diffusers.DiTTransformer2DModel if family == "dit" else diffusers.UNet2DConditionModel
        module = cls.from_pretrained(folder / subfolder).eval()
        backend = stack.enter_context(open_backend(Artifact.open(artifact), "onnxruntime-cpu",
                                                   BackendOptions(threads=1)))
        built[family] = Model(folder, artifact, module, backend)
    return built


class TorchNoise:
    """The noise source of the runtime fed by diffusers' generator: torch.randn, seeded, in order."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape) -> np.ndarray:
        return torch.randn(tuple(shape), generator=self.generator).numpy()


def load_scheduler(folder: Path, cls: str | None, fields: dict):
    """The pipeline's scheduler (loaded from its folder), or Target.from_config(its config, **fields)."""
    config = getattr(diffusers, FAMILIES[folder.name]["_class_name"]).from_pretrained(folder / "scheduler").config
    return getattr(diffusers, cls or FAMILIES[folder.name]["_class_name"]).from_config(config, **fields)


def stable_diffusion_loop(unet, scheduler, prompts, negatives, x_T, s, phi, seed) -> np.ndarray:
    """StableDiffusionPipeline.__call__'s denoising loop with prompt_embeds and
    negative_prompt_embeds, output_type='latent'."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg  # the pipeline's own

    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(seed)
    accepts = set(inspect.signature(scheduler.step).parameters)
    extra = {"generator": generator} if "generator" in accepts else {}
    if "eta" in accepts:
        extra["eta"] = 0.0
    latents = x_T * scheduler.init_noise_sigma
    embeds = torch.cat([torch.from_numpy(negatives), torch.from_numpy(prompts)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + s * (text - uncond)
            if phi > 0:
                noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale=phi)
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents.numpy()


def dit_pipeline(transformer, scheduler, labels, s, seed) -> np.ndarray:
    """DiTPipeline.__call__; its final latents, caught on their way into a tiny VAE (scaling 1)."""
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=2, layers_per_block=1, scaling_factor=1.0).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    caught = []
    decode = vae.decode
    vae.decode = lambda latents, *a, **k: caught.append(latents.clone()) or decode(latents)  # this instance only
    pipe(class_labels=list(labels), guidance_scale=s, generator=torch.Generator().manual_seed(seed),
         num_inference_steps=STEPS, output_type="pt")
    return caught[0].numpy()


@dataclass(frozen=True)
class Row:
    """One row of the table: a family's model, the scheduler diffusers runs (the shipped one,
    or `cls` made from_config of it with `fields`), and the runtime's --sampler and fields."""

    family: str
    scheduler: str  # the row's name, as users call the scheduler
    cls: str | None = None  # diffusers' class; None: the shipped one
    fields: dict = field(default_factory=dict)
    sampler: str | None = None  # the runtime's --sampler; None: the manifest's scheduler
    rescale: float = 0.0  # guidance_rescale phi
    ours: dict | None = None  # the runtime's fields, where they differ from diffusers' (ablations)
    ours_rescale: float | None = None  # the runtime's phi, where it differs (ablations)

    @property
    def name(self) -> str:
        extra = f", guidance_rescale {self.rescale}" if self.rescale else ""
        return f"{self.family}: {self.scheduler}{extra}"

    def run(self, models: dict) -> float:
        """Returns max |ours - diffusers| / max |diffusers| of the final latents."""
        model = models[self.family]
        seed = 11
        scheduler = load_scheduler(model.folder, self.cls, self.fields)
        fields = self.fields if self.ours is None else self.ours
        common = {"steps": STEPS, "sampler": self.sampler, "scheduler": fields, "backend": model.backend}
        if self.family == "dit":
            labels = [1, 7]
            x_T = torch.randn((N, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
            theirs = dit_pipeline(model.module, scheduler, labels, S, seed)
            ours = sample_guided(model.artifact, labels, S - 1, noise=x_T.numpy(), **common).samples
        else:
            g = np.random.default_rng(4)
            prompts = g.standard_normal((N, tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM)).astype(np.float32)
            null = np.load(model.artifact / "null_embedding.npy")
            x_T = torch.randn((N, 4, 8, 8), generator=torch.Generator().manual_seed(seed + 1))
            theirs = stable_diffusion_loop(model.module, scheduler, prompts, np.stack([null] * N), x_T, S,
                                           self.rescale, seed)
            phi = self.rescale if self.ours_rescale is None else self.ours_rescale
            ours = sample_guided(model.artifact, prompts, S - 1, noise=x_T.numpy(), noise_source=TorchNoise(seed),
                                 guidance=GuidanceOptions(rescale=phi or None), **common).samples
        assert np.abs(theirs).max() > 0.1
        return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
ROWS = [
    Row("sd1", "PNDM (PLMS), shipped"),
    Row("sd1", "DDIM", "DDIMScheduler", sampler="ddim"),
    Row("sd1", "DDPM", "DDPMScheduler", sampler="ddpm"),
    Row("sd1", "Euler", "EulerDiscreteScheduler", sampler="euler"),
    Row("sd1", "Euler ancestral", "EulerAncestralDiscreteScheduler", sampler="euler-ancestral"),
    Row("sd1", "Heun", "HeunDiscreteScheduler", sampler="heun"),
    Row("sd1", "DPM++ 2M", "DPMSolverMultistepScheduler", sampler="dpmpp-2m"),
    Row("sd1", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", KARRAS, sampler="dpmpp-2m"),
    Row("sd1", "DPM++ 2M SDE", "DPMSolverMultistepScheduler", SDE, sampler="dpmpp-2m-sde"),
    Row("sd1", "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**SDE, **KARRAS}, sampler="dpmpp-2m-sde"),
    Row("sd1", "UniPC", "UniPCMultistepScheduler", sampler="unipc"),
    Row("sd2", "DDIM (v-prediction), shipped"),
    Row("sd2", "DDIM (v-prediction), shipped", rescale=0.7),
    Row("sd2", "Euler (v-prediction)", "EulerDiscreteScheduler", sampler="euler"),
    Row("sd2", "Euler (v-prediction)", "EulerDiscreteScheduler", sampler="euler", rescale=0.7),
    Row("dit", "DDIM, shipped"),
    Row("dit", "DPM++ 2M", "DPMSolverMultistepScheduler", sampler="dpmpp-2m"),
]
# What the runtime gave before these samplers (its DDIM without the config's steps_offset
# and set_alpha_to_one, no guidance_rescale, DDIM's linspace for DPM-Solver), for the notes.
ABLATIONS = [
    (Row("sd1", "DDIM", "DDIMScheduler", sampler="ddim", ours={"steps_offset": 0, "set_alpha_to_one": True}),
     "SD 1.5 DDIM without steps_offset=1 and set_alpha_to_one=false"),
    (Row("sd2", "DDIM (v-prediction), shipped", ours={"steps_offset": 0, "set_alpha_to_one": True}),
     "SD 2.1 DDIM without steps_offset=1 and set_alpha_to_one=false"),
    (Row("sd2", "DDIM (v-prediction), shipped", rescale=0.7, ours_rescale=0.0),
     "SD 2.1 with guidance_rescale 0.7 in diffusers, none in the runtime"),
    (Row("dit", "DPM++ 2M", "DPMSolverMultistepScheduler", sampler="dpmpp-2m",
         ours={"timestep_spacing": "trailing"}), "DiT DPM++ 2M from_config of DDIM's config, trailing spacing"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread each side is fastest, and fair to shared CPUs
    with contextlib.ExitStack() as stack:
        yield build_models(tmp_path_factory.mktemp("fidelity"), stack)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_fidelity_row(models, row):
    assert row.run(models) < TOLERANCE


@pytest.mark.parametrize("ablation", ABLATIONS, ids=[a[1] for a in ABLATIONS])
def test_ablations_are_far_off(models, ablation):
    """The table can fail: ignoring a config field the rows honour moves the result far beyond
    the tolerance."""
    assert ablation[0].run(models) > 1e-3
