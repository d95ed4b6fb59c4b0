"""`cfg-export eval` over w x guidance strategy: rows, ratios, the quality verdict, the
JSON, the table and the Frechet-vs-rows plot; and its refusals."""
import json

import pytest

from cfg_export.evaluation.evaluate import EvalRow, compare_to_full
from cfg_export.evaluation.stats import Estimate
from tests.conftest import run_cli


def row(strategy, fd, accuracy, rows, seconds, w=3.0):
    e = lambda v: Estimate(*v) if isinstance(v, tuple) else Estimate(v, v, v)  # noqa: E731
    return EvalRow(w=w, accuracy=e(accuracy), inception_score=e(8.0), frechet_distance=e(fd), samples=300,
                   rows_per_image=rows, seconds_per_image=seconds, strategy=strategy)


def test_compare_to_full():
    rows = [row("full", (8.0, 7.0, 9.5), 1.0, 100, 0.4), row("adaptive:0.99", 9.4, 0.996, 70, 0.3),
            row("cache:3", 9.6, 1.0, 67, 0.25), row("cache:2", 5.0, 0.99, 75, 0.3),
            row("adaptive:0.99", 3.0, 1.0, 60, 0.2, w=1.0)]
    compare_to_full(rows)
    assert [r.rows_ratio for r in rows] == [1.0, 0.7, 0.67, 0.75, None]
    assert rows[1].seconds_ratio == pytest.approx(0.75)
    # within full's interval and at most 0.5 points less accurate; above its interval; 1 point less accurate
    assert [r.holds_quality for r in rows] == [True, True, False, False, None]


def test_eval_strategy_grid_cli(digits_artifact, tmp_path):
    out = tmp_path / "e.json"
    proc = run_cli("eval", digits_artifact, "--w", "3", "--strategy", "full,adaptive:0.95,cache:2", "--per-class", 2,
                   "--steps", 6, "--json", out, "--plot-rows", tmp_path / "rows.png", "--plot", tmp_path / "w.png")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [(r["w"], r["strategy"]) for r in data] == [(3.0, "full"), (3.0, "adaptive:0.95"), (3.0, "cache:2")]
    full, adaptive, cache = data
    assert full["rows_per_image"] == 12 and full["rows_ratio"] == 1.0
    assert cache["rows_per_image"] == 6 + 3  # null rows at steps 0, 2, 4 of 6
    assert 6 < adaptive["rows_per_image"] < 12
    assert all(isinstance(r["holds_quality"], bool) and r["seconds_per_image"] > 0 for r in data)
    assert "adaptive:0.95" in proc.stdout and "0.75x" in proc.stdout  # the table, with the rows ratio of cache:2
    assert (tmp_path / "rows.png").stat().st_size > 0 and (tmp_path / "w.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--strategy", "full,fast"], "Error: strategy part 'fast': not understood"),
    (["--strategy", "full,,cache"], "Error: --strategy: got 'full,,cache', expected names separated by commas"),
    (["--strategy", "cache:2,cache:2"], "Error: --strategy: cache:2 is given twice"),
    (["--plot-rows", "rows.txt"], "Error: --plot-rows rows.txt: expected a file name ending in .png"),
])
def test_eval_strategy_errors(tiny_artifacts, args, message):
    proc = run_cli("eval", tiny_artifacts / "stacked", *args)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_frechet_distance_to_fixed_reference_matches_the_formula():
    """The precomputed-root form against ||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) with the
    matrix square root taken by scipy (an independent reference)."""
    import numpy as np
    from scipy.linalg import sqrtm

    from cfg_export.evaluation.stats import frechet_distance_to

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 200, 6)) @ rng.standard_normal((2, 6, 6))
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    want = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real)
    assert frechet_distance_to(m2, c2)(m1, c1) == pytest.approx(want, rel=1e-9)
