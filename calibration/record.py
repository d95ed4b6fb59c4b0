"""record_calibration: the inputs the engine really sees, recorded from guided sampler
trajectories of the FP32 model, for INT8 calibration.

Post-training quantization of diffusion models needs calibration data from the
sampler's own trajectories, spread over the timesteps (Q-Diffusion, Li et al. 2023,
sec. 4.1 "time step-aware calibration"; PTQ4DM, Shang et al. 2023): a network sees
very different activations at high and low noise, and in its conditional and null
halves. So the FP32 artifact is sampled with the guided runtime sampler and, at K
sampler steps spread evenly over the whole trajectory (first and last included),
the exact feeds of the model call are kept: for the stacked layout `sample`
[2N, *S], `timestep` [2N] and `cond` [2N] (first N rows the real conditions, last N
the null condition), for the fused layout the N rows and `w`.

The file is an .npz: one array per model input, the K recorded feeds concatenated
rows first ([K * 2N, ...]; the layout TensorRT's calibrator reads batches from), and
`manifest`, a JSON string saying where the rows come from (see CalibrationManifest).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.files import check_output_file, staged_file
from cfg_export.runtime.memory import check_rows_fit
from cfg_export.runtime.progress import Progress

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "cfg-export-calibration/1"
MANIFEST_ENTRY = "manifest"  # the npz entry holding the JSON manifest
MIN_STEPS = 4  # recorded steps: fewer cannot cover the trajectory's noise levels
DEFAULT_IMAGES_PER_CLASS = 2
DEFAULT_W = 3.0  # calibrate at the w the model will be sampled at; 3 suits the reference model


@dataclass
class CalibrationManifest:
    """Where the rows of a calibration file come from."""

    source_sha256: str  # the model file the rows were recorded from
    layout: str  # stacked or fused
    inputs: list[dict]  # the model's input specs (name, shape, dtype), as in its manifest
    sampler: str
    steps: int  # sampler steps of the trajectory
    w: float
    seed: int
    cond: list  # the condition of each image: class labels, or "embeddings [N, L, D]"
    images: int  # N
    recorded_steps: list[int]  # indices (0 = first, at the highest noise) of the recorded steps
    recorded_timesteps: list[int]  # their training timesteps
    rows: list[int]  # rows per recorded step (2N for stacked, N for fused)
    format: str = CALIBRATION_FORMAT
    producer: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CalibrationManifest":
        try:
            d = json.loads(text)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(d, dict) or d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"format {d.get('format') if isinstance(d, dict) else None!r}, expected "
                             f"{CALIBRATION_FORMAT!r}")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RecordResult:
    path: Path
    manifest: CalibrationManifest
    arrays: dict[str, np.ndarray]  # what was written, by input name, rows first
    seconds: float


def pick_steps(steps: int, k: int | None) -> list[int]:
    """Returns k step indices in 0..steps-1 spread evenly over the trajectory, first and
    last included (all steps when k is None or >= steps)."""
    if k is None or k >= steps:
        return list(range(steps))
    if k < MIN_STEPS:
        raise CfgExportError(f"--record-steps: got {k}, expected at least {MIN_STEPS} (steps spread over the "
                             f"trajectory, from the highest noise level to the lowest)")
    return [int(i) for i in np.round(np.linspace(0, steps - 1, k)).astype(int)]


class _Recorder:
    """The `record` callback of sample_guided: keeps copies of the feeds of the calls
    whose index is in `keep` (one model call per sampler step)."""

    def __init__(self, keep: Sequence[int]):
        self.keep = set(keep)
        self.calls = 0
        self.feeds: list[dict[str, np.ndarray]] = []
        self.indices: list[int] = []

    def __call__(self, feeds: dict) -> None:
        if self.calls in self.keep:
            self.feeds.append({name: np.array(value, copy=True) for name, value in feeds.items()})
            self.indices.append(self.calls)
        self.calls += 1


def default_conditions(manifest, classes: Sequence[int] | None, n: int | None) -> np.ndarray:
    """Returns the labels [N] to record: each of `classes` (default every class of the
    model, when it has at most MAX_DEFAULT_CLASSES) repeated n times (default
    DEFAULT_IMAGES_PER_CLASS)."""
    from cfg_export.runtime.conditions import MAX_DEFAULT_CLASSES
    from cfg_export.runtime.manifest import ConditionKind

    condition = manifest.facts.condition
    if condition.kind is not ConditionKind.CLASS:
        raise CfgExportError(f"this model takes {condition.kind.value} conditions: pass the conditions "
                             f"[N, L, D] to record_calibration(cond=...) instead of classes")
    n = DEFAULT_IMAGES_PER_CLASS if n is None else int(n)
    if n < 1:
        raise CfgExportError(f"--n: got {n}, expected at least 1 image per class")
    if classes is None:
        if condition.num_classes > MAX_DEFAULT_CLASSES:
            raise CfgExportError(f"this model has {condition.num_classes} classes: pick the ones to record "
                                 f"with --classes, e.g. --classes 207,360,387")
    classes = list(range(condition.num_classes)) if classes is None else list(classes)
    if not classes:
        raise CfgExportError("--classes: got no class, expected at least one label")
    images = len(classes) * n
    check_rows_fit(manifest.activation_bytes_per_row, images * manifest.rows_per_image, images, "recording",
                   math.prod(manifest.facts.sample_shape))  # before the labels of n images per class are made
    return np.repeat(np.asarray(classes, dtype=np.int64), n)


def record_calibration(artifact: "Artifact | str | Path", out: str | Path, *, classes: Sequence[int] | None = None,
                       n: int | None = None, cond: np.ndarray | None = None, w: float | None = None,
                       steps: int | None = None, sampler: str | None = None, seed: int | None = None,
                       record_steps: int | None = None, backend: str | None = None,
                       progress: Progress | None = None) -> RecordResult:
    """Returns what was written to `out` (an .npz, whole or not at all): the feeds of the
    FP32 artifact (an Artifact or its folder) at `record_steps` sampler steps (None: all) spread over
    a guided trajectory of N images, rows first: for the stacked layout `sample`
    [K * 2N, *S] float32, `timestep` [K * 2N], `cond` [K * 2N] (each step's first N rows
    the real conditions, last N the null one), plus the JSON `manifest`.

    The images: `classes` (default every class) each repeated `n` times (default 2), or
    explicit conditions `cond` (labels [N] or embeddings [N, L, D]). w: the guidance
    weight (default 3.0); steps, sampler: as sample_guided's defaults when None.
    """
    import time

    from cfg_export.runtime.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, sample_guided

    start = time.perf_counter()
    artifact = as_artifact(artifact)
    check_output_file(out, "-o", (".npz",))
    manifest = artifact.model_file(engine=backend == "tensorrt" or None).manifest
    if manifest.precision != "fp32" or manifest.engine is not None:
        raise CfgExportError(f"{artifact.directory}: the model is {manifest.precision}"
                             f"{' (a TensorRT engine)' if manifest.engine else ''}; calibration data is recorded "
                             f"from the FP32 ONNX export (cfg-export onnx)")
    if cond is None:
        cond = default_conditions(manifest, classes, n)
    elif classes is not None or n is not None:
        raise CfgExportError("give either cond, or classes and n; not both")
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < MIN_STEPS:
        raise CfgExportError(f"--steps: got {steps}, expected at least {MIN_STEPS} sampler steps to record from")
    T = manifest.facts.schedule.num_train_timesteps
    if steps > T:
        raise CfgExportError(f"--steps: got {steps}, expected at most {T} (the model's training timesteps)")
    if record_steps is not None and record_steps > steps:
        raise CfgExportError(f"--record-steps: got {record_steps}, more than the {steps} sampler steps; "
                             f"give at most {steps}, or more --steps")
    keep = pick_steps(steps, record_steps)
    sampler = sampler or DEFAULT_SAMPLER
    w = DEFAULT_W if w is None else float(w)
    seed = 0 if seed is None else int(seed)
    recorder = _Recorder(keep)
    result = sample_guided(artifact, cond, w, steps=steps, sampler=sampler, seed=seed, backend=backend,
                           progress=progress, record=recorder)
    if recorder.calls != steps:
        log.info("%d model calls for %d sampler steps: recorded calls %s", recorder.calls, steps, recorder.indices)
    arrays = {spec.name: np.concatenate([f[spec.name] for f in recorder.feeds]) for spec in manifest.inputs}
    timesteps = [int(f["timestep"].reshape(-1)[0]) for f in recorder.feeds]
    cond_summary = (result.cond.tolist() if result.cond.ndim == 1 else f"embeddings {list(result.cond.shape)}")
    calib = CalibrationManifest(
        source_sha256=manifest.model_sha256, layout=manifest.layout.value,
        inputs=[s.to_dict() for s in manifest.inputs], sampler=sampler, steps=steps, w=w, seed=seed,
        cond=cond_summary, images=len(result.cond), recorded_steps=recorder.indices,
        recorded_timesteps=timesteps, rows=[len(f["sample"]) for f in recorder.feeds],
        producer={"cfg_export": _version(), "numpy": np.__version__})
    out = Path(out)
    with staged_file(out) as tmp:
        save_npz(tmp, {**arrays, MANIFEST_ENTRY: np.array(calib.to_json())})
    log.info("recorded %d steps x %d rows of %s into %s", len(keep), calib.rows[0], artifact.directory, out)
    return RecordResult(out, calib, arrays, time.perf_counter() - start)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes arrays as a compressed .npz (what np.load reads; np.savez_compressed's layout),
    closing the zip whatever happens, so a failed write (a full disk) is one OSError and
    leaves no half-closed zip behind."""
    import zipfile

    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cfg-export")
    except Exception:  # not installed: running from a checkout
        return "unknown"
