"""make_profiles: the optimization profiles of an engine, in images N, for the layouts'
row counts (2N stacked, N fused, and N for the unguided steps of a guidance interval)."""
from __future__ import annotations

from cfg_export.runtime.engine import Profile, input_shape, resolve_batches
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import Layout, Manifest


def _profile(manifest: Manifest, rows: tuple[int, int, int]) -> Profile:
    return Profile(rows, {spec.name: tuple(input_shape(spec, r) for r in rows) for spec in manifest.inputs})


def make_profiles(manifest: Manifest, min_batch: int | None = None, opt_batch: int | None = None,
                  max_batch: int | None = None, interval: bool = False) -> list[Profile]:
    """Returns the optimization profiles for images N in [min, opt, max]: rows 2N for the
    stacked layout, N for the fused one, and with `interval` a second profile of N rows for
    the unguided steps of a guidance interval. A static graph (exported with --batch) has
    fixed shapes and needs none: it returns [] and refuses batch options."""
    if manifest.batch is not None:
        given = [f for f, v in (("--min-batch", min_batch), ("--opt-batch", opt_batch),
                                ("--max-batch", max_batch)) if v is not None]
        if given or interval:
            what = ", ".join(given + (["--interval-profile"] if interval else []))
            raise CfgExportError(f"{what}: the graph is static for N={manifest.batch} images, so the engine has "
                                 f"no profiles; drop {what}, or re-export without --batch")
        return []
    images = resolve_batches(min_batch, opt_batch, max_batch)
    k = manifest.rows_per_image
    profiles = [_profile(manifest, tuple(k * n for n in images))]
    if interval:
        if manifest.layout is not Layout.STACKED:
            raise CfgExportError("--interval-profile: the fused layout runs N rows at every step already; "
                                 "drop it, or export the stacked layout")
        profiles.append(_profile(manifest, images))
    return profiles


