"""evaluate_guidance: the trade-off of the guidance paper's Table 2 (FID and IS against w),
on any class-conditional artifact, with a classifier in ONNX as the feature extractor.

Columns per w: class accuracy (is the sample the asked class), an Inception Score
analog exp(E_x[KL(p(y|x) || p(y))]) (Salimans et al. 2016) from the classifier's
softmax, and the Frechet distance (Heusel et al. 2017) between the classifier's
features of the samples and those of real data (mean and covariance given in a file).
Needs no torch: sampling runs in the runtime, the classifier in ONNX Runtime.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.evaluation.stats import Estimate, frechet_distance, inception_score, score  # noqa: F401
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.backends import open_backend
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.pipeline import DEFAULT_SEED, sample_guided
from cfg_export.runtime.progress import Progress, scaled

log = logging.getLogger(__name__)

DEFAULT_WS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0)  # the paper's Table 2 grid, and a few more
DEFAULT_PER_CLASS = 30
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

    def to_dict(self) -> dict:
        return {"w": self.w, "accuracy": self.accuracy.to_dict(), "inception_score": self.inception_score.to_dict(),
                "frechet_distance": self.frechet_distance.to_dict(), "samples": self.samples,
                "rows_per_image": self.rows_per_image, "seconds_per_image": self.seconds_per_image}


def evaluate_guidance(artifact: "Artifact | str | Path", ws: Sequence[float] | None = None, *,
                      per_class: int | None = None, steps: int | None = None, sampler: str | None = None,
                      seed: int | None = None, classifier: str | Path | None = None,
                      reference: str | Path | None = None, backend: str | None = None,
                      progress: Progress | None = None) -> list[EvalRow]:
    """Returns one EvalRow per w: `per_class` samples of every class with the same noise
    for every w (seeded), scored by `classifier` (ONNX: input [B, *S] -> outputs 'logits'
    [B, K] and 'features' [B, F]) against `reference` (.npz with 'mean' [F], 'cov' [F, F]).
    The artifact is opened once and one backend session serves every w."""
    ort = require("onnxruntime", "onnxruntime")
    ws = list(DEFAULT_WS if ws is None else ws)
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
    classifier = Path(classifier or DEFAULT_CLASSIFIER)
    reference = Path(reference or DEFAULT_REFERENCE)
    for path, what, option in ((classifier, "classifier", "--classifier"),
                               (reference, "reference statistics", "--reference")):
        if not path.is_file():
            raise CfgExportError(f"{what} {path}: no such file; pass {option} (the digits ones are in the "
                                 f"repository's examples/digits/classifier/)")
    stats = np.load(reference)
    session = ort.InferenceSession(str(classifier), providers=["CPUExecutionProvider"])
    image_name = session.get_inputs()[0].name
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = np.random.default_rng(seed).standard_normal((len(labels), *manifest.facts.sample_shape))
    rows = []
    with open_backend(artifact, backend) as runner:
        for i, w in enumerate(ws):
            result = sample_guided(artifact, labels, float(w), steps=steps, sampler=sampler, seed=seed, noise=noise,
                                   backend=runner, progress=scaled(progress, i * steps, len(ws) * steps))
            row = _score(session, image_name, result.samples, labels, num_classes, stats, float(w))
            row.rows_per_image = result.rows / len(labels)
            row.seconds_per_image = sum(result.step_seconds) / len(labels)
            rows.append(row)
            log.info("w=%g: %s", w, rows[-1])
    return rows


def _score(session, image_name: str, samples: np.ndarray, labels: np.ndarray, num_classes: int, stats,
           w: float) -> EvalRow:
    """Scores one sample set with the classifier session (bootstrap intervals)."""
    logits, features = session.run(["logits", "features"], {image_name: samples.astype(np.float32)})
    if logits.shape[1] != num_classes:
        raise CfgExportError(f"classifier gives {logits.shape[1]} classes, the model has {num_classes}")
    quality = score(logits, features, labels, stats["mean"], stats["cov"])
    return EvalRow(w=w, accuracy=quality.accuracy, inception_score=quality.inception_score,
                   frechet_distance=quality.frechet_distance, samples=len(labels))


def rows_to_dicts(rows: Sequence[EvalRow]) -> list[dict]:
    return [r.to_dict() for r in rows]
