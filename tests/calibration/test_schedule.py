"""Per-step precision schedules: the artifact quantize writes, the backend that switches
model files between steps (checked call by call against bare ONNX Runtime sessions of
both files, and a whole DDIM run against a loop written here), and the refusals."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from cfg_export.calibration.precision import parse_schedule, schedule_from_errors
from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact
from cfg_export.runtime.backends import open_backend
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import read_manifest
from cfg_export.runtime.pipeline import sample_guided

FLOAT_AT = [[0, 45]]  # tests.models: T = 100; 10 DDIM steps visit 90, 80, ..., 0
NULL, T, W = 3, 100, 2.0


@pytest.fixture(scope="module")
def scheduled(tiny_artifacts, tiny_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("schedule") / "int8"
    result = quantize_artifact(tiny_artifacts / "stacked", tiny_calib.path, out,
                               QuantizeOptions(keep_fp32=(), method="minmax"), schedule=FLOAT_AT)
    return result


def sessions(scheduled, tiny_artifacts):
    make = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    return make(scheduled.directory / "model.onnx"), make(tiny_artifacts / "stacked" / "model.onnx")


def test_scheduled_artifact_carries_its_float_model(scheduled, tiny_artifacts):
    m = read_manifest(scheduled.directory)
    assert m.precision_schedule == {"folder": "float", "float_timesteps": FLOAT_AT, "float_precision": "fp32"}
    source = read_manifest(tiny_artifacts / "stacked")
    assert read_manifest(scheduled.directory / "float") == source
    assert m.producer["quantized_from"] == source.model_sha256
    assert scheduled.quantized and any("precision schedule" in n for n in scheduled.notes)


def test_backend_switches_model_file_where_the_schedule_says(scheduled, tiny_artifacts):
    int8, fp32 = sessions(scheduled, tiny_artifacts)
    g = np.random.default_rng(3)
    with open_backend(scheduled.directory, "onnxruntime-cpu") as backend:
        for t in (90, 46, 45, 30, 0):
            feeds = {"sample": g.standard_normal((4, 2, 6, 6)).astype(np.float32),
                     "timestep": np.full(4, t, np.int64), "cond": np.array([0, 1, NULL, NULL], np.int64)}
            (got,) = backend.infer(feeds).values()
            want = (fp32 if t <= 45 else int8).run(None, feeds)[0]
            other = (int8 if t <= 45 else fp32).run(None, feeds)[0]
            np.testing.assert_array_equal(got, want)
            assert np.abs(want - other).max() > 0  # the two files do differ
        assert backend.calls == {"primary": 2, "secondary": 3}


def test_sampling_runs_int8_then_fp32_like_a_loop_written_here(scheduled, tiny_artifacts):
    int8, fp32 = sessions(scheduled, tiny_artifacts)
    labels, steps, seed = np.array([0, 2]), 10, 4
    got = sample_guided(scheduled.directory, labels, W, steps=steps, seed=seed).samples
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    ts = (np.arange(steps) * (T // steps))[::-1]
    x = np.random.default_rng(seed).standard_normal((2, 2, 6, 6))
    for i, t in enumerate(ts):  # DDIM, eta 0 (Song et al. 2021, eq. 12), guided (Ho & Salimans 2021, eq. 6)
        session = fp32 if t <= 45 else int8
        feeds = {"sample": np.concatenate([x, x]).astype(np.float32), "timestep": np.full(4, t, np.int64),
                 "cond": np.concatenate([labels, [NULL, NULL]]).astype(np.int64)}
        eps = session.run(None, feeds)[0].astype(np.float64)
        eps = (1 + W) * eps[:2] - W * eps[2:]
        a, a_prev = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        x = np.sqrt(a_prev) * (x - np.sqrt(1 - a) * eps) / np.sqrt(a) + np.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)
    plain = sample_guided(tiny_artifacts / "stacked", labels, W, steps=steps, seed=seed).samples
    assert np.abs(plain - got).max() > 1e-6  # the INT8 steps did run


def test_intervals_from_per_step_errors():
    ts = [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    errors = [0.09, 0.06, 0.01, 0.02, 0.01, 0.01, 0.07, 0.01, 0.08, 0.09]
    assert schedule_from_errors(ts, errors, 0.05) == [[76, 90], [26, 35], [0, 15]]
    assert schedule_from_errors(ts, [0.01] * 10, 0.05) == []
    assert parse_schedule("0-160, 900-999") == [[0, 160], [900, 999]]
    with pytest.raises(CfgExportError, match=r"--schedule: got 'late', expected auto, none, or timestep intervals"):
        parse_schedule("late")


def test_broken_schedules_are_refused(scheduled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(scheduled.directory, copy)
    shutil.rmtree(copy / "float")
    with pytest.raises(CfgExportError, match=r"float: no such artifact folder"):
        open_backend(copy, "onnxruntime-cpu")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["precision_schedule"]["folder"] = "../elsewhere"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CfgExportError, match=r"precision_schedule has no valid 'folder' \('../elsewhere'\)"):
        open_backend(copy, "onnxruntime-cpu")
    with pytest.raises(CfgExportError,
                       match=r"schedule: got 'late', expected 'auto', 'none' or \[\[lo, hi\], \.\.\.\]"):
        quantize_artifact(scheduled.directory.parent / "none", "x.npz", tmp_path / "q", schedule="late")


def test_a_schedule_of_a_schedule_and_bad_intervals_are_refused(scheduled, tmp_path):
    from cfg_export.runtime.backends.scheduled import check_intervals

    copy = tmp_path / "nested"
    shutil.copytree(scheduled.directory, copy)
    inner = json.loads((copy / "float" / "manifest.json").read_text())
    inner["precision_schedule"] = {"folder": "float", "float_timesteps": [[0, 1]]}
    (copy / "float" / "manifest.json").write_text(json.dumps(inner))
    with pytest.raises(CfgExportError, match=r"a scheduled model has a schedule of its own; quantize again"):
        open_backend(copy, "onnxruntime-cpu")
    with pytest.raises(CfgExportError, match=r"precision schedule: interval \[9.0, 1.0\] has lo > hi or is not finite"):
        check_intervals([[0, 5], [9, 1]])
    with pytest.raises(CfgExportError, match=r"precision schedule: got float_timesteps 'late', expected a list of"):
        check_intervals("late")
