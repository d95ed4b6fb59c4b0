"""The pipeline-level rows of the scheduler fidelity table: a diffusers pipeline's
__call__ against `cfg-export sample --prompt` (its library call, sample_pipeline) on
the same tiny pipeline folder, for the same prompts, two different negative prompts in
one batch, initial latents, steps, guidance_scale = 1 + w (and guidance_rescale), each
pipeline with its family's shipped scheduler config or another scheduler made
from_config of it (diffusers' side) and the matching --sampler/--karras/--set
(cfg-export's side).

Ancestral and SDE schedulers draw noise at each step: diffusers' draws (its
randn_tensor, in the scheduler's module) are recorded and handed to the runtime as its
noise source, in order, shape by shape.

Each row: final latents within 1e-5 of the largest latent value. Each tiny pipeline is
built and exported once per session (tests/cfg_export/pipelines/conftest.py);
benchmarks/scheduler_fidelity.py prints the rows with their errors.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cfg_export.runtime.guidance import GuidanceOptions  # noqa: E402
from cfg_export.runtime.pipeline_sampling import sample_pipeline  # noqa: E402

TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers| of the final latents
STEPS = 5  # enough for PLMS's fourth order and the multistep solvers' second
S = 7.5  # diffusers' guidance_scale; the runtime's w = S - 1
PROMPTS = ["a red car", "a photo of the blue sky"]
NEGATIVES = ["blurry", "ugly green tree"]
SEED = 21
FAMILIES = {"sd": "SD 1.x (ships PNDM)", "sd_v": "SD 2.x (ships DDIM, v-prediction)",
            "sdxl": "SDXL (ships Euler)", "sd3": "SD3 (ships flow-matching Euler, shift 3)"}

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class RecordedNoise:
    """The runtime's noise source, fed the noise diffusers drew, in order."""

    def __init__(self, draws: list[np.ndarray]):
        self.draws = list(draws)
        self.used = 0

    def standard_normal(self, shape) -> np.ndarray:
        if self.used >= len(self.draws):
            raise AssertionError(f"the runtime draws more noise than diffusers ({len(self.draws)} draws)")
        value = self.draws[self.used]
        if tuple(value.shape) != tuple(shape):
            raise AssertionError(f"draw {self.used}: the runtime asks {tuple(shape)}, diffusers drew {value.shape}")
        self.used += 1
        return value


def recording(scheduler, draws: list[np.ndarray]):
    """Patches randn_tensor in the scheduler's module (this run only) to record its draws."""
    module = sys.modules[type(scheduler).__module__]
    if not hasattr(module, "randn_tensor"):
        return contextlib.nullcontext()  # a scheduler that draws no noise
    original = module.randn_tensor

    def randn_tensor(*args, **kwargs):
        value = original(*args, **kwargs)
        draws.append(value.numpy().copy())
        return value

    return mock.patch.object(module, "randn_tensor", randn_tensor)


