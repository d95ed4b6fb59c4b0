"""A client of a pipeline server's `sampler` model: prompts (or DiT's classes) in, images
out, written as `cfg-export sample` writes them for a pipeline artifact.

The same options give the same images as `cfg-export sample PIPELINE_ARTIFACT` (the
server runs the runtime's own sample_pipeline): one image per prompt or class, the
negative prompts one for all or one per prompt, w one number or one per image.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.grid import read_npy
from cfg_export.runtime.images import save_npy
from cfg_export.runtime.pipeline_sampling import check_outputs, save_images

from .client import RequestResult, SamplerClient

log = logging.getLogger(__name__)

OUTPUTS = ("images", "latents", "warnings")


def request_images(url: str, *, prompts: Sequence[str] | None = None, negative_prompts: Sequence[str] | None = None,
                   classes: Sequence | None = None, w=None, steps: int | None = None, sampler: str | None = None,
                   spacing: str | None = None, scheduler: dict | None = None, seed: int | None = None, noise=None,
                   height: int | None = None, width: int | None = None, w_schedule: str | None = None,
                   interval: tuple[float, float] | None = None, threshold: float | None = None,
                   guidance_rescale: float | None = None, out: str | Path | None = None,
                   npy: str | Path | None = None, latents: str | Path | None = None,
                   timeout: float | None = None) -> RequestResult:
    """Returns the images [N, H, W, 3] float32 in [0, 1] (as `samples`) and the final
    latents of one request to a pipeline server at `url`, and the files written: the
    images at `out` (a grid for several), the decoded images at `npy`, the latents at
    `latents`. prompts (a text pipeline) or classes (DiT: indices or names) give one image
    each; the other arguments are sample_pipeline's (noise: an array or .npy path). The
    server checks them and refuses bad ones with one line (raised as CfgExportError)."""
    check_outputs(out, npy, latents)
    if isinstance(noise, (str, Path)):
        noise = read_npy(noise, "--noise")
    if noise is not None and np.ndim(noise) != 4:  # its size is the server's to check (it knows the image size)
        raise CfgExportError(f"--noise: got shape {list(np.shape(noise))}, expected latents [N, C, h, w]")
    with SamplerClient(url, timeout) as client:
        parameters = client.parameters()
        if parameters.get("kind") != "pipeline":
            raise CfgExportError(f"{client.url} serves one denoiser, not a pipeline: give --classes or --cond")
        text = parameters.get("text") == "1"
        if text and classes is not None:
            raise CfgExportError("--classes: this pipeline takes prompts (--prompt), not class labels")
        if not text and (prompts is not None or negative_prompts is not None):
            raise CfgExportError("--prompt: this pipeline is class-conditional (DiT); give --classes (indices or "
                                 "names)")
        values = {"prompt": None if prompts is None else [str(p) for p in prompts],
                  "negative_prompt": None if negative_prompts is None else [str(p) for p in negative_prompts],
                  "classes": None if classes is None else [str(c) for c in classes],
                  "w": None if w is None else np.asarray(w, dtype=np.float64).reshape(-1),
                  "seed": seed, "steps": steps, "height": height, "width": width,
                  "sampler": sampler, "spacing": spacing, "scheduler": scheduler, "w_schedule": w_schedule,
                  "interval": None if interval is None else np.asarray(interval, dtype=np.float64),
                  "threshold": None if threshold is None else float(threshold),
                  "guidance_rescale": None if guidance_rescale is None else float(guidance_rescale),
                  "noise": None if noise is None else np.asarray(noise, dtype=np.float32)}
        for name in ("seed", "steps", "height", "width"):
            if values[name] is not None:
                values[name] = int(values[name])
        start = time.perf_counter()
        outputs = client.infer(values, OUTPUTS)
        seconds = time.perf_counter() - start
    images = outputs["images"]
    warnings = [w.decode("utf-8", "replace") if isinstance(w, bytes) else str(w) for w in outputs["warnings"]]
    result = RequestResult(images, len(images), seconds, latents=outputs["latents"], warnings=warnings)
    if out is not None:
        save_images(images, out)
        result.written.append((Path(out), f"{len(images)} image{'s' * (len(images) != 1)} {images.shape[1]}x{images.shape[2]}"))
    if npy is not None:
        save_npy(images, npy)
        result.written.append((Path(npy), f"images {list(images.shape)} float32 in [0, 1]"))
    if latents is not None:
        save_npy(result.latents, latents)
        result.written.append((Path(latents), f"latents {list(result.latents.shape)} float32"))
    return result
