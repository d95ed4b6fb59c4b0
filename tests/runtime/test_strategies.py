"""Adaptive guidance and the cached guidance direction: exact row counts, the reductions at
the extreme settings, the reuse schedule, the spelling, and the engine-profile check."""
import math

import numpy as np
import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.guidance import GuidanceOptions, GuidedModel, RowPlanner
from cfg_export.runtime.manifest import Condition, Layout, Manifest, ModelFacts, TensorSpec
from cfg_export.runtime.samplers import Denoiser, default_scheduler, plan_sampling, resolve_scheduler, run_plan
from cfg_export.runtime.schedule import NoiseSchedule, make_timesteps
from cfg_export.runtime.strategies import Strategy, cosine_similarity, parse_strategy
from tests.runtime.fakes import RecordingBackend

NULL = 10
BASE = np.array([1.0, 1.0, 1.0, 1.0])
D = np.array([1.0, -1.0, 0.0, 0.0])  # orthogonal to BASE


def manifest(prediction="x0", layout=Layout.STACKED, batch=None, engine=None):
    facts = ModelFacts(Condition("class", 10, NULL), prediction, NoiseSchedule(), (1, 2, 2))
    rows = "2N" if layout is Layout.STACKED else "N"
    inputs = [TensorSpec("sample", (rows, 1, 2, 2), "float32"), TensorSpec("timestep", (rows,), "int64"),
              TensorSpec("cond", (rows,), "int64")]
    if layout is Layout.FUSED:
        inputs.append(TensorSpec("w", (rows,), "float32"))
    return Manifest(facts, layout, tuple(inputs), (TensorSpec("eps", (rows, 1, 2, 2), "float32"),), batch=batch,
                    engine=engine)


def k_of(t, label):
    """How far a conditional x0 prediction leans from the null one: label * t / 100."""
    return 0.0 if label == NULL else label * t / 100.0


def x0_outputs(feeds):
    """A model predicting x0 = BASE + k(t, label) D: the null rows predict BASE."""
    k = np.array([k_of(t, c) for t, c in zip(feeds["timestep"], feeds["cond"])])
    return (BASE + k[:, None] * D).reshape(-1, 1, 2, 2)


def expected_cosine(t, label):
    """cos(BASE + k D, BASE) = |BASE|^2 / (|BASE| sqrt(|BASE|^2 + k^2 |D|^2)), D orthogonal to BASE."""
    k = k_of(t, label)
    return 4.0 / (2.0 * math.sqrt(4.0 + 2.0 * k * k))


def run_calls(options, labels, timesteps, layout=Layout.STACKED, batch=None):
    backend = RecordingBackend(manifest(layout=layout, batch=batch), x0_outputs)
    x = np.zeros((len(labels), 1, 2, 2))
    outs = []
    with backend:
        model = GuidedModel(backend, len(labels), options, {"cond": np.full(len(labels), NULL)})
        for t in timesteps:
            outs.append(model(x, int(t), np.asarray(labels), sigma=1.0))
    return backend, model, outs


def test_cosine_similarity_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5, 3, 4))
    want = [np.dot(p.ravel(), q.ravel()) / np.linalg.norm(p) / np.linalg.norm(q) for p, q in zip(a, b)]
    np.testing.assert_allclose(cosine_similarity(a, b), want, rtol=1e-12)
    assert cosine_similarity(a[:1], a[:1])[0] == pytest.approx(1.0)
    assert cosine_similarity(np.zeros((1, 3)), np.zeros((1, 3)))[0] == 1.0
    assert cosine_similarity(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0
    assert cosine_similarity(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0,)


def test_adaptive_row_counts_are_exact():
    """Each image stops its null rows from the call on which cos(x0_c, x0_u) first reaches
    gamma; the backend sees N + the images still running them, call by call."""
    labels = [0, 1, 2, 3, 5, 9]
    timesteps = [90, 70, 50, 30, 20, 10, 5, 1]
    gamma = 0.9
    backend, model, outs = run_calls(GuidanceOptions(w=2.0, adaptive=gamma), labels, timesteps)
    running = np.ones(len(labels), bool)
    want_rows = []
    for t in timesteps:
        want_rows.append(len(labels) + int(running.sum()))
        agree = np.array([expected_cosine(t, c) >= gamma for c in labels])
        running &= ~agree
    got = [len(f["sample"]) for f in backend.feeds]
    assert got == want_rows
    assert model.rows == sum(want_rows)
    assert len(set(got)) > 3  # the batch shrinks one image at a time, through several sizes
    # the null rows of each call are exactly those of the images still running them
    running = np.ones(len(labels), bool)
    for t, f in zip(timesteps, backend.feeds):
        np.testing.assert_array_equal(f["cond"][len(labels):], [NULL] * int(running.sum()))
        running &= ~np.array([expected_cosine(t, c) >= gamma for c in labels])


def test_adaptive_outputs_mix_until_the_image_agrees():
    labels, timesteps, gamma, w = [1, 4], [80, 40, 10], 0.9, 3.0
    _, _, outs = run_calls(GuidanceOptions(w=w, adaptive=gamma), labels, timesteps)
    stopped = np.zeros(2, bool)
    for t, out in zip(timesteps, outs):
        for i, c in enumerate(labels):
            cond = BASE + k_of(t, c) * D
            stopped[i] |= expected_cosine(t, c) >= gamma
            want = cond if stopped[i] else (1 + w) * cond - w * BASE
            np.testing.assert_allclose(out[i].ravel(), want, rtol=1e-6)


def vp_sigma(alpha_cumprod: float) -> float:
    """The noise level sigma = sqrt((1 - a) / a) of a variance-preserving timestep."""
    return math.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)


