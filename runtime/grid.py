"""sample_grid: the `sample` command as one library call. Conditions (classes, or
embedding files) each repeated n times, guided sampling, and the files written: an
image grid with one row per condition, and/or the raw samples as .npy."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifact import Artifact, as_artifact
from .backends import BackendOptions
from .conditions import MAX_DEFAULT_CLASSES, check_embeddings
from .errors import CfgExportError
from .files import check_output_file
from .guidance import GuidanceOptions
from .images import IMAGE_FORMATS, check_drawable, save_grid, save_npy
from .manifest import ConditionKind
from .memory import check_rows_fit
from .pipeline import SampleResult, sample_guided
from .progress import Progress

log = logging.getLogger(__name__)

DEFAULT_IMAGES_PER_CONDITION = 8
OUT_OF_RANGE = 100.0  # warn when a sample's largest |value| exceeds this (images live in [-1, 1])


@dataclass
class GridResult:
    result: SampleResult
    rows: int  # conditions: grid rows
    written: list[tuple[Path, str]] = field(default_factory=list)  # (path, what) of each file written
    warnings: list[str] = field(default_factory=list)


def read_npy(path: str | Path, option: str) -> np.ndarray:
    """Returns the array in a .npy file; raises CfgExportError naming the option."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CfgExportError(f"{option} {path}: cannot read it as .npy ({reason})") from None


def _array(value, option: str) -> tuple[np.ndarray | None, str]:
    """Returns (array, name for messages) of an array or a .npy path given for `option`."""
    if value is None:
        return None, option
    if isinstance(value, (str, Path)):
        return read_npy(value, option), f"{option} {value}"
    return np.asarray(value), option


