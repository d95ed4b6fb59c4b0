"""Guided samples of the reference model, scored by the shipped classifier (ONNX, no torch)."""
import numpy as np
import onnxruntime as ort
import pytest

from cfg_export.runtime.pipeline import sample_guided
from tests.conftest import ROOT

CLASSIFIER = ROOT / "examples" / "digits" / "classifier" / "classifier.onnx"


@pytest.fixture(scope="module")
def classify():
    session = ort.InferenceSession(str(CLASSIFIER), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"image": x})[0].argmax(1)


@pytest.fixture(scope="module")
def accuracy(digits_artifact, classify):
    labels = np.repeat(np.arange(10), 6)
    noise = np.random.default_rng(0).standard_normal((len(labels), 1, 16, 16))

    def run(w):
        samples = sample_guided(digits_artifact, labels, w, steps=25, noise=noise).samples
        return float((classify(samples) == labels).mean())
    return run


def test_guided_samples_are_the_requested_class(accuracy):
    unconditional, guided = accuracy(-1.0), accuracy(3.0)
    assert guided >= 0.9, guided
    assert unconditional <= 0.4, unconditional  # w = -1 ignores the label: about 1 in 10 by chance
    assert accuracy(0.0) <= guided + 0.02


def test_stacked_and_fused_reference_samples_agree(digits_artifact, digits_fused_artifact):
    labels = [0, 3, 5, 9]
    a = sample_guided(digits_artifact, labels, 2.0, steps=10, sampler="dpmpp-2m", seed=4).samples
    b = sample_guided(digits_fused_artifact, labels, 2.0, steps=10, sampler="dpmpp-2m", seed=4).samples
    np.testing.assert_allclose(a, b, atol=1e-4)