def sample_fake(options, labels, steps=12, prediction="eps", batch=None):
    """DDIM (leading spacing) over a fake eps model through GuidedModel: returns (samples,
    rows per call, timesteps)."""
    def eps_fn(feeds):
        t = feeds["timestep"].astype(np.float64).reshape(-1, 1, 1, 1)
        c = feeds["cond"].astype(np.float64).reshape(-1, 1, 1, 1)
        return 0.3 * feeds["sample"] + np.sin(c + t / 250.0) * np.array([1.0, -0.5, 0.25, 2.0]).reshape(1, 1, 2, 2)

    m = manifest(prediction=prediction, batch=batch)
    backend = RecordingBackend(m, eps_fn)
    plan = plan_sampling(resolve_scheduler(default_scheduler(m.facts)), steps)
    x = np.random.default_rng(4).standard_normal((len(labels), 1, 2, 2))
    nulls = {"cond": np.full(len(labels), NULL)}
    with backend:
        model = GuidedModel(backend, len(labels), options, nulls)
        samples = run_plan(plan, Denoiser(model, np.asarray(labels), prediction), x, np.random.default_rng(0))
    return samples, [len(f["sample"]) for f in backend.feeds], plan.timesteps.astype(int)


def test_adaptive_extremes_reduce_to_full_guidance_and_conditional_only():
    labels = [0, 3, 7]
    full, full_rows, _ = sample_fake(GuidanceOptions(w=2.5), labels)
    never, never_rows, _ = sample_fake(GuidanceOptions(w=2.5, adaptive=1.0), labels)
    np.testing.assert_array_equal(never, full)
    assert never_rows == full_rows == [6] * 12
    conditional, cond_rows, _ = sample_fake(GuidanceOptions(w=0.0), labels)
    at_once, at_once_rows, _ = sample_fake(GuidanceOptions(w=2.5, adaptive=-1.0), labels)
    np.testing.assert_array_equal(at_once, conditional)
    assert cond_rows == [3] * 12  # w = 0 runs no null rows at all
    assert at_once_rows == [6] + [3] * 11  # one look at the null rows, then conditional only


def test_cache_every_one_is_full_guidance():
    labels = [1, 2]
    full, full_rows, _ = sample_fake(GuidanceOptions(w=1.5), labels)
    cached, cached_rows, _ = sample_fake(GuidanceOptions(w=1.5, cache_every=1), labels)
    np.testing.assert_array_equal(cached, full)
    assert cached_rows == full_rows


