"""measure_quality: how far an INT8 artifact is from its FP32 source, measured.

Two views (stacked layout):
- per step: the FP32 guided trajectory is run once; at every step both models get the
  very same stacked feeds (x_t of the FP32 trajectory, [cond; null]) and the error of
  the INT8 guided eps (1 + w) eps_c - w eps_u against FP32 is taken, relative to the
  FP32 guided eps (Frobenius norms over the N images). The w mix amplifies an error
  of the two halves: the same figure for eps_c alone is given beside it.
- per sample: the same seeds sampled end to end by both models; the distance between
  the final images, and, given a classifier (ONNX: samples [B, *S] in, logits first
  out), the share of each set that it labels as the requested class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.calibration.record import DEFAULT_W, default_conditions
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.guidance import mix
from cfg_export.runtime.manifest import Layout
from cfg_export.runtime.progress import Progress, scaled

log = logging.getLogger(__name__)

REPORT_IMAGES_PER_CLASS = 4
TARGET_STEP_ERROR = 0.05  # the project's target for the per-step guided eps error
DEFAULT_SEED = 1234  # not the calibration default (0): measured on trajectories calibration did not see


@dataclass
class StepError:
    index: int  # sampler step, 0 = highest noise
    timestep: int
    guided: float  # ||eps~_int8 - eps~_fp32|| / ||eps~_fp32||, eps~ = (1 + w) eps_c - w eps_u
    cond: float  # the same for eps_c alone (no mix)
    x0: float  # the same for the x0 the guided eps implies, (x_t - sqrt(1 - a) eps~) / sqrt(a)


@dataclass
class QualityReport:
    w: float
    sampler: str
    steps: int
    seed: int
    labels: list[int]
    step_errors: list[StepError]
    distances: np.ndarray  # [N] RMS pixel difference of the final images
    relative_distances: np.ndarray  # [N] ||x_int8 - x_fp32|| / ||x_fp32|| per image
    accuracy_fp32: float | None = None  # classifier accuracy on the FP32 samples
    accuracy_int8: float | None = None
    agreement: float | None = None  # share of images the classifier labels the same in both sets
    notes: list[str] = field(default_factory=list)

    @property
    def max_step_error(self) -> float:
        return max(e.guided for e in self.step_errors)

    @property
    def mean_step_error(self) -> float:
        return float(np.mean([e.guided for e in self.step_errors]))

    def lines(self, every: int | None = None) -> list[str]:
        """The report as text lines; per-step rows every `every` steps (default about 10 rows)."""
        every = every or max(1, len(self.step_errors) // 10)
        worst = max(self.step_errors, key=lambda e: e.guided)
        out = [f"INT8 vs FP32, {self.sampler} {self.steps} steps, w={self.w:g}, seed {self.seed}, "
               f"{len(self.labels)} images",
               "per step (same x_t for both): relative error of the guided eps (eps_c alone; implied x0):"]
        for e in self.step_errors:
            if e.index % every == 0 or e.index == len(self.step_errors) - 1 or e is worst:
                out.append(f"  step {e.index:3d} t={e.timestep:4d}: {100 * e.guided:6.2f}%  "
                           f"({100 * e.cond:.2f}%; x0 {100 * e.x0:.2f}%)")
        out.append(f"  max {100 * self.max_step_error:.2f}% at t={worst.timestep}, "
                   f"mean {100 * self.mean_step_error:.2f}%")
        out.append(f"final images: RMS difference mean {self.distances.mean():.4f}, max {self.distances.max():.4f}; "
                   f"relative L2 mean {100 * self.relative_distances.mean():.2f}%, "
                   f"max {100 * self.relative_distances.max():.2f}%")
        if self.accuracy_fp32 is not None:
            out.append(f"classifier accuracy: FP32 {100 * self.accuracy_fp32:.1f}%, "
                       f"INT8 {100 * self.accuracy_int8:.1f}% "
                       f"({100 * (self.accuracy_int8 - self.accuracy_fp32):+.1f} points); same label on "
                       f"{100 * self.agreement:.1f}% of images")
        return out + [f"note: {n}" for n in self.notes]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Returns ||got - want|| / ||want|| (Frobenius, float64)."""
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def step_errors(fp32, int8, feeds: Sequence[dict], w: float, alphas_cumprod: np.ndarray) -> list[StepError]:
    """Returns the per-step errors of backend `int8` against `fp32` (both open, eps
    prediction) on the stacked feeds of each step ([2N] rows: first N conditional, last N null)."""
    errors = []
    for i, f in enumerate(feeds):
        t = int(f["timestep"][0])
        n = len(f["sample"]) // 2
        (a,) = fp32.infer(f).values()
        (b,) = int8.infer(f).values()
        a, b = a.astype(np.float64), b.astype(np.float64)
        guided_a, guided_b = mix(a[:n], a[n:], np.full(n, w)), mix(b[:n], b[n:], np.full(n, w))
        x, alpha = f["sample"][:n].astype(np.float64), float(alphas_cumprod[t])
        x0_a, x0_b = ((x - np.sqrt(1 - alpha) * g) / np.sqrt(alpha) for g in (guided_a, guided_b))
        errors.append(StepError(i, t, relative_error(guided_b, guided_a), relative_error(b[:n], a[:n]),
                                relative_error(x0_b, x0_a)))
    return errors


