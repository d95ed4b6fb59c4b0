"""Embedding conditions: text-style `cond` [N, L, D] float32 checked against the
manifest, and the artifact's null embedding [L, D] (for Stable Diffusion, the empty
prompt's encoding), which fills the null rows of the stacked batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CfgExportError
from .manifest import ConditionKind, Manifest

MAX_DEFAULT_CLASSES = 32  # without explicit classes, sample (and record) every class up to this many


def _embedding_shape(manifest: Manifest) -> tuple[int, ...]:
    cond = manifest.facts.condition
    if cond.kind is not ConditionKind.EMBEDDING:
        raise CfgExportError(f"this model takes {cond.kind.value} conditions, not embeddings")
    if cond.shape is None:
        raise CfgExportError("the manifest's embedding condition has no shape [L, D]; re-export the model")
    return cond.shape


def check_embeddings(values, manifest: Manifest, what: str = "cond") -> np.ndarray:
    """Returns embeddings as float32 [K, L, D], from one [L, D] (K = 1) or [K, L, D];
    raises CfgExportError naming `what` when the shape or values do not fit the model."""
    shape = _embedding_shape(manifest)
    arr = np.asarray(values)
    expected = f"[{', '.join(map(str, shape))}] for every image, or [N, {', '.join(map(str, shape))}]"
    if not np.issubdtype(arr.dtype, np.floating):
        raise CfgExportError(f"{what}: got {arr.dtype} values; this model takes float embeddings {expected}")
    if arr.shape == shape:
        arr = arr[None]
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape or len(arr) < 1:
        raise CfgExportError(f"{what}: got shape {list(arr.shape)}, expected {expected}")
    if not np.all(np.isfinite(arr)):
        raise CfgExportError(f"{what}: contains NaN or infinity")
    return arr.astype(np.float32)


def rows_for(embeddings: np.ndarray, n: int, what: str) -> np.ndarray:
    """Returns embeddings [K, L, D] as [n, L, D]: one row for every image, or one each."""
    if len(embeddings) == 1:
        return np.broadcast_to(embeddings, (n, *embeddings.shape[1:]))
    if len(embeddings) != n:
        raise CfgExportError(f"{what}: got {len(embeddings)} embeddings, expected 1 or one per image ({n})")
    return embeddings


def read_null_embedding(manifest: Manifest, directory: str | Path) -> np.ndarray:
    """Returns the artifact's null embedding [L, D] float32 (condition.null_file)."""
    shape = _embedding_shape(manifest)
    name = manifest.facts.condition.null_file
    if name is None:
        raise CfgExportError("the manifest names no null embedding (condition.null_file); re-export the model, "
                             "or give a negative embedding for the null rows")
    path = Path(directory) / name
    try:
        null = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CfgExportError(f"{path}: cannot read the null embedding ({exc}); re-export the model") from None
    if null.shape != shape:
        raise CfgExportError(f"{path}: null embedding of shape {list(null.shape)}, the manifest says "
                             f"{list(shape)}; re-export the model")
    return null.astype(np.float32)
