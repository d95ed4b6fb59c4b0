"""make_profiles: the optimization profiles of an engine, in images N, for the layouts'
row counts: 2N stacked, N fused, and for the stacked calls of fewer than 2N rows (N for
the steps outside a guidance interval, N + G while adaptive or cached guidance runs the
null rows of G images only) a second profile.

With images N in [min, max], the calls of a stacked engine take every row count from
min (no null rows) to 2 max: the first profile covers 2 min .. 2 max, the second
min .. max(max, 2 min - 1), so together they leave no gap. A static graph (exported with
--batch) always runs its 2N rows: the strategies then save no model work, only change
which rows are mixed."""
from __future__ import annotations

from cfg_export.runtime.engine import Profile, input_shape, resolve_batches
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import Layout, Manifest


def _profile(manifest: Manifest, rows: tuple[int, int, int], sizes: dict | None = None) -> Profile:
    sizes = sizes or {}
    return Profile(rows, {spec.name: tuple(input_shape(spec, r, {k: v[i] for k, v in sizes.items()})
                                           for i, r in enumerate(rows)) for spec in manifest.inputs})


def make_profiles(manifest: Manifest, min_batch: int | None = None, opt_batch: int | None = None,
                  max_batch: int | None = None, interval: bool = False,
                  sizes: dict[str, tuple[int, int, int]] | None = None) -> list[Profile]:
    """Returns the optimization profiles for images N in [min, opt, max]: rows 2N for the
    stacked layout, N for the fused and plain ones, and with `interval` a second profile for
    the stacked calls of fewer than 2N rows (a guidance interval's unguided steps, the
    shrinking batches of adaptive and cached guidance): rows min .. max(max, 2 min - 1),
    tuned for opt, so that the two cover every row count from min to 2 max. `sizes` gives
    the (min, opt, max) of other named sizes (a pipeline stage's 'H', 'W' in latents). A
    static graph (exported with --batch) has fixed shapes and needs none: it returns [] and
    refuses batch options."""
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
    profiles = [_profile(manifest, tuple(k * n for n in images), sizes)]
    if interval:
        if manifest.layout is not Layout.STACKED:
            raise CfgExportError("--interval-profile: the fused layout runs N rows at every step already; "
                                 "drop it, or export the stacked layout")
        lo, opt, hi = images
        profiles.append(_profile(manifest, (lo, opt, max(hi, 2 * lo - 1)), sizes))
    return profiles