@pytest.mark.parametrize("every, window", [(3, None), (2, (0.5, 5.0)), (4, (2.0, 40.0))])
def test_cache_reuses_the_direction_only_where_the_schedule_says(every, window):
    """Inside the window the null rows run at calls 0, k, 2k, ... of the window and the
    direction of the last of those is reused in between; outside it they run every call."""
    labels, w = [2, 5, 8], 2.0
    ac = NoiseSchedule().alphas_cumprod()
    timesteps = make_timesteps(len(ac), 20, "leading")
    backend = RecordingBackend(manifest(prediction="eps"), x0_outputs)  # outputs BASE + k(t, label) D
    x = np.zeros((3, 1, 2, 2))
    options = GuidanceOptions(w=w, cache_every=every, cache_interval=window)
    with backend:
        model = GuidedModel(backend, 3, options, {"cond": np.full(3, NULL)})
        outs = [model(x, int(t), np.asarray(labels), sigma=vp_sigma(float(ac[t]))) for t in timesteps]
    j, direction, reused = 0, None, []
    for i, (t, out, feeds) in enumerate(zip(timesteps, outs, backend.feeds)):
        sigma = vp_sigma(float(ac[t]))
        inside = window is None or window[0] <= sigma <= window[1]
        fresh = not inside or j % every == 0
        j += inside
        cond = np.stack([BASE + k_of(t, c) * D for c in labels])
        assert len(feeds["sample"]) == (6 if fresh else 3), f"call {i} (sigma {sigma:.3g})"
        if fresh:
            direction = cond - BASE
        else:
            reused.append(i)
        np.testing.assert_allclose(out.reshape(3, 4), cond + w * direction, rtol=1e-6)
    assert model.planner.cache.reused_at == reused and reused  # the schedule reused somewhere
    assert model.rows == sum(len(f["sample"]) for f in backend.feeds)


def test_combined_strategies_on_a_static_graph_give_the_same_samples():
    """A static graph runs 2N rows whatever the plan; the samples do not change."""
    options = GuidanceOptions(w=2.0, adaptive=0.95, cache_every=2)
    dynamic, rows, _ = sample_fake(options, [0, 3], prediction="eps")
    static, static_rows, _ = sample_fake(GuidanceOptions(w=2.0, adaptive=0.95, cache_every=2), [0, 3],
                                         prediction="eps", batch=2)
    np.testing.assert_array_equal(static, dynamic)
    assert static_rows == [4] * 12 and min(rows) < 4


def test_w_zero_images_run_no_null_rows():
    backend, model, _ = run_calls(GuidanceOptions(w=[0.0, 2.0, 0.0, 1.0]), [1, 2, 3, 4], [50, 20])
    assert [len(f["sample"]) for f in backend.feeds] == [6, 6]
    np.testing.assert_array_equal(backend.feeds[0]["cond"], [1, 2, 3, 4, NULL, NULL])


def test_row_counts_of_the_planner():
    def counts(**kw):
        return RowPlanner(GuidanceOptions(**kw), 4, 1000).row_counts()

    assert counts(w=2.0) == {8}
    assert counts(w=2.0, interval=(0.0, 1.0)) == {4, 8}
    assert counts(w=2.0, adaptive=0.99) == {4, 5, 6, 7, 8}
    assert counts(w=[0, 1, 1, 0], cache_every=2) == {4, 5, 6}


def test_engine_profiles_must_cover_the_strategy_rows():
    profile = {"rows": [8, 8, 32], "shapes": {}}
    engine = {"profiles": [profile]}
    backend = RecordingBackend(manifest(engine=engine), x0_outputs)
    GuidedModel(backend, 4, GuidanceOptions(w=2.0), {"cond": np.full(4, NULL)})  # 8 rows: covered
    with pytest.raises(CfgExportError, match=r"engine: this guidance makes calls of 4, 5, 6, 7 rows for N=4 images, "
                                             r"outside its profiles \(rows 8..32\); rebuild it with "
                                             r"--interval-profile"):
        GuidedModel(backend, 4, GuidanceOptions(w=2.0, adaptive=0.99), {"cond": np.full(4, NULL)})
    engine["profiles"].append({"rows": [4, 4, 16], "shapes": {}})  # what --interval-profile adds
    GuidedModel(backend, 4, GuidanceOptions(w=2.0, adaptive=0.99), {"cond": np.full(4, NULL)})


def test_strategies_need_the_stacked_layout():
    backend = RecordingBackend(manifest(layout=Layout.FUSED), x0_outputs)
    with pytest.raises(CfgExportError, match="adaptive and cached guidance need the stacked layout"):
        GuidedModel(backend, 2, GuidanceOptions(w=1.0, cache_every=2), None)


@pytest.mark.parametrize("options, message", [
    (dict(adaptive=1.5), r"adaptive guidance: got threshold 1.5, expected a cosine similarity in \[-1, 1\]"),
    (dict(adaptive="high"), "adaptive guidance: got threshold 'high'"),
    (dict(cache_every=0), "cached guidance: got every 0, expected an integer k >= 1"),
    (dict(cache_every=2.5), "cached guidance: got every 2.5"),
    (dict(cache_interval=(0.1, 2.0)), "cache interval: given without the cache"),
    (dict(cache_every=2, cache_interval=(3.0, 1.0)), r"cache interval: got \(3, 1\), expected 0 <= lo <= hi"),
])
def test_option_errors(options, message):
    with pytest.raises(CfgExportError, match=message):
        GuidanceOptions(w=1.0, **options).check()


