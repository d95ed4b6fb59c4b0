"""Whole guided sampling runs: cfg-export's torch-free runtime on the exported artifact
against diffusers' own loop (its pipeline where one runs offline, else the loop its
pipelines run) for the same model, scheduler, noise and guidance; and the sample CLI
with embedding conditions."""
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,  # noqa: E402
                       DPMSolverMultistepScheduler, UNet2DConditionModel, UNet2DModel)

from cfg_export.runtime.errors import CfgExportError  # noqa: E402
from cfg_export.runtime.guidance import GuidanceOptions  # noqa: E402
from cfg_export.runtime.pipeline import sample_guided  # noqa: E402
from tests import tiny_diffusers  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

STEPS = 10
# Final latents agree to float32 rounding: the model runs in float32 (ONNX Runtime here,
# PyTorch there, ~1e-7 apart per call) and our sampler steps in float64 where diffusers
# steps in float32 (and builds alphas_cumprod in float32).
TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|

# diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array on a torch tensor
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rel_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def initial_noise(shape, seed: int) -> torch.Tensor:
    """x_T as diffusers' randn_tensor draws it on the CPU from a seeded generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def dpm_solver(config) -> DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) as runtime/samplers/dpmpp_2m.py implements it, with trailing timesteps."""
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   solver_type="midpoint", lower_order_final=True,
                                                   final_sigmas_type="zero", timestep_spacing="trailing")


# --- DiT: diffusers' DiTPipeline ---------------------------------------------------------

def dit_pipeline_latents(folder, scheduler, labels, s, seed) -> np.ndarray:
    """Runs DiTPipeline with guidance_scale s and returns its final latents (caught on the
    way into this tiny VAE, whose scaling_factor is 1 so they arrive unscaled)."""
    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=2, layers_per_block=1, scaling_factor=1.0).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    caught = []
    decode = vae.decode
    vae.decode = lambda latents, *a, **k: caught.append(latents.clone()) or decode(latents)  # this instance only
    pipe(class_labels=labels, guidance_scale=s, generator=torch.Generator().manual_seed(seed),
         num_inference_steps=STEPS, output_type="pt")
    return caught[0].numpy()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_dit_matches_dit_pipeline(diffusers_artifacts, diffusers_folders, sampler):
    """DiTPipeline guides eps = eps_u + s (eps_c - eps_u) on all latent channels (the
    learned-sigma channels ride along unguided and are dropped before the scheduler step),
    with the null class 1000: our w = s - 1 on the sliced graph is the same mix."""
    folder, labels, s, seed = diffusers_folders["dit"].parent, [1, 7, 999], 4.0, 0
    ddim = DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler = ddim if sampler == "ddim" else dpm_solver(ddim.config)
    theirs = dit_pipeline_latents(folder, scheduler, labels, s, seed)
    noise = initial_noise((3, 4, 8, 8), seed).numpy()
    ours = sample_guided(diffusers_artifacts["dit"], labels, s - 1, steps=STEPS, sampler=sampler, noise=noise,
                         spacing="leading" if sampler == "ddim" else "trailing").samples
    assert rel_difference(ours, theirs) < TOLERANCE


# --- UNet2DModel: the class-conditional loop ----------------------------------------------

def class_unet_loop(folder, labels, null, s, seed) -> np.ndarray:
    """The loop of diffusers' pipelines, written out (there is no class-conditional UNet2D
    pipeline): [cond; null] rows in one call, eps_u + s (eps_c - eps_u), DDIMScheduler.step."""
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(STEPS)
    latents = initial_noise((len(labels), 3, 8, 8), seed)
    class_labels = torch.tensor(list(labels) + [null] * len(labels))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_c, eps_u = unet(torch.cat([latents] * 2), t, class_labels=class_labels).sample.chunk(2)
            latents = scheduler.step(eps_u + s * (eps_c - eps_u), t, latents).prev_sample
    return latents.numpy()


def test_class_unet_matches_diffusers_loop(diffusers_artifacts, diffusers_folders):
    labels, s, seed = [0, 2], 3.0, 1
    theirs = class_unet_loop(diffusers_folders["unet2d"], labels, 3, s, seed)  # null: the last of 4 class embeds
    ours = sample_guided(diffusers_artifacts["unet2d"], labels, s - 1, steps=STEPS,
                         noise=initial_noise((2, 3, 8, 8), seed).numpy()).samples
    assert rel_difference(ours, theirs) < TOLERANCE


# --- UNet2DConditionModel: Stable Diffusion's loop -------------------------------------------

