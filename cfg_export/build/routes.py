"""Everything that differs between TensorRT versions when building, as pure logic on a
version value: precision routes (TensorRT 10.x builder flags and calibrators against
11.x strongly typed networks), DLA support, build options.

The builder (cfg_export.build.builder) and --print-trtexec both ask this module; neither
compares version numbers itself. Nothing here imports tensorrt: the version is passed
in, so every rule is tested on machines without it. What a version *runs* (engine
compatibility) is runtime.trt_versions, which goes onto the board.

TensorRT 10.x (JetPack 6) is weakly typed by default: FP16 and INT8 are builder flags,
layers are kept in FP32 by precision constraints, and INT8 ranges come from an
implicit calibrator or from explicit Q/DQ nodes. TensorRT 11.x removed those flags
and the calibrators: every network is strongly typed, so FP16 comes from an ONNX whose
tensors are FP16 (made by cfg_export.build.fp16) and INT8 from explicit Q/DQ nodes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.trt_versions import HardwareCompat, TrtVersion

MIN_VERSION_TEXT = "8.6"  # the first with builder_optimization_level, hardware and version compatibility
MIN_VERSION = TrtVersion.parse(MIN_VERSION_TEXT)
STRONGLY_TYPED_SINCE = TrtVersion(9, 1)  # NetworkDefinitionCreationFlag.STRONGLY_TYPED


def check_supported(version: TrtVersion) -> TrtVersion:
    """Returns the version, or raises CfgExportError when it is older than 8.6."""
    if version < MIN_VERSION:
        raise CfgExportError(
            f"TensorRT {version} is older than {MIN_VERSION_TEXT}, the oldest this tool builds for; install "
            f"TensorRT 10 (JetPack 6 ships 10.x), or build with trtexec from the command --print-trtexec shows")
    return version


class Precision(enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # INT8 where Q/DQ or ranges say so, FP32 (or FP16 with --fp16) elsewhere


class Fp16Source(enum.Enum):
    BUILDER_FLAG = "builder-flag"  # 10.x: BuilderFlag.FP16, FP32 kept by layer precision constraints
    TYPED_ONNX = "typed-onnx"  # an ONNX whose tensors are FP16 (kept layers FP32), strongly typed network


class Int8Source(enum.Enum):
    QDQ = "qdq"  # an ONNX with QuantizeLinear/DequantizeLinear nodes (cfg-export quantize)
    CALIBRATOR = "calibrator"  # 10.x: implicit entropy calibrator over recorded sampler inputs


@dataclass(frozen=True)
class Route:
    """How one precision is obtained from one TensorRT version: names of the API members
    to use (the builder looks them up with getattr) and of the matching trtexec flags."""

    version: TrtVersion
    precision: Precision
    fp16: bool  # FP16 allowed for the layers that are not kept in FP32
    fp16_source: Fp16Source | None
    int8_source: Int8Source | None
    network_flags: tuple[str, ...]  # tensorrt.NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # tensorrt.BuilderFlag members, precision ones only
    trtexec_flags: tuple[str, ...]

    @property
    def strongly_typed(self) -> bool:
        return "STRONGLY_TYPED" in self.network_flags or self.version.strongly_typed_only

    @property
    def name(self) -> str:
        """A short description for logs and the engine manifest, e.g. 'fp16 via typed-onnx'."""
        parts = [f"int8 via {self.int8_source.value}"] if self.int8_source else []
        if self.fp16_source:
            parts.append(f"fp16 via {self.fp16_source.value}")
        return " + ".join(parts) or "fp32"

    @property
    def precision_label(self) -> str:
        """The manifest's precision: fp32, fp16, int8 or int8+fp16."""
        if self.precision is Precision.INT8:
            return "int8+fp16" if self.fp16 else "int8"
        return self.precision.value


def _network_flags(version: TrtVersion, typed: bool) -> tuple[str, ...]:
    flags = ("EXPLICIT_BATCH",) if version.major < 10 else ()  # implicit batch is gone from 10 on
    if typed and version >= STRONGLY_TYPED_SINCE:
        flags += ("STRONGLY_TYPED",)  # accepted and ignored on 11.x, where typing is always strong
    return flags


def choose_route(version, fp16: bool = False, int8: bool = False, *, qdq_model: bool = False,
                 calibration: bool = False, strongly_typed: bool | None = None) -> Route:
    """Returns how `version` builds the asked precision, or raises CfgExportError saying which
    route works instead.

    fp16 and int8 may both be set (INT8 where quantized, FP16 elsewhere). For INT8, qdq_model
    says a Q/DQ ONNX is given, calibration that recorded inputs for the implicit calibrator are.
    strongly_typed None means the version's own default: builder flags on 10.x, typed on 11.x;
    True asks for the typed FP16 ONNX on 10.x too.
    """
    version = check_supported(TrtVersion.parse(version))
    typed_only = version.strongly_typed_only
    if strongly_typed is False and typed_only and (fp16 or int8):
        raise CfgExportError(f"TensorRT {version} has no weakly typed builds (BuilderFlag.FP16/INT8 were removed in "
                             f"11.0): drop the weak-typing request; FP16 comes from an FP16-typed ONNX made here")
    if strongly_typed and version < STRONGLY_TYPED_SINCE:
        raise CfgExportError(f"strongly typed networks need TensorRT {STRONGLY_TYPED_SINCE} or newer, got {version}: "
                             f"drop --strongly-typed to use the FP16 builder flag")
    typed = typed_only or bool(strongly_typed)
    fp16_source = None
    if fp16:
        fp16_source = Fp16Source.TYPED_ONNX if typed else Fp16Source.BUILDER_FLAG
    int8_source = None
    if int8:
        int8_source = _int8_source(version, qdq_model, calibration, typed)
    elif qdq_model or calibration:
        raise CfgExportError("a Q/DQ model or calibration data was given without --int8: add --int8, or drop them")
    typed_network = typed and (fp16 or int8)
    flags: tuple[str, ...] = ()
    trtexec: tuple[str, ...] = ()
    if not typed:
        if fp16:
            flags += ("FP16", "OBEY_PRECISION_CONSTRAINTS")
            trtexec += ("--fp16",)
        if int8:
            flags += ("INT8",)
            trtexec += ("--int8",)
    elif typed_network and not typed_only:
        trtexec += ("--stronglyTyped",)  # default-on, so not written, on 11.x
    precision = Precision.INT8 if int8 else Precision.FP16 if fp16 else Precision.FP32
    return Route(version, precision, fp16, fp16_source, int8_source,
                 _network_flags(version, typed_network), flags, trtexec)


