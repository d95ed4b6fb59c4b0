"""Prints, for each tiny pipeline (SD eps, SD v, SDXL, SD3, DiT): export time, the export's
per-stage ONNX Runtime vs PyTorch errors, torch-free sampling time beside the diffusers
pipeline's __call__ time in the same run (prompt to images, PyTorch CPU, its second call;
the runtime's one call opens its ONNX Runtime sessions), and the errors
against the same diffusers pipeline's __call__ (final latents relative to the largest
latent, decoded images absolute in [0, 1], text encoder outputs relative).

    .venv/bin/python benchmarks/pipelines_fidelity.py [WORK_DIR]
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfg_export.export.pipelines import export_pipeline  # noqa: E402
from cfg_export.runtime.artifact import Artifact  # noqa: E402
from cfg_export.runtime.pipeline_sampling import sample_pipeline  # noqa: E402
from cfg_export.runtime.prompts import encode_prompts  # noqa: E402
from tests import tiny_pipelines  # noqa: E402
from tests.cfg_export.pipelines.conftest import SAVERS  # noqa: E402
from tests.cfg_export.pipelines.test_fidelity import (NEGATIVES, PROMPTS, STEPS, W, diffusers_text_run,  # noqa: E402
                                                      initial_latents, latent_channels, reference_encode, rel)


def encoder_errors(artifact: Artifact, pipe) -> str:
    """Each text encoder stage (ONNX Runtime) against transformers' model on the prompts'
    and negatives' tokens: max relative error of its hidden states and pooled output."""
    from cfg_export.runtime.backends import open_backend
    from cfg_export.runtime.prompts import PromptTokenizer

    errors = []
    for entry in artifact.pipeline["prompt"]["encoders"]:
        ids = PromptTokenizer(artifact, entry["tokenizer"])(PROMPTS + NEGATIVES).ids
        with open_backend(artifact, "onnxruntime-cpu", stage=entry["stage"]) as encoder:
            ours = encoder.infer({"input_ids": ids})
            facts = encoder.manifest.facts
        with torch.no_grad():
            out = getattr(pipe, entry["stage"])(torch.from_numpy(ids), output_hidden_states=True)
        hidden = out.hidden_states[-2] if facts.hidden_layer.value == "penultimate" else out.last_hidden_state
        error = rel(ours["hidden"], hidden.numpy())
        if "pooled" in ours:
            error = max(error, rel(ours["pooled"], out.text_embeds.numpy()))
        errors.append(f"{entry['stage']} {error:.1e}")
    return ", ".join(errors)


def main(work: Path) -> None:
    for name, save in SAVERS.items():
        folder = save(work / name)
        start = time.perf_counter()
        result = export_pipeline(folder, work / f"{name}-artifact")
        export_seconds = time.perf_counter() - start
        stages = ", ".join(f"{c.stage} {c.what}: {c.max_rel:.1e}" for c in result.checks)
        print(f"{name}: export {export_seconds:.1f} s; ONNX Runtime vs PyTorch per stage (max rel): {stages}")
        pipe = tiny_pipelines.load_pipeline(folder)
        latents = initial_latents(2, seed=3, channels=latent_channels(pipe))
        if name == "dit":
            caught = []
            decode = pipe.vae.decode
            pipe.vae.decode = lambda z, *a, **k: caught.append(z.clone()) or decode(z, *a, **k)
            with torch.no_grad():  # a first, untimed call: PyTorch's first-call costs are not the pipeline's
                pipe(class_labels=[1, 7], guidance_scale=1 + W, num_inference_steps=STEPS, output_type="np")
            caught.clear()
            start = time.perf_counter()
            with torch.no_grad():
                theirs_images = pipe(class_labels=[1, 7], guidance_scale=1 + W, num_inference_steps=STEPS,
                                     output_type="np", generator=torch.Generator().manual_seed(3)).images
            theirs_latents = caught[0].numpy() * pipe.vae.config.scaling_factor
            diffusers_seconds = time.perf_counter() - start
            start = time.perf_counter()
            ours = sample_pipeline(work / f"{name}-artifact", classes=[1, 7], w=W, steps=STEPS, noise=latents)
            sample_seconds = time.perf_counter() - start
            text = ""
        else:
            diffusers_text_run(pipe, latents, NEGATIVES, 16, 16)  # untimed: PyTorch's first-call costs
            start = time.perf_counter()
            theirs_images, theirs_latents = diffusers_text_run(pipe, latents, NEGATIVES, 16, 16)
            diffusers_seconds = time.perf_counter() - start
            start = time.perf_counter()
            ours = sample_pipeline(work / f"{name}-artifact", PROMPTS, NEGATIVES, w=W, steps=STEPS, noise=latents)
            sample_seconds = time.perf_counter() - start
            artifact = Artifact.open(work / f"{name}-artifact")
            encoded = encode_prompts(artifact, PROMPTS, NEGATIVES, 16, 16)
            ref = reference_encode(pipe, PROMPTS, NEGATIVES)
            main_name = artifact.manifest.facts.condition.name
            errors = {main_name: max(rel(encoded.conds[main_name], ref[0]), rel(encoded.nulls[main_name], ref[1]))}
            pooled = artifact.pipeline["prompt"].get("pooled")
            if pooled:
                errors[pooled] = max(rel(encoded.conds[pooled], ref[2]), rel(encoded.nulls[pooled], ref[3]))
            text = ", text encoders vs encode_prompt (rel): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
            text += f"; each encoder stage vs transformers (rel): {encoder_errors(artifact, pipe)}"
        print(f"{name}: sample 2 images x {STEPS} steps {sample_seconds:.2f} s (diffusers' __call__ "
              f"{diffusers_seconds:.2f} s, ratio {sample_seconds / diffusers_seconds:.2f}); vs diffusers: latents "
              f"{rel(ours.latents, theirs_latents):.1e} (rel), images "
              f"{float(np.abs(ours.images - theirs_images).max()):.1e} (abs){text}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
