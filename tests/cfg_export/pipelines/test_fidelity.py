"""Whole pipelines, prompt (or class) to pixels: tiny diffusers pipelines saved with
save_pretrained (each with its family's shipped scheduler), exported by cfg-export,
sampled by the torch-free runtime, and compared with the same diffusers pipeline's
__call__ for the same prompts, negative prompts, latents, steps and guidance
(guidance_scale = 1 + w)."""
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


def initial_latents(n: int, seed: int, size: int | tuple[int, int] = tiny_pipelines.LATENT,
                    channels: int = 4) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn((n, channels, h, w), generator=torch.Generator().manual_seed(seed)).numpy()


def latent_channels(pipe) -> int:
    return pipe.vae.config.latent_channels


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


@pytest.mark.parametrize("name", ["sd", "sd_v", "sdxl", "sd3"])
def test_text_pipeline_matches_diffusers(pipeline_artifacts, pipeline_references, name):
    """Two prompts, two different negative prompts, one batch: final latents within 1e-5
    (relative to the largest latent), images within 1e-3, as diffusers computes them."""
    artifact = pipeline_artifacts[name]
    pipe = pipeline_references[name]
    size = 2 * tiny_pipelines.LATENT
    latents = initial_latents(2, seed=3, channels=latent_channels(pipe))
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


def pipeline_max_length(pipe, tokenizer: str) -> int:
    """The tokens the pipeline pads each tokenizer's prompts to (SD3: both CLIPs to the
    first's model_max_length, T5 to max_sequence_length's default)."""
    if type(pipe).__name__ == "StableDiffusion3Pipeline":
        return tiny_pipelines.T5_LENGTH if tokenizer == "tokenizer_3" else pipe.tokenizer_max_length
    return getattr(pipe, tokenizer).model_max_length


def reference_encode(pipe, prompts, negatives):
    """The pipeline's own encode_prompt: (cond, null, pooled, null pooled); pooled None for SD."""
    with torch.no_grad():
        if type(pipe).__name__ == "StableDiffusion3Pipeline":
            out = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True,
                                     negative_prompt=negatives)
        else:
            out = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=True, negative_prompt=negatives)
    return [None if t is None else t.numpy() for t in (tuple(out) + (None, None))[:4]]


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_text_encoders_match_transformers(pipeline_artifacts, pipeline_references, name):
    """Token ids equal transformers' tokenizer's at the length the pipeline pads to; the
    encoded conditions (prompts and negatives) within 1e-5 relative of the pipeline's own
    encode_prompt."""
    pipe = pipeline_references[name]
    artifact = Artifact.open(pipeline_artifacts[name])
    for entry in artifact.pipeline["prompt"]["encoders"]:
        reference = getattr(pipe, entry["tokenizer"])
        ours = PromptTokenizer(artifact, entry["tokenizer"])
        assert ours.max_length == pipeline_max_length(pipe, entry["tokenizer"])
        want = reference(PROMPTS + NEGATIVES, padding="max_length", max_length=ours.max_length,
                         truncation=True).input_ids
        assert ours(PROMPTS + NEGATIVES).ids.tolist() == want
    ours = encode_prompts(artifact, PROMPTS, NEGATIVES, 16, 16)
    theirs = reference_encode(pipe, PROMPTS, NEGATIVES)
    main = artifact.manifest.facts.condition.name
    assert rel(ours.conds[main], theirs[0]) < TEXT_TOLERANCE
    assert rel(ours.nulls[main], theirs[1]) < TEXT_TOLERANCE
    if name != "sd":
        pooled = artifact.pipeline["prompt"]["pooled"]
        assert rel(ours.conds[pooled], theirs[2]) < TEXT_TOLERANCE
        assert rel(ours.nulls[pooled], theirs[3]) < TEXT_TOLERANCE