def _int8_source(version: TrtVersion, qdq_model: bool, calibration: bool, typed: bool) -> Int8Source:
    if qdq_model and calibration:
        raise CfgExportError("INT8: got both a Q/DQ model and calibration data, expected one: the Q/DQ model "
                             "already carries its ranges; drop --calibration-data")
    if qdq_model:
        return Int8Source.QDQ
    if calibration and (typed or version.strongly_typed_only):
        raise CfgExportError(
            f"TensorRT {version} builds INT8 only from explicit Q/DQ nodes (the implicit calibrators were "
            f"removed in 11.0, and strongly typed networks never take them): make a Q/DQ model with "
            f"`cfg-export calibrate` then `cfg-export quantize`, and pass its model.onnx with --int8-onnx")
    if calibration:
        return Int8Source.CALIBRATOR
    if version.strongly_typed_only:
        raise CfgExportError(f"INT8 on TensorRT {version} needs a Q/DQ model (11.x has no calibrators): make one with "
                             f"`cfg-export calibrate` then `cfg-export quantize`, and pass its model.onnx with --int8-onnx")
    raise CfgExportError("INT8 needs activation ranges: pass --int8-onnx MODEL (a Q/DQ model from `cfg-export "
                         "quantize`) or --calibration-data FILE.npz (the implicit calibrator, TensorRT 10 only)")


# Which TensorRT releases build for the DLA (Jetson's deep learning accelerator). Sources:
# NVIDIA, "Working with DLA", TensorRT 11.4.1 documentation
#   (docs.nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/work-with-dla.html):
#   "TensorRT 10.7 was the last 10.x release that supported DLA"; "DLA was unavailable in
#   TensorRT 11.0 through 11.3 ... TensorRT 11.4.0 supported DLA only on Windows on ARM";
#   11.4.1 supports it on Jetson AGX Orin with JetPack 7.2.2 or later, strongly typed.
# NVIDIA, TensorRT 11.4.1 Release Notes, "DLA support for NVIDIA JetPack" (same facts).
# JetPack 6 ships TensorRT 10.3, inside the supported 10.x range.
DLA_LAST_10 = TrtVersion(10, 7, 99, 99)  # 10.7.x is the last 10.x with DLA
DLA_IN_11_SINCE = TrtVersion(11, 4, 1)  # Jetson AGX Orin, JetPack 7.2.2 or later
DLA_WINDOWS_ARM_ONLY = TrtVersion(11, 4, 0)  # DLA on Windows on ARM only (beta, no GPU fallback)


def dla_unsupported_reason(version) -> str | None:
    """Returns why `version` cannot build DLA engines for a Jetson, or None when it can:
    8.6-10.7 and 11.4.1 on can; 10.8-10.x, 11.0-11.3 and 11.4.0 cannot (see the sources above)."""
    version = TrtVersion.parse(version)
    if version.major < 11:
        if version <= DLA_LAST_10:
            return None
        return (f"TensorRT {version} has no DLA support (10.7 was the last 10.x release with DLA): use the "
                f"TensorRT 10.x your JetPack ships (JetPack 6: 10.3), or 11.4.1+ with JetPack 7.2.2+")
    if version >= DLA_IN_11_SINCE:
        return None
    if (version.major, version.minor, version.patch) == (11, 4, 0):
        return (f"TensorRT {version} builds DLA engines only on Windows on ARM, not on Jetson: use 11.4.1+ "
                f"(Jetson AGX Orin, JetPack 7.2.2+) or the TensorRT 10.x your JetPack ships")
    return (f"TensorRT {version} has no DLA support (unavailable in 11.0 through 11.3; back in 11.4.1 for "
            f"Jetson AGX Orin with JetPack 7.2.2+): drop --dla-core, or use the TensorRT 10.x your JetPack ships")


def dla_supported(version) -> bool:
    """True where TensorRT builds DLA engines for a Jetson (see dla_unsupported_reason)."""
    return dla_unsupported_reason(version) is None


def check_build_options(version, dla_core: int | None, hardware: HardwareCompat, version_compatible: bool) -> None:
    """Raises CfgExportError for option combinations `version` cannot build."""
    version = TrtVersion.parse(version)
    reason = dla_unsupported_reason(version) if dla_core is not None else None
    if reason is not None:
        raise CfgExportError(reason)
    if dla_core is not None and hardware is not HardwareCompat.NONE:
        raise CfgExportError(f"--hardware-compat {hardware.value} does not apply to DLA engines (they run on the DLA "
                             f"of the board they were built on): drop one of the two")
    if dla_core is not None and version_compatible:
        raise CfgExportError("--version-compatible engines run on the GPU only: drop --dla-core or "
                             "--version-compatible")


