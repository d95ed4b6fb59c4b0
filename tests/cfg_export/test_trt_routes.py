"""cfg_export.build.routes and runtime.trt_versions: the TensorRT version rules, with the version passed in as a value.

The expected routes are those of TensorRT's documentation: 10.x has the FP16/INT8 builder
flags, precision constraints and the implicit calibrators; 11.x removed them all (strongly
typed networks only, INT8 from explicit Q/DQ), and EXPLICIT_BATCH is needed only before 10.
"""
import re
from dataclasses import replace
from pathlib import Path

import pytest

from cfg_export.runtime.backends.trt import compatibility_error
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import Manifest, read_manifest
from cfg_export.build.routes import (Fp16Source, Int8Source, check_build_options, choose_route, dla_supported,
                                     dla_unsupported_reason)
from cfg_export.runtime.trt_versions import DeviceInfo, HardwareCompat, TrtVersion, check_engine


@pytest.mark.parametrize("text,expected", [
    ("10.3.0.30", (10, 3, 0, 30)), ("10", (10, 0, 0, 0)), ("11.1", (11, 1, 0, 0)), ("8.6.1.6", (8, 6, 1, 6)),
    (" 10.7.0.post1 ", (10, 7, 0, 0)),
])
def test_version_parse(text, expected):
    v = TrtVersion.parse(text)
    assert (v.major, v.minor, v.patch, v.build) == expected


def test_version_order_and_text():
    assert TrtVersion.parse("10.3") < TrtVersion.parse("10.12") < TrtVersion.parse("11.0")
    assert str(TrtVersion.parse("10.3.0.30")) == "10.3.0.30" and str(TrtVersion.parse("11")) == "11.0.0"


@pytest.mark.parametrize("text", ["", "ten", "10..3", "v10"])
def test_version_parse_refuses(text):
    with pytest.raises(CfgExportError, match=r"TensorRT version: got .*expected numbers like 10.3"):
        TrtVersion.parse(text)


# version, fp16, int8, qdq, calibration, typed -> fp16 source, int8 source, builder flags, network flags, trtexec
ROUTES = [
    ("10.3", False, False, False, False, None, None, None, (), (), ()),
    ("10.3", True, False, False, False, None, "builder-flag", None, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), (),
     ("--fp16",)),
    ("10.3", True, False, False, False, True, "typed-onnx", None, (), ("STRONGLY_TYPED",), ("--stronglyTyped",)),
    ("10.3", False, True, True, False, None, None, "qdq", ("INT8",), (), ("--int8",)),
    ("10.3", False, True, False, True, None, None, "calibrator", ("INT8",), (), ("--int8",)),
    ("10.3", True, True, True, False, None, "builder-flag", "qdq", ("FP16", "OBEY_PRECISION_CONSTRAINTS", "INT8"), (),
     ("--fp16", "--int8")),
    ("8.6", True, False, False, False, None, "builder-flag", None, ("FP16", "OBEY_PRECISION_CONSTRAINTS"),
     ("EXPLICIT_BATCH",), ("--fp16",)),
    ("11.0", False, False, False, False, None, None, None, (), (), ()),
    ("11.0", True, False, False, False, None, "typed-onnx", None, (), ("STRONGLY_TYPED",), ()),
    ("11.4.1", False, True, True, False, None, None, "qdq", (), ("STRONGLY_TYPED",), ()),
    ("11.4.1", True, True, True, False, None, "typed-onnx", "qdq", (), ("STRONGLY_TYPED",), ()),
    ("12.0", True, False, False, False, None, "typed-onnx", None, (), ("STRONGLY_TYPED",), ()),
]


@pytest.mark.parametrize("version,fp16,int8,qdq,calib,typed,fp16_src,int8_src,flags,net,trtexec", ROUTES)
def test_route_per_version(version, fp16, int8, qdq, calib, typed, fp16_src, int8_src, flags, net, trtexec):
    route = choose_route(version, fp16, int8, qdq_model=qdq, calibration=calib, strongly_typed=typed)
    assert (route.fp16_source.value if route.fp16_source else None) == fp16_src
    assert (route.int8_source.value if route.int8_source else None) == int8_src
    assert route.builder_flags == flags and route.network_flags == net and route.trtexec_flags == trtexec


def test_route_labels():
    assert choose_route("10", fp16=True).precision_label == "fp16"
    assert choose_route("10", int8=True, fp16=True, qdq_model=True).precision_label == "int8+fp16"
    assert choose_route("11", int8=True, qdq_model=True).precision_label == "int8"
    assert choose_route("11", fp16=True).name == "fp16 via typed-onnx"
    assert choose_route("11", fp16=True).strongly_typed and not choose_route("10", fp16=True).strongly_typed
    assert choose_route("10", fp16=True).fp16_source is Fp16Source.BUILDER_FLAG
    assert choose_route("10", int8=True, calibration=True).int8_source is Int8Source.CALIBRATOR


@pytest.mark.parametrize("args,kwargs,message", [
    (("8.5.2",), {"fp16": True}, r"TensorRT 8\.5\.2 is older than 8\.6.*--print-trtexec"),
    (("11.0",), {"int8": True, "calibration": True},
     r"TensorRT 11\.0\.0 builds INT8 only from explicit Q/DQ.*cfg-export calibrate.*--int8-onnx"),
    (("11.0",), {"int8": True}, r"INT8 on TensorRT 11\.0\.0 needs a Q/DQ model.*--int8-onnx"),
    (("10.3",), {"int8": True}, r"INT8 needs activation ranges: pass --int8-onnx.*--calibration-data"),
    (("10.3",), {"int8": True, "qdq_model": True, "calibration": True}, r"got both a Q/DQ model and calibration"),
    (("10.3",), {"int8": True, "calibration": True, "strongly_typed": True}, r"builds INT8 only from explicit Q/DQ"),
    (("10.3",), {"qdq_model": True}, r"without --int8: add --int8"),
    (("8.6",), {"fp16": True, "strongly_typed": True}, r"strongly typed networks need TensorRT 9\.1\.0 or newer"),
    (("11.0",), {"fp16": True, "strongly_typed": False}, r"has no weakly typed builds"),
])
def test_route_refusals_say_which_route_works(args, kwargs, message):
    with pytest.raises(CfgExportError, match=message):
        choose_route(*args, **kwargs)


