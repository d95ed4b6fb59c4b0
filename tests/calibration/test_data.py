"""Bad calibration input: each gives one line saying what was got, what was expected and
the fix."""
import json

import numpy as np
import pytest

from cfg_export.calibration.data import load_calibration, read_calibration
from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import read_manifest
from tests.conftest import run_cli


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def rewrite(src, dst, keep_steps=None, drop=(), manifest_edit=None, arrays_edit=None):
    """Writes a modified copy of the calibration file src to dst."""
    with np.load(src, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    manifest = json.loads(str(arrays.pop("manifest")[()]))
    if keep_steps is not None:
        rows = sum(manifest["rows"][:keep_steps])
        arrays = {k: v[:rows] for k, v in arrays.items()}
        for key in ("rows", "recorded_steps", "recorded_timesteps"):
            manifest[key] = manifest[key][:keep_steps]
    for name in drop:
        arrays.pop(name)
    if manifest_edit:
        manifest_edit(manifest)
    if arrays_edit:
        arrays_edit(arrays)
    np.savez(dst, **arrays, manifest=np.array(json.dumps(manifest)))
    return dst


def test_a_valid_file_reads(tiny_calib, tiny_artifacts):
    data = read_calibration(tiny_calib.path, read_manifest(tiny_artifacts / "stacked"))
    assert data.steps == 4 and [len(b["sample"]) for b in data.batches()] == [12] * 4


def test_file_of_another_model_is_refused(tiny_calib, tiny_artifacts):
    other = read_manifest(tiny_artifacts / "static2")  # same network, another export: another file
    with pytest.raises(CfgExportError) as exc:
        read_calibration(tiny_calib.path, other)
    mine = read_manifest(tiny_artifacts / "stacked").model_sha256
    assert one_line(exc) == (f"tiny.npz was recorded from model {mine[:12]}, this artifact is "
                             f"{other.model_sha256[:12]}: re-run cfg-export calibrate")


def test_file_of_another_layout_is_refused(tiny_calib, tiny_artifacts):
    with pytest.raises(CfgExportError, match=r"^tiny.npz was recorded from a stacked-layout model, this artifact "
                                             r"is fused: re-run cfg-export calibrate on this artifact$"):
        read_calibration(tiny_calib.path, read_manifest(tiny_artifacts / "fused"))


def test_arrays_of_the_wrong_layout_are_refused(tiny_calib, tiny_artifacts, tmp_path):
    manifest = read_manifest(tiny_artifacts / "stacked")
    missing = rewrite(tiny_calib.path, tmp_path / "missing.npz", drop=["cond"],
                      manifest_edit=lambda m: None)
    with pytest.raises(CfgExportError, match=r"missing.npz: got arrays \['sample', 'timestep'\], expected one per "
                                             r"model input \['cond', 'sample', 'timestep'\]"):
        read_calibration(missing, manifest)

    def transpose(arrays):
        arrays["sample"] = np.ascontiguousarray(arrays["sample"].transpose(0, 2, 3, 1))  # NHWC
    nhwc = rewrite(tiny_calib.path, tmp_path / "nhwc.npz", arrays_edit=transpose)
    with pytest.raises(CfgExportError, match=r"nhwc.npz: array 'sample' has rows of shape \[6, 6, 2\], the model "
                                             r"input takes \[2, 6, 6\]: re-run cfg-export calibrate"):
        read_calibration(nhwc, manifest)

    def as_float64(arrays):
        arrays["sample"] = arrays["sample"].astype(np.float64)
    wide = rewrite(tiny_calib.path, tmp_path / "wide.npz", arrays_edit=as_float64)
    with pytest.raises(CfgExportError, match=r"array 'sample' has dtype float64, the model input is float32"):
        read_calibration(wide, manifest)


def test_empty_truncated_and_foreign_files_are_refused(tiny_calib, tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(CfgExportError, match=r"^empty.npz is empty \(0 bytes\): re-run cfg-export calibrate"):
        load_calibration(tmp_path / "empty.npz")
    data = tiny_calib.path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CfgExportError, match=r"^cut.npz: truncated or corrupt \(.+\): re-run cfg-export calibrate"):
        load_calibration(tmp_path / "cut.npz")
    np.savez(tmp_path / "plain.npz", sample=np.zeros((4, 2, 6, 6), np.float32))
    with pytest.raises(CfgExportError, match=r"plain.npz: got arrays \['sample'\], expected a calibration file with a "
                                             r"'manifest' entry"):
        load_calibration(tmp_path / "plain.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(CfgExportError, match=r"single.npy: got a single array \[3\], expected a calibration .npz"):
        load_calibration(tmp_path / "single.npy")
    with pytest.raises(CfgExportError, match=r"nowhere.npz: no such calibration file; record one with: "
                                             r"cfg-export calibrate DIR -o nowhere.npz"):
        load_calibration(tmp_path / "nowhere.npz")


def test_empty_recording_and_too_few_steps_are_refused(tiny_calib, tiny_artifacts, tmp_path):
    manifest = read_manifest(tiny_artifacts / "stacked")
    few = rewrite(tiny_calib.path, tmp_path / "few.npz", keep_steps=2)
    with pytest.raises(CfgExportError) as exc:
        read_calibration(few, manifest)
    assert one_line(exc) == ("few.npz holds 2 recorded step(s) (24 rows); expected at least 4 spread over the "
                             "trajectory: re-run cfg-export calibrate with --record-steps 8 or more")
    none = rewrite(tiny_calib.path, tmp_path / "none.npz", keep_steps=0)
    with pytest.raises(CfgExportError, match=r"^none.npz holds no recorded rows"):
        load_calibration(none)


def test_unknown_method_lists_the_valid_ones(tiny_calib, tiny_artifacts, tmp_path):
    with pytest.raises(CfgExportError) as exc:
        quantize_artifact(tiny_artifacts / "stacked", tiny_calib.path, tmp_path / "q", QuantizeOptions(method="kl"))
    assert one_line(exc) == "--method: got 'kl', expected one of minmax, entropy, percentile, min-mean"
    assert not (tmp_path / "q").exists()


def test_cli_prints_one_error_line(tiny_calib, tiny_artifacts, tmp_path):
    proc = run_cli("quantize", tiny_artifacts / "static2", "--calib", tiny_calib.path, "-o", tmp_path / "q")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: tiny.npz was recorded from model ") and len(lines) == 1
    proc = run_cli("quantize", tiny_artifacts / "stacked", "--calib", tiny_calib.path, "-o", tmp_path / "q",
                   "--method", "max")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "Error: --method: got 'max', expected one of minmax, entropy, percentile, min-mean"
