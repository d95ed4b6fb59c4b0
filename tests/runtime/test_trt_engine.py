"""Engine profiles (images N -> rows), the engine manifest and the choice of manifest per
backend, the ORT TensorRT provider options, and the TensorRT backend's refusals on a
machine without TensorRT. Runs everywhere: nothing here needs TensorRT or a GPU."""
import shutil
from dataclasses import replace

import pytest

from cfg_export.build.profiles import make_profiles
from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.backends import BACKENDS, open_backend
from cfg_export.runtime.backends.onnxrt_trt import ort_tensorrt_options
from cfg_export.runtime.engine import (ENGINE_FILE, ENGINE_MANIFEST, Profile, engine_profiles, pick_profile,
                                       resolve_batches, shapes_text)
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import read_manifest
from tests.conftest import has_module


@pytest.mark.parametrize("given,expected", [
    ({}, (1, 4, 16)),
    ({"max_batch": 2}, (1, 2, 2)),
    ({"min_batch": 32}, (32, 32, 32)),
    ({"opt_batch": 20}, (1, 20, 20)),
    ({"min_batch": 2, "opt_batch": 3, "max_batch": 5}, (2, 3, 5)),
    ({"min_batch": 8, "max_batch": 8}, (8, 8, 8)),
])
def test_batches_fill_defaults_around_what_is_given(given, expected):
    assert resolve_batches(**given) == expected


@pytest.mark.parametrize("given,message", [
    ({"min_batch": 0}, r"--min-batch: got 0, expected images N >= 1"),
    ({"max_batch": -2}, r"--max-batch: got -2, expected images N >= 1"),
    ({"min_batch": 4, "opt_batch": 2, "max_batch": 8}, r"got --min-batch 4, --opt-batch 2, --max-batch 8 .*"
                                                       r"expected min <= opt <= max"),
    ({"opt_batch": 9, "max_batch": 8}, r"--opt-batch 9, --max-batch 8"),
])
def test_batches_refused(given, message):
    with pytest.raises(CfgExportError, match=message):
        resolve_batches(**given)


def test_stacked_profile_is_two_rows_per_image(tiny_artifacts):
    m = read_manifest(tiny_artifacts / "stacked")  # sample [2N, 2, 6, 6], timestep [2N], cond [2N]
    (p,) = make_profiles(m, 1, 3, 8)
    assert p.rows == (2, 6, 16)
    assert p.shapes == {"sample": ((2, 2, 6, 6), (6, 2, 6, 6), (16, 2, 6, 6)),
                        "timestep": ((2,), (6,), (16,)), "cond": ((2,), (6,), (16,))}


def test_interval_profile_adds_n_rows(tiny_artifacts):
    m = read_manifest(tiny_artifacts / "stacked")
    guided, unguided = make_profiles(m, 2, 4, 8, interval=True)
    assert guided.rows == (4, 8, 16) and unguided.rows == (2, 4, 8)
    assert unguided.shapes["sample"] == ((2, 2, 6, 6), (4, 2, 6, 6), (8, 2, 6, 6))


def test_fused_profile_is_one_row_per_image_with_w(tiny_artifacts):
    m = read_manifest(tiny_artifacts / "fused")
    (p,) = make_profiles(m, max_batch=8)
    assert p.rows == (1, 4, 8) and p.shapes["w"] == ((1,), (4,), (8,))
    with pytest.raises(CfgExportError, match="--interval-profile: the fused layout runs N rows at every step"):
        make_profiles(m, interval=True)


def test_audio_profile_keeps_other_sizes(tiny_artifacts):
    (p,) = make_profiles(read_manifest(tiny_artifacts / "audio"), 1, 1, 2)
    assert p.shapes["sample"] == ((2, 3, 10), (2, 3, 10), (4, 3, 10))


def test_static_graph_has_no_profiles(tiny_artifacts):
    m = read_manifest(tiny_artifacts / "static2")
    assert make_profiles(m) == []
    with pytest.raises(CfgExportError, match=r"--max-batch, --interval-profile: the graph is static for N=2 images.*"
                                             r"re-export without --batch"):
        make_profiles(m, max_batch=4, interval=True)


def test_pick_profile_prefers_nearest_opt():
    guided = Profile((2, 8, 32), {})
    unguided = Profile((1, 4, 16), {})
    profiles = [guided, unguided]
    assert pick_profile(profiles, 8) == 0  # guided call of N=4: opt 8 exactly
    assert pick_profile(profiles, 4) == 1  # unguided call of N=4
    assert pick_profile(profiles, 1) == 1  # only the unguided profile covers one row
    assert pick_profile(profiles, 6) == 0  # |8-6| = |4-6|: the first on a tie
    with pytest.raises(CfgExportError, match=r"got a call of 40 rows, expected rows in its profiles \(2\.\.32, "
                                             r"1\.\.16\); rebuild it with a larger --max-batch"):
        pick_profile(profiles, 40)


def test_profile_roundtrip_and_shape_text():
    p = Profile((2, 4, 8), {"sample": ((2, 1, 16, 16), (4, 1, 16, 16), (8, 1, 16, 16)), "cond": ((2,), (4,), (8,))})
    assert Profile.from_dict(p.to_dict()) == p
    assert shapes_text({"sample": (2, 1, 16, 16), "timestep": (2,)}) == "sample:2x1x16x16,timestep:2"


