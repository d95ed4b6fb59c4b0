"""Prompt (or class) to pixels on a pipeline artifact, torch-free: tokenize, encode
(prompt and negative prompt in one 2N call per text encoder), guided denoising (one
2N call per step), VAE decode, and the files: a PNG grid, the decoded images as .npy
[N, H, W, 3] in [0, 1] (diffusers' output_type="np"), the final latents.

The library call behind `cfg-export sample PIPELINE_ARTIFACT --prompt ...`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifact import Artifact, as_artifact
from .backends import BackendOptions
from .errors import CfgExportError
from .files import check_output_file
from .guidance import GuidanceOptions, guided_model
from .images import IMAGE_FORMATS, save_grid, save_npy
from .pipeline import DEFAULT_STEPS, check_seed, check_timesteps, run_timed, scheduler_for
from .progress import Progress
from .prompts import StageBackends, stage_backend
from .samplers import Denoiser, Noise, plan_sampling

log = logging.getLogger(__name__)

DEFAULT_SEED = 0


@dataclass
class PipelineResult:
    images: np.ndarray  # [N, H, W, 3] float32 in [0, 1]
    latents: np.ndarray  # [N, C, h, w] float32, the final latents (before the VAE's scaling)
    timesteps: np.ndarray
    conditions: list  # the prompts, or the class labels
    warnings: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # model time of each stage
    step_seconds: list[float] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # model rows each stage computed
    backend: str = ""
    written: list[tuple[Path, str]] = field(default_factory=list)


def _pipeline(artifact: Artifact) -> dict:
    if artifact.pipeline is None:
        raise CfgExportError(f"{artifact.directory}: a one-model artifact, not a pipeline; sample it with --classes "
                             f"or --cond, or export a diffusers pipeline folder (with model_index.json)")
    return artifact.pipeline


def is_text_pipeline(artifact: Artifact) -> bool:
    return "prompt" in _pipeline(artifact)


def check_size(artifact: Artifact, height: int | None, width: int | None) -> tuple[int, int]:
    """Returns (height, width) in pixels: the export's default size, or the given one
    checked against the exported range and the size multiple."""
    sizes = _pipeline(artifact)["image_size"]
    height = sizes["opt"][0] if height is None else height
    width = sizes["opt"][1] if width is None else width
    multiple = sizes["multiple"]
    for flag, value, lo, hi in (("--height", height, sizes["min"][0], sizes["max"][0]),
                                ("--width", width, sizes["min"][1], sizes["max"][1])):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value % multiple:
            raise CfgExportError(f"{flag}: got {value}, expected a multiple of {multiple} pixels (the VAE factor "
                                 f"times the denoiser's downsampling)")
        if not lo <= value <= hi:
            raise CfgExportError(f"{flag}: got {value}, outside the exported range {lo}..{hi}; re-export with "
                                 f"--min-size/--max-size covering it")
    return int(height), int(width)


def class_labels(artifact: Artifact, classes: Sequence) -> np.ndarray:
    """Returns int64 labels [N] from indices or class names (DiT's id2label, as DiTPipeline.get_label_ids)."""
    manifest = artifact.manifest
    names: dict[str, int] = {}
    for key, value in (_pipeline(artifact).get("id2label") or {}).items():
        for label in str(value).split(","):
            names[label.strip()] = int(key)
    labels = []
    for c in classes:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            labels.append(int(c))
        elif isinstance(c, str) and c.strip().lstrip("-").isdigit():
            labels.append(int(c))
        elif isinstance(c, str) and c.strip() in names:
            labels.append(names[c.strip()])
        else:
            known = ", ".join(sorted(names)[:5]) if names else "none: this artifact has no id2label"
            raise CfgExportError(f"--classes: got {c!r}, expected a class index or a class name (e.g. {known})")
    from .pipeline import check_labels

    return check_labels(labels, manifest)


def make_latents(shape: tuple[int, ...], rng: np.random.Generator, noise) -> np.ndarray:
    if noise is None:
        return rng.standard_normal(shape)
    noise = np.asarray(noise)
    if noise.shape != shape:
        raise CfgExportError(f"--noise: got shape {list(noise.shape)}, expected {list(shape)} (N images x latent "
                             f"channels x height/scale x width/scale)")
    if not np.issubdtype(noise.dtype, np.floating) or not np.all(np.isfinite(noise)):
        raise CfgExportError("--noise: expected finite float latents")
    return noise.astype(np.float64)


def decode_latents(artifact: Artifact, latents: np.ndarray, backend: "str | StageBackends | None",
                   options: BackendOptions | None) -> tuple[np.ndarray, float]:
    """Returns (images [N, H, W, 3] float32 in [0, 1], model seconds): the VAE decoder on
    latents / scaling_factor (+ shift_factor), then (x / 2 + 0.5) clipped, as diffusers does."""
    with stage_backend(artifact, "vae_decoder", backend, options) as vae:
        facts = vae.manifest.facts
        z = latents.astype(np.float32)
        if facts.latents_mean is not None:
            shape = (1, -1, 1, 1)
            z = z * np.asarray(facts.latents_std, np.float32).reshape(shape) / np.float32(facts.scaling_factor) + \
                np.asarray(facts.latents_mean, np.float32).reshape(shape)
        else:
            z = z / np.float32(facts.scaling_factor)
            if facts.shift_factor is not None:
                z = z + np.float32(facts.shift_factor)
        (images,) = vae.infer({"latents": np.ascontiguousarray(z, dtype=np.float32)}).values()
        seconds = vae.last_seconds
    images = np.clip(images / 2 + 0.5, 0, 1).astype(np.float32)
    return images.transpose(0, 2, 3, 1), seconds


def sample_pipeline(artifact: "Artifact | str | Path", prompts: Sequence[str] | None = None,
                    negative_prompts: Sequence[str] | None = None, classes: Sequence | None = None,
                    w: float | Sequence[float] = 0.0, *, steps: int | None = None, sampler: str | None = None,
                    spacing: str | None = None, scheduler: dict | None = None, seed: int | None = None,
                    noise: np.ndarray | None = None, noise_source: Noise | None = None,
                    height: int | None = None, width: int | None = None, guidance: GuidanceOptions | None = None,
                    backend: "str | StageBackends | None" = None, backend_options: BackendOptions | None = None,
                    progress: Progress | None = None) -> PipelineResult:
    """Returns N images [N, H, W, 3] in [0, 1] and their final latents, one per prompt (a
    text pipeline: SD, SDXL, SD3) or per class (DiT: indices or names).

    negative_prompts: one for all prompts, or one per prompt; they fill the null rows
    (default: the pipeline's own null: the empty prompt, or zeros for SDXL). w: the
    guidance weight, diffusers' guidance_scale = 1 + w. height, width: pixels (default
    the export's own size). noise: the initial latents [N, C, h, w] (default: drawn from
    `seed`); noise_source: where ancestral and SDE samplers draw during the steps (any
    object with standard_normal(shape); default numpy's generator of `seed`). Sampling
    follows the pipeline's scheduler config as diffusers runs it; `sampler`, `scheduler`
    (config fields by their diffusers names) and `spacing` switch or override it as for
    sample_guided. backend: a backend name (each stage opened and closed here, with
    backend_options), or open backends by stage name, used as they are (a server's model
    connections; runtime.prompts.stage_backend).
    """
    artifact = as_artifact(artifact)
    pipeline = _pipeline(artifact)
    text = is_text_pipeline(artifact)
    if text and classes is not None:
        raise CfgExportError("--classes: this pipeline takes prompts (--prompt), not class labels")
    if not text and (prompts is not None or negative_prompts is not None):
        raise CfgExportError("--prompt: this pipeline is class-conditional (DiT); give --classes (indices or names)")
    conditions = list(prompts if text else classes) if (prompts if text else classes) is not None else []
    if not conditions:
        raise CfgExportError("no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE" if text else
                             "no class given: pass --classes 207,360 or class names")
    if text and any(not isinstance(p, str) for p in conditions):
        raise CfgExportError("prompts: expected text")
    n = len(conditions)
    if negative_prompts is not None:
        negative_prompts = list(negative_prompts)
        if len(negative_prompts) == 1:
            negative_prompts = negative_prompts * n
        if len(negative_prompts) != n:
            raise CfgExportError(f"--negative-prompt: got {len(negative_prompts)}, expected one for all prompts or "
                                 f"one per prompt ({n})")
    height, width = check_size(artifact, height, width)
    manifest = artifact.manifest
    vae_facts = (backend["vae_decoder"].manifest if isinstance(backend, Mapping) and "vae_decoder" in backend
                 else artifact.model_file("vae_decoder").manifest).facts
    scale = vae_facts.scale
    result = PipelineResult(np.empty(0), np.empty(0), np.empty(0), conditions)
    scheduler_config = pipeline.get("scheduler") or None
    if text:
        from .prompts import encode_prompts

        encoded = encode_prompts(artifact, conditions, negative_prompts, height, width, backend, backend_options)
        result.warnings += encoded.warnings
        result.stage_seconds["text_encoders"] = encoded.seconds
        result.rows["text_encoders"] = encoded.rows
        conds, nulls = encoded.conds, encoded.nulls
    else:
        labels = class_labels(artifact, conditions)
        null = manifest.facts.condition.null
        conds, nulls = {"cond": labels}, {"cond": np.full(n, null, dtype=np.int64)}
    options = replace(guidance or GuidanceOptions(), w=w)
    options.check()
    facts = manifest.facts
    if facts.scheduler is None and scheduler_config:  # artifacts that record it in pipeline.json only
        manifest = replace(manifest, facts=replace(facts, scheduler=scheduler_config))
    config = scheduler_for(manifest, sampler, scheduler, spacing, options.threshold)
    h, w_latent = height // scale, width // scale
    patch = manifest.facts.patch_size
    plan = plan_sampling(config, DEFAULT_STEPS if steps is None else steps,
                         None if patch is None else (h // patch) * (w_latent // patch))
    check_timesteps(plan, config, manifest)
    result.timesteps = plan.timesteps
    rng = np.random.default_rng(check_seed(DEFAULT_SEED if seed is None else seed))
    shape = (n, manifest.facts.sample_shape[0], h, w_latent)
    x = make_latents(shape, rng, noise)
    with stage_backend(artifact, "denoiser", backend, backend_options) as runner:
        model = guided_model(runner, n, options, nulls=nulls)
        denoiser = Denoiser(model, conds, manifest.facts.prediction)
        result.latents = run_timed(plan, denoiser, x, noise_source or rng, result.step_seconds, progress)
        result.stage_seconds["denoiser"] = model.model_seconds
        result.rows["denoiser"] = model.rows
        result.backend = runner.name
    result.images, result.stage_seconds["vae_decoder"] = decode_latents(artifact, result.latents, backend,
                                                                        backend_options)
    result.rows["vae_decoder"] = n
    return result


def save_images(images: np.ndarray, path: str | Path) -> Path:
    """Writes images [N, H, W, 3] in [0, 1] as one image (a near-square grid for several)."""
    n = len(images)
    rows = max(1, math.isqrt(n))
    while n % rows:
        rows -= 1
    return save_grid(images.transpose(0, 3, 1, 2) * 2 - 1, rows=rows, path=path, min_cell=1)


def check_outputs(out, npy, latents) -> None:
    """Refuses a run with nothing to write, or two outputs at one path, before any model runs."""
    if out is None and npy is None and latents is None:
        raise CfgExportError("nothing to write: give -o FILE.png, --npy FILE.npy and/or --latents FILE.npy")
    paths = [(out, "-o", tuple(IMAGE_FORMATS)), (npy, "--npy", (".npy",)), (latents, "--latents", (".npy",))]
    given = [Path(p).resolve() for p, *_ in paths if p is not None]
    if len(set(given)) != len(given):
        raise CfgExportError("-o, --npy and --latents name the same file; give different paths")
    for path, flag, suffixes in paths:
        if path is not None:
            check_output_file(path, flag, suffixes)


def sample_pipeline_files(artifact: "Artifact | str | Path", *, out: str | Path | None = None,
                          npy: str | Path | None = None, latents: str | Path | None = None,
                          **kwargs) -> PipelineResult:
    """Returns sample_pipeline's result after writing what was asked: the images at `out`
    (a grid for several; the format follows the extension), the decoded images
    [N, H, W, 3] float32 in [0, 1] at `npy`, the final latents at `latents`. Output
    paths are checked before any model runs; kwargs are sample_pipeline's."""
    check_outputs(out, npy, latents)
    result = sample_pipeline(artifact, **kwargs)
    if out is not None:
        save_images(result.images, out)
        count = len(result.images)
        result.written.append((Path(out), f"{count} image{'s' * (count > 1)} {result.images.shape[1]}x"
                                          f"{result.images.shape[2]}"))
    if npy is not None:
        save_npy(result.images, npy)
        result.written.append((Path(npy), f"images {list(result.images.shape)} float32 in [0, 1]"))
    if latents is not None:
        save_npy(result.latents, latents)
        result.written.append((Path(latents), f"latents {list(result.latents.shape)} float32"))
    return result
