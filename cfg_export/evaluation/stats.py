"""Sample-quality metrics with bootstrap confidence intervals.

A few hundred samples give noisy metrics: two settings whose intervals overlap are not
shown to differ. Each metric is a function of the sample set (class probabilities,
features, labels); its interval is the normal bootstrap interval (Efron & Tibshirani
1993, sec. 13.2): resample the N samples with replacement B times, recompute the metric,
and take the estimate on the whole set +- z * the standard deviation of the B values.
Not the percentile interval: the IS analog and the Frechet distance are biased under
resampling (repeated samples shrink the spread of the features and the entropy of the
class marginal), so the percentiles of the resampled values can miss the estimate itself.

The resamples run their small linear algebra on one BLAS thread (threadpoolctl, where
installed): on a machine whose cores are shared, two BLAS threads waiting on each other
made a 128-feature Frechet distance ten times slower than one thread.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A metric on the whole sample set and its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def overlaps(self, other: "Estimate") -> bool:
        """True when the two intervals share a point: the difference is not shown."""
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def bootstrap(metric: Callable[[np.ndarray], float], n: int, *, resamples: int = DEFAULT_RESAMPLES,
              level: float = DEFAULT_LEVEL, seed: int = 0) -> Estimate:
    """Returns metric(all indices) with its normal bootstrap interval, value +- z se, se the
    standard deviation of the metric over `resamples` resamplings with replacement: metric
    takes an index array [n] (with repeats) into the sample set and returns a number."""
    from statistics import NormalDist

    if n < 2:
        raise ValueError(f"bootstrap needs at least 2 samples, got {n}")
    rng = np.random.default_rng(seed)
    with _one_blas_thread():
        values = np.array([metric(rng.integers(0, n, n)) for _ in range(resamples)], dtype=np.float64)
        value = float(metric(np.arange(n)))
    half = NormalDist().inv_cdf(0.5 + level / 2) * float(values.std(ddof=1))
    return Estimate(value, value - half, value + half)


def _one_blas_thread():
    """A context in which numpy's BLAS runs one thread (nothing where threadpoolctl is absent)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def inception_score(probs: np.ndarray) -> float:
    """Returns exp(E_x[KL(p(y|x) || p(y))]) for class probabilities [N, K] (Salimans et al. 2016)."""
    probs = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    marginal = probs.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1))))


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Returns ||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) (Heusel et al. 2017), with
    tr((C1 C2)^(1/2)) computed as the sum of sqrt of the eigenvalues of C1^(1/2) C2 C1^(1/2)."""
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_root = np.sum(np.sqrt(np.clip(middle, 0, None)))
    return float(np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def frechet_distance_to(reference_mean: np.ndarray, reference_cov: np.ndarray):
    """Returns fd(mean [F], cov [F, F]) -> the Frechet distance to fixed reference statistics,
    with the reference's square root R computed once: tr((C1 C2)^(1/2)) is the sum of sqrt
    of the eigenvalues of R C1 R (the same as those of C1 C2), one symmetric solve per call."""
    values, vectors = np.linalg.eigh(reference_cov)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_reference = float(np.trace(reference_cov))

    def fd(mean: np.ndarray, cov: np.ndarray) -> float:
        middle = np.linalg.eigvalsh(root @ cov @ root)
        trace_root = np.sum(np.sqrt(np.clip(middle, 0, None)))
        return float(np.sum((mean - reference_mean) ** 2) + np.trace(cov) + trace_reference - 2 * trace_root)

    return fd


@dataclass(frozen=True)
class Quality:
    """Class accuracy, IS analog and Frechet distance of one sample set, each with its interval."""

    accuracy: Estimate
    inception_score: Estimate
    frechet_distance: Estimate
    samples: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy.to_dict(), "inception_score": self.inception_score.to_dict(),
                "frechet_distance": self.frechet_distance.to_dict(), "samples": self.samples}


def score(logits: np.ndarray, features: np.ndarray, labels: np.ndarray, reference_mean: np.ndarray,
          reference_cov: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Quality:
    """Returns the quality of a sample set from a classifier's logits [N, K] and features
    [N, F] and the asked labels [N], against real-data feature statistics; the intervals
    resample the same indices for the three metrics."""
    probs = softmax(logits.astype(np.float64))
    correct = (logits.argmax(1) == labels).astype(np.float64)
    features = features.astype(np.float64)
    distance = frechet_distance_to(reference_mean, reference_cov)

    def fd(index: np.ndarray) -> float:
        f = features[index]
        return distance(f.mean(0), np.cov(f, rowvar=False))

    n = len(labels)
    return Quality(accuracy=bootstrap(lambda i: correct[i].mean(), n, resamples=resamples, seed=seed),
                   inception_score=bootstrap(lambda i: inception_score(probs[i]), n, resamples=resamples, seed=seed),
                   frechet_distance=bootstrap(fd, n, resamples=resamples, seed=seed), samples=n)
