"""measure_quality: how much of the INT8 error reaches the image, step by step and at the
end, and what it costs in time.

The sampler never shows the model's eps to the image directly. At each step it forms the
guided eps~ = (1 + w) eps_c - w eps_u and from it the implied clean sample

    x0 = (x_t - sqrt(1 - a_t) eps~) / sqrt(a_t)                 (DDIM, Song et al. 2021, eq. 12)

which the step moves toward. At low noise sqrt(1 - a_t) is small (0.01 at t = 0): a large
relative error of eps~ there moves x0 by little, and a small eps~ error at high noise is
divided by a small sqrt(a_t). So the report leads with the relative error of x0 at each
step (both models fed the same x_t, the FP32 trajectory's), shows the guided eps error
second, and judges on x0 and on the final images: their relative distance, and, given a
`score` function (cfg_export.evaluation.int8 passes the classifier's accuracy, IS analog
and Frechet distance with bootstrap intervals), the metrics of both sample sets. Wall
time per image of both models comes from the same runs, taken in turns chunk by chunk.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cfg_export.calibration.record import DEFAULT_W, default_conditions
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.guidance import mix, to_eps
from cfg_export.runtime.manifest import Layout
from cfg_export.runtime.progress import Progress, scaled

log = logging.getLogger(__name__)

REPORT_IMAGES_PER_CLASS = 4
TARGET_X0_ERROR = 0.05  # the project's bound on the per-step error of the implied x0
DEFAULT_SEED = 1234  # not the calibration default (0): measured on trajectories calibration did not see
DEFAULT_CHUNK = 16  # images per sampling call; FP32 and INT8 take turns chunk by chunk
SLOWER = 0.95  # a speed-up below this is reported as slower (above it: within the noise of one run)

#: score(samples [N, *S], labels [N]) -> an object with accuracy, inception_score and
#: frechet_distance, each an estimate with value, low, high (cfg_export.evaluation.stats.Quality)
Score = Callable[[np.ndarray, np.ndarray], Any]


@dataclass
class StepError:
    index: int  # sampler step, 0 = highest noise
    timestep: int
    x0: float  # ||x0_int8 - x0_fp32|| / ||x0_fp32||, x0 implied by the guided eps (same x_t)
    guided: float  # ||eps~_int8 - eps~_fp32|| / ||eps~_fp32||, eps~ = (1 + w) eps_c - w eps_u
    cond: float  # the same for eps_c alone (no mix)


@dataclass
class QualityReport:
    w: float
    sampler: str
    steps: int
    seed: int
    images: int
    step_errors: list[StepError]
    relative_distances: np.ndarray  # [N] ||x_int8 - x_fp32|| / ||x_fp32|| per final image
    seconds_per_image: dict[str, float]  # "fp32", "int8": sampling wall time per image
    chunk: int  # images per sampling call of the timings
    bound: float = TARGET_X0_ERROR
    quality: dict[str, Any] = field(default_factory=dict)  # "fp32", "int8": what `score` returned
    verdict: str = ""
    advice: list[str] = field(default_factory=list)

    @property
    def max_x0_error(self) -> float:
        return max(e.x0 for e in self.step_errors)

    @property
    def max_step_error(self) -> float:
        """The largest guided-eps error (shown second; the verdict does not rest on it)."""
        return max(e.guided for e in self.step_errors)

    @property
    def steps_over(self) -> list[StepError]:
        """The steps whose implied-x0 error is above the bound."""
        return [e for e in self.step_errors if e.x0 > self.bound]

    @property
    def speedup(self) -> float:
        return self.seconds_per_image["fp32"] / max(self.seconds_per_image["int8"], 1e-12)

    def lines(self, every: int | None = None) -> list[str]:
        """The report as text lines; per-step rows every `every` steps (default about 10 rows)."""
        every = every or max(1, len(self.step_errors) // 10)
        worst = max(self.step_errors, key=lambda e: e.x0)
        out = [f"INT8 vs FP32: {self.sampler} {self.steps} steps, w={self.w:g}, seed {self.seed}, {self.images} images",
               f"per step (both models fed the FP32 trajectory's x_t): relative error of the implied x0 "
               f"(bound {100 * self.bound:g}%); guided eps; eps_c alone"]
        for e in self.step_errors:
            if e.index % every == 0 or e.index == len(self.step_errors) - 1 or e is worst:
                mark = "  over" if e.x0 > self.bound else ""
                out.append(f"  step {e.index:3d} t={e.timestep:4d}: x0 {100 * e.x0:6.2f}%   guided eps "
                           f"{100 * e.guided:6.2f}%   eps_c {100 * e.cond:6.2f}%{mark}")
        out.append(f"  x0: max {100 * self.max_x0_error:.2f}% at t={worst.timestep}, "
                   f"{len(self.steps_over)} of {len(self.step_errors)} steps above {100 * self.bound:g}%")
        d = self.relative_distances
        out.append(f"final images, relative L2 distance INT8 vs FP32: mean {100 * d.mean():.2f}%, "
                   f"max {100 * d.max():.2f}%")
        for name in ("fp32", "int8"):
            q = self.quality.get(name)
            if q is not None:
                out.append(f"{name.upper():5s} accuracy {_pct(q.accuracy)}   IS analog {q.inception_score:.3f}   "
                           f"Frechet distance {q.frechet_distance:.3f}   ({q.samples} samples, 95% bootstrap)")
        s = self.seconds_per_image
        out.append(f"wall time per image (N={self.chunk}, taken in turns): FP32 {1e3 * s['fp32']:.2f} ms, "
                   f"INT8 {1e3 * s['int8']:.2f} ms ({self.speedup:.2f}x)")
        out.append(f"verdict: {self.verdict}")
        return out + [f"advice: {a}" for a in self.advice]


def _pct(estimate) -> str:
    return f"{100 * estimate.value:.1f}% [{100 * estimate.low:.1f}, {100 * estimate.high:.1f}]"


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Returns ||got - want|| / ||want|| (Frobenius, float64)."""
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def implied_x0(x: np.ndarray, eps: np.ndarray, alpha_cumprod: float) -> np.ndarray:
    """Returns (x_t - sqrt(1 - a) eps) / sqrt(a), float64."""
    a = float(alpha_cumprod)
    return (np.asarray(x, dtype=np.float64) - np.sqrt(1.0 - a) * eps) / np.sqrt(a)


