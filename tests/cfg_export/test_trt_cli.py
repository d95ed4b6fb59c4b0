"""`cfg-export trt`: --print-trtexec (pure, no TensorRT), the plan behind it, and the errors.

The expected trtexec lines are written out by hand from trtexec's documented flags.
"""
import shutil

import onnx
import pytest
from click.testing import CliRunner

from cfg_export.cli import main
from cfg_export.build.plan import EngineOptions, plan_engine, rebuild_command
from cfg_export.runtime.errors import CfgExportError
from tests import graph_ref
from tests.conftest import has_module, run_cli



def tiny_kept(artifact) -> list[str]:
    """The tiny model's nodes the default list keeps in FP32 (time and class embedding, first
    conv, the decomposed GroupNorm, last conv), found by structure (tests/graph_ref.py)."""
    return graph_ref.default_kept(onnx.load(str(artifact / "model.onnx")))


def cli(*args):
    """Runs cfg-export in-process; returns (exit code, output)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def artifact(tiny_artifacts, tmp_path):
    """A private copy of the tiny stacked artifact (commands may write into it)."""
    return shutil.copytree(tiny_artifacts / "stacked", tmp_path / "tiny")


def test_print_trtexec_fp16_on_tensorrt_10(artifact):
    code, out = cli("trt", artifact, "--fp16", "--print-trtexec", "--trt-version", "10.3.0.30", "--max-batch", 8,
                    "--workspace", 2048, "--opt-level", 4, "--timing-cache", "cache.bin", "--dla-core", 0)
    assert code == 0, out
    kept = tiny_kept(artifact)
    assert len(kept) == 14  # 7 embedding nodes (time and class, their sum, its reshape), first conv, 5 GroupNorm, last conv
    layers = ",".join(f"{n}:fp32" for n in kept)
    assert out.splitlines() == [
        "# TensorRT 10.3.0.30: fp16 via builder-flag",
        f"trtexec --onnx={artifact}/model.onnx --saveEngine={artifact}/model.engine "
        "--minShapes=sample:2x2x6x6,timestep:2,cond:2 --optShapes=sample:8x2x6x6,timestep:8,cond:8 "
        "--maxShapes=sample:16x2x6x6,timestep:16,cond:16 --fp16 --precisionConstraints=obey "
        f"--layerPrecisions={layers} --layerOutputTypes={layers} --memPoolSize=workspace:2048M "
        "--builderOptimizationLevel=4 --timingCacheFile=cache.bin --useDLACore=0 --allowGPUFallback"]
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.onnx"]  # printing wrote nothing


def test_print_trtexec_portable_fp32(artifact):
    code, out = cli("trt", artifact, "--print-trtexec", "--trt-version", "10.3", "--min-batch", 2, "--opt-batch", 2,
                    "--max-batch", 4, "--interval-profile", "--hardware-compat", "ampere+", "--version-compatible")
    assert code == 0, out
    assert out.splitlines()[1] == (
        f"trtexec --onnx={artifact}/model.onnx --saveEngine={artifact}/model.engine "
        "--minShapes=sample:4x2x6x6,timestep:4,cond:4 --optShapes=sample:4x2x6x6,timestep:4,cond:4 "
        "--maxShapes=sample:8x2x6x6,timestep:8,cond:8 "
        "--minShapes=sample:2x2x6x6,timestep:2,cond:2 --optShapes=sample:2x2x6x6,timestep:2,cond:2 "
        "--maxShapes=sample:4x2x6x6,timestep:4,cond:4 "
        "--hardwareCompatibilityLevel=ampere+ --versionCompatible")


def test_print_trtexec_on_tensorrt_11_writes_the_fp16_onnx(artifact, tmp_path):
    out_dir = tmp_path / "engine"
    code, out = cli("trt", artifact, "-o", out_dir, "--fp16", "--print-trtexec", "--trt-version", "11.1",
                    "--max-batch", 4)
    assert code == 0, out
    assert out.splitlines() == [
        f"# wrote {out_dir}/model.fp16.onnx (16 nodes kept in FP32)",
        "# TensorRT 11.1.0: fp16 via typed-onnx",
        f"trtexec --onnx={out_dir}/model.fp16.onnx --saveEngine={out_dir}/model.engine "
        "--minShapes=sample:2x2x6x6,timestep:2,cond:2 --optShapes=sample:8x2x6x6,timestep:8,cond:8 "
        "--maxShapes=sample:8x2x6x6,timestep:8,cond:8"]
    model = onnx.load(str(out_dir / "model.fp16.onnx"))
    casts = [a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert casts.count(onnx.TensorProto.FLOAT16) == 3  # into Add_1 (twice) and into the SiLU after the norm
    assert [p.name for p in out_dir.iterdir()] == ["model.fp16.onnx"]


def test_print_trtexec_strongly_typed_on_10_and_int8_routes(tiny_artifacts, tiny_calib, tmp_path):
    from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact

    artifact = tmp_path / "fp32"
    shutil.copytree(tiny_artifacts / "stacked", artifact)
    code, out = cli("trt", artifact, "--fp16", "--strongly-typed", "--print-trtexec", "--trt-version", "10.3",
                    "--max-batch", 1)
    assert code == 0 and out.splitlines()[-1].endswith("--stronglyTyped"), out
    everything = QuantizeOptions(keep_fp32=())  # the tiny model's two convolutions are the first and the last
    qdq = quantize_artifact(artifact, tiny_calib.path, tmp_path / "int8", everything).directory / "model.onnx"
    code, out = cli("trt", artifact, "--int8", "--int8-onnx", qdq, "--print-trtexec", "--trt-version", "11.4.1",
                    "--max-batch", 1)
    assert code == 0 and out.splitlines()[0] == "# TensorRT 11.4.1: int8 via qdq", out
    assert f"--onnx={qdq} " in out and "--int8" not in out.splitlines()[1]
    # a model without Q/DQ nodes gives TensorRT no ranges: refused, not printed with --int8
    code, out = cli("trt", artifact, "--int8", "--int8-onnx", artifact / "model.onnx", "--print-trtexec",
                    "--trt-version", "10.3", "--max-batch", 1)
    assert code == 1 and "has no QuantizeLinear/DequantizeLinear nodes" in out, out
    # trtexec reads a calibration cache, not the recorded inputs: refused until a build has written the cache
    code, out = cli("trt", artifact, "--int8", "--calibration-data", tiny_calib.path, "--print-trtexec",
                    "--trt-version", "10.3", "--max-batch", 1)
    assert code == 1 and "calibration.cache does not exist yet" in out, out
    (artifact / "calibration.cache").write_bytes(b"ranges a build wrote")
    code, out = cli("trt", artifact, "--int8", "--calibration-data", tiny_calib.path, "--print-trtexec",
                    "--trt-version", "10.3", "--max-batch", 1)
    assert code == 0, out
    assert out.splitlines()[1].endswith(f"--int8 --calib={artifact}/calibration.cache")
    # a calibration file of another model is refused by --print-trtexec too
    other = tmp_path / "other.npz"
    other.write_bytes(b"")
    code, out = cli("trt", artifact, "--int8", "--calibration-data", other, "--print-trtexec", "--trt-version", "10.3")
    assert code == 1 and "is empty" in out, out


def test_print_trtexec_layouts(tiny_artifacts):
    code, out = cli("trt", tiny_artifacts / "fused", "--print-trtexec", "--trt-version", "10", "--max-batch", 2)
    assert code == 0 and "--maxShapes=sample:2x2x6x6,timestep:2,cond:2,w:2" in out, out
    code, out = cli("trt", tiny_artifacts / "static2", "--print-trtexec", "--trt-version", "10")
    assert code == 0 and "Shapes" not in out, out  # a static graph needs no profile
    assert out.splitlines()[1] == (f"trtexec --onnx={tiny_artifacts}/static2/model.onnx "
                                   f"--saveEngine={tiny_artifacts}/static2/model.engine")


@pytest.mark.parametrize("args,message", [
    (["--min-batch", 4, "--max-batch", 2], "Error: profile: got --min-batch 4, --opt-batch 2, --max-batch 2 (images "
                                           "N); expected min <= opt <= max"),
    (["--int8", "--trt-version", "11"], "Error: INT8 on TensorRT 11.0.0 needs a Q/DQ model (11.x has no calibrators): "
                                        "make one with `cfg-export calibrate` then `cfg-export quantize`, and pass its "
                                        "model.onnx with --int8-onnx"),
    (["--fp16", "--dla-core", 0, "--trt-version", "11.2"], "Error: TensorRT 11.2.0 has no DLA support (unavailable "
                                                           "in 11.0 through 11.3; back in 11.4.1 for Jetson AGX Orin "
                                                           "with JetPack 7.2.2+): drop --dla-core, or use the "
                                                           "TensorRT 10.x your JetPack ships"),
    (["--keep-fp32", "@norm"], "Error: --keep-fp32 applies to FP16 builds: add --fp16, or drop --keep-fp32"),
    (["--fp16", "--keep-fp32", "/nowhere/*"], "Error: --keep-fp32 '/nowhere/*': matches no node (got neither an op "
                                               "type of the graph nor a node name); node names look like "
                                               "'/model/Cast', groups: @norm, @embedding, @first-conv, @last-conv, @full-res, "
                                                   "@attention-matmul"),
    (["--opt-level", 7], "Error: --opt-level: got 7, expected 0..5 (default 3)"),
    (["--no-gpu-fallback"], "Error: GPU fallback applies to DLA builds only: add --dla-core N, or drop the fallback "
                            "option"),
    (["--trt-version", "8.5"], "Error: TensorRT 8.5.0 is older than 8.6, the oldest this tool builds for; install "
                               "TensorRT 10 (JetPack 6 ships 10.x), or build with trtexec from the command "
                               "--print-trtexec shows"),
])
def test_print_trtexec_errors(artifact, args, message):
    code, out = cli("trt", artifact, "--print-trtexec", *args)
    assert code == 1 and out.strip().splitlines() == [message]


def test_trt_version_is_only_for_printing(artifact):
    code, out = cli("trt", artifact, "--trt-version", "10")
    assert code == 1 and out.strip() == "Error: --trt-version 10: applies to --print-trtexec; a build uses the " \
                                        "installed TensorRT"


def test_missing_artifact(tmp_path):
    code, out = cli("trt", tmp_path / "nope", "--print-trtexec")
    assert code == 1 and "no such artifact folder; make one with: cfg-export onnx MODEL" in out


@pytest.mark.skipif(has_module("tensorrt"), reason="tensorrt is installed: the missing-package message cannot show")
def test_build_without_tensorrt_is_one_line_and_writes_nothing(artifact, tmp_path):
    before = sorted(p.name for p in artifact.iterdir())
    proc = run_cli("trt", artifact, "--fp16", "-o", tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: tensorrt is not installed (No module named 'tensorrt'): pip install 'cfg-export[tensorrt]'; "
        "or print the equivalent trtexec command with --print-trtexec and build on the device"]
    assert sorted(p.name for p in artifact.iterdir()) == before and not (tmp_path / "out").exists()


def test_plan_refuses_a_changed_model(artifact):
    (artifact / "model.onnx").write_bytes((artifact / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(CfgExportError, match=r"model\.onnx does not match its manifest"):
        plan_engine(artifact, trt_version="10")


def test_plan_and_rebuild_command(artifact, tmp_path):
    options = EngineOptions(fp16=True, max_batch=8, keep_fp32=("default", "Sigmoid"), dla_core=1, gpu_fallback=False,
                            timing_cache="t.cache")
    plan = plan_engine(artifact, tmp_path / "out", "10.3.0.30", options)
    assert plan.engine_path == tmp_path / "out" / "model.engine" and plan.fp16_onnx_path is None
    assert [p.rows for p in plan.profiles] == [(2, 8, 16)] and not plan.gpu_fallback
    assert rebuild_command(plan) == (
        f"cfg-export trt {artifact} -o {tmp_path}/out --fp16 --max-batch 8 --timing-cache t.cache --dla-core 1 "
        "--keep-fp32 default --keep-fp32 Sigmoid --no-gpu-fallback")
    typed = plan_engine(artifact, None, "11", EngineOptions(fp16=True))
    assert typed.fp16_onnx_path == artifact / "model.fp16.onnx" and typed.route.strongly_typed


def test_quantized_artifact_builds_as_int8(artifact):
    """An artifact written by the quantizer (precision int8-qdq) is its own Q/DQ model."""
    import json

    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["precision"] = "int8-qdq"
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    code, out = cli("trt", artifact, "--int8", "--fp16", "--print-trtexec", "--trt-version", "10.3", "--max-batch", 1)
    assert code == 0, out
    assert out.splitlines()[0] == "# TensorRT 10.3.0: int8 via qdq + fp16 via builder-flag"
    assert out.splitlines()[1].startswith(f"trtexec --onnx={artifact}/model.onnx ") and "--fp16 --int8" in out
    code, out = cli("trt", artifact, "--fp16", "--print-trtexec", "--trt-version", "10.3")
    assert code == 1 and out.strip() == (f"Error: {artifact}: its model is already int8-qdq (Q/DQ); build it with "
                                         "--int8 and without --int8-onnx (add --fp16 for FP16 elsewhere)")
