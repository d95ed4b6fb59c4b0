"""Reading a calibration file (made by calibration.record) and checking that it belongs
to the artifact it is about to calibrate: same model file (sha256), same layout, one
array per model input with the input's dtype and per-row shape, enough steps."""
from __future__ import annotations

import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cfg_export.calibration.record import MANIFEST_ENTRY, MIN_STEPS, CalibrationManifest
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import Manifest

log = logging.getLogger(__name__)

REMAKE = "re-run cfg-export calibrate"


@dataclass
class CalibrationData:
    """The recorded feeds of one calibration file, rows first, and where they come from."""

    path: Path
    manifest: CalibrationManifest
    arrays: dict[str, np.ndarray]  # input name -> [sum(rows), ...]

    @property
    def steps(self) -> int:
        """Recorded steps (model calls)."""
        return len(self.manifest.rows)

    def batches(self, order: list[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yields the feeds of each recorded step (2N rows for the stacked layout), in
        recorded order or in `order` (indices of recorded steps)."""
        bounds = np.concatenate([[0], np.cumsum(self.manifest.rows)])
        for k in (range(self.steps) if order is None else order):
            yield {name: a[bounds[k]:bounds[k + 1]] for name, a in self.arrays.items()}


def _short(sha: str) -> str:
    return sha[:12] if sha else "<unknown>"


def load_calibration(path: str | Path) -> CalibrationData:
    """Returns the calibration file at `path`; raises CfgExportError, one line, for a
    missing, empty, truncated or foreign file."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CfgExportError(f"{path}: no such calibration file; record one with: cfg-export calibrate DIR -o {name}")
    if path.stat().st_size == 0:
        raise CfgExportError(f"{name} is empty (0 bytes): {REMAKE} DIR -o {name}")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise CfgExportError(f"{name}: got a single array {list(np.shape(npz))}, expected a calibration .npz "
                                 f"(made by cfg-export calibrate): {REMAKE} DIR -o {name}")
        with npz:
            files = list(npz.files)
            if MANIFEST_ENTRY not in files:
                raise CfgExportError(f"{name}: got arrays {sorted(files)}, expected a calibration file with a "
                                     f"'{MANIFEST_ENTRY}' entry (made by cfg-export calibrate): {REMAKE}")
            text = str(npz[MANIFEST_ENTRY][()])
            arrays = {k: npz[k] for k in files if k != MANIFEST_ENTRY}
    except CfgExportError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CfgExportError(f"{name}: truncated or corrupt ({reason}): {REMAKE} DIR -o {name}") from None
    try:
        manifest = CalibrationManifest.from_json(text)
    except (ValueError, TypeError) as exc:
        raise CfgExportError(f"{name}: unreadable calibration manifest ({exc}): {REMAKE}") from None
    data = CalibrationData(path, manifest, arrays)
    _check_rows(data)
    return data


def _check_rows(data: CalibrationData) -> None:
    m, name = data.manifest, data.path.name
    total = sum(m.rows)
    if total == 0 or not data.arrays:
        raise CfgExportError(f"{name} holds no recorded rows: {REMAKE} with more --n and --steps")
    for key, array in data.arrays.items():
        if len(array) != total:
            raise CfgExportError(f"{name}: array '{key}' has {len(array)} rows, its manifest says {total} "
                                 f"({len(m.rows)} steps); the file was altered: {REMAKE}")


def check_calibration(data: CalibrationData, manifest: Manifest, min_steps: int = MIN_STEPS) -> None:
    """Raises CfgExportError unless `data` was recorded from the model of `manifest`, with
    one array per model input of its dtype and per-row shape, over >= min_steps steps."""
    m, name = data.manifest, data.path.name
    if m.layout != manifest.layout.value:
        raise CfgExportError(f"{name} was recorded from a {m.layout}-layout model, this artifact is "
                             f"{manifest.layout.value}: {REMAKE} on this artifact")
    if m.source_sha256 != manifest.model_sha256:
        raise CfgExportError(f"{name} was recorded from model {_short(m.source_sha256)}, this artifact is "
                             f"{_short(manifest.model_sha256)}: {REMAKE}")
    want = {s.name: s for s in manifest.inputs}
    if set(data.arrays) != set(want):
        raise CfgExportError(f"{name}: got arrays {sorted(data.arrays)}, expected one per model input "
                             f"{sorted(want)}: {REMAKE}")
    for key, spec in want.items():
        array = data.arrays[key]
        if array.dtype != np.dtype(spec.dtype):
            raise CfgExportError(f"{name}: array '{key}' has dtype {array.dtype}, the model input is {spec.dtype}: "
                                 f"{REMAKE}")
        fixed = [s if isinstance(s, int) else None for s in spec.shape[1:]]
        if array.ndim != len(spec.shape) or any(f is not None and f != s for f, s in zip(fixed, array.shape[1:])):
            raise CfgExportError(f"{name}: array '{key}' has rows of shape {list(array.shape[1:])}, the model input "
                                 f"takes {list(spec.shape[1:])}: {REMAKE}")
    if data.steps < min_steps:
        raise CfgExportError(f"{name} holds {data.steps} recorded step(s) ({sum(m.rows)} rows); expected at least "
                             f"{min_steps} spread over the trajectory: {REMAKE} with "
                             f"--record-steps {max(min_steps, 8)} or more")


def read_calibration(path: str | Path, manifest: Manifest, min_steps: int = MIN_STEPS) -> CalibrationData:
    """Returns the calibration file at `path` after checking it against the artifact manifest."""
    data = load_calibration(path)
    check_calibration(data, manifest, min_steps)
    return data
