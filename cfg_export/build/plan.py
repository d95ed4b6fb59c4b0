"""plan_engine: what `cfg-export trt` will build, decided without TensorRT.

A plan holds the precision route for the TensorRT version (cfg_export.build.routes), the
optimization profiles (runtime.engine), the files to read and write, and the other
build options. It is pure: `--print-trtexec` turns it into the equivalent trtexec
command line on a machine without TensorRT, and build_engine executes it on one with it.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cfg_export.build.profiles import make_profiles
from cfg_export.runtime.engine import ENGINE_FILE, ENGINE_MANIFEST, Profile, shapes_text
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import require
from cfg_export.runtime.manifest import Manifest
from cfg_export.build.routes import (Fp16Source, HardwareCompat, Int8Source, Route, TrtVersion, check_build_options,
                                choose_route)
from cfg_export.runtime.schedule import parse_enum

FP16_MODEL_FILE = "model.fp16.onnx"  # the FP16-typed ONNX of the strongly typed route
CALIBRATION_CACHE = "calibration.cache"  # the implicit calibrator's ranges (TensorRT 10)
DEFAULT_TRT_VERSION = "10"  # what --print-trtexec targets when none is given or installed (JetPack 6)
MAX_OPT_LEVEL = 5


@dataclass(frozen=True)
class EngineOptions:
    """The choices of `cfg-export trt`; None means the default (TensorRT's own for the
    workspace and the optimization level)."""

    fp16: bool = False
    int8: bool = False
    int8_onnx: str | None = None  # a Q/DQ model (cfg-export quantize)
    calibration_data: str | None = None  # .npz of recorded inputs, for the TensorRT 10 calibrator
    keep_fp32: tuple[str, ...] | None = None  # see cfg_export.build.fp16; None: DEFAULT_KEEP_FP32
    strongly_typed: bool | None = None  # None: builder flags on 10.x, typed on 11.x
    min_batch: int | None = None  # images N
    opt_batch: int | None = None
    max_batch: int | None = None
    interval_profile: bool = False
    workspace_mib: int | None = None
    optimization_level: int | None = None  # 0..5; TensorRT's default is 3
    timing_cache: str | None = None
    dla_core: int | None = None
    gpu_fallback: bool | None = None  # None: True on the DLA (layers it cannot run go to the GPU)
    hardware_compat: HardwareCompat | str | None = None
    version_compatible: bool = False


@dataclass
class EnginePlan:
    directory: Path  # the artifact folder: manifest.json + model.onnx
    out_dir: Path  # where model.engine and engine.json go
    manifest: Manifest  # the ONNX model's
    options: EngineOptions
    route: Route
    profiles: list[Profile]
    onnx_path: Path  # the model TensorRT parses
    keep_fp32: tuple[str, ...] | None  # resolved from the options for FP16 routes, else None
    hardware_compat: HardwareCompat = HardwareCompat.NONE
    gpu_fallback: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def engine_path(self) -> Path:
        return self.out_dir / ENGINE_FILE

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / ENGINE_MANIFEST

    @property
    def fp16_onnx_path(self) -> Path | None:
        """The FP16-typed ONNX to write first (the typed FP16 route), else None."""
        typed = self.route.fp16_source is Fp16Source.TYPED_ONNX
        return self.out_dir / FP16_MODEL_FILE if typed else None

    @property
    def calibration_cache(self) -> Path | None:
        return self.out_dir / CALIBRATION_CACHE if self.route.int8_source is Int8Source.CALIBRATOR else None


def has_qdq_nodes(path: Path) -> bool:
    """True when the ONNX model at `path` holds QuantizeLinear/DequantizeLinear nodes."""
    onnx = require("onnx", "export")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for files that are not ONNX
        raise CfgExportError(f"{path}: not an ONNX model ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    ops = {node.op_type for node in model.graph.node}
    return "QuantizeLinear" in ops and "DequantizeLinear" in ops


def plan_engine(artifact: "Artifact | str | Path", out_dir: str | Path | None = None,
                trt_version: str | TrtVersion | None = None, options: EngineOptions | None = None,
                stage: str = "denoiser", sizes: dict[str, tuple[int, int, int]] | None = None) -> EnginePlan:
    """Returns the plan for building an engine of the artifact's stage (an Artifact or its
    folder) with TensorRT `trt_version` (default 10), or raises CfgExportError for options
    that version cannot build. `sizes`: the (min, opt, max) of a pipeline stage's named
    spatial sizes ('H', 'W' in latents)."""
    options = options or EngineOptions()
    artifact = as_artifact(artifact)
    directory = artifact.stage(stage).directory
    manifest = artifact.model_file(stage, engine=False).manifest
    version = TrtVersion.parse(trt_version or DEFAULT_TRT_VERSION)
    int8_onnx = Path(options.int8_onnx) if options.int8_onnx else None
    if int8_onnx is not None and not int8_onnx.is_file():
        raise CfgExportError(f"--int8-onnx {int8_onnx}: no such file; make a Q/DQ model with cfg-export calibrate, "
                             f"then cfg-export quantize")
    if int8_onnx is not None and not has_qdq_nodes(int8_onnx):
        raise CfgExportError(f"--int8-onnx {int8_onnx}: the model has no QuantizeLinear/DequantizeLinear nodes, so "
                             f"TensorRT would find no INT8 ranges in it; give the model.onnx that cfg-export "
                             f"quantize writes")
    if manifest.precision.startswith("int8"):  # an artifact made by the quantizer: its model.onnx has Q/DQ
        if int8_onnx is not None or not options.int8:
            raise CfgExportError(f"{directory}: its model is already {manifest.precision} (Q/DQ); build it with "
                                 f"--int8 and without --int8-onnx (add --fp16 for FP16 elsewhere)")
        int8_onnx = directory / manifest.model_file
    elif manifest.precision != "fp32":
        raise CfgExportError(f"{directory}: its model is {manifest.precision}, expected the FP32 export "
                             f"(cfg-export onnx) or a Q/DQ artifact")
    if options.calibration_data:
        from cfg_export.calibration.data import read_calibration

        read_calibration(options.calibration_data, manifest)  # refuses a file of another model or layout
    route = choose_route(version, options.fp16, options.int8, qdq_model=int8_onnx is not None,
                         calibration=bool(options.calibration_data), strongly_typed=options.strongly_typed)
    hardware = parse_enum(HardwareCompat, options.hardware_compat or HardwareCompat.NONE, "hardware compatibility")
    check_build_options(version, options.dla_core, hardware, options.version_compatible)
    if options.optimization_level is not None and not 0 <= options.optimization_level <= MAX_OPT_LEVEL:
        raise CfgExportError(f"--opt-level: got {options.optimization_level}, expected 0..{MAX_OPT_LEVEL} (default 3)")
    if options.workspace_mib is not None and options.workspace_mib < 1:
        raise CfgExportError(f"--workspace: got {options.workspace_mib}, expected MiB >= 1")
    if options.gpu_fallback is not None and options.dla_core is None:
        raise CfgExportError("GPU fallback applies to DLA builds only: add --dla-core N, or drop the fallback option")
    if options.keep_fp32 is not None and not options.fp16:
        raise CfgExportError("--keep-fp32 applies to FP16 builds: add --fp16, or drop --keep-fp32")
    profiles = make_profiles(manifest, options.min_batch, options.opt_batch, options.max_batch,
                             options.interval_profile, sizes)
    plan = EnginePlan(directory=directory, out_dir=Path(out_dir) if out_dir is not None else directory,
                      manifest=manifest, options=options, route=route, profiles=profiles,
                      onnx_path=int8_onnx or directory / manifest.model_file,
                      keep_fp32=tuple(options.keep_fp32) if options.keep_fp32 is not None else None,
                      hardware_compat=hardware,
                      gpu_fallback=options.dla_core is not None and options.gpu_fallback is not False)
    if plan.fp16_onnx_path is not None:
        plan.notes.append(f"TensorRT {version} route: FP16-typed ONNX {plan.fp16_onnx_path.name} + strongly "
                          f"typed network")
    return plan


def _keep_names(plan: EnginePlan) -> list[str]:
    """The ONNX node names the builder-flag route constrains to FP32."""
    from cfg_export.build.fp16 import kept_float_nodes
    from cfg_export.runtime.errors import require

    onnx = require("onnx", "export")
    return [node.name for node in kept_float_nodes(onnx.load(str(plan.onnx_path)), plan.keep_fp32)]


def trtexec_command(plan: EnginePlan) -> list[str]:
    """Returns the trtexec argv that builds the same engine as build_engine(plan). On the
    typed route it reads the FP16-typed ONNX, which must be written first (write_fp16_model)."""
    route, options = plan.route, plan.options
    onnx_path = plan.fp16_onnx_path or plan.onnx_path
    argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan.engine_path}"]
    for profile in plan.profiles:  # repeated min/opt/max triplets make one profile each
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            argv.append(f"{flag}={shapes_text({n: s[k] for n, s in profile.shapes.items()})}")
    argv += list(route.trtexec_flags)
    if "OBEY_PRECISION_CONSTRAINTS" in route.builder_flags:
        names = _keep_names(plan)
        if names:
            argv += ["--precisionConstraints=obey",
                     "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in names),
                     "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in names)]
    if plan.calibration_cache is not None:
        if not plan.calibration_cache.is_file():
            raise CfgExportError(
                f"trtexec cannot read the recorded inputs of --calibration-data, only a calibration cache, and "
                f"{plan.calibration_cache} does not exist yet: run `cfg-export trt ... --calibration-data` once on "
                f"the device (it writes that cache), or use the Q/DQ route (cfg-export quantize, then --int8-onnx)")
        argv.append(f"--calib={plan.calibration_cache}")
    if options.workspace_mib is not None:
        argv.append(f"--memPoolSize=workspace:{options.workspace_mib}M")
    if options.optimization_level is not None:
        argv.append(f"--builderOptimizationLevel={options.optimization_level}")
    if options.timing_cache:
        argv.append(f"--timingCacheFile={options.timing_cache}")
    if options.dla_core is not None:
        argv.append(f"--useDLACore={options.dla_core}")
        if plan.gpu_fallback:
            argv.append("--allowGPUFallback")
    if plan.hardware_compat is not HardwareCompat.NONE:
        argv.append(f"--hardwareCompatibilityLevel={plan.hardware_compat.trtexec_name}")
    if options.version_compatible:
        argv.append("--versionCompatible")
    return argv


def rebuild_command(plan: EnginePlan) -> str:
    """Returns the `cfg-export trt` command line that builds this plan again (recorded in the
    engine manifest, and shown when the engine does not fit the machine that loads it)."""
    o = plan.options
    argv = ["cfg-export", "trt", str(plan.directory)]
    if plan.out_dir != plan.directory:
        argv += ["-o", str(plan.out_dir)]
    argv += [flag for flag, on in (("--fp16", o.fp16), ("--int8", o.int8)) if on]
    for flag, value in (("--int8-onnx", o.int8_onnx), ("--calibration-data", o.calibration_data),
                        ("--min-batch", o.min_batch), ("--opt-batch", o.opt_batch), ("--max-batch", o.max_batch),
                        ("--workspace", o.workspace_mib), ("--opt-level", o.optimization_level),
                        ("--timing-cache", o.timing_cache), ("--dla-core", o.dla_core)):
        if value is not None:
            argv += [flag, str(value)]
    for entry in plan.keep_fp32 or ():
        argv += ["--keep-fp32", entry]
    if o.strongly_typed:
        argv.append("--strongly-typed")
    if o.interval_profile:
        argv.append("--interval-profile")
    if o.dla_core is not None and not plan.gpu_fallback:
        argv.append("--no-gpu-fallback")
    if plan.hardware_compat is not HardwareCompat.NONE:
        argv += ["--hardware-compat", plan.hardware_compat.value]
    if o.version_compatible:
        argv.append("--version-compatible")
    return shlex.join(argv)


def format_command(argv: Sequence[str]) -> str:
    """Returns argv as one shell-quoted line."""
    return shlex.join(argv)
