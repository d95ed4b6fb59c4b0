"""sample_guided: an artifact folder in, guided samples out. The library call behind
`cfg-export sample` and `python -m runtime sample`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backends import make_backend
from .conditions import check_embeddings, load_null_embedding, rows_for
from .errors import CfgExportError
from .guidance import GuidanceOptions, GuidedDenoiser
from .manifest import ConditionKind, Layout, Manifest, verify_model_file
from .samplers import get_sampler
from .schedule import make_timesteps

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50
DEFAULT_SAMPLER = "ddim"
DEFAULT_SPACING = "leading"


@dataclass
class SampleResult:
    samples: np.ndarray  # [N, *S] float32, the final x_0
    cond: np.ndarray  # the condition of each image: labels [N] or embeddings [N, L, D]
    timesteps: np.ndarray  # [steps] the training timesteps visited
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step
    model_seconds: float = 0.0  # total time inside the backend
    backend: str = ""

    @property
    def host_share(self) -> float:
        """Share of the sampling time spent outside the model call (stacking, mix, update)."""
        total = sum(self.step_seconds)
        return (total - self.model_seconds) / total if total > 0 else 0.0


def open_artifact(directory: str | Path, backend: str | None = None) -> Manifest:
    """Returns the manifest of an artifact folder after checking the model file's sha256
    (engine.json for the tensorrt backend or a folder holding only an engine)."""
    from .engine import read_artifact_manifest

    manifest = read_artifact_manifest(directory, backend)
    verify_model_file(manifest, directory)
    return manifest


def check_labels(labels: Sequence[int], manifest: Manifest, what: str = "class") -> np.ndarray:
    """Returns labels as int64 [N]; refuses labels the model does not know."""
    cond = manifest.facts.condition
    if cond.kind is not ConditionKind.CLASS:
        raise CfgExportError(f"this model takes {cond.kind.value} conditions, not class labels")
    arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = [int(v) for v in arr if not (0 <= v < cond.num_classes or v == cond.null)]
    if bad:
        raise CfgExportError(f"{what} {bad[0]} out of range: the model has classes 0..{cond.num_classes - 1} "
                             f"(null class {cond.null})")
    return arr


def check_cond(cond, manifest: Manifest, what: str = "cond") -> np.ndarray:
    """Returns the condition of each image: int64 labels [N] for a class-conditional
    model, float32 embeddings [N, L, D] (one [L, D] is one image) for an embedding model."""
    if manifest.facts.condition.kind is ConditionKind.EMBEDDING:
        return check_embeddings(cond, manifest, what)
    if np.ndim(cond) > 1:
        raise CfgExportError(f"{what}: got shape {list(np.shape(cond))}; this model takes class labels [N]")
    return check_labels(cond, manifest, "class" if what == "cond" else what)


def make_noise(manifest: Manifest, n: int, rng: np.random.Generator, noise: np.ndarray | None) -> np.ndarray:
    """Returns x_T [N, *S] float64: given noise (checked) or standard normal from rng."""
    shape = (n, *manifest.facts.sample_shape)
    if noise is None:
        return rng.standard_normal(shape)
    noise = np.asarray(noise)
    if noise.shape != shape:
        raise CfgExportError(f"noise: got shape {list(noise.shape)}, expected {list(shape)} (N images x sample shape)")
    if not np.all(np.isfinite(noise)):
        raise CfgExportError("noise: contains NaN or infinity")
    return noise.astype(np.float64)


def sample_guided(directory: str | Path, cond: Sequence[int] | np.ndarray, w: float | Sequence[float] = 0.0, *,
                  steps: int | None = None, sampler: str | None = None, spacing: str | None = None,
                  seed: int = 0, noise: np.ndarray | None = None, eta: float | None = None,
                  guidance: GuidanceOptions | None = None, backend: str | None = None,
                  callback: Callable[[int, int, np.ndarray], None] | None = None,
                  record: Callable[[dict], None] | None = None) -> SampleResult:
    """Returns N guided samples [N, *S] float32 of the artifact in `directory`, one per
    condition: class labels [N], or embeddings [N, L, D] float32 (one [L, D] is one image).
    Latent models (DiT, Stable Diffusion UNets) give latents: decoding is the VAE's job.

    w: the guidance weight (paper's convention), one number or [N]. guidance: the other
    guidance options (w schedule, interval, negative condition, thresholding); its w
    is replaced by `w`. A negative condition is a label (or [N]) or an embedding
    [L, D] (or [N, L, D]); it takes the null rows' place.
    The same seed on the same backend gives the same samples.
    """
    manifest = open_artifact(directory, backend)
    cond = check_cond(cond, manifest)
    n = len(cond)
    if n < 1:
        raise CfgExportError("no images asked for: give at least one condition")
    options = GuidanceOptions(**{**(guidance.__dict__ if guidance else {}), "w": w})
    embedding = manifest.facts.condition.kind is ConditionKind.EMBEDDING
    if options.negative is not None and embedding:
        options.negative = rows_for(check_embeddings(options.negative, manifest, "negative"), n, "negative")
    elif options.negative is not None:
        options.negative = check_labels(np.broadcast_to(options.negative, (n,)), manifest, "negative class")
    null_embedding = None
    if embedding and options.negative is None and manifest.layout is Layout.STACKED:
        null_embedding = load_null_embedding(manifest, directory)
    if manifest.batch is not None and n != manifest.batch:
        raise CfgExportError(f"the graph is static for N={manifest.batch} images; got {n}: sample "
                             f"{manifest.batch} images, or re-export without --batch")
    sample_fn = get_sampler(sampler or DEFAULT_SAMPLER)
    extra = {}
    if eta is not None:
        if (sampler or DEFAULT_SAMPLER) != "ddim":
            raise CfgExportError(f"eta applies to the ddim sampler only, not {sampler}")
        extra["eta"] = float(eta)
    alphas_cumprod = manifest.facts.schedule.alphas_cumprod()
    timesteps = make_timesteps(len(alphas_cumprod), DEFAULT_STEPS if steps is None else steps,
                               spacing or DEFAULT_SPACING)
    rng = np.random.default_rng(seed)
    x = make_noise(manifest, n, rng, noise)
    result = SampleResult(np.empty(0), cond, timesteps)
    with make_backend(backend, manifest, directory) as runner:
        denoise = GuidedDenoiser(runner, alphas_cumprod, n, options, record=record, null_embedding=null_embedding)
        last = time.perf_counter()

        def on_step(i: int, t: int, x_t: np.ndarray) -> None:
            nonlocal last
            now = time.perf_counter()
            result.step_seconds.append(now - last)
            last = now
            if callback is not None:
                callback(i, t, x_t)

        result.samples = sample_fn(denoise, x, cond, alphas_cumprod, timesteps, rng, on_step, **extra)
        result.model_seconds = denoise.model_seconds
        result.backend = runner.name
    return result
