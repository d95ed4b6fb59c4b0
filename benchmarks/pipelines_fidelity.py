"""Prints, for each tiny pipeline (SD eps, SD v, SDXL, DiT): export time, the export's
per-stage ONNX Runtime vs PyTorch errors, torch-free sampling time, and the errors
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
                                                      initial_latents, rel)


def main(work: Path) -> None:
    for name, save in SAVERS.items():
        folder = save(work / name)
        start = time.perf_counter()
        result = export_pipeline(folder, work / f"{name}-artifact")
        export_seconds = time.perf_counter() - start
        stages = ", ".join(f"{c.stage} {c.what}: {c.max_rel:.1e}" for c in result.checks)
        print(f"{name}: export {export_seconds:.1f} s; ONNX Runtime vs PyTorch per stage (max rel): {stages}")
        pipe = tiny_pipelines.load_pipeline(folder)
        latents = initial_latents(2, seed=3)
        if name == "dit":
            caught = []
            decode = pipe.vae.decode
            pipe.vae.decode = lambda z, *a, **k: caught.append(z.clone()) or decode(z, *a, **k)
            with torch.no_grad():
                theirs_images = pipe(class_labels=[1, 7], guidance_scale=1 + W, num_inference_steps=STEPS,
                                     output_type="np", generator=torch.Generator().manual_seed(3)).images
            theirs_latents = caught[0].numpy() * pipe.vae.config.scaling_factor
            start = time.perf_counter()
            ours = sample_pipeline(work / f"{name}-artifact", classes=[1, 7], w=W, steps=STEPS, noise=latents)
            text = ""
        else:
            theirs_images, theirs_latents = diffusers_text_run(pipe, latents, NEGATIVES, 16, 16)
            start = time.perf_counter()
            ours = sample_pipeline(work / f"{name}-artifact", PROMPTS, NEGATIVES, w=W, steps=STEPS, noise=latents)
            artifact = Artifact.open(work / f"{name}-artifact")
            encoded = encode_prompts(artifact, PROMPTS, NEGATIVES, 16, 16)
            with torch.no_grad():
                ref = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
            main_name = artifact.manifest.facts.condition.name
            errors = [rel(encoded.conds[main_name], ref[0].numpy()), rel(encoded.nulls[main_name], ref[1].numpy())]
            if name == "sdxl":
                errors += [rel(encoded.conds["text_embeds"], ref[2].numpy()),
                           rel(encoded.nulls["text_embeds"], ref[3].numpy())]
            text = f", text encoders {max(errors):.1e} (rel)"
        sample_seconds = time.perf_counter() - start
        print(f"{name}: sample 2 images x {STEPS} steps {sample_seconds:.2f} s; vs diffusers: latents "
              f"{rel(ours.latents, theirs_latents):.1e} (rel), images "
              f"{float(np.abs(ours.images - theirs_images).max()):.1e} (abs){text}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
