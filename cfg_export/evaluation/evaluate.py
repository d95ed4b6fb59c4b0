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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

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
    accuracy: float  # share of samples the classifier assigns to the asked class
    inception_score: float  # exp(E[KL(p(y|x) || p(y))]), from 1 (useless) to num_classes
    frechet_distance: float  # between classifier features of samples and of real data
    samples: int


def inception_score(probs: np.ndarray) -> float:
    """Returns exp(E_x[KL(p(y|x) || p(y))]) for class probabilities [N, K]."""
    probs = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    marginal = probs.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1))))


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Returns ||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), with tr((C1 C2)^(1/2))
    computed as the sum of sqrt of the eigenvalues of C1^(1/2) C2 C1^(1/2) (symmetric PSD)."""
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_root = np.sum(np.sqrt(np.clip(middle, 0, None)))
    return float(np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


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
            samples = sample_guided(artifact, labels, float(w), steps=steps, sampler=sampler, seed=seed, noise=noise,
                                    backend=runner, progress=scaled(progress, i * steps, len(ws) * steps)).samples
            rows.append(_score(session, image_name, samples, labels, num_classes, stats, float(w)))
            log.info("w=%g: %s", w, rows[-1])
    return rows


def _score(session, image_name: str, samples: np.ndarray, labels: np.ndarray, num_classes: int, stats,
           w: float) -> EvalRow:
    """Scores one sample set with the classifier session."""
    logits, features = session.run(["logits", "features"], {image_name: samples})
    if logits.shape[1] != num_classes:
        raise CfgExportError(f"classifier gives {logits.shape[1]} classes, the model has {num_classes}")
    features = features.astype(np.float64)
    return EvalRow(
        w=w,
        accuracy=float((logits.argmax(1) == labels).mean()),
        inception_score=inception_score(_softmax(logits.astype(np.float64))),
        frechet_distance=frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                                          stats["mean"], stats["cov"]),
        samples=len(labels))


def rows_to_dicts(rows: Sequence) -> list[dict]:
    return [asdict(r) for r in rows]
