"""sample_guided: an artifact in, guided samples out. The library call behind
`cfg-export sample` and `python -m runtime sample`."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .artifact import Artifact, as_artifact
from .backends import Backend, BackendOptions, open_backend
from .conditions import check_embeddings, rows_for
from .errors import CfgExportError
from .guidance import GuidanceOptions, guided_model
from .manifest import ConditionKind, Layout, Manifest
from .memory import check_rows_fit
from .progress import Progress
from .samplers import (Callback, Denoiser, Noise, Plan, SchedulerConfig, check_model, default_scheduler, plan_sampling,
                       resolve_scheduler, run_plan)
from .samplers.config import CLASSES, SAMPLER_NAMES

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50
DEFAULT_SAMPLER = "ddim"  # calibration's default; sample_guided's is the scheduler the manifest records
DEFAULT_SEED = 0


@dataclass
class SampleResult:
    samples: np.ndarray  # [N, *S] float32, the final x_0
    cond: np.ndarray  # the condition of each image: labels [N] or embeddings [N, L, D]
    timesteps: np.ndarray  # [K] float64: the timestep fed to the model at each of the K model calls
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step
    model_seconds: float = 0.0  # total time inside the backend
    rows: int = 0  # model rows evaluated over the whole run (2N per guided step, N per unguided one)
    backend: str = ""
    scheduler: dict = field(default_factory=dict)  # the scheduler config sampled with, as diffusers saves it
    sampler: str = ""  # the sampler that ran it (samplers.SAMPLER_CHOICES)

    @property
    def host_share(self) -> float:
        """Share of the sampling time spent outside the model call (stacking, mix, update)."""
        total = sum(self.step_seconds)
        return (total - self.model_seconds) / total if total > 0 else 0.0


def check_labels(labels: Sequence[int], manifest: Manifest, what: str = "class") -> np.ndarray:
    """Returns labels as int64 [N]; refuses labels the model does not know."""
    cond = manifest.facts.condition
    if cond.kind is not ConditionKind.CLASS:
        raise CfgExportError(f"this model takes {cond.kind.value} conditions, not class labels")
    try:
        arr = np.asarray(labels).reshape(-1)
    except (TypeError, ValueError):
        raise CfgExportError(f"{what}: got {labels!r}, expected integer class labels") from None
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or
                         (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and
                          np.all(arr == np.round(arr)))):
        raise CfgExportError(f"{what}: got {arr.tolist()[:4]}, expected integer class labels")
    arr = arr.astype(np.int64)
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
    if not np.issubdtype(noise.dtype, np.floating):
        raise CfgExportError(f"noise: got {noise.dtype} values, expected floats")
    if not np.all(np.isfinite(noise)):
        raise CfgExportError("noise: contains NaN or infinity")
    return noise.astype(np.float64)


def check_seed(seed) -> int:
    """Returns the seed as an int; refuses what numpy's generator does not take."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise CfgExportError(f"seed: got {seed!r}, expected an integer 0 <= seed < 2**63")
    return int(seed)


@contextlib.contextmanager
def _runner(artifact: Artifact, backend: "str | Backend | None", options: BackendOptions | None):
    """Yields an open backend: the one given (left open), or one opened here from the artifact."""
    if isinstance(backend, Backend):
        if options is not None:
            raise CfgExportError("backend options apply when the backend is opened here; the given backend "
                                 "is already open")
        if not backend.is_open:
            raise CfgExportError(f"{backend.name} backend is not open: use it inside `with backend:`")
        yield backend
        return
    with open_backend(artifact, backend, options) as runner:
        yield runner