def stable_diffusion_loop(folder, prompt_embeds, negative_embeds, s, seed) -> np.ndarray:
    """StableDiffusionPipeline's denoising loop with prompt_embeds and negative_prompt_embeds
    (the pipeline itself needs transformers' CLIP, which this environment lacks): rows
    [negative; prompt], noise_pred_uncond + s (noise_pred_text - noise_pred_uncond)."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(STEPS)
    latents = initial_noise((len(prompt_embeds), 4, 8, 8), seed) * scheduler.init_noise_sigma
    embeds = torch.cat([torch.from_numpy(negative_embeds), torch.from_numpy(prompt_embeds)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_in, t, encoder_hidden_states=embeds).sample
            uncond, text = noise_pred.chunk(2)
            latents = scheduler.step(uncond + s * (text - uncond), t, latents).prev_sample
    return latents.numpy()


@pytest.mark.parametrize("negative", [False, True])
def test_text_unet_matches_stable_diffusion_loop(diffusers_artifacts, diffusers_folders, negative):
    g = np.random.default_rng(4)
    prompts = g.standard_normal((2, tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM)).astype(np.float32)
    null = np.load(diffusers_folders["null"])
    negatives = g.standard_normal(prompts.shape).astype(np.float32) if negative else np.stack([null, null])
    s, seed = 7.5, 2
    theirs = stable_diffusion_loop(diffusers_folders["sd"].parent, prompts, negatives, s, seed)
    options = GuidanceOptions(negative=negatives) if negative else None
    ours = sample_guided(diffusers_artifacts["sd"], prompts, s - 1, steps=STEPS, guidance=options,
                         noise=initial_noise((2, 4, 8, 8), seed).numpy()).samples
    assert rel_difference(ours, theirs) < TOLERANCE


# --- the runtime with embedding conditions: library and CLI ---------------------------------

def test_one_embedding_for_every_image(diffusers_artifacts):
    prompt = np.random.default_rng(0).standard_normal((tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM))
    one = sample_guided(diffusers_artifacts["sd"], prompt.astype(np.float32), 2.0, steps=3, seed=1)
    many = sample_guided(diffusers_artifacts["sd"], prompt[None].astype(np.float32), 2.0, steps=3, seed=1)
    assert one.samples.shape == (1, 4, 8, 8) and one.cond.shape == (1, 5, 16)
    np.testing.assert_array_equal(one.samples, many.samples)


@pytest.mark.parametrize("kwargs,message", [
    ({"cond": np.zeros((2, 5, 8), np.float32)}, "cond: got shape [2, 5, 8], expected [5, 16] for every image, "
                                                "or [N, 5, 16]"),
    ({"cond": [0, 1]}, "cond: got int64 values; this model takes float embeddings [5, 16]"),
    ({"negative": np.zeros((3, 5, 16), np.float32)}, "negative: got 3 embeddings, expected 1 or one per image (2)"),
    ({"negative": np.zeros((5, 4), np.float32)}, "negative: got shape [5, 4], expected [5, 16]"),
])
def test_bad_embeddings(diffusers_artifacts, kwargs, message):
    cond = kwargs.pop("cond", np.zeros((2, 5, 16), np.float32))
    options = GuidanceOptions(negative=kwargs["negative"]) if "negative" in kwargs else None
    with pytest.raises(CfgExportError) as info:
        sample_guided(diffusers_artifacts["sd"], cond, 1.0, steps=2, guidance=options)
    assert message in str(info.value)


def run_runtime(*args):
    return subprocess.run([sys.executable, "-m", "runtime", "sample", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_samples_latents_from_embedding_files(diffusers_artifacts, tmp_path):
    g = np.random.default_rng(5)
    prompts = g.standard_normal((2, 5, 16)).astype(np.float32)
    negative = g.standard_normal((5, 16)).astype(np.float32)
    np.save(tmp_path / "cond.npy", prompts)
    np.save(tmp_path / "neg.npy", negative)
    proc = run_runtime(diffusers_artifacts["sd"], "--cond", tmp_path / "cond.npy", "--negative", tmp_path / "neg.npy",
                       "--n", 2, "--w", 3, "--steps", 4, "--npy", tmp_path / "latents.npy", "-q")
    assert proc.returncode == 0, proc.stderr
    latents = np.load(tmp_path / "latents.npy")
    want = sample_guided(diffusers_artifacts["sd"], np.repeat(prompts, 2, axis=0), 3.0, steps=4,
                         guidance=GuidanceOptions(negative=negative)).samples
    np.testing.assert_array_equal(latents, want)


@pytest.mark.parametrize("args,message", [
    (["--cond", "bad.npy"], "--cond bad.npy: got shape [5, 8], expected [5, 16] for every image, or [N, 5, 16]"),
    ([], "this model takes embedding conditions [5, 16]: give --cond FILE.npy"),
    (["--classes", "1"], "--classes: this model takes embeddings [5, 16]; give --cond FILE.npy"),
    (["--cond", "cond.npy", "--negative", "bad.npy"], "--negative bad.npy: got shape [5, 8]"),
    (["--cond", "missing.npy"], "--cond missing.npy: cannot read it as .npy"),
    (["--cond", "cond.npy", "-o", "grid.png"], "cannot draw samples of shape [4, 8, 8]"),
    (["--cond", "cond.npy", "--no-null"], "null_embedding.npy: cannot read the null embedding"),
])
def test_cli_bad_embedding_input(diffusers_artifacts, tmp_path, args, message):
    import shutil

    art = diffusers_artifacts["sd"]
    if "--no-null" in args:
        art = tmp_path / "art"
        shutil.copytree(diffusers_artifacts["sd"], art)
        (art / "null_embedding.npy").unlink()
        args = [a for a in args if a != "--no-null"]
    np.save(tmp_path / "bad.npy", np.zeros((5, 8), np.float32))
    np.save(tmp_path / "cond.npy", np.zeros((5, 16), np.float32))
    out = [] if "-o" in args else ["--npy", tmp_path / "x.npy"]
    proc = subprocess.run([sys.executable, "-m", "runtime", "sample", str(art), "--steps", "2",
                           *[str(tmp_path / a) if a.endswith((".npy", ".png")) else a for a in args], *map(str, out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr.replace(str(tmp_path) + "/", ""), proc.stderr
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "grid.png").exists()


def test_cli_class_model_refuses_embedding_files(diffusers_artifacts, tmp_path):
    np.save(tmp_path / "cond.npy", np.zeros((5, 16), np.float32))
    proc = run_runtime(diffusers_artifacts["dit"], "--cond", tmp_path / "cond.npy", "--npy", tmp_path / "x.npy")
    assert proc.returncode == 1 and "--cond: this model takes class labels; use --classes" in proc.stderr
    proc = run_runtime(diffusers_artifacts["dit"], "--classes", "3", "--negative", "x", "--npy", tmp_path / "x.npy")
    assert proc.returncode == 1 and "--negative: got 'x', expected integers separated by commas" in proc.stderr
