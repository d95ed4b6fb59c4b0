"""The w mix, guidance rescale and the guided model's feeds."""
import math

import numpy as np
import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.guidance import GuidanceOptions, check_w, guided_model, mix
from cfg_export.runtime.manifest import Condition, Layout, Manifest, ModelFacts, TensorSpec
from cfg_export.runtime.schedule import NoiseSchedule
from tests.runtime.fakes import RecordingBackend

rng = np.random.default_rng(0)


def test_mix_equals_diffusers_guidance_scale_form():
    eps_c, eps_u = rng.standard_normal((2, 4, 1, 3, 3))
    w = np.array([0.0, 1.0, -1.0, 3.5])
    s = 1 + w  # diffusers: eps_u + s * (eps_c - eps_u)
    want = eps_u + s[:, None, None, None] * (eps_c - eps_u)
    np.testing.assert_allclose(mix(eps_c, eps_u, w), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(mix(eps_c, eps_u, np.zeros(4)), eps_c)  # w = 0: conditional
    np.testing.assert_allclose(mix(eps_c, eps_u, -np.ones(4)), eps_u)  # w = -1: unconditional


def test_check_w():
    np.testing.assert_array_equal(check_w(2.5, 3), [2.5, 2.5, 2.5])
    np.testing.assert_array_equal(check_w([-2, 0, 1], 3), [-2, 0, 1])  # negative w is allowed
    for bad in (float("nan"), float("inf"), [1, float("-inf"), 0]):
        with pytest.raises(CfgExportError, match="expected a finite number"):
            check_w(bad, 3)
    with pytest.raises(CfgExportError, match="got 2 values, expected 1 or one per image"):
        check_w([1, 2], 3)


def _fake_eps(feeds):
    eps = 0.1 * feeds["sample"] + feeds["cond"].reshape(-1, 1, 1, 1)
    if "w" in feeds:  # fused: the graph does the stacking with null class 10
        w = feeds["w"].reshape(-1, 1, 1, 1)
        eps = (1 + w) * eps - w * (0.1 * feeds["sample"] + 10)
    return eps


def FakeBackend(manifest):
    """eps = 0.1 * sample + cond (broadcast): a backend whose answer is easy to predict."""
    return RecordingBackend(manifest, _fake_eps)


def make_manifest(layout=Layout.STACKED, batch=None):
    facts = ModelFacts(Condition("class", 10, 10), "eps", NoiseSchedule(), (1, 2, 2))
    rows = "2N" if layout is Layout.STACKED else "N"
    inputs = [TensorSpec("sample", (rows, 1, 2, 2), "float32"), TensorSpec("timestep", (rows,), "int64"),
              TensorSpec("cond", (rows,), "int64")]
    if layout is Layout.FUSED:
        inputs.append(TensorSpec("w", (rows,), "float32"))
    return Manifest(facts, layout, tuple(inputs), (TensorSpec("eps", (rows, 1, 2, 2), "float32"),), batch=batch)


def vp_sigma(t: int) -> float:
    a = NoiseSchedule().alphas_cumprod()[t]
    return math.sqrt((1 - a) / a)


def run_denoiser(options, layout=Layout.STACKED, t=500, batch=None):
    manifest = make_manifest(layout, batch)
    backend = FakeBackend(manifest)
    x = np.random.default_rng(1).standard_normal((3, 1, 2, 2))
    cond = np.array([1, 2, 3])
    with backend:
        eps = guided_model(backend, 3, options)(x, t, cond, sigma=vp_sigma(t))
    return backend.feeds, eps, x, cond


def test_stacked_feeds_and_mix():
    feeds, eps, x, cond = run_denoiser(GuidanceOptions(w=2.0))
    (f,) = feeds
    np.testing.assert_array_equal(f["cond"], [1, 2, 3, 10, 10, 10])
    np.testing.assert_array_equal(f["timestep"], [500] * 6)
    np.testing.assert_array_equal(f["sample"][:3], f["sample"][3:])
    eps_c = 0.1 * x.astype(np.float32) + cond.reshape(-1, 1, 1, 1)
    eps_u = 0.1 * x.astype(np.float32) + 10
    np.testing.assert_allclose(eps, 3 * eps_c - 2 * eps_u, rtol=1e-6)


def test_fused_gives_the_same_eps():
    _, stacked, _, _ = run_denoiser(GuidanceOptions(w=[0.5, 1, 4]))
    feeds, fused, _, _ = run_denoiser(GuidanceOptions(w=[0.5, 1, 4]), layout=Layout.FUSED)
    np.testing.assert_array_equal(feeds[0]["w"], np.float32([0.5, 1, 4]))
    assert len(feeds[0]["sample"]) == 3
    np.testing.assert_allclose(fused, stacked, rtol=1e-5)


def test_negative_condition_fills_the_null_rows():
    feeds, _, _, _ = run_denoiser(GuidanceOptions(w=1.0, negative=np.array([7, 7, 7])))
    np.testing.assert_array_equal(feeds[0]["cond"], [1, 2, 3, 7, 7, 7])
    with pytest.raises(CfgExportError, match="negative condition needs the stacked layout"):
        run_denoiser(GuidanceOptions(w=1.0, negative=np.array([7, 7, 7])), layout=Layout.FUSED)


def test_guidance_interval_runs_only_conditional_rows_outside():
    ac = NoiseSchedule().alphas_cumprod()
    sigma = np.sqrt((1 - ac) / ac)
    options = GuidanceOptions(w=3.0, interval=(0.5, 2.0))
    inside = int(np.argmin(np.abs(sigma - 1.0)))
    outside = int(np.argmin(np.abs(sigma - 10.0)))
    feeds, _, _, _ = run_denoiser(options, t=inside)
    assert len(feeds[0]["sample"]) == 6
    feeds, eps, x, cond = run_denoiser(options, t=outside)
    assert len(feeds[0]["sample"]) == 3  # half the rows: the conditional ones
    np.testing.assert_allclose(eps, 0.1 * x.astype(np.float32) + cond.reshape(-1, 1, 1, 1), rtol=1e-6)
    feeds, eps, x, cond = run_denoiser(options, t=outside, batch=3)  # static graph: 2N rows, w = 0
    assert len(feeds[0]["sample"]) == 6
    np.testing.assert_allclose(eps, 0.1 * x.astype(np.float32) + cond.reshape(-1, 1, 1, 1), rtol=1e-6)


def test_linear_w_schedule():
    T = 1000
    model = guided_model(FakeBackend(make_manifest()), 2, GuidanceOptions(w=2.0, w_schedule="linear"))
    np.testing.assert_allclose(model.planner.w_at(0), [4.0, 4.0])
    np.testing.assert_allclose(model.planner.w_at(T // 2), [2.0, 2.0])
    with pytest.raises(CfgExportError, match="w schedule: got 'cosine', expected one of constant, linear"):
        guided_model(FakeBackend(make_manifest()), 2, GuidanceOptions(w=2.0, w_schedule="cosine"))


def test_backend_validates_feeds():
    backend = FakeBackend(make_manifest(batch=2))
    feeds = {"sample": np.zeros((4, 1, 2, 2), np.float32), "timestep": np.zeros(4, np.int64),
             "cond": np.zeros(4, np.int64)}
    with pytest.raises(CfgExportError, match="not open"):
        backend.infer(feeds)
    backend.manifest = make_manifest()
    with backend:
        with pytest.raises(CfgExportError, match="input 'sample': got dtype float64, expected float32"):
            backend.infer({**feeds, "sample": np.zeros((4, 1, 2, 2))})
        with pytest.raises(CfgExportError, match=r"input 'cond': got shape \[3\], expected \['2N'\]"):
            backend.infer({**feeds, "cond": np.zeros(3, np.int64)})
        with pytest.raises(CfgExportError, match=r"inputs: got \['cond', 'sample'\]"):
            backend.infer({"sample": feeds["sample"], "cond": feeds["cond"]})
        backend.infer(feeds)