@dataclass(frozen=True)
class Row:
    """One pipeline-level row: the pipeline (a key of the session's tiny pipelines), the
    scheduler diffusers runs (the shipped one, or `cls` made from_config of it with
    `fields`) and the runtime's --sampler and fields."""

    pipeline: str
    scheduler: str  # the row's name, as users call the scheduler
    cls: str | None = None  # diffusers' class; None: the shipped one
    fields: dict = field(default_factory=dict)
    sampler: str | None = None  # the runtime's --sampler; None: the recorded scheduler
    rescale: float = 0.0  # guidance_rescale phi
    size: tuple[int, int] | None = None  # pixels; None: the pipeline's own size
    ours: dict | None = None  # the runtime's fields, where they differ (ablations)
    ours_rescale: float | None = None  # the runtime's phi, where it differs (ablations)
    own_noise: bool = False  # the runtime draws from its own seed instead of diffusers' noise (ablations)

    @property
    def name(self) -> str:
        extra = f", guidance_rescale {self.rescale}" if self.rescale else ""
        extra += f", {self.size[0]}x{self.size[1]}" if self.size else ""
        return f"{self.pipeline}: {self.scheduler}{extra}"

    def runtime_args(self) -> list[str]:
        """The row's runtime side as `cfg-export sample` options."""
        args = ["--sampler", self.sampler] if self.sampler else []
        for key, value in self.fields.items():
            if key == "use_karras_sigmas":
                args.append("--karras")
            elif key != "algorithm_type":  # --sampler dpmpp-2m-sde sets it
                args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        args += ["--guidance-rescale", str(self.rescale)] if self.rescale else []
        args += ["--height", str(self.size[0]), "--width", str(self.size[1])] if self.size else []
        return args

    def runtime_flags(self) -> str:
        return " ".join(self.runtime_args()) or "(the recorded scheduler)"

    def diffusers_side(self) -> str:
        if self.cls is None:
            return "the shipped config"
        return f"{self.cls}.from_config(shipped{''.join(f', {k}={v!r}' for k, v in self.fields.items())})"

    def reference(self, references: dict) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], tuple[int, int]]:
        """Runs the diffusers pipeline's __call__; returns (initial latents, final latents,
        the noise its scheduler drew, (height, width))."""
        pipe = references[self.pipeline]
        shipped = pipe.scheduler
        height, width = self.size or (shipped_size(pipe),) * 2
        scale = pipe.vae_scale_factor
        latents = torch.randn((len(PROMPTS), pipe.vae.config.latent_channels, height // scale, width // scale),
                              generator=torch.Generator().manual_seed(SEED))
        draws: list[np.ndarray] = []
        extra = {"guidance_rescale": self.rescale} if self.rescale else {}
        try:
            if self.cls is not None:
                pipe.scheduler = getattr(diffusers, self.cls).from_config(shipped.config, **self.fields)
            with recording(pipe.scheduler, draws), torch.no_grad():
                theirs = pipe(prompt=PROMPTS, negative_prompt=NEGATIVES, latents=latents.clone(), guidance_scale=S,
                              num_inference_steps=STEPS, height=height, width=width, output_type="latent",
                              generator=torch.Generator().manual_seed(SEED + 1), **extra).images.numpy()
        finally:
            pipe.scheduler = shipped
        assert np.abs(theirs).max() > 0.1
        return latents.numpy(), theirs, draws, (height, width)

    def run(self, artifacts: dict, references: dict) -> float:
        """Returns max |ours - diffusers| / max |diffusers| of the final latents."""
        latents, theirs, draws, (height, width) = self.reference(references)
        noise = None if self.own_noise else RecordedNoise(draws)
        phi = self.rescale if self.ours_rescale is None else self.ours_rescale
        fields = self.fields if self.ours is None else self.ours
        ours = sample_pipeline(artifacts[self.pipeline], PROMPTS, NEGATIVES, w=S - 1, steps=STEPS,
                               sampler=self.sampler, scheduler=fields or None, noise=latents, noise_source=noise,
                               guidance=GuidanceOptions(rescale=phi or None), height=height, width=width).latents
        if noise is not None:
            assert noise.used == len(draws), f"the runtime drew {noise.used} of diffusers' {len(draws)} draws"
        return relative_error(ours, theirs)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def shipped_size(pipe) -> int:
    """The pipeline's own image size in pixels (its denoiser's sample_size x the VAE factor)."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    return int(denoiser.config.sample_size) * pipe.vae_scale_factor


KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
DYNAMIC = {"use_dynamic_shifting": True}
ROWS = [
    Row("sd", "PNDM (PLMS), shipped"),
    Row("sd", "DDIM", "DDIMScheduler", sampler="ddim"),
    Row("sd", "Euler", "EulerDiscreteScheduler", sampler="euler"),
    Row("sd", "Euler ancestral", "EulerAncestralDiscreteScheduler", sampler="euler-ancestral"),
    Row("sd", "DPM++ 2M", "DPMSolverMultistepScheduler", sampler="dpmpp-2m"),
    Row("sd", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", KARRAS, sampler="dpmpp-2m"),
    Row("sd", "DPM++ 2M SDE", "DPMSolverMultistepScheduler", SDE, sampler="dpmpp-2m-sde"),
    Row("sd", "UniPC", "UniPCMultistepScheduler", sampler="unipc"),
    Row("sd_v", "DDIM (v-prediction), shipped"),
    Row("sd_v", "DDIM (v-prediction), shipped", rescale=0.7),
    Row("sd_v", "Euler (v-prediction)", "EulerDiscreteScheduler", sampler="euler"),
    Row("sd_v", "Euler (v-prediction)", "EulerDiscreteScheduler", sampler="euler", rescale=0.7),
    Row("sdxl", "Euler, shipped"),
    Row("sdxl", "Euler ancestral", "EulerAncestralDiscreteScheduler", sampler="euler-ancestral"),
    Row("sdxl", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", KARRAS, sampler="dpmpp-2m"),
    Row("sd3", "flow-matching Euler, shipped"),
    Row("sd3", "flow-matching Euler, dynamic shifting", "FlowMatchEulerDiscreteScheduler", DYNAMIC, size=(24, 32)),
]
# The rows can fail: what leaving out one thing the rows honour costs, on the same pipelines.
ABLATIONS = [
    (Row("sd", "Euler ancestral", "EulerAncestralDiscreteScheduler", sampler="euler-ancestral", own_noise=True),
     "SD 1.x Euler ancestral with the runtime's own noise instead of diffusers' draws"),
    (Row("sd_v", "DDIM (v-prediction), shipped", rescale=0.7, ours_rescale=0.0),
     "SD 2.x guidance_rescale 0.7 in diffusers, none in the runtime"),
    (Row("sd3", "flow-matching Euler, shipped", ours={"shift": 1.0}),
     "SD3 without its shipped shift 3 (shift 1 in the runtime)"),
    (Row("sd3", "flow-matching Euler, dynamic shifting", "FlowMatchEulerDiscreteScheduler", DYNAMIC, size=(24, 32),
         ours={}), "SD3 with dynamic shifting in diffusers, the fixed shift in the runtime"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread each side is fastest, and fair to shared CPUs
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_pipeline_row(pipeline_artifacts, pipeline_references, row):
    assert row.run(pipeline_artifacts, pipeline_references) < TOLERANCE


@pytest.mark.parametrize("ablation", ABLATIONS, ids=[a[1] for a in ABLATIONS])
def test_pipeline_ablations_are_far_off(pipeline_artifacts, pipeline_references, ablation):
    """The rows can fail: leaving out what they honour (diffusers' noise, guidance_rescale,
    the shift, dynamic shifting) moves the result at least 50 times the tolerance."""
    assert ablation[0].run(pipeline_artifacts, pipeline_references) > 50 * TOLERANCE


CLI_ROWS = [r for r in ROWS if (r.pipeline, r.scheduler) in {("sdxl", "DPM++ 2M Karras"),
                                                              ("sd3", "flow-matching Euler, dynamic shifting")}]


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.name for r in CLI_ROWS])
def test_pipeline_row_through_the_cli(pipeline_artifacts, pipeline_references, row, tmp_path):
    """The row as a user types it: cfg-export sample --prompt ... --negative-prompt ...
    --noise FILE --karras / --set use_dynamic_shifting=true --height --width."""
    from tests.cfg_export.pipelines.test_cli_and_errors import run_here

    latents, theirs, draws, _ = row.reference(pipeline_references)
    assert not draws
    np.save(tmp_path / "noise.npy", latents)
    args = [a for p in PROMPTS for a in ("--prompt", p)] + [a for n in NEGATIVES for a in ("--negative-prompt", n)]
    proc = run_here("sample", pipeline_artifacts[row.pipeline], *args, "--w", S - 1, "--steps", STEPS, "--noise",
                    tmp_path / "noise.npy", "--latents", tmp_path / "latents.npy", *row.runtime_args())
    assert proc.returncode == 0, proc.output
    assert relative_error(np.load(tmp_path / "latents.npy"), theirs) < TOLERANCE
