"""TensorRT versions as the runtime sees them: the version value, the GPU an engine runs on,
and whether an engine built with one version on one GPU runs with another here.

What each version can *build* (precision routes, the 10.x/11.x differences, DLA) is
cfg_export.build.routes: the builder is not copied onto a board. Nothing here imports
tensorrt: versions are passed in as values, so every rule is tested without it.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .errors import CfgExportError

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


INT64_IO_SINCE = TrtVersion(10, 0)  # before 10, int64 inputs become int32 in the engine


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