def test_sd3_each_text_encoder_matches_transformers(pipeline_artifacts, pipeline_references):
    """Each SD3 text encoder stage on its own, within 1e-5 relative of transformers: the two
    CLIPs' penultimate hidden states and pooled projections, T5's last hidden state."""
    from cfg_export.runtime.backends import open_backend

    pipe = pipeline_references["sd3"]
    artifact = Artifact.open(pipeline_artifacts["sd3"])
    for entry in artifact.pipeline["prompt"]["encoders"]:
        ids = PromptTokenizer(artifact, entry["tokenizer"])(PROMPTS + NEGATIVES).ids
        with open_backend(artifact, "onnxruntime-cpu", stage=entry["stage"]) as encoder:
            ours = encoder.infer({"input_ids": ids})
        model = getattr(pipe, entry["stage"])
        with torch.no_grad():
            out = model(torch.from_numpy(ids), output_hidden_states=True)
        if entry["stage"] == "text_encoder_3":
            assert set(ours) == {"hidden"}
            assert rel(ours["hidden"], out.last_hidden_state.numpy()) < TEXT_TOLERANCE
        else:
            assert rel(ours["hidden"], out.hidden_states[-2].numpy()) < TEXT_TOLERANCE
            assert rel(ours["pooled"], out.text_embeds.numpy()) < TEXT_TOLERANCE


def test_sd3_without_negative_prompt_and_other_size(pipeline_artifacts, pipeline_references):
    """No negative prompt: the null rows are the empty prompt's encoding through all three
    encoders, stored at export; 24x32 pixels (SD3 crops its position embedding)."""
    pipe = pipeline_references["sd3"]
    latents = initial_latents(2, seed=7, size=(12, 16), channels=16)
    theirs_images, theirs_latents = diffusers_text_run(pipe, latents, None, 24, 32)
    ours = sample_pipeline(pipeline_artifacts["sd3"], PROMPTS, w=W, steps=STEPS, noise=latents, height=24, width=32)
    assert ours.images.shape == (2, 24, 32, 3)
    assert rel(ours.latents, theirs_latents) < LATENT_TOLERANCE
    assert np.abs(ours.images - theirs_images).max() < IMAGE_TOLERANCE
    assert ours.rows["text_encoders"] == 3 * 2  # prompts only: the null is stored


def test_sd3_manifest_flow_matching_facts(pipeline_artifacts, pipeline_folders):
    """The denoiser records flow matching: schedule flow_match, prediction flow (velocity),
    float32 timesteps (sigma x 1000), the scheduler config whole (shift), the patch size;
    the VAE its scaling and shift factors."""
    import json

    artifact = Artifact.open(pipeline_artifacts["sd3"])
    facts = artifact.manifest.facts
    saved = json.loads((pipeline_folders["sd3"] / "scheduler" / "scheduler_config.json").read_text())
    assert facts.schedule.is_flow and facts.prediction.value == "flow" and facts.timestep_dtype == "float32"
    assert facts.scheduler == saved and saved["shift"] == 3.0
    assert facts.patch_size == 2 and facts.sample_shape == (16, 8, 8)
    assert [c.name for c in facts.conditions] == ["encoder_hidden_states", "pooled_projections"]
    assert facts.condition.shape == (tiny_pipelines.MAX_LENGTH + tiny_pipelines.T5_LENGTH, 64)
    vae = artifact.model_file("vae_decoder").manifest.facts
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels) == (1.5305, 0.0609, 16)
    assert artifact.pipeline["image_size"]["max"] == [32, 32]  # pos_embed_max_size 8 patches of 4 pixels


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


def test_sd3_t5_tokens_truncate_like_transformers(pipeline_artifacts, pipeline_references):
    """A prompt longer than the 256 T5 tokens: the ids equal T5TokenizerFast's (truncated,
    '</s>' kept), with one warning; a short one is padded with <pad> (id 0)."""
    pipe = pipeline_references["sd3"]
    long = " ".join(tiny_pipelines.WORDS * 20)
    prompts = [long, "a cat on the tree"]
    ours = PromptTokenizer(Artifact.open(pipeline_artifacts["sd3"]), "tokenizer_3")(prompts)
    want = pipe.tokenizer_3(prompts, padding="max_length", max_length=tiny_pipelines.T5_LENGTH,
                            truncation=True).input_ids
    assert len(pipe.tokenizer_3(long).input_ids) > tiny_pipelines.T5_LENGTH
    assert ours.ids.tolist() == want
    assert len(ours.truncated) == 1 and "256 tokens" in ours.truncated[0]
