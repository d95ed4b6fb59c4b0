"""Everything that differs between TensorRT versions, as pure logic on a version value.

The builder (cfg_export.engine_build) and the runtime backend (runtime.backends.trt)
both ask this module; neither compares version numbers itself. Nothing here imports
tensorrt: the version is passed in, so every rule is tested on machines without it.

TensorRT 10.x (JetPack 6) is weakly typed by default: FP16 and INT8 are builder flags,
layers are kept in FP32 by precision constraints, and INT8 ranges come from an
implicit calibrator or from explicit Q/DQ nodes. TensorRT 11.x removed those flags
and the calibrators: every network is strongly typed, so FP16 comes from an ONNX whose
tensors are FP16 (made by cfg_export.fp16) and INT8 from explicit Q/DQ nodes.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .errors import CfgExportError

MIN_VERSION_TEXT = "8.6"  # the first with builder_optimization_level, hardware and version compatibility
TYPED_ONLY_MAJOR = 11  # from here on, every network is strongly typed


@dataclass(frozen=True, order=True)
class TrtVersion:
    """A TensorRT version, e.g. 10.3.0.30 (major.minor.patch.build)."""

    major: int
    minor: int = 0
    patch: int = 0
    build: int = 0

    @classmethod
    def parse(cls, text) -> "TrtVersion":
        """Returns the version of '10', '10.3', '10.3.0.30' or a TrtVersion; raises CfgExportError."""
        if isinstance(text, TrtVersion):
            return text
        match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?(?:[.+-]?[A-Za-z]\w*)?\s*", str(text))
        if not match:
            raise CfgExportError(f"TensorRT version: got {text!r}, expected numbers like 10.3 or 10.3.0.30")
        return cls(*(int(g) if g else 0 for g in match.groups()))

    def __str__(self) -> str:
        parts = [self.major, self.minor, self.patch] + ([self.build] if self.build else [])
        return ".".join(str(p) for p in parts)

    @property
    def strongly_typed_only(self) -> bool:
        """True from 11.0: the FP16/INT8 builder flags and the calibrators are gone."""
        return self.major >= TYPED_ONLY_MAJOR


MIN_VERSION = TrtVersion.parse(MIN_VERSION_TEXT)
STRONGLY_TYPED_SINCE = TrtVersion(9, 1)  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
INT64_IO_SINCE = TrtVersion(10, 0)  # before 10, int64 inputs become int32 in the engine
DLA_IN_11_SINCE = TrtVersion(11, 4, 1)  # 11.0-11.4.0 shipped without DLA (release notes)


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
    QDQ = "qdq"  # an ONNX with QuantizeLinear/DequantizeLinear nodes (cfg-export calibrate)
    CALIBRATOR = "calibrator"  # 10.x: implicit entropy calibrator over recorded sampler inputs


class HardwareCompat(enum.Enum):
    NONE = "none"  # this GPU's compute capability only (the default; needed for DLA)
    AMPERE_PLUS = "ampere+"  # any GPU of compute capability 8.0 or newer
    SAME_CC = "same-cc"  # any GPU of the same compute capability

    @property
    def trt_name(self) -> str:
        """The member name of tensorrt.HardwareCompatibilityLevel."""
        return {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}[self.value]

    @property
    def trtexec_name(self) -> str:
        return {"none": "none", "ampere+": "ampere+", "same-cc": "sameComputeCapability"}[self.value]


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
            f"`cfg-export calibrate` and pass it with --int8-onnx")
    if calibration:
        return Int8Source.CALIBRATOR
    if version.strongly_typed_only:
        raise CfgExportError(f"INT8 on TensorRT {version} needs a Q/DQ model (11.x has no calibrators): make one with "
                             f"`cfg-export calibrate` and pass it with --int8-onnx")
    raise CfgExportError("INT8 needs activation ranges: pass --int8-onnx MODEL (a Q/DQ model from `cfg-export "
                         "calibrate`) or --calibration-data FILE.npz (the implicit calibrator, TensorRT 10 only)")


def dla_supported(version) -> bool:
    """True where TensorRT builds for the DLA: 8.6-10.x, and 11.x from 11.4.1 (Jetson AGX Orin)."""
    version = TrtVersion.parse(version)
    return not version.strongly_typed_only or version >= DLA_IN_11_SINCE


def check_build_options(version, dla_core: int | None, hardware: HardwareCompat, version_compatible: bool) -> None:
    """Raises CfgExportError for option combinations `version` cannot build."""
    version = TrtVersion.parse(version)
    if dla_core is not None and not dla_supported(version):
        raise CfgExportError(f"TensorRT {version} has no DLA support (back in {DLA_IN_11_SINCE} for Jetson AGX Orin): "
                             f"drop --dla-core, or use TensorRT 10.x (JetPack 6)")
    if dla_core is not None and hardware is not HardwareCompat.NONE:
        raise CfgExportError(f"--hardware-compat {hardware.value} does not apply to DLA engines (they run on the DLA "
                             f"of the board they were built on): drop one of the two")
    if dla_core is not None and version_compatible:
        raise CfgExportError("--version-compatible engines run on the GPU only: drop --dla-core or "
                             "--version-compatible")


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built on or run on."""

    name: str
    compute_capability: str  # "8.7"
    dla_cores: int = 0

    @property
    def cc(self) -> tuple[int, int]:
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)


def check_engine(engine: dict, installed, device: DeviceInfo) -> list[str]:
    """Returns why an engine whose manifest facts are `engine` cannot run with TensorRT
    `installed` on `device` (empty when it can).

    Plain engines need the same TensorRT version (major.minor.patch.build as recorded) and
    the same compute capability; version-compatible ones any version from theirs on;
    hardware-compatible ones any GPU of their level; DLA engines a DLA core of that index.
    """
    installed = TrtVersion.parse(installed)
    built = TrtVersion.parse(engine["tensorrt"])
    problems = []
    if engine.get("version_compatible"):
        if installed < built:
            problems.append(f"it is version-compatible from TensorRT {built} on, and this TensorRT is {installed}")
    elif (installed.major, installed.minor, installed.patch) != (built.major, built.minor, built.patch) or (
            built.build and installed.build and built.build != installed.build):
        problems.append(f"it was built with TensorRT {built}, and this TensorRT is {installed} (engines run only "
                        f"on the version that built them unless built with --version-compatible)")
    level = HardwareCompat(engine.get("hardware_compatibility") or "none")
    built_device = DeviceInfo(engine.get("gpu", "?"), engine["compute_capability"])
    if level is HardwareCompat.AMPERE_PLUS:
        if device.cc < (8, 0):
            problems.append(f"it is built for Ampere and newer GPUs (compute capability >= 8.0), and this GPU "
                            f"({device.name}) has {device.compute_capability}")
    elif device.cc != built_device.cc:
        problems.append(f"it was built on {built_device.name} (compute capability {built_device.compute_capability}), "
                        f"and this GPU is {device.name} ({device.compute_capability})")
    dla_core = engine.get("dla_core")
    if dla_core is not None and dla_core >= device.dla_cores:
        problems.append(f"it runs on DLA core {dla_core}, and this device has {device.dla_cores} DLA cores")
    return problems