def test_dla_support_by_version():
    # NVIDIA's "Working with DLA" (TensorRT 11.4.1 docs): 10.7 was the last 10.x with DLA; none in
    # 11.0-11.3; 11.4.0 on Windows on ARM only; back in 11.4.1 for Jetson AGX Orin (JetPack 7.2.2+).
    for version in ("8.6", "10.3.0.30", "10.7.0.23", "11.4.1", "11.5"):
        assert dla_supported(version), version
    for version in ("10.8.0.43", "10.13", "11.0", "11.3.1", "11.4.0"):
        assert not dla_supported(version), version
    assert "Windows on ARM" in dla_unsupported_reason("11.4.0")
    assert "10.7 was the last" in dla_unsupported_reason("10.8")


@pytest.mark.parametrize("version,dla,hardware,vc,message", [
    ("11.2", 0, "none", False, r"TensorRT 11\.2\.0 has no DLA support.*drop --dla-core"),
    ("10.3", 0, "ampere+", False, r"--hardware-compat ampere\+ does not apply to DLA engines"),
    ("10.3", 0, "none", True, r"--version-compatible engines run on the GPU only"),
])
def test_build_option_refusals(version, dla, hardware, vc, message):
    with pytest.raises(CfgExportError, match=message):
        check_build_options(version, dla, HardwareCompat(hardware), vc)


def test_build_options_accepted():
    check_build_options("10.3", 1, HardwareCompat.NONE, False)
    check_build_options("11.0", None, HardwareCompat.AMPERE_PLUS, True)
    assert HardwareCompat("ampere+").trt_name == "AMPERE_PLUS"
    assert HardwareCompat("same-cc").trtexec_name == "sameComputeCapability"


ORIN = DeviceInfo("Orin", "8.7", dla_cores=2)
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0")


def engine(**changes):
    facts = {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7", "dla_core": None,
             "version_compatible": False, "hardware_compatibility": "none"}
    return {**facts, **changes}


def test_engine_runs_where_it_was_built():
    assert check_engine(engine(), "10.3.0.30", ORIN) == []
    assert check_engine(engine(), "10.3.0", ORIN) == []  # a version without build number matches any build
    assert check_engine(engine(dla_core=1), "10.3.0.30", ORIN) == []


@pytest.mark.parametrize("facts,installed,device,reason", [
    ({}, "10.7.0.23", ORIN, r"built with TensorRT 10\.3\.0\.30, and this TensorRT is 10\.7\.0\.23"),
    ({}, "10.3.0.26", ORIN, r"built with TensorRT 10\.3\.0\.30, and this TensorRT is 10\.3\.0\.26"),
    ({}, "10.3.0.30", H100, r"built on Orin \(compute capability 8\.7\), and this GPU is NVIDIA H100.* \(9\.0\)"),
    ({"version_compatible": True}, "10.2.0", ORIN, r"version-compatible from TensorRT 10\.3\.0\.30 on"),
    ({"hardware_compatibility": "ampere+"}, "10.3.0.30", DeviceInfo("Tesla T4", "7.5"),
     r"Ampere and newer GPUs \(compute capability >= 8\.0\).*Tesla T4.* 7\.5"),
    ({"hardware_compatibility": "same-cc", "compute_capability": "8.6"}, "10.3.0.30", ORIN, r"compute capability 8\.6"),
    ({"dla_core": 1}, "10.3.0.30", DeviceInfo("Orin Nano", "8.7", dla_cores=0), r"DLA core 1, and this device has 0"),
])
def test_engine_mismatch_reasons(facts, installed, device, reason):
    problems = check_engine(engine(**facts), installed, device)
    assert len(problems) == 1
    assert re.search(reason, problems[0]), problems[0]


def test_compatible_engines_accept_other_machines():
    assert check_engine(engine(version_compatible=True), "10.7.0", ORIN) == []
    assert check_engine(engine(version_compatible=True), "11.1.0", ORIN) == []  # 10 engines run on 11 (docs)
    assert check_engine(engine(hardware_compatibility="ampere+"), "10.3.0.30", H100) == []
    assert check_engine(engine(hardware_compatibility="same-cc"), "10.3.0.30", DeviceInfo("AGX Orin", "8.7")) == []


def test_compatibility_error_names_both_sides_and_the_rebuild(tiny_artifacts):
    onnx_manifest: Manifest = read_manifest(tiny_artifacts / "stacked")
    m = replace(onnx_manifest, model_file="model.engine",
                engine=engine(rebuild="cfg-export trt out/digits --fp16 --max-batch 8"))
    error = compatibility_error(m, Path("out/digits/model.engine"), "10.7.0.23", H100)
    text = str(error)
    assert text.startswith("out/digits/model.engine: built for TensorRT 10.3.0.30 on Orin (compute capability 8.7), "
                           "this machine has TensorRT 10.7.0.23 on NVIDIA H100 80GB HBM3 (9.0): ")
    assert text.endswith("rebuild it here with: cfg-export trt out/digits --fp16 --max-batch 8")
    assert compatibility_error(m, Path("x.engine"), "10.3.0.30", ORIN) is None
