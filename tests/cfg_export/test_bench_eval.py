"""cfg-export bench and eval: their arithmetic against independent references, and their errors."""
import json

import numpy as np
import pytest
import scipy.linalg

from cfg_export.evaluation.bench import run_bench
from cfg_export.evaluation.evaluate import evaluate_guidance, frechet_distance, inception_score
from cfg_export.runtime.errors import CfgExportError
from tests.conftest import run_cli


def test_inception_score_bounds():
    assert inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)  # no confidence: 1
    assert inception_score(np.eye(10)[np.arange(50) % 10]) == pytest.approx(10.0, rel=1e-6)  # confident, diverse: K
    assert inception_score(np.eye(10)[np.zeros(50, int)]) == pytest.approx(1.0, rel=1e-6)  # confident, one class: 1


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 6)), rng.standard_normal((300, 6)) * 1.5 + 0.3
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    want = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-8)


def test_bad_batches_are_refused(digits_artifact):
    for bad in ([0], [-2], []):
        with pytest.raises(CfgExportError, match="--batch: got .* expected image counts >= 1"):
            run_bench([digits_artifact], bad)
    for bad in ("1,x", "", "0"):
        proc = run_cli("bench", digits_artifact, "--batch", bad, "-q")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: --batch: got"), proc.stderr


def test_bench_rows_and_ratios(tiny_artifacts):
    result = run_bench([tiny_artifacts / "stacked", tiny_artifacts / "fused"], [1, 2], steps=3, warmup=1)
    modes = {(r.mode, r.n) for r in result.rows}
    assert modes == {(m, n) for m in ("stacked", "two-pass", "unguided", "fused") for n in (1, 2)}
    for r in result.rows:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms and 0 <= r.host_share < 1 and r.peak_rss_mb > 0
    assert any("two-pass / stacked" in line for line in result.ratios)
    assert result.machine["cores"] >= 1 and "onnxruntime" in result.machine


def test_bench_torch_baseline(tiny_artifacts):
    result = run_bench([tiny_artifacts / "stacked"], [2], modes=["stacked", "torch"], steps=2, warmup=0,
                       torch_model="tests.models:conv2d")
    assert [r.mode for r in result.rows] == ["stacked", "torch"]
    assert any("PyTorch eager loop / ours" in line for line in result.ratios)


@pytest.mark.parametrize("args,message", [
    (["--backend", "tpu"], "backend: got 'tpu', expected one of"),
    (["--precision", "int4"], "precision: got 'int4'; the artifacts given have fp32"),
    (["--batch", "1,two"], "--batch: got '1,two'"),
    (["--mode", "warp"], "mode: got 'warp', expected one of stacked, two-pass, unguided, fused, torch"),
])
def test_bench_bad_input(tiny_artifacts, args, message):
    proc = run_cli("bench", tiny_artifacts / "stacked", "--steps", "2", *args)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "available here: onnxruntime-cpu" in proc.stderr or args[0] != "--backend"


def test_bench_static_batch_refused(tiny_artifacts):
    proc = run_cli("bench", tiny_artifacts / "static2", "--batch", "1", "--steps", "2")
    assert proc.returncode == 1 and "static graph for N=2 images; --batch asks for 1" in proc.stderr


def test_bench_cli_json(tiny_artifacts, tmp_path):
    proc = run_cli("bench", tiny_artifacts / "stacked", "--batch", "1", "--steps", "2", "--warmup", "0",
                   "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert {r["mode"] for r in data["rows"]} == {"stacked", "two-pass", "unguided"}
    assert "p50 ms" in proc.stdout


def test_eval_on_reference_model(digits_artifact):
    rows = evaluate_guidance(digits_artifact, [0.0, 3.0], per_class=3, steps=10, resamples=100)
    assert [r.w for r in rows] == [0.0, 3.0] and all(r.samples == 30 for r in rows)
    for r in rows:
        for e in (r.accuracy, r.inception_score, r.frechet_distance):
            assert e.low <= e.value <= e.high
        assert 0 <= r.accuracy.value <= 1 and 1 <= r.inception_score.value <= 10 and r.frechet_distance.value >= 0
    assert [r.rows_per_image for r in rows] == [10, 2 * 10]  # w = 0 runs no null rows; w = 3 two rows per step
    assert rows[1].accuracy.value >= 0.8


def test_bootstrap_interval_covers_the_known_mean():
    """The bootstrap interval of a sample mean: for a large normal sample it is close to
    mean +- 1.96 sd / sqrt(n) (the textbook interval, computed here independently)."""
    from cfg_export.evaluation.stats import bootstrap

    x = np.random.default_rng(3).standard_normal(2000) + 5.0
    e = bootstrap(lambda i: x[i].mean(), len(x), resamples=2000, seed=1)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert e.value == pytest.approx(x.mean())
    assert e.low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert e.high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_eval_bad_input(tiny_artifacts, tmp_path):
    proc = run_cli("eval", tiny_artifacts / "stacked", "--w", "0,x")
    assert proc.returncode == 1 and "--w: got '0,x'" in proc.stderr
    proc = run_cli("eval", tiny_artifacts / "stacked", "--classifier", tmp_path / "none.onnx")
    assert proc.returncode == 1 and "classifier" in proc.stderr and "no such file" in proc.stderr
