"""Engines (TensorRT plans) in an artifact: their file names, and the optimization
profiles as the runtime uses them (which profile takes a call of so many rows). The
builder makes the profiles (cfg_export.build.profiles).

An engine lives beside the ONNX model as `model.engine`, described by `engine.json`:
a manifest of the same schema whose `engine` block holds the TensorRT facts (version,
GPU, compute capability, profiles, precision route, sha256 of the source ONNX).

Profiles are given in images N. The stacked layout runs 2N rows per call ([cond; null]),
the fused one N rows; an optional second profile covers the N-row calls of the steps
outside a guidance interval, which run only the conditional rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CfgExportError
from .manifest import Manifest, TensorSpec

ENGINE_FILE = "model.engine"
ENGINE_MANIFEST = "engine.json"

DEFAULT_MIN_BATCH = 1  # images N
DEFAULT_OPT_BATCH = 4
DEFAULT_MAX_BATCH = 16

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: rows of the batch axis (min, opt, max), and every input's
    shape at each of the three."""

    rows: tuple[int, int, int]
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def covers(self, rows: int) -> bool:
        return self.rows[0] <= rows <= self.rows[2]

    def to_dict(self) -> dict:
        return {"rows": list(self.rows),
                "shapes": {name: [list(s) for s in triple] for name, triple in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(tuple(d["rows"]), {name: tuple(tuple(s) for s in triple) for name, triple in d["shapes"].items()})


def input_shape(spec: TensorSpec, rows: int, sizes: dict[str, int] | None = None) -> Shape:
    """Returns the concrete shape of an input at `rows` rows: the named batch size ('2N',
    'N') becomes rows, other named sizes (a pipeline's spatial 'H', 'W') come from `sizes`."""
    sizes = sizes or {}
    return tuple(int(size) if not isinstance(size, str) else rows if i == 0 or size not in sizes else int(sizes[size])
                 for i, size in enumerate(spec.shape))


def named_sizes(manifest: Manifest, feeds: dict) -> dict[str, int]:
    """Returns the named sizes other than the batch (e.g. {'H': 64, 'W': 96}) that `feeds` bind."""
    sizes = {}
    for spec in manifest.inputs:
        for i, size in enumerate(spec.shape):
            if i > 0 and isinstance(size, str) and spec.name in feeds:
                sizes[size] = int(feeds[spec.name].shape[i])
    return sizes


def resolve_batches(min_batch: int | None = None, opt_batch: int | None = None,
                    max_batch: int | None = None) -> tuple[int, int, int]:
    """Returns images (min, opt, max) with the defaults filled in around what was given
    (opt 4 and max 16 unless that contradicts a given value); raises CfgExportError unless
    1 <= min <= opt <= max."""
    for flag, value in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
        if value is not None and int(value) < 1:
            raise CfgExportError(f"{flag}: got {value}, expected images N >= 1")
    lo = DEFAULT_MIN_BATCH if min_batch is None else int(min_batch)
    hi = max(DEFAULT_MAX_BATCH, lo, opt_batch or 0) if max_batch is None else int(max_batch)
    opt = min(max(DEFAULT_OPT_BATCH, lo), hi) if opt_batch is None else int(opt_batch)
    if not lo <= opt <= hi:
        raise CfgExportError(f"profile: got --min-batch {lo}, --opt-batch {opt}, --max-batch {hi} (images N); "
                             f"expected min <= opt <= max")
    return lo, opt, hi


def pick_profile(profiles: list[Profile], rows: int) -> int:
    """Returns the index of the profile for a call of `rows` rows: among those that cover
    it, the one whose opt is nearest (the first on a tie); raises CfgExportError if none."""
    covering = [i for i, p in enumerate(profiles) if p.covers(rows)]
    if not covering:
        ranges = ", ".join(f"{p.rows[0]}..{p.rows[2]}" for p in profiles)
        raise CfgExportError(f"engine: got a call of {rows} rows, expected rows in its profiles ({ranges}); "
                             f"rebuild it with a larger --max-batch or smaller --min-batch (in images N)")
    return min(covering, key=lambda i: (abs(profiles[i].rows[1] - rows), i))


def shapes_text(shapes: dict[str, Shape]) -> str:
    """Returns 'sample:2x1x16x16,timestep:2,cond:2', the trtexec and ORT spelling."""
    return ",".join(f"{name}:{'x'.join(str(s) for s in shape)}" for name, shape in shapes.items())


def engine_profiles(manifest: Manifest) -> list[Profile]:
    """Returns the profiles recorded in an engine manifest."""
    return [Profile.from_dict(d) for d in (manifest.engine or {}).get("profiles", [])]