def scheduler_for(manifest: Manifest, sampler: str | None = None, fields: dict | None = None,
                  spacing: str | None = None, threshold: float | None = None) -> SchedulerConfig:
    """Returns the scheduler config a run samples with: the one the manifest records
    (DDIM, no clipping, where it records none), switched to `sampler` as diffusers'
    from_config switches it, with `fields` (diffusers' names), `spacing`
    (timestep_spacing) and `threshold` (the scheduler's dynamic thresholding at that
    ratio) overriding one field each. Raises CfgExportError for what cfg-export does not
    reproduce, and for a scheduler this model cannot take."""
    facts = manifest.facts
    fields = dict(fields or {})
    if spacing is not None:
        fields["timestep_spacing"] = spacing
    recorded = facts.scheduler or default_scheduler(facts)
    if threshold is not None:
        target = resolve_scheduler(recorded, sampler, {k: v for k, v in fields.items() if k != "thresholding"})
        if "thresholding" not in target.fields:
            having = [name for name, s in SAMPLER_NAMES.items() if "thresholding" in CLASSES[s.scheduler].defaults]
            raise CfgExportError(f"--threshold: {target.class_name} ({target.sampler}) has no dynamic thresholding; "
                                 f"the samplers with it: {', '.join(having)}")
        fields.update(thresholding=True, dynamic_thresholding_ratio=float(threshold))
    config = resolve_scheduler(recorded, sampler, fields)
    check_model(config, facts)
    return config


def check_timesteps(plan: Plan, config: SchedulerConfig, manifest: Manifest) -> None:
    """Raises CfgExportError, naming the config field behind them, when the plan feeds
    fractional timesteps to a graph that takes int64 ones."""
    if manifest.facts.timestep_dtype != "int64":
        return
    fractional = plan.timesteps[plan.timesteps != np.round(plan.timesteps)]
    if not len(fractional):
        return
    f = config.fields
    causes = [("use_karras_sigmas", True), ("use_exponential_sigmas", True), ("timestep_type", "continuous"),
              ("timestep_spacing", "linspace")]
    cause = next((f"{k}={v!r}" for k, v in causes if f.get(k) == v), "its timesteps sigma x 1000")
    raise CfgExportError(f"{config.class_name} with {cause} feeds fractional timesteps (e.g. {fractional[0]:.4g}) "
                         f"to the model, whose graph takes int64 timesteps: re-export the model with float "
                         f"timesteps, or sample with other settings")


def run_timed(plan: Plan, denoiser: Denoiser, x: np.ndarray, noise: Noise, step_seconds: list[float],
              progress: Progress | None = None, callback: Callback | None = None, *,
              eta: float | None = None) -> np.ndarray:
    """Returns run_plan's final sample, appending the wall time of each model call (and
    the host work after it) to step_seconds; reports progress and calls callback(i, t, x_t)
    after each."""
    last = time.perf_counter()

    def on_step(i: int, t: float, x_t: np.ndarray) -> None:
        nonlocal last
        now = time.perf_counter()
        step_seconds.append(now - last)
        last = now
        if callback is not None:
            callback(i, t, x_t)
        if progress is not None:
            progress(i + 1, len(plan))

    return run_plan(plan, denoiser, x, noise, on_step, eta=eta)


