"""record_calibration keeps the exact stacked feeds of the guided sampler, checked against
an independent DDIM loop written here from the equations (Song et al. 2021, eq. 12 with
sigma = 0; Ho & Salimans 2021, eq. 6) over the model file in ONNX Runtime."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from cfg_export.calibration.data import load_calibration
from cfg_export.calibration.record import MIN_STEPS, pick_steps, record_calibration
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import read_manifest
from tests.conftest import TINY_STEPS

NULL = 3  # tests.models: 3 classes, null class 3
T = 100  # tests.models' training timesteps


def independent_ddim_states(model_path, labels, w, steps, seed):
    """Returns x_t [N, *S] float64 at each DDIM step (eta 0, 'leading' timesteps, final
    alpha 1) for the guided mix, with the model run by a bare ONNX Runtime session."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    ts = (np.arange(steps) * (T // steps))[::-1]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    n = len(labels)
    x = np.random.default_rng(seed).standard_normal((n, 2, 6, 6))
    states = []
    for i, t in enumerate(ts):
        states.append(x.copy())
        feeds = {"sample": np.concatenate([x, x]).astype(np.float32), "timestep": np.full(2 * n, t, np.int64),
                 "cond": np.concatenate([labels, np.full(n, NULL)]).astype(np.int64)}
        eps = session.run(None, feeds)[0].astype(np.float64)
        eps = (1 + w) * eps[:n] - w * eps[n:]
        a, a_prev = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return ts, states


def test_recorded_rows_are_the_stacked_feeds_of_an_independent_run(tiny_calib, tiny_artifacts):
    m, arrays = tiny_calib.manifest, tiny_calib.arrays
    labels = np.repeat([0, 1, 2], 2)
    ts, states = independent_ddim_states(tiny_artifacts / "stacked" / "model.onnx", labels, 2.0, TINY_STEPS, seed=5)
    assert m.recorded_steps == [0, 3, 6, 9] and m.rows == [12] * 4
    assert m.recorded_timesteps == [int(ts[k]) for k in m.recorded_steps] == [90, 60, 30, 0]
    for j, k in enumerate(m.recorded_steps):
        rows = slice(12 * j, 12 * (j + 1))
        np.testing.assert_array_equal(arrays["cond"][rows], np.concatenate([labels, np.full(6, NULL)]))
        np.testing.assert_array_equal(arrays["timestep"][rows], np.full(12, ts[k]))
        want = np.concatenate([states[k], states[k]])
        np.testing.assert_allclose(arrays["sample"][rows], want, rtol=1e-4, atol=1e-5)
    assert arrays["sample"].dtype == np.float32 and arrays["timestep"].dtype == np.int64


def test_file_manifest_names_the_source_and_the_trajectory(tiny_calib, tiny_artifacts):
    source = read_manifest(tiny_artifacts / "stacked")
    data = load_calibration(tiny_calib.path)
    m = data.manifest
    assert m.source_sha256 == source.model_sha256 and m.layout == "stacked"
    assert (m.sampler, m.steps, m.w, m.seed, m.images) == ("ddim", TINY_STEPS, 2.0, 5, 6)
    assert m.cond == [0, 0, 1, 1, 2, 2]
    assert [s["name"] for s in m.inputs] == ["sample", "timestep", "cond"]
    assert set(data.arrays) == {"sample", "timestep", "cond"}
    for name, array in data.arrays.items():
        np.testing.assert_array_equal(array, tiny_calib.arrays[name])
    with np.load(tiny_calib.path, allow_pickle=False) as npz:  # plain npz, JSON manifest inside
        assert json.loads(str(npz["manifest"][()]))["format"] == "cfg-export-calibration/1"


@pytest.mark.parametrize("steps,k", [(50, 8), (10, 4), (7, 5), (50, 50), (20, None)])
def test_recorded_steps_spread_over_the_whole_trajectory(steps, k):
    picked = pick_steps(steps, k)
    count = steps if k is None else min(k, steps)
    assert len(picked) == len(set(picked)) == count and picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] == steps - 1  # the highest and the lowest noise level
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1  # even spacing


def test_too_few_recorded_steps_is_refused(tiny_artifacts, tmp_path):
    with pytest.raises(CfgExportError, match=rf"--record-steps: got 2, expected at least {MIN_STEPS}"):
        record_calibration(tiny_artifacts / "stacked", tmp_path / "c.npz", steps=10, record_steps=2)
    with pytest.raises(CfgExportError, match=r"--record-steps: got 12, more than the 10 sampler steps"):
        record_calibration(tiny_artifacts / "stacked", tmp_path / "c.npz", steps=10, record_steps=12)
    with pytest.raises(CfgExportError, match=r"--n: got 0, expected at least 1 image per class"):
        record_calibration(tiny_artifacts / "stacked", tmp_path / "c.npz", n=0)
    T = read_manifest(tiny_artifacts / "stacked").facts.schedule.num_train_timesteps
    with pytest.raises(CfgExportError, match=rf"--steps: got {10**20}, expected at most {T}"):  # an OverflowError before
        record_calibration(tiny_artifacts / "stacked", tmp_path / "c.npz", steps=10**20)
    with pytest.raises(CfgExportError, match=r"recording: \d+ images need about .* ask for at most \d+ images"):
        record_calibration(tiny_artifacts / "stacked", tmp_path / "c.npz", n=10**20)
    assert not (tmp_path / "c.npz").exists()


def test_fused_layout_records_its_own_feeds(tiny_artifacts, tmp_path):
    result = record_calibration(tiny_artifacts / "fused", tmp_path / "f.npz", classes=[1], n=3, w=1.5, steps=4)
    assert result.manifest.layout == "fused" and result.manifest.rows == [3] * 4
    assert set(result.arrays) == {"sample", "timestep", "cond", "w"}
    np.testing.assert_array_equal(result.arrays["cond"], np.ones(12))
    np.testing.assert_array_equal(result.arrays["w"], np.full(12, 1.5, np.float32))