def grid_conditions(artifact: Artifact, classes: Sequence[int] | None, cond, negative,
                    n: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Returns (cond, negative or None, rows): the conditions, each repeated n times, the
    negative ones likewise, and the number of conditions (grid rows). cond and an
    embedding negative are arrays or .npy paths."""
    manifest = artifact.manifest
    negatives = None
    if manifest.facts.condition.kind is ConditionKind.EMBEDDING:
        shape = list(manifest.facts.condition.shape or [])
        if classes is not None:
            raise CfgExportError(f"--classes: this model takes embeddings {shape}; give --cond FILE.npy")
        if cond is None:
            raise CfgExportError(f"this model takes embedding conditions {shape}: give --cond FILE.npy "
                                 f"({shape} for all images, or [K, {', '.join(map(str, shape))}])")
        cond, name = _array(cond, "--cond")
        conds = check_embeddings(cond, manifest, name)
        if negative is not None:
            negative, name = _array(negative, "--negative")
            negatives = check_embeddings(negative, manifest, name)
    else:
        conds, negatives = class_rows(classes, cond, negative, manifest.facts.condition.num_classes, "this model")
    rows = len(conds)
    check_rows_fit(manifest.activation_bytes_per_row, rows * n * manifest.rows_per_image, rows * n, "sampling",
                   math.prod(manifest.facts.sample_shape))  # before the arrays of rows * n images are made
    return repeat_rows(conds, negatives, n)


def class_rows(classes: Sequence[int] | None, cond, negative, num_classes: int,
               model: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (labels [K], negative labels [1 or K] or None) of a class-conditional grid:
    the given classes, or every class of a model with at most MAX_DEFAULT_CLASSES (`model`
    names it in messages)."""
    if cond is not None:
        raise CfgExportError(f"--cond: {model} takes class labels; use --classes")
    if classes is None:
        if not 0 < num_classes <= MAX_DEFAULT_CLASSES:
            raise CfgExportError(f"this model has {num_classes} classes: pick the grid rows with --classes, "
                                 "e.g. --classes 207,360,387")
        classes = list(range(num_classes))
    if len(classes) == 0:
        raise CfgExportError("--classes: got no class, expected at least one label")
    negatives = None if negative is None else np.asarray(negative, dtype=np.int64).reshape(-1)
    return np.asarray(classes, dtype=np.int64), negatives


def repeat_rows(conds: np.ndarray, negatives: np.ndarray | None,
                n: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Returns (cond, negative or None, rows): the K grid conditions each repeated n times,
    the negatives (one for all, or one per condition) likewise, and K."""
    rows = len(conds)
    if negatives is not None:
        if len(negatives) not in (1, rows):
            raise CfgExportError(f"--negative: got {len(negatives)} negative conditions, expected 1 or one per "
                                 f"condition ({rows})")
        negatives = np.repeat(np.broadcast_to(negatives, (rows, *negatives.shape[1:])), n, axis=0)
    return np.repeat(conds, n, axis=0), negatives, rows


def expand_w(w, rows: int, n: int) -> float | np.ndarray:
    """Returns the guidance weight of each image from one number, one per condition (grid
    row), or one per image; raises CfgExportError for any other count."""
    values = np.asarray(w if w is not None else 0.0, dtype=np.float64).reshape(-1)
    if values.size == 1:
        return float(values[0])
    if values.size == rows:
        return np.repeat(values, n)
    if values.size == rows * n:
        return values
    raise CfgExportError(f"--w: got {values.size} values, expected one number, one per condition ({rows}) or "
                         f"one per image ({rows * n})")


def sample_grid(artifact: "Artifact | str | Path", *, classes: Sequence[int] | None = None,
                cond: "np.ndarray | str | Path | None" = None, negative=None, n: int | None = None, w=None,
                out: str | Path | None = None, npy: str | Path | None = None, noise: np.ndarray | None = None,
                guidance: GuidanceOptions | None = None, steps: int | None = None, sampler: str | None = None,
                spacing: str | None = None, scheduler: dict | None = None, eta: float | None = None,
                seed: int | None = None,
                backend: str | None = None, backend_options: BackendOptions | None = None,
                progress: Progress | None = None) -> GridResult:
    """Returns the sampling result and the files written: `n` images (default 8) for each
    condition (class labels `classes`, default every class; or embeddings `cond`
    [L, D] / [K, L, D], an array or a .npy path), as an image grid at `out` (one row per condition; the format
    follows the extension) and/or the raw samples [N, ...] float32 at `npy`.

    w: one number, one per condition, or one per image. negative: class labels (one, or
    one per condition) or embeddings (array or .npy path), for the null rows. noise: an
    array or a .npy path. Output paths are checked before
    any sampling. The other arguments are sample_guided's.
    """
    if out is None and npy is None:
        raise CfgExportError("nothing to write: give -o FILE.png and/or --npy FILE.npy")
    n = DEFAULT_IMAGES_PER_CONDITION if n is None else int(n)
    if n < 1:
        raise CfgExportError(f"--n: got {n}, expected at least 1 image per condition")
    artifact = as_artifact(artifact)
    if out is not None:
        check_output_file(out, "-o", tuple(IMAGE_FORMATS))
        check_drawable(artifact.manifest.facts.sample_shape)
    if npy is not None:
        check_output_file(npy, "--npy", (".npy",))
    noise, _ = _array(noise, "--noise")
    if out is not None and npy is not None and Path(out).resolve() == Path(npy).resolve():
        raise CfgExportError(f"-o and --npy name the same file {out}; give two paths")
    conds, negatives, rows = grid_conditions(artifact, classes, cond, negative, n)
    options = guidance or GuidanceOptions()
    if negatives is not None:
        options.negative = negatives
    result = sample_guided(artifact, conds, expand_w(w, rows, n), steps=steps, sampler=sampler, spacing=spacing,
                           scheduler=scheduler, seed=seed, noise=noise, eta=eta, guidance=options, backend=backend,
                           backend_options=backend_options, progress=progress)
    grid = GridResult(result, rows)
    largest = float(np.abs(result.samples).max())
    if largest > OUT_OF_RANGE:
        grid.warnings.append(f"the samples reach |x| = {largest:.3g}, far outside the data range [-1, 1]: the "
                             f"guidance weight is likely too large for this model (try a smaller --w or "
                             f"--threshold 0.995)")
    if out is not None:
        save_grid(result.samples, rows=rows, path=out)
        grid.written.append((Path(out), f"{len(conds)} images, one row per condition"))
    if npy is not None:
        save_npy(result.samples, npy)
        grid.written.append((Path(npy), f"{list(result.samples.shape)} float32"))
    return grid
