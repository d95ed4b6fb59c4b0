"""Whole pipelines, prompt (or class) to pixels: tiny diffusers pipelines saved with
save_pretrained, exported by cfg-export, sampled by the torch-free runtime, and
compared with the same diffusers pipeline's __call__ for the same prompts, negative
prompts, latents, steps and guidance (guidance_scale = 1 + w)."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cfg_export.runtime.artifact import Artifact  # noqa: E402
from cfg_export.runtime.pipeline_sampling import sample_pipeline  # noqa: E402
from cfg_export.runtime.prompts import PromptTokenizer, encode_prompts  # noqa: E402
from tests import tiny_pipelines  # noqa: E402

STEPS = 3
W = 2.5  # guidance_scale 3.5
PROMPTS = ["a red car", "a photo of the blue sky"]
NEGATIVES = ["blurry", "ugly green tree"]
LATENT_TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers| of the final latents
IMAGE_TOLERANCE = 1e-3  # max |ours - diffusers| of the decoded images in [0, 1]
TEXT_TOLERANCE = 1e-5  # max |ours - transformers| / max |transformers| of the text encoder outputs


def rel(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max() / np.abs(np.asarray(theirs)).max())


def initial_latents(n: int, seed: int, size: int = tiny_pipelines.LATENT) -> np.ndarray:
    return torch.randn((n, 4, size, size), generator=torch.Generator().manual_seed(seed)).numpy()


def diffusers_text_run(pipe, latents, negatives, height, width):
    """The pipeline's own __call__: (images [N, H, W, 3], final latents)."""
    caught = {}

    def on_step_end(pipeline, i, t, kwargs):
        caught["latents"] = kwargs["latents"].clone()
        return kwargs

    out = pipe(prompt=PROMPTS, negative_prompt=negatives, latents=torch.from_numpy(latents), guidance_scale=1 + W,
               num_inference_steps=STEPS, height=height, width=width, output_type="np",
               callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    return out.images, caught["latents"].numpy()


@pytest.mark.parametrize("name", ["sd", "sd_v", "sdxl"])
def test_text_pipeline_matches_diffusers(pipeline_artifacts, pipeline_references, name):
    """Two prompts, two different negative prompts, one batch: final latents within 1e-5
    (relative to the largest latent), images within 1e-3, as diffusers computes them."""
    artifact = pipeline_artifacts[name]
    pipe = pipeline_references[name]
    size = 2 * tiny_pipelines.LATENT
    latents = initial_latents(2, seed=3)
    theirs_images, theirs_latents = diffusers_text_run(pipe, latents, NEGATIVES, size, size)
    ours = sample_pipeline(artifact, PROMPTS, NEGATIVES, w=W, steps=STEPS, noise=latents, height=size, width=size)
    assert ours.images.shape == theirs_images.shape == (2, size, size, 3)
    assert rel(ours.latents, theirs_latents) < LATENT_TOLERANCE
    assert np.abs(ours.images - theirs_images).max() < IMAGE_TOLERANCE
    assert ours.rows["text_encoders"] == 4 * len(Artifact.open(artifact).pipeline["prompt"]["encoders"])
    # the comparison sees the conditions: the negatives swapped between the images is far outside it
    swapped = sample_pipeline(artifact, PROMPTS, NEGATIVES[::-1], w=W, steps=STEPS, noise=latents)
    assert rel(swapped.latents, theirs_latents) > 10 * LATENT_TOLERANCE


def test_sd_without_negative_prompt_uses_the_empty_prompt(pipeline_artifacts, pipeline_references):
    """No negative prompt: the null rows are the empty prompt's encoding stored at export."""
    pipe = pipeline_references["sd"]
    latents = initial_latents(2, seed=4)
    theirs_images, theirs_latents = diffusers_text_run(pipe, latents, None, 16, 16)
    ours = sample_pipeline(pipeline_artifacts["sd"], PROMPTS, w=W, steps=STEPS, noise=latents)
    assert rel(ours.latents, theirs_latents) < LATENT_TOLERANCE
    assert np.abs(ours.images - theirs_images).max() < IMAGE_TOLERANCE
    assert ours.rows["text_encoders"] == 2  # prompts only: the null is stored


def test_sdxl_without_negative_prompt_zeros_and_other_size(pipeline_artifacts, pipeline_references):
    """force_zeros_for_empty_prompt: zero null rows; time_ids follow --height/--width (24x32)."""
    pipe = pipeline_references["sdxl"]
    latents = torch.randn((2, 4, 12, 16), generator=torch.Generator().manual_seed(5)).numpy()
    theirs_images, theirs_latents = diffusers_text_run(pipe, latents, None, 24, 32)
    ours = sample_pipeline(pipeline_artifacts["sdxl"], PROMPTS, w=W, steps=STEPS, noise=latents, height=24, width=32)
    assert ours.images.shape == (2, 24, 32, 3)
    assert rel(ours.latents, theirs_latents) < LATENT_TOLERANCE
    assert np.abs(ours.images - theirs_images).max() < IMAGE_TOLERANCE


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_text_encoders_match_transformers(pipeline_artifacts, pipeline_references, name):
    """Token ids equal transformers' tokenizer's; the encoded conditions (prompts and
    negatives) within 1e-5 relative of the pipeline's own encode_prompt."""
    pipe = pipeline_references[name]
    artifact = Artifact.open(pipeline_artifacts[name])
    for entry in artifact.pipeline["prompt"]["encoders"]:
        reference = getattr(pipe, entry["tokenizer"])
        want = reference(PROMPTS + NEGATIVES, padding="max_length", max_length=reference.model_max_length,
                         truncation=True).input_ids
        assert PromptTokenizer(artifact, entry["tokenizer"])(PROMPTS + NEGATIVES).ids.tolist() == want
    ours = encode_prompts(artifact, PROMPTS, NEGATIVES, 16, 16)
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                    negative_prompt=NEGATIVES)
    main = "cond" if name == "sd" else "encoder_hidden_states"
    assert rel(ours.conds[main], theirs[0].numpy()) < TEXT_TOLERANCE
    assert rel(ours.nulls[main], theirs[1].numpy()) < TEXT_TOLERANCE
    if name == "sdxl":
        assert rel(ours.conds["text_embeds"], theirs[2].numpy()) < TEXT_TOLERANCE
        assert rel(ours.nulls["text_embeds"], theirs[3].numpy()) < TEXT_TOLERANCE


def test_dit_matches_dit_pipeline(pipeline_artifacts, pipeline_references):
    """DiTPipeline with class names and indices: latents within 1e-5, images within 1e-3."""
    pipe = pipeline_references["dit"]
    labels = pipe.get_label_ids(["goldfish", "cock"])
    latents = initial_latents(2, seed=6)
    caught = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: caught.append(z.clone()) or decode(z, *a, **k)  # this instance only
    with torch.no_grad():  # DiTPipeline draws its own latents: the same seed gives `latents`
        theirs = pipe(class_labels=labels, guidance_scale=1 + W, num_inference_steps=STEPS, output_type="np",
                      generator=torch.Generator().manual_seed(6)).images
    theirs_latents = caught[0].numpy() * pipe.vae.config.scaling_factor
    ours = sample_pipeline(pipeline_artifacts["dit"], classes=["goldfish", "7"], w=W, steps=STEPS, noise=latents)
    assert ours.images.shape == (2, 16, 16, 3)
    assert rel(ours.latents, theirs_latents) < LATENT_TOLERANCE
    assert np.abs(ours.images - theirs).max() < IMAGE_TOLERANCE