def test_ort_tensorrt_options(tiny_artifacts, tmp_path):
    m = read_manifest(tiny_artifacts / "stacked")
    options = ort_tensorrt_options(m, tmp_path / "cache", fp16=True, max_batch=8, workspace_mib=512)
    assert options == {
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(tmp_path / "cache"),
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(tmp_path / "cache"),
        "trt_fp16_enable": "True", "trt_max_workspace_size": str(512 * 2 ** 20),
        # one profile from the unguided N_min rows to the stacked 2 N_max rows
        "trt_profile_min_shapes": "sample:1x2x6x6,timestep:1,cond:1",
        "trt_profile_opt_shapes": "sample:8x2x6x6,timestep:8,cond:8",
        "trt_profile_max_shapes": "sample:16x2x6x6,timestep:16,cond:16",
    }
    static = ort_tensorrt_options(read_manifest(tiny_artifacts / "static2"), "c")
    assert not any(k.startswith("trt_profile") for k in static) and static["trt_fp16_enable"] == "False"


def fake_engine_folder(tiny_artifacts, target, keep_onnx=True):
    """An artifact with an engine.json for a fake model.engine (no TensorRT can load it)."""
    shutil.copytree(tiny_artifacts / "stacked", target)
    if not keep_onnx:
        (target / "manifest.json").unlink()
        (target / "model.onnx").unlink()
    (target / ENGINE_FILE).write_bytes(b"not a real plan")
    onnx_manifest = read_manifest(tiny_artifacts / "stacked")
    engine = {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7",
              "profiles": [p.to_dict() for p in make_profiles(onnx_manifest, 1, 2, 4)],
              "rebuild": f"cfg-export trt {target} --fp16"}
    m = replace(onnx_manifest, model_file=ENGINE_FILE, precision="fp16", engine=engine).with_sha(target)
    m.write(target, ENGINE_MANIFEST)
    return m


def test_engine_manifest_roundtrip(tiny_artifacts, tmp_path):
    written = fake_engine_folder(tiny_artifacts, tmp_path / "a")
    m = Artifact.open(tmp_path / "a").stage().engine.manifest
    assert m == written and m.model_file == "model.engine" and m.precision == "fp16"
    assert [p.rows for p in engine_profiles(m)] == [(2, 4, 8)]
    assert m.facts == read_manifest(tiny_artifacts / "stacked").facts


def test_manifest_choice_per_backend(tiny_artifacts, tmp_path):
    fake_engine_folder(tiny_artifacts, tmp_path / "both")
    fake_engine_folder(tiny_artifacts, tmp_path / "engine", keep_onnx=False)
    both, engine = Artifact.open(tmp_path / "both"), Artifact.open(tmp_path / "engine")
    assert both.stage().onnx is not None and engine.stage().onnx is None
    assert both.manifest.model_file == "model.onnx"
    assert both.model_file(engine=True).manifest.model_file == "model.engine"
    assert engine.manifest.model_file == "model.engine"
    (tmp_path / "engine" / ENGINE_FILE).write_bytes(b"changed")
    with pytest.raises(CfgExportError, match=r"model\.engine does not match its manifest"):
        Artifact.open(tmp_path / "engine").model_file()


def test_tensorrt_backend_without_engine_says_how_to_build(tiny_artifacts):
    with pytest.raises(CfgExportError, match=r"no engine\.json in it; build an engine with: cfg-export trt"):
        Artifact.open(tiny_artifacts / "stacked").model_file(engine=True)
    with pytest.raises(CfgExportError, match=r"no engine\.json in it; build an engine with: cfg-export trt"):
        open_backend(tiny_artifacts / "stacked", "tensorrt")


def test_onnxruntime_refuses_an_engine_folder(tiny_artifacts, tmp_path):
    fake_engine_folder(tiny_artifacts, tmp_path / "engine", keep_onnx=False)
    with pytest.raises(CfgExportError, match=r"holds a TensorRT engine, not an ONNX model; use --backend tensorrt"):
        open_backend(tmp_path / "engine", "onnxruntime-cpu")
    assert {"tensorrt", "onnxruntime-tensorrt"} <= set(BACKENDS)


@pytest.mark.skipif(has_module("tensorrt"), reason="tensorrt is installed: the missing-package message cannot show")
def test_tensorrt_backend_names_the_extra(tiny_artifacts, tmp_path):
    fake_engine_folder(tiny_artifacts, tmp_path / "engine", keep_onnx=False)
    backend = open_backend(tmp_path / "engine")  # auto: a folder holding only an engine
    assert backend.name == "tensorrt"
    with pytest.raises(CfgExportError, match=r"^tensorrt is not installed .*pip install 'cfg-export\[tensorrt\]'$"):
        with backend:
            pass


@pytest.mark.skipif(has_module("onnxruntime") and "TensorrtExecutionProvider" in __import__(
    "onnxruntime").get_available_providers(), reason="this onnxruntime has the TensorRT provider")
def test_ort_tensorrt_backend_refuses_without_the_provider(tiny_artifacts):
    backend = open_backend(tiny_artifacts / "stacked", "onnxruntime-tensorrt")
    with pytest.raises(CfgExportError, match=r"this onnxruntime has no TensorRT provider .*--backend tensorrt"):
        with backend:
            pass


def test_cuda_without_a_gpu_names_the_fix():
    from cfg_export.runtime.backends.device_memory import open_cuda

    try:
        cuda = open_cuda()
    except CfgExportError as exc:
        text = str(exc)
        assert ("pip install 'cfg-export[tensorrt]'" in text) or ("driver" in text), text
    else:
        cuda.close()
        pytest.skip("a GPU answered: the no-GPU message cannot show")


def test_sample_cli_with_engine_backend_errors_in_one_line(tiny_artifacts, tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("sample", tiny_artifacts / "stacked", "--backend", "tensorrt", "--npy", tmp_path / "x.npy", "-q")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"Error: {tiny_artifacts / 'stacked'}: no engine.json in it; build an engine with: cfg-export trt "
        f"{tiny_artifacts / 'stacked'}"]