def step_errors(fp32, int8, feeds: Sequence[dict], w: float, alphas_cumprod: np.ndarray,
                prediction=None) -> list[StepError]:
    """Returns the per-step errors of backend `int8` against `fp32` (both open, stacked
    layout) on the feeds of each step ([2N] rows: first N conditional, last N null);
    prediction: the models' prediction type (default eps), converted to eps first."""
    from cfg_export.runtime.manifest import Prediction

    prediction = prediction or Prediction.EPS
    errors = []
    for i, f in enumerate(feeds):
        t = int(np.asarray(f["timestep"]).reshape(-1)[0])
        n = len(f["sample"]) // 2
        a = float(alphas_cumprod[t])
        x = f["sample"][:n].astype(np.float64)
        outs = []
        for backend in (fp32, int8):
            (out,) = backend.infer(f).values()
            out = out.astype(np.float64)
            eps_c, eps_u = (to_eps(out[rows], f["sample"][rows].astype(np.float64), a, prediction)
                            for rows in (slice(0, n), slice(n, 2 * n)))
            outs.append((eps_c, mix(eps_c, eps_u, np.full(n, w))))
        (ca, ga), (cb, gb) = outs
        errors.append(StepError(i, t, relative_error(implied_x0(x, gb, a), implied_x0(x, ga, a)),
                                relative_error(gb, ga), relative_error(cb, ca)))
    return errors


def judge(report: QualityReport) -> None:
    """Sets the verdict and advice of `report` from its x0 errors, metrics and timings."""
    over = report.steps_over
    problems, advice = [], []
    if over:
        ts = [e.timestep for e in over]
        problems.append(f"implied x0 above {100 * report.bound:g}% at {len(over)} of {len(report.step_errors)} steps "
                        f"(t={min(ts)}..{max(ts)})")
    metrics_ok = None
    a, b = report.quality.get("fp32"), report.quality.get("int8")
    if a is not None and b is not None:
        metrics_ok = True
        if b.accuracy.value < a.accuracy.low:
            problems.append(f"class accuracy {100 * b.accuracy.value:.1f}% below FP32's interval "
                            f"[{100 * a.accuracy.low:.1f}, {100 * a.accuracy.high:.1f}]")
            metrics_ok = False
        if not a.frechet_distance.low <= b.frechet_distance.value <= a.frechet_distance.high:
            problems.append(f"Frechet distance {b.frechet_distance.value:.3f} outside FP32's interval "
                            f"[{a.frechet_distance.low:.3f}, {a.frechet_distance.high:.3f}]")
            metrics_ok = False
    if report.speedup < SLOWER:
        problems.append(f"INT8 is slower than FP32 here ({report.speedup:.2f}x)")
        advice.append("check that ONNX Runtime fuses the quantized layers (calibration.qdq.fused_kernels): "
                      "quantize with the default --cpu-fusion, and time on an idle machine")
    if not problems:
        report.verdict = ("ship INT8: the implied x0 stays within the bound at every step"
                          + (" and the metrics stay inside FP32's intervals" if metrics_ok else "")
                          + f", {report.speedup:.2f}x the speed")
    elif over and metrics_ok:
        report.verdict = "INT8 usable: " + "; ".join(problems) + ", yet the final metrics hold"
        advice.append(f"to meet the per-step bound, run those timesteps in float (cfg-export quantize --schedule "
                      f"auto, float for t={min(e.timestep for e in over)}..{max(e.timestep for e in over)}) or "
                      f"keep the layers that hurt them in float (--select auto)")
    else:
        report.verdict = "keep FP32 (or fix the recipe): " + "; ".join(problems)
        if over or metrics_ok is False:
            advice.append("keep the layers with the largest effect on x0 per ms of float time in float "
                          "(cfg-export quantize --select auto), or run the steps over the bound in float "
                          "(--schedule auto)")
    report.advice = advice


