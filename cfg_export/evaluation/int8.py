"""compare_int8: the INT8 quality report (calibration.report) with the eval metrics of both
sample sets: class accuracy, IS analog and Frechet distance, each with its bootstrap
interval (cfg_export.evaluation.stats), from an ONNX classifier and real-data feature
statistics (by default the digits ones shipped in examples/digits/classifier/)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.calibration.report import QualityReport, measure_quality
from cfg_export.evaluation.evaluate import DEFAULT_CLASSIFIER, read_reference, scoring_files
from cfg_export.evaluation.stats import DEFAULT_RESAMPLES, Quality, score
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.progress import Progress


def classifier_input(classifier: str | Path) -> list:
    """Returns the input shape of an ONNX classifier (dims as ints, or names for dynamic ones)."""
    ort = require("onnxruntime", "onnxruntime")
    session = ort.InferenceSession(str(classifier), providers=["CPUExecutionProvider"])
    return list(session.get_inputs()[0].shape)


def make_scorer(classifier: str | Path | None = None, reference: str | Path | None = None,
                resamples: int | None = None):
    """Returns score(samples [N, *S], labels [N]) -> Quality, from the ONNX `classifier`
    (input [B, *S] -> 'logits' [B, K], 'features' [B, F]) and the `reference` statistics
    (.npz with 'mean' [F] and 'cov' [F, F]); resamples: of the bootstrap intervals (default
    stats.DEFAULT_RESAMPLES)."""
    ort = require("onnxruntime", "onnxruntime")
    classifier, reference = scoring_files(classifier, reference)
    stats = read_reference(reference)
    session = ort.InferenceSession(str(classifier), providers=["CPUExecutionProvider"])
    image = session.get_inputs()[0].name

    def scorer(samples: np.ndarray, labels: np.ndarray) -> Quality:
        logits, features = session.run(["logits", "features"], {image: samples.astype(np.float32)})
        return score(logits, features, np.asarray(labels), stats["mean"], stats["cov"],
                     resamples=DEFAULT_RESAMPLES if resamples is None else int(resamples))

    return scorer


def compare_int8(fp32, int8, *, classes: Sequence[int] | None = None, n: int | None = None,
                 w: float | None = None, steps: int | None = None, sampler: str | None = None,
                 seed: int | None = None, classifier: str | Path | None = None,
                 reference: str | Path | None = None, metrics: bool = True, resamples: int | None = None,
                 chunk: int | None = None, threads: int | None = None,
                 progress: Progress | None = None) -> QualityReport:
    """Returns measure_quality's report of artifact `int8` against `fp32` with, when
    `metrics` (default) and the model takes class labels, the accuracy, IS analog and
    Frechet distance of both sample sets (see make_scorer)."""
    from cfg_export.runtime.artifact import as_artifact
    from cfg_export.runtime.manifest import ConditionKind

    fp32 = as_artifact(fp32)
    facts = fp32.manifest.facts
    scorer, note = None, None
    if metrics and facts.condition.kind is ConditionKind.CLASS:
        shape = classifier_input(Path(classifier or DEFAULT_CLASSIFIER))
        fits = len(shape) == len(facts.sample_shape) + 1 and all(
            not isinstance(d, int) or d == s for d, s in zip(shape[1:], facts.sample_shape))
        if fits:
            scorer = make_scorer(classifier, reference, resamples)
        elif classifier is not None:
            raise CfgExportError(f"--classifier {classifier} takes samples {shape[1:]}, the model makes "
                                 f"{list(facts.sample_shape)}: give a classifier of this model's samples")
        else:
            note = (f"no metrics: the default (digits) classifier takes {shape[1:]}, this model makes "
                    f"{list(facts.sample_shape)}; pass --classifier and --reference")
    report = measure_quality(fp32, int8, classes=classes, n=n, w=w, steps=steps, sampler=sampler, seed=seed,
                             score=scorer, chunk=chunk, threads=threads, progress=progress)
    if note:
        report.advice.append(note)
    return report