def classify(classifier: str | Path, samples: np.ndarray, batch: int = 256) -> np.ndarray:
    """Returns the argmax labels [N] of an ONNX classifier (samples in, logits first out)."""
    ort = require("onnxruntime", "onnxruntime")
    path = Path(classifier)
    if not path.is_file():
        raise CfgExportError(f"--classifier {path}: no such file; expected an ONNX classifier taking the samples")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = samples.astype(np.float32)
    logits = [session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(logits).argmax(1)


def measure_quality(fp32: "Artifact | str | Path", int8: "Artifact | str | Path", *,
                    classes: Sequence[int] | None = None, n: int | None = None, w: float | None = None,
                    steps: int | None = None, sampler: str | None = None, seed: int | None = None,
                    classifier: str | Path | None = None, progress: Progress | None = None) -> QualityReport:
    """Returns the quality report of the artifact `int8_dir` against `fp32_dir` (stacked
    layout, class labels): `classes` (default all) x `n` images (default 4 per class) at
    guidance weight w (default: the calibration's, else 3), the sampler's defaults for steps and sampler, seed
    (default 1234). With `classifier`, the class accuracy of both sample sets."""
    from cfg_export.runtime.backends import open_backend
    from cfg_export.runtime.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, sample_guided

    fp32, int8 = as_artifact(fp32), as_artifact(int8)
    fp32_dir, int8_dir = fp32.directory, int8.directory
    fp32_manifest = fp32.model_file(engine=False).manifest
    int8_manifest = int8.model_file(engine=False).manifest
    if classifier is not None and not Path(classifier).is_file():
        raise CfgExportError(f"--classifier {classifier}: no such file; expected an ONNX classifier taking the samples")
    if fp32_manifest.layout is not Layout.STACKED or int8_manifest.layout is not Layout.STACKED:
        raise CfgExportError("the quality report compares stacked-layout artifacts (the w mix on the host)")
    if fp32_manifest.facts.prediction.value != "eps":
        raise CfgExportError(f"the quality report compares eps-prediction models; this one predicts "
                             f"{fp32_manifest.facts.prediction.value}")
    source = int8_manifest.producer.get("quantized_from")
    if source and source != fp32_manifest.model_sha256:
        raise CfgExportError(f"{int8_dir} was quantized from model {source[:12]}, {fp32_dir} is "
                             f"{fp32_manifest.model_sha256[:12]}: compare it with its own source")
    labels = default_conditions(fp32_manifest, classes, REPORT_IMAGES_PER_CLASS if n is None else n)
    if w is None:  # the w the model was calibrated at, else DEFAULT_W
        w = int8_manifest.producer.get("quantization", {}).get("w", DEFAULT_W)
    w = float(w)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    sampler = sampler or DEFAULT_SAMPLER
    seed = DEFAULT_SEED if seed is None else int(seed)
    feeds: list[dict] = []
    with open_backend(fp32, "onnxruntime-cpu") as a, open_backend(int8, "onnxruntime-cpu") as b:
        reference = sample_guided(fp32, labels, w, steps=steps, sampler=sampler, seed=seed, backend=a,
                                  progress=scaled(progress, 0, 2 * steps),
                                  record=lambda f: feeds.append({k: np.array(v) for k, v in f.items()}))
        quantized = sample_guided(int8, labels, w, steps=steps, sampler=sampler, seed=seed, backend=b,
                                  progress=scaled(progress, steps, 2 * steps))
        errors = step_errors(a, b, feeds, w, fp32_manifest.facts.schedule.alphas_cumprod())
    x, y = reference.samples.astype(np.float64), quantized.samples.astype(np.float64)
    diff = (y - x).reshape(len(x), -1)
    report = QualityReport(w, sampler, steps, seed, labels.tolist(), errors,
                           distances=np.sqrt((diff ** 2).mean(1)),
                           relative_distances=np.linalg.norm(diff, axis=1) / np.maximum(
                               np.linalg.norm(x.reshape(len(x), -1), axis=1), 1e-30))
    over = [e for e in errors if e.guided > TARGET_STEP_ERROR]
    if over:
        report.notes.append(f"guided eps error above {100 * TARGET_STEP_ERROR:g}% at {len(over)} of {len(errors)} "
                            f"steps (t <= {max(e.timestep for e in over)}); find the layers responsible with "
                            f"benchmarks/int8_cpu.py --sensitivity, keep them with --keep-fp32 (e.g. @full-res)")
    if classifier is not None:
        pa, pb = classify(classifier, reference.samples), classify(classifier, quantized.samples)
        report.accuracy_fp32 = float((pa == labels).mean())
        report.accuracy_int8 = float((pb == labels).mean())
        report.agreement = float((pa == pb).mean())
    return report