def test_parse_strategy():
    assert parse_strategy("full") == Strategy()
    s = parse_strategy("adaptive")
    assert s.adaptive is not None and s.name == f"adaptive:{s.adaptive:g}" and s.kind == "adaptive"
    s = parse_strategy("cache:3@0.5..20")
    assert (s.cache_every, s.cache_interval, s.name, s.kind) == (3, (0.5, 20.0), "cache:3@0.5..20", "cache")
    s = parse_strategy(" interval:0.3..5 + adaptive:0.995 + cache:2 ")
    assert (s.interval, s.adaptive, s.cache_every) == ((0.3, 5.0), 0.995, 2)
    assert s.name == "interval:0.3..5+adaptive:0.995+cache:2" and s.kind == "interval+adaptive+cache"
    options = s.apply(GuidanceOptions(w=3.0, threshold=0.995))
    assert (options.w, options.threshold, options.adaptive, options.interval) == (3.0, 0.995, 0.995, (0.3, 5.0))


@pytest.mark.parametrize("text, message", [
    ("", "strategy: got '', expected full"),
    ("fast", "strategy part 'fast': not understood; expected full"),
    ("adaptive:x", "strategy part 'adaptive:x': got 'x', expected a number"),
    ("adaptive:2", r"adaptive guidance: got threshold 2.0, expected a cosine similarity in \[-1, 1\]"),
    ("cache:0", "cached guidance: got every 0"),
    ("cache:2@5", "strategy part 'cache:2@5': expected noise levels LO..HI"),
    ("interval:3..1", "strategy part 'interval:3..1': expected noise levels LO..HI with 0 <= LO <= HI"),
    ("adaptive+adaptive:0.9", "'adaptive' given twice"),
    ("full+cache", "'full' combines with nothing"),
])
def test_parse_strategy_errors(text, message):
    with pytest.raises(CfgExportError, match=message):
        parse_strategy(text)


def test_extremes_on_an_exported_model(tiny_artifacts):
    """The same reductions through ONNX Runtime on a real exported graph."""
    from cfg_export.runtime.pipeline import sample_guided

    artifact, labels = tiny_artifacts / "stacked", [0, 1, 2, 1]
    run = lambda w, **options: sample_guided(artifact, labels, w, steps=10, seed=1,  # noqa: E731
                                             guidance=GuidanceOptions(**options))
    full, never, every = run(2.0), run(2.0, adaptive=1.0), run(2.0, cache_every=1)
    np.testing.assert_array_equal(never.samples, full.samples)
    np.testing.assert_array_equal(every.samples, full.samples)
    assert full.rows == never.rows == every.rows == 2 * 4 * 10
    conditional, at_once = run(0.0), run(2.0, adaptive=-1.0)
    np.testing.assert_array_equal(at_once.samples, conditional.samples)
    assert (conditional.rows, at_once.rows) == (4 * 10, 4 * 10 + 4)


def run_sample(*args):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run([sys.executable, "-m", "runtime", "sample", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_sample_cli_strategy(tiny_artifacts, tmp_path):
    out = tmp_path / "s.npy"
    base = [tiny_artifacts / "stacked", "--w", 2, "--classes", "0,1", "--n", 1, "--steps", 6, "--npy", out]
    proc = run_sample(*base, "--strategy", "cache:2")
    assert proc.returncode == 0, proc.stderr
    assert "9.0 model rows per image" in proc.stdout  # 6 conditional rows + null rows at steps 0, 2, 4
    for args, message in [
        (["--strategy", "fast"], "Error: strategy part 'fast': not understood; expected full"),
        (["--strategy", "interval:0..1", "--interval", "0,1"], "Error: --strategy interval:0..1 holds a guidance "
                                                               "interval and --interval gives another"),
        (["--strategy", "adaptive:7"], "Error: adaptive guidance: got threshold 7.0, expected a cosine similarity"),
    ]:
        proc = run_sample(*base, *args)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_sample(tiny_artifacts / "fused", *base[1:], "--strategy", "adaptive")
    assert proc.returncode == 1 and "Error: adaptive and cached guidance need the stacked layout" in proc.stderr