def measure_quality(fp32: "Artifact | str | Path", int8: "Artifact | str | Path", *,
                    classes: Sequence[int] | None = None, n: int | None = None, cond: np.ndarray | None = None,
                    w: float | None = None, steps: int | None = None, sampler: str | None = None,
                    seed: int | None = None, score: Score | None = None, chunk: int | None = None,
                    threads: int | None = None, bound: float | None = None,
                    progress: Progress | None = None) -> QualityReport:
    """Returns the quality report of the artifact `int8` against `fp32` (stacked layout):
    images of `classes` (default all) x `n` (default 4 per class), or of the conditions
    `cond` (labels [N] or embeddings [N, L, D]), at guidance weight w (default: the
    calibration's, else 3), the sampler's defaults for steps and sampler, seed (default
    1234), sampled in chunks of `chunk` images (default 16), FP32 and INT8 in turns, on
    ONNX Runtime CPU with `threads` intra-op threads (default ONNX Runtime's) and no
    spinning. With `score`, the metrics of both sample sets (labels are the asked classes).
    bound: the per-step x0 bound of the verdict (default 5%)."""
    from cfg_export.runtime.backends import BackendOptions, open_backend
    from cfg_export.runtime.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, sample_guided

    fp32, int8 = as_artifact(fp32), as_artifact(int8)
    fp32_manifest = fp32.model_file(engine=False).manifest
    int8_manifest = int8.model_file(engine=False).manifest
    if fp32_manifest.layout is not Layout.STACKED or int8_manifest.layout is not Layout.STACKED:
        raise CfgExportError("the quality report compares stacked-layout artifacts (the w mix on the host)")
    source = int8_manifest.producer.get("quantized_from")
    if source and source != fp32_manifest.model_sha256:
        raise CfgExportError(f"{int8.directory} was quantized from model {source[:12]}, {fp32.directory} is "
                             f"{fp32_manifest.model_sha256[:12]}: compare it with its own source")
    if cond is None:
        cond = default_conditions(fp32_manifest, classes, REPORT_IMAGES_PER_CLASS if n is None else n)
    elif classes is not None or n is not None:
        raise CfgExportError("give either cond, or classes and n; not both")
    if score is not None and np.ndim(cond) != 1:
        raise CfgExportError("scoring needs class labels: the classifier checks the asked class")
    if w is None:  # the w the model was calibrated at, else DEFAULT_W
        w = int8_manifest.producer.get("quantization", {}).get("w", DEFAULT_W)
    w = float(w)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    sampler = sampler or DEFAULT_SAMPLER
    seed = DEFAULT_SEED if seed is None else int(seed)
    chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
    bound = TARGET_X0_ERROR if bound is None else float(bound)
    if chunk < 1:
        raise CfgExportError(f"chunk: got {chunk}, expected at least 1 image per sampling call")
    cond = np.asarray(cond)
    total = len(cond)
    noise = np.random.default_rng(seed).standard_normal((total, *fp32_manifest.facts.sample_shape))
    options = BackendOptions(threads=threads, spinning=False)
    feeds: list[dict] = []
    samples = {"fp32": [], "int8": []}
    seconds = {"fp32": 0.0, "int8": 0.0}
    starts = list(range(0, total, chunk))
    with open_backend(fp32, "onnxruntime-cpu", options) as a, open_backend(int8, "onnxruntime-cpu", options) as b:
        for artifact, backend in ((fp32, a), (int8, b)):  # first calls allocate: keep them out of the timings
            sample_guided(artifact, cond[:chunk], w, steps=2, sampler=sampler, seed=seed, noise=noise[:chunk],
                          backend=backend)
        for j, start in enumerate(starts):
            part = slice(start, start + chunk)
            record = (lambda f: feeds.append({k: np.array(v) for k, v in f.items()})) if j == 0 else None
            for name, artifact, backend in (("fp32", fp32, a), ("int8", int8, b)):
                began = time.perf_counter()
                result = sample_guided(artifact, cond[part], w, steps=steps, sampler=sampler, seed=seed,
                                       noise=noise[part], backend=backend, record=record,
                                       progress=scaled(progress, (2 * j + (name == "int8")) * steps,
                                                       2 * len(starts) * steps))
                seconds[name] += time.perf_counter() - began
                samples[name].append(result.samples)
                record = None
        errors = step_errors(a, b, feeds, w, fp32_manifest.facts.schedule.alphas_cumprod(),
                             fp32_manifest.facts.prediction)
    x, y = (np.concatenate(samples[k]).astype(np.float64).reshape(total, -1) for k in ("fp32", "int8"))
    report = QualityReport(w, sampler, steps, seed, total, errors,
                           relative_distances=np.linalg.norm(y - x, axis=1) / np.maximum(np.linalg.norm(x, axis=1),
                                                                                          1e-30),
                           seconds_per_image={k: v / total for k, v in seconds.items()}, chunk=min(chunk, total),
                           bound=bound)
    if score is not None:
        for name in ("fp32", "int8"):
            report.quality[name] = score(np.concatenate(samples[name]), cond)
    judge(report)
    return report

