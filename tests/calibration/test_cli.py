"""cfg-export calibrate and quantize end to end on the tiny model, in a subprocess."""
import numpy as np
import pytest

from cfg_export.calibration.data import load_calibration
from cfg_export.runtime.manifest import read_manifest
from tests.conftest import run_cli


def test_calibrate_then_quantize_with_report(tiny_artifacts, tmp_path):
    calib, out = tmp_path / "calib.npz", tmp_path / "int8"
    proc = run_cli("-q", "calibrate", tiny_artifacts / "stacked", "-o", calib, "--steps", "8", "--record-steps", "4",
                   "--classes", "0,2", "--n", "3", "--w", "1.5", "--seed", "9")
    assert proc.returncode == 0, proc.stderr
    m = load_calibration(calib).manifest
    assert (m.steps, m.recorded_steps, m.cond, m.w, m.seed) == (8, [0, 2, 5, 7], [0, 0, 0, 2, 2, 2], 1.5, 9)
    proc = run_cli("quantize", tiny_artifacts / "stacked", "--calib", calib, "-o", out, "--method", "minmax",
                   "--keep-fp32", "default", "--report", "--report-n", "1", "--report-steps", "4")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'model.onnx'} and manifest.json (int8-qdq:" in proc.stdout
    assert "INT8 vs FP32: ddim 4 steps, w=1.5" in proc.stdout and "final images, relative L2 distance" in proc.stdout
    assert "advice: no metrics: the default (digits) classifier takes [1, 16, 16]" in proc.stdout
    assert read_manifest(out).producer["quantization"]["method"] == "minmax"


def test_quantize_refuses_both_quantize_all_and_keep(tiny_artifacts, tiny_calib, tmp_path):
    proc = run_cli("quantize", tiny_artifacts / "stacked", "--calib", tiny_calib.path, "-o", tmp_path / "q",
                   "--quantize-all", "--keep-fp32", "Conv")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "Error: --quantize-all and --keep-fp32: give one of the two"
    proc = run_cli("calibrate", tiny_artifacts / "stacked", "-o", tmp_path / "c.npz", "--classes", "0,x")
    assert proc.stderr.strip() == "Error: --classes: got '0,x', expected integers separated by commas, like 0,1,2"
    assert not np.any([p.name.startswith("c.npz") for p in tmp_path.iterdir()])


def test_quantize_option_errors_name_the_fix(tiny_artifacts, tiny_calib, tmp_path):
    from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact
    from cfg_export.runtime.errors import CfgExportError

    for args, message in (
            (["--select", "--keep-fp32", "Conv"], "--select chooses the float layers itself: drop --keep-fp32 and "
                                                  "--quantize-all"),
            (["--budget", "0.03"], "--budget applies with --select: add it"),
            (["--classifier", "c.onnx"], "--classifier, --reference, --no-metrics, --report-n and --report-steps "
                                         "apply with --report: add it"),
            (["--report", "--reference", "missing.npz"],
             "--reference missing.npz: no such file; give an existing file, or leave --reference out for the "
             "digits one"),
            (["--schedule", "0-x"], "--schedule: got '0-x', expected auto, none, or timestep intervals LO-HI[,LO-HI], "
                                    "e.g. 0-160")):
        proc = run_cli("quantize", tiny_artifacts / "stacked", "--calib", tiny_calib.path, "-o", tmp_path / "q", *args)
        assert proc.returncode == 1 and proc.stderr.strip() == f"Error: {message}", (args, proc.stderr)
    assert not (tmp_path / "q").exists()
    with pytest.raises(CfgExportError, match=r"--percentile: got 30.0, expected a percentile in \(50, 100\]"):
        quantize_artifact(tiny_artifacts / "stacked", tiny_calib.path, tmp_path / "q", QuantizeOptions(percentile=30.0))
