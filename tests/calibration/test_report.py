"""measure_quality: its figures against the same figures computed here from bare ONNX
Runtime sessions, the runtime's sampler, the DDIM equation for x0 (Song et al. 2021, eq. 12)
and the shipped classifier; its verdict from the x0 bound and the metrics' intervals."""
import re

import numpy as np
import onnxruntime as ort
import pytest

from cfg_export.calibration.report import QualityReport, StepError, judge, measure_quality
from cfg_export.evaluation.int8 import compare_int8
from cfg_export.evaluation.stats import Estimate, Quality
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.pipeline import sample_guided
from tests.conftest import ROOT

CLASSIFIER = ROOT / "examples" / "digits" / "classifier" / "classifier.onnx"
STEPS, SEED, W = 5, 11, 3.0


@pytest.fixture(scope="module")
def report(digits_artifact, digits_int8):
    return compare_int8(digits_artifact, digits_int8.directory, n=1, steps=STEPS, seed=SEED, w=W, resamples=50)


def test_report_figures_match_an_independent_computation(report, digits_artifact, digits_int8):
    labels = np.arange(10)
    feeds = []
    a = sample_guided(digits_artifact, labels, W, steps=STEPS, seed=SEED, record=feeds.append).samples
    b = sample_guided(digits_int8.directory, labels, W, steps=STEPS, seed=SEED).samples
    s32, s8 = (ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
               for d in (digits_artifact, digits_int8.directory))
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    assert [e.timestep for e in report.step_errors] == [int(f["timestep"][0]) for f in feeds]
    assert report.chunk == 10  # all ten images in one call of each model
    for e, f in zip(report.step_errors, feeds):
        e32, e8 = (s.run(None, f)[0].astype(np.float64) for s in (s32, s8))
        g32, g8 = 4 * e32[:10] - 3 * e32[10:], 4 * e8[:10] - 3 * e8[10:]
        t = int(f["timestep"][0])
        x = f["sample"][:10].astype(np.float64)
        x0_32, x0_8 = ((x - np.sqrt(1 - abar[t]) * g) / np.sqrt(abar[t]) for g in (g32, g8))
        assert e.x0 == pytest.approx(np.linalg.norm(x0_8 - x0_32) / np.linalg.norm(x0_32), rel=1e-6)
        assert e.guided == pytest.approx(np.linalg.norm(g8 - g32) / np.linalg.norm(g32), rel=1e-6)
        assert e.cond == pytest.approx(np.linalg.norm(e8[:10] - e32[:10]) / np.linalg.norm(e32[:10]), rel=1e-6)
    x, y = a.reshape(10, -1).astype(np.float64), b.reshape(10, -1).astype(np.float64)
    np.testing.assert_allclose(report.relative_distances,
                               np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1), rtol=1e-5)
    clf = ort.InferenceSession(str(CLASSIFIER), providers=["CPUExecutionProvider"])
    predict = lambda s: clf.run(["logits"], {"image": s.astype(np.float32)})[0].argmax(1)
    assert report.quality["fp32"].accuracy.value == pytest.approx((predict(a) == labels).mean())
    assert report.quality["int8"].accuracy.value == pytest.approx((predict(b) == labels).mean())
    assert report.seconds_per_image["fp32"] > 0 and report.seconds_per_image["int8"] > 0


def test_report_leads_with_x0_and_gives_a_verdict(report):
    text = "\n".join(report.lines())
    assert text.index("x0") < text.index("guided eps")
    assert re.search(rf"step +0 t= *{report.step_errors[0].timestep}: x0 +[0-9.]+%   guided eps", text)
    assert "FP32  accuracy" in text and "Frechet distance" in text and "wall time per image" in text
    assert report.verdict and text.splitlines()[-1 - len(report.advice)].startswith("verdict: ")


def _report(x0s, fd_int8=1.0, acc_int8=1.0, speed=(2.0, 1.0)) -> QualityReport:
    est = lambda v, lo, hi: Estimate(v, lo, hi)
    quality = lambda acc, fd: Quality(est(acc, acc - 0.01, min(acc + 0.01, 1)), est(8, 7, 9),
                                      est(fd, fd - .5, fd + .5), 10)
    steps = [StepError(i, 980 - 20 * i, x0, 0.5, 0.1) for i, x0 in enumerate(x0s)]
    r = QualityReport(3.0, "ddim", len(steps), 1, 10, steps, np.zeros(10), {"fp32": speed[0], "int8": speed[1]}, 10,
                      quality={"fp32": quality(1.0, 1.0), "int8": quality(acc_int8, fd_int8)})
    judge(r)
    return r


def test_verdict_follows_x0_and_metrics_not_the_eps_error():
    assert _report([0.01, 0.04]).verdict.startswith("ship INT8")  # eps errors of 50% do not matter
    usable = _report([0.01, 0.07])
    assert usable.verdict.startswith("INT8 usable: implied x0 above 5% at 1 of 2 steps (t=960..960)")
    assert "--schedule auto, float for t=960..960" in usable.advice[0]
    bad = _report([0.01, 0.02], fd_int8=2.0)
    assert bad.verdict.startswith("keep FP32") and "Frechet distance 2.000 outside FP32's interval" in bad.verdict
    assert "INT8 is slower than FP32" in _report([0.01], speed=(1.0, 2.0)).verdict
    assert "slower" not in _report([0.01], speed=(1.0, 1.02)).verdict  # within the noise of one run


def test_fp32_against_itself_reports_no_error(digits_artifact):
    same = measure_quality(digits_artifact, digits_artifact, classes=[3, 7], n=1, steps=4, seed=2)
    assert same.max_x0_error == 0 and same.max_step_error == 0 and np.all(same.relative_distances == 0)
    assert same.quality == {} and same.steps_over == [] and "above" not in same.verdict


def test_a_model_quantized_from_another_source_is_refused(tiny_artifacts, digits_int8):
    with pytest.raises(CfgExportError, match=r"was quantized from model [0-9a-f]{12}, .* is [0-9a-f]{12}: compare it "
                                             r"with its own source"):
        measure_quality(tiny_artifacts / "stacked", digits_int8.directory, n=1, steps=4)


def test_report_input_errors(tiny_artifacts, tmp_path):
    tiny = tiny_artifacts / "stacked"
    with pytest.raises(CfgExportError, match=r"give either cond, or classes and n; not both"):
        measure_quality(tiny, tiny, cond=[0, 1], n=2)
    with pytest.raises(CfgExportError, match=r"chunk: got 0, expected at least 1 image per sampling call"):
        measure_quality(tiny, tiny, classes=[0], n=1, chunk=0)
    with pytest.raises(CfgExportError, match=r"scoring needs class labels: the classifier checks the asked class"):
        measure_quality(tiny, tiny, cond=np.zeros((2, 3, 4), np.float32), score=lambda s, l: None)
    with pytest.raises(CfgExportError, match=r"--classifier .*classifier.onnx takes samples \[1, 16, 16\], the model "
                                             r"makes \[2, 6, 6\]: give a classifier of this model's samples"):
        compare_int8(tiny, tiny, n=1, steps=4, classifier=CLASSIFIER)
