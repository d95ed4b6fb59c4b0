"""evaluate_guidance: the trade-off of the guidance paper's Table 2 (FID and IS against w),
on any class-conditional artifact, with a classifier in ONNX as the feature extractor,
and what each guidance strategy (runtime.strategies) costs and gives at each w.

Columns per w and strategy: model rows evaluated per image, sampling wall time per
image, class accuracy (is the sample the asked class), an Inception Score analog
exp(E_x[KL(p(y|x) || p(y))]) (Salimans et al. 2016) from the classifier's softmax, and
the Frechet distance (Heusel et al. 2017) between the classifier's features of the
samples and those of real data (mean and covariance given in a file), each with its
bootstrap interval. Every (w, strategy) starts from the same seeded noise, and one
backend session serves them all, so the times compare side by side.
Needs no torch: sampling runs in the runtime, the classifier in ONNX Runtime.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.evaluation.stats import (DEFAULT_RESAMPLES, Estimate, frechet_distance,  # noqa: F401
                                         inception_score, score)
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.backends import open_backend
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.guidance import GuidanceOptions, check_w
from cfg_export.runtime.pipeline import DEFAULT_SEED, check_seed, sample_guided
from cfg_export.runtime.strategies import Strategy, parse_strategy
from cfg_export.runtime.progress import Progress, scaled

log = logging.getLogger(__name__)

DEFAULT_WS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0)  # the paper's Table 2 grid, and a few more
DEFAULT_STRATEGIES = ("full",)
DEFAULT_PER_CLASS = 30
ACCURACY_SLACK = 0.005  # a strategy holds full guidance's quality: accuracy at most 0.5 points lower, and
# a Frechet distance at or below the upper end of full guidance's interval
DEFAULT_STEPS = 50
ROOT = Path(__file__).resolve().parents[2]  # the repository (examples/ is not installed)
DEFAULT_CLASSIFIER = ROOT / "examples" / "digits" / "classifier" / "classifier.onnx"
DEFAULT_REFERENCE = ROOT / "examples" / "digits" / "classifier" / "real_features.npz"


@dataclass
class EvalRow:
    w: float
    accuracy: Estimate  # share of samples the classifier assigns to the asked class
    inception_score: Estimate  # exp(E[KL(p(y|x) || p(y))]), from 1 (useless) to num_classes
    frechet_distance: Estimate  # between classifier features of samples and of real data
    samples: int
    rows_per_image: float = 0.0  # model rows evaluated per image over the whole trajectory
    seconds_per_image: float = 0.0  # sampling wall time per image
    strategy: str = "full"  # runtime.strategies spelling
    kind: str = "full"  # the strategy without its values: one curve of the plot
    rows_ratio: float | None = None  # rows per image / full guidance's at this w (None: full not evaluated)
    seconds_ratio: float | None = None  # time per image / full guidance's at this w
    holds_quality: bool | None = None  # Frechet distance <= full's upper bound, accuracy >= full's - 0.5 points

    def to_dict(self) -> dict:
        return {"w": self.w, "strategy": self.strategy, "accuracy": self.accuracy.to_dict(),
                "inception_score": self.inception_score.to_dict(),
                "frechet_distance": self.frechet_distance.to_dict(), "samples": self.samples,
                "rows_per_image": self.rows_per_image, "seconds_per_image": self.seconds_per_image,
                "rows_ratio": self.rows_ratio, "seconds_ratio": self.seconds_ratio,
                "holds_quality": self.holds_quality}


def compare_to_full(rows: Sequence[EvalRow]) -> None:
    """Fills rows_ratio, seconds_ratio and holds_quality of every row from the 'full' row
    of the same w (left None where there is none)."""
    full = {r.w: r for r in rows if r.strategy == "full"}
    for r in rows:
        base = full.get(r.w)
        if base is None:
            continue
        r.rows_ratio = r.rows_per_image / base.rows_per_image if base.rows_per_image else None
        r.seconds_ratio = r.seconds_per_image / base.seconds_per_image if base.seconds_per_image else None
        r.holds_quality = bool(r.frechet_distance.value <= base.frechet_distance.high and
                               r.accuracy.value >= base.accuracy.value - ACCURACY_SLACK)


def _strategies(strategies) -> list[Strategy]:
    """The strategies to evaluate, parsed; refuses repeats."""
    parsed = [s if isinstance(s, Strategy) else parse_strategy(s) for s in (strategies or DEFAULT_STRATEGIES)]
    names = [s.name for s in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CfgExportError(f"--strategy: {repeated[0]} is given twice; give each strategy once")
    return parsed


def evaluate_guidance(artifact: "Artifact | str | Path", ws: Sequence[float] | None = None, *,
                      strategies: "Sequence[str | Strategy] | None" = None, per_class: int | None = None,
                      steps: int | None = None, sampler: str | None = None,
                      seed: int | None = None, classifier: str | Path | None = None,
                      reference: str | Path | None = None, backend: str | None = None,
                      resamples: int | None = None, progress: Progress | None = None) -> list[EvalRow]:
    """Returns one EvalRow per w and strategy (w outer): `per_class` samples of every class
    with the same noise for every w and strategy (seeded), scored by `classifier` (ONNX:
    input [B, *S] -> outputs 'logits' [B, K] and 'features' [B, F]) against `reference`
    (.npz with 'mean' [F], 'cov' [F, F]), with bootstrap intervals over `resamples`
    resamplings (default 1000). strategies: runtime.strategies spellings or Strategy
    objects (default: full guidance only); the rows of a w are compared with its 'full' row
    when there is one (compare_to_full). The artifact is opened once and one backend session
    serves every run."""
    ort = require("onnxruntime", "onnxruntime")
    ws = list(DEFAULT_WS if ws is None else ws)
    plan = _strategies(strategies)
    per_class = DEFAULT_PER_CLASS if per_class is None else int(per_class)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    seed = DEFAULT_SEED if seed is None else seed
    if per_class < 2:
        raise CfgExportError(f"per class: got {per_class}, expected at least 2 samples per class")
    artifact = as_artifact(artifact)
    manifest = artifact.manifest
    num_classes = manifest.facts.condition.num_classes
    if num_classes is None:
        raise CfgExportError("eval needs a class-conditional model (condition kind 'class')")
    classifier, reference = scoring_files(classifier, reference)
    stats = read_reference(reference)
    session, image_name = open_classifier(ort, classifier, manifest.facts.sample_shape, num_classes,
                                          stats["mean"].shape[0])
    ws = [float(check_w(w, 1)[0]) for w in ws]
    check_seed(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = np.random.default_rng(seed).standard_normal((len(labels), *manifest.facts.sample_shape))
    rows = []
    runs = [(float(w), strategy) for w in ws for strategy in plan]
    with open_backend(artifact, backend) as runner:
        # one untimed step at the full batch first, so that no run pays for the session's warm-up
        sample_guided(artifact, labels, 1.0, steps=1, sampler=sampler, seed=seed, noise=noise, backend=runner)
        for i, (w, strategy) in enumerate(runs):
            result = sample_guided(artifact, labels, w, steps=steps, sampler=sampler, seed=seed, noise=noise,
                                   guidance=strategy.apply(GuidanceOptions()), backend=runner,
                                   progress=scaled(progress, i * steps, len(runs) * steps))
            row = _score(session, image_name, result.samples, labels, num_classes, stats, w,
                         DEFAULT_RESAMPLES if resamples is None else int(resamples))
            row.strategy, row.kind = strategy.name, strategy.kind
            row.rows_per_image = result.rows / len(labels)
            row.seconds_per_image = sum(result.step_seconds) / len(labels)
            rows.append(row)
            log.info("w=%g %s: %s", w, strategy.name, row)
    compare_to_full(rows)
    return rows


def scoring_files(classifier: str | Path | None, reference: str | Path | None) -> tuple[Path, Path]:
    """Returns the paths of the classifier and the reference statistics (default: the
    digits ones), checked to exist."""
    classifier = Path(classifier or DEFAULT_CLASSIFIER)
    reference = Path(reference or DEFAULT_REFERENCE)
    for path, what, option in ((classifier, "classifier", "--classifier"),
                               (reference, "reference statistics", "--reference")):
        if not path.is_file():
            raise CfgExportError(f"{what} {path}: no such file; pass {option} (the digits ones are in the "
                                 f"repository's examples/digits/classifier/)")
    return classifier, reference


def read_reference(path: Path) -> dict:
    """Returns the real-data feature statistics {'mean' [F], 'cov' [F, F]} of an .npz, checked."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz")
            stats = {key: np.asarray(data[key], dtype=np.float64) for key in ("mean", "cov")}
    except (OSError, ValueError, KeyError, EOFError, AttributeError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CfgExportError(f"--reference {path}: expected an .npz with 'mean' [F] and 'cov' [F, F] of real-data "
                             f"features ({reason})") from None
    mean, cov = stats["mean"], stats["cov"]
    if mean.ndim != 1 or cov.shape != (len(mean), len(mean)) or not (np.all(np.isfinite(mean)) and
                                                                     np.all(np.isfinite(cov))):
        raise CfgExportError(f"--reference {path}: got mean {list(mean.shape)} and cov {list(cov.shape)}, expected "
                             f"finite [F] and [F, F]")
    return stats


def open_classifier(ort, path: Path, sample_shape, num_classes: int, features: int):
    """Returns (session, input name) of the classifier, after checking it takes samples of
    the model's shape and gives 'logits' [B, num_classes] and 'features' [B, F]."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own InvalidProtobuf/Fail types
        raise CfgExportError(f"--classifier {path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:120]}); "
                             f"expected an ONNX classifier") from None
    inputs, outputs = session.get_inputs(), {o.name for o in session.get_outputs()}
    if len(inputs) != 1 or not {"logits", "features"} <= outputs:
        raise CfgExportError(f"--classifier {path}: got inputs {[i.name for i in inputs]} and outputs "
                             f"{sorted(outputs)}, expected one input (the samples) and outputs 'logits' and "
                             f"'features' (is it the denoiser?)")
    probe = np.zeros((2, *sample_shape), np.float32)
    try:
        logits, feats = session.run(["logits", "features"], {inputs[0].name: probe})
    except Exception as exc:  # shape or type mismatch inside onnxruntime
        raise CfgExportError(f"--classifier {path}: it does not take samples of shape {list(sample_shape)} "
                             f"({str(exc).splitlines()[0][:120]})") from None
    if logits.shape != (2, num_classes) or feats.shape != (2, features):
        raise CfgExportError(f"--classifier {path}: gives logits {list(logits.shape[1:])} and features "
                             f"{list(feats.shape[1:])}, expected [{num_classes}] (the model's classes) and "
                             f"[{features}] (the reference statistics')")
    return session, inputs[0].name


def _score(session, image_name: str, samples: np.ndarray, labels: np.ndarray, num_classes: int, stats,
           w: float, resamples: int) -> EvalRow:
    """Scores one sample set with the classifier session (bootstrap intervals)."""
    logits, features = session.run(["logits", "features"], {image_name: samples.astype(np.float32)})
    if logits.shape[1] != num_classes:
        raise CfgExportError(f"classifier gives {logits.shape[1]} classes, the model has {num_classes}")
    quality = score(logits, features, labels, stats["mean"], stats["cov"], resamples=resamples)
    return EvalRow(w=w, accuracy=quality.accuracy, inception_score=quality.inception_score,
                   frechet_distance=quality.frechet_distance, samples=len(labels))


def rows_to_dicts(rows: Sequence[EvalRow]) -> list[dict]:
    return [r.to_dict() for r in rows]
