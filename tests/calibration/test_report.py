"""measure_quality: its figures against the same figures computed here from bare ONNX
Runtime sessions, the runtime's sampler and the shipped classifier."""
import re

import numpy as np
import onnxruntime as ort
import pytest

from cfg_export.calibration.report import measure_quality
from cfg_export.runtime.pipeline import sample_guided
from tests.conftest import ROOT

CLASSIFIER = ROOT / "examples" / "digits" / "classifier" / "classifier.onnx"
STEPS, SEED, W = 5, 11, 3.0


@pytest.fixture(scope="module")
def report(digits_artifact, digits_int8):
    return measure_quality(digits_artifact, digits_int8.directory, n=1, steps=STEPS, seed=SEED, w=W,
                           classifier=CLASSIFIER)


def test_report_figures_match_an_independent_computation(report, digits_artifact, digits_int8):
    labels = np.arange(10)
    feeds = []
    a = sample_guided(digits_artifact, labels, W, steps=STEPS, seed=SEED, record=feeds.append).samples
    b = sample_guided(digits_int8.directory, labels, W, steps=STEPS, seed=SEED).samples
    s32, s8 = (ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
               for d in (digits_artifact, digits_int8.directory))
    assert [e.timestep for e in report.step_errors] == [int(f["timestep"][0]) for f in feeds]
    for e, f in zip(report.step_errors, feeds):
        e32, e8 = (s.run(None, f)[0].astype(np.float64) for s in (s32, s8))
        g32, g8 = 4 * e32[:10] - 3 * e32[10:], 4 * e8[:10] - 3 * e8[10:]
        assert e.guided == pytest.approx(np.linalg.norm(g8 - g32) / np.linalg.norm(g32), rel=1e-6)
        assert e.cond == pytest.approx(np.linalg.norm(e8[:10] - e32[:10]) / np.linalg.norm(e32[:10]), rel=1e-6)
        assert e.guided > e.cond  # the w mix amplifies the error of the halves
    rms = np.sqrt(((b.astype(np.float64) - a) ** 2).reshape(10, -1).mean(1))
    np.testing.assert_allclose(report.distances, rms, rtol=1e-6)
    clf = ort.InferenceSession(str(CLASSIFIER), providers=["CPUExecutionProvider"])
    predict = lambda x: clf.run(["logits"], {"image": x.astype(np.float32)})[0].argmax(1)
    assert report.accuracy_fp32 == pytest.approx((predict(a) == labels).mean())
    assert report.accuracy_int8 == pytest.approx((predict(b) == labels).mean())
    assert report.accuracy_fp32 >= 0.8  # the reference model at w=3, even at 5 steps
    text = "\n".join(report.lines())
    assert "classifier accuracy: FP32" in text and re.search(rf"step +0 t= *{report.step_errors[0].timestep}:", text)


def test_fp32_against_itself_reports_no_error(digits_artifact):
    same = measure_quality(digits_artifact, digits_artifact, classes=[3, 7], n=1, steps=4, seed=2)
    assert same.max_step_error == 0 and np.all(same.distances == 0) and same.accuracy_fp32 is None