def sample_guided(artifact: "Artifact | str | Path", cond: Sequence[int] | np.ndarray, w: float | Sequence[float] = 0.0,
                  *, steps: int | None = None, sampler: str | None = None, spacing: str | None = None,
                  scheduler: dict | None = None, seed: int | None = None, noise: np.ndarray | None = None,
                  noise_source: Noise | None = None, eta: float | None = None,
                  guidance: GuidanceOptions | None = None, backend: "str | Backend | None" = None,
                  backend_options: BackendOptions | None = None, progress: Progress | None = None,
                  callback: Callable[[int, float, np.ndarray], None] | None = None,
                  record: Callable[[dict], None] | None = None) -> SampleResult:
    """Returns N guided samples [N, *S] float32 of the artifact (an Artifact, or a folder
    opened once here), one per condition: class labels [N], or embeddings [N, L, D]
    float32 (one [L, D] is one image). Latent models (DiT, Stable Diffusion UNets) give
    latents.

    w: the guidance weight (paper's convention), one number or [N]. guidance: the other
    guidance options (w schedule, interval, negative condition, thresholding, guidance
    rescale); its w is replaced by `w`. A negative condition is a label (or [N]) or an
    embedding [L, D] (or [N, L, D]); it takes the null rows' place.
    Sampling follows the scheduler config the manifest records (DDIM where it records
    none) as diffusers runs it: `sampler` switches it (one of samplers.SAMPLER_CHOICES,
    as diffusers' from_config), `scheduler` overrides config fields by their diffusers
    names (e.g. {"use_karras_sigmas": True}), `spacing` the timestep_spacing; eta is
    DDIM's. noise: x_T [N, *S] (default: drawn from the seeded generator); noise_source:
    where ancestral and SDE samplers draw (default: numpy's generator of `seed`).
    backend: a backend name (opened and closed here, with backend_options), or an open
    Backend of this artifact, reused as it is (sample many w or batch sizes with one session).
    progress(done, total) is called after each model call; callback(i, t, x_t) with the sample.
    The same seed on the same backend gives the same samples.
    """
    artifact = as_artifact(artifact)
    manifest = backend.manifest if isinstance(backend, Backend) else _manifest_for(artifact, backend)
    _check_backend_fits(artifact, backend)
    cond = check_cond(cond, manifest)
    n = len(cond)
    if n < 1:
        raise CfgExportError("no images asked for: give at least one condition")
    options = replace(guidance or GuidanceOptions(), w=w)
    options.check()
    embedding = manifest.facts.condition.kind is ConditionKind.EMBEDDING
    if options.negative is not None and embedding:
        options.negative = rows_for(check_embeddings(options.negative, manifest, "negative"), n, "negative")
    elif options.negative is not None:
        options.negative = check_labels(np.broadcast_to(options.negative, (n,)), manifest, "negative class")
    null_embedding = None
    if embedding and options.negative is None and manifest.layout is Layout.STACKED:
        null_embedding = artifact.null_embedding()
    if manifest.batch is not None and n != manifest.batch:
        raise CfgExportError(f"the graph is static for N={manifest.batch} images; got {n}: sample "
                             f"{manifest.batch} images, or re-export without --batch")
    check_rows_fit(manifest.activation_bytes_per_row, n * manifest.rows_per_image, n, "sampling",
                   math.prod(manifest.facts.sample_shape))
    config = scheduler_for(manifest, sampler, scheduler, spacing, options.threshold)
    if eta is not None and config.class_name != "DDIMScheduler":
        raise CfgExportError(f"eta applies to the ddim sampler only (DDIMScheduler), not {config.sampler} "
                             f"({config.class_name})")
    plan = plan_sampling(config, DEFAULT_STEPS if steps is None else steps, _image_seq_len(manifest))
    check_timesteps(plan, config, manifest)
    rng = np.random.default_rng(check_seed(DEFAULT_SEED if seed is None else seed))
    x = make_noise(manifest, n, rng, noise)
    result = SampleResult(np.empty(0), cond, plan.timesteps, scheduler=config.to_dict(), sampler=config.sampler)
    with _runner(artifact, backend, backend_options) as runner:
        model = guided_model(runner, n, options, null_embedding, record)
        denoiser = Denoiser(model, cond, manifest.facts.prediction)
        result.samples = run_timed(plan, denoiser, x, noise_source or rng, result.step_seconds, progress, callback,
                                   eta=eta)
        result.model_seconds = model.model_seconds
        result.rows = model.rows
        result.backend = runner.name
    return result


def _image_seq_len(manifest: Manifest) -> int | None:
    """Image tokens of a patch-based model, (H / p) (W / p), for flow-matching dynamic shifting."""
    p = manifest.facts.patch_size
    shape = manifest.facts.sample_shape
    return None if p is None or len(shape) != 3 else (shape[1] // p) * (shape[2] // p)


def _manifest_for(artifact: Artifact, backend: str | None) -> Manifest:
    """The manifest of the model file the named backend runs (the engine's for tensorrt)."""
    stage = artifact.stage()
    if backend == "tensorrt" or (backend in (None, "auto") and stage.onnx is None):
        return artifact.model_file(engine=True).manifest
    return artifact.model_file(engine=False).manifest


def _check_backend_fits(artifact: Artifact, backend) -> None:
    """An open backend given to sample_guided must run this artifact's denoiser."""
    if not isinstance(backend, Backend):
        return
    stage = artifact.stage()
    shas = {m.manifest.model_sha256 for m in (stage.onnx, stage.engine) if m is not None}
    if backend.manifest.model_sha256 not in shas:
        raise CfgExportError(f"the given {backend.name} backend runs another model than {artifact.directory}: "
                             f"open it from this artifact (open_backend(artifact))")
