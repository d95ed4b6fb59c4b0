"""build_engine: an artifact's ONNX -> a TensorRT engine (`model.engine` + `engine.json`).

Written against TensorRT's documented Python API (10.x and 11.x; 8.6 and 9.x too):
Builder, create_network, OnnxParser, BuilderConfig (memory pool limit, optimization
level, precision flags where the version has them, optimization profiles, timing cache,
DLA, hardware and version compatibility), build_serialized_network. Every difference
between versions is decided in cfg_export.build.routes; this module only looks the chosen
names up on the installed tensorrt. tensorrt is imported when a build starts, so this
module imports without it.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path


from cfg_export import __version__
from cfg_export.build.plan import EngineOptions, EnginePlan, plan_engine, rebuild_command
from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.engine import ENGINE_MANIFEST
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.files import sha256_file, staged_file
from cfg_export.build.routes import Int8Source
from cfg_export.runtime.trt_versions import DeviceInfo, TrtVersion

log = logging.getLogger(__name__)


@dataclass
class EngineResult:
    plan: EnginePlan
    manifest: object  # runtime.manifest.Manifest of the engine
    device: DeviceInfo
    seconds: float
    fp16: object = None  # cfg_export.fp16.Fp16Result on the typed route
    constrained: int = 0  # layers constrained to FP32 on the builder-flag route
    notes: list[str] = field(default_factory=list)


def import_tensorrt():
    """Returns the tensorrt module, or raises CfgExportError naming the extra and --print-trtexec."""
    try:
        return require("tensorrt", "tensorrt")
    except CfgExportError as exc:
        raise CfgExportError(f"{exc}; or print the equivalent trtexec command with --print-trtexec "
                             f"and build on the device") from None


def installed_trt_version() -> str | None:
    """The installed tensorrt's version, or None when it cannot be imported."""
    try:
        return require("tensorrt", "tensorrt").__version__
    except CfgExportError:
        return None


def _member(enum_type, name: str, what: str, version: TrtVersion):
    member = getattr(enum_type, name, None)
    if member is None:
        raise CfgExportError(f"TensorRT {version} has no {what}.{name}; the version rules in cfg_export/build/routes.py "
                             f"do not fit this TensorRT: report it, or build with trtexec (--print-trtexec)")
    return member


def _network(trt, builder, plan: EnginePlan, source: Path, logger):
    flags = 0
    for name in plan.route.network_flags:
        flags |= 1 << int(_member(trt.NetworkDefinitionCreationFlag, name, "NetworkDefinitionCreationFlag",
                                  plan.route.version))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise CfgExportError(f"TensorRT's ONNX parser rejects {source}: {'; '.join(errors) or 'no reason given'}")
    return network, parser


def _constrain_fp32(trt, network, plan: EnginePlan) -> int:
    """Builder-flag route: marks the layers made from the kept ONNX nodes as FP32 (by layer
    name, or by output tensor name, which the parser keeps); returns how many."""
    from cfg_export.build.fp16 import kept_float_nodes

    onnx = require("onnx", "export")
    nodes = kept_float_nodes(onnx.load(str(plan.onnx_path)), plan.keep_fp32)
    names = {n.name for n in nodes}
    tensors = {o for n in nodes for o in n.output}
    floats = (trt.float32, trt.float16)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.name not in names and not any(o.name in tensors for o in outputs):
            continue
        if not any(o.dtype in floats for o in outputs):
            continue
        layer.precision = trt.float32
        for j, output in enumerate(outputs):
            if output.dtype in floats:
                layer.set_output_type(j, trt.float32)
        count += 1
    return count


def _make_calibrator(cuda, plan: EnginePlan):
    """Returns TensorRT 10's entropy calibrator over the calibration file, checked against
    the artifact it was recorded from, in batches of the first profile's opt rows."""
    from cfg_export.calibration.trt_calibrator import make_calibrator

    rows = plan.profiles[0].rows[1] if plan.profiles else plan.manifest.batch * plan.manifest.rows_per_image
    return make_calibrator(plan.options.calibration_data, plan.manifest, rows, plan.calibration_cache, cuda=cuda)


def _configure(trt, builder, network, plan: EnginePlan, cuda):
    options, route, version = plan.options, plan.route, plan.route.version
    config = builder.create_builder_config()
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    for name in route.builder_flags:
        config.set_flag(_member(trt.BuilderFlag, name, "BuilderFlag", version))
    profiles = []
    for profile in plan.profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            optimization_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(optimization_profile)
        profiles.append(optimization_profile)
    calibrator = None
    if route.int8_source is Int8Source.CALIBRATOR:
        calibrator = _make_calibrator(cuda, plan)
        config.int8_calibrator = calibrator
        if profiles:
            config.set_calibration_profile(profiles[0])
    if options.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
        if plan.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if plan.hardware_compat.trt_name != "NONE":
        config.hardware_compatibility_level = _member(trt.HardwareCompatibilityLevel, plan.hardware_compat.trt_name,
                                                      "HardwareCompatibilityLevel", version)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = None
    if options.timing_cache:
        path = Path(options.timing_cache)
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache, calibrator


def _save_timing_cache(config, path: Path) -> None:
    """Writes the build's timing cache, merged with what another build may have written meanwhile."""
    cache = config.get_timing_cache()
    if path.is_file():
        cache.combine(config.create_timing_cache(path.read_bytes()), ignore_mismatch=True)
    with staged_file(path) as tmp:
        tmp.write_bytes(bytes(memoryview(cache.serialize())))


def build_engine(artifact: "Artifact | str | Path", out_dir: str | Path | None = None,
                 options: EngineOptions | None = None, stage: str = "denoiser",
                 sizes: dict[str, tuple[int, int, int]] | None = None) -> EngineResult:
    """Returns what was built: `model.engine` and `engine.json` in out_dir (default: the
    artifact folder), from the artifact's model.onnx (or the Q/DQ model of options.int8_onnx).

    Profiles are in images N (2N rows stacked, N fused). On TensorRT 10 FP16 uses the builder
    flag with the keep list constrained to FP32; on 11 (or with strongly_typed) an FP16-typed
    ONNX, model.fp16.onnx, is written first. Raises CfgExportError, leaving no partial engine
    file, when tensorrt or a GPU is missing or the build fails.
    """
    trt = import_tensorrt()
    from cfg_export.runtime.backends.device_memory import open_cuda

    start = time.perf_counter()
    plan = plan_engine(artifact, out_dir, trt.__version__, options, stage, sizes)
    cuda = open_cuda()
    try:
        device = cuda.device_info()
        result = EngineResult(plan, None, device, 0.0, notes=list(plan.notes))
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        source = plan.onnx_path
        if plan.fp16_onnx_path is not None:
            from cfg_export.build.fp16 import write_fp16_model

            result.fp16 = write_fp16_model(plan.onnx_path, plan.fp16_onnx_path, plan.keep_fp32)
            source = plan.fp16_onnx_path
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, _parser = _network(trt, builder, plan, source, logger)
        if "OBEY_PRECISION_CONSTRAINTS" in plan.route.builder_flags:
            result.constrained = _constrain_fp32(trt, network, plan)
        config, _cache, calibrator = _configure(trt, builder, network, plan, cuda)
        log.info("building %s (%s) with TensorRT %s on %s", plan.engine_path, plan.route.name, trt.__version__,
                 device.name)
        serialized = builder.build_serialized_network(network, config)
        if calibrator is not None:
            calibrator.free()
        if serialized is None:
            raise CfgExportError(f"TensorRT {trt.__version__} could not build the engine (its log above says why); "
                                 f"try a larger --workspace, --keep-fp32 for the failing layer, or an FP32 build")
        with staged_file(plan.engine_path) as tmp:
            tmp.write_bytes(bytes(memoryview(serialized)))
        if plan.options.timing_cache:
            _save_timing_cache(config, Path(plan.options.timing_cache))
    finally:
        cuda.close()
    result.manifest = _engine_manifest(plan, trt.__version__, device, source, result).with_sha(plan.out_dir)
    null_file = plan.manifest.facts.condition.null_file if plan.manifest.is_denoiser else None
    if null_file and plan.out_dir != plan.directory:
        shutil.copyfile(plan.directory / null_file, plan.out_dir / null_file)
    result.manifest.write(plan.out_dir, ENGINE_MANIFEST)
    result.seconds = time.perf_counter() - start
    return result


def _engine_manifest(plan: EnginePlan, trt_version: str, device: DeviceInfo, source: Path, result: EngineResult):
    """The engine's manifest: the ONNX manifest's facts and I/O, with the engine facts."""
    from cfg_export.runtime.engine import ENGINE_FILE

    options = plan.options
    engine = {
        "tensorrt": trt_version,
        "gpu": device.name,
        "compute_capability": device.compute_capability,
        "route": plan.route.name,
        "strongly_typed": plan.route.strongly_typed,
        "profiles": [p.to_dict() for p in plan.profiles],
        "source_onnx": source.name if source.parent == plan.out_dir else str(source),
        "source_onnx_sha256": sha256_file(source),
        "keep_fp32": list(plan.keep_fp32) if plan.keep_fp32 is not None else None,
        "fp32_layers": result.constrained if result.constrained else (len(result.fp16.kept) if result.fp16 else 0),
        "dla_core": options.dla_core,
        "gpu_fallback": plan.gpu_fallback,
        "version_compatible": options.version_compatible,
        "hardware_compatibility": plan.hardware_compat.value,
        "workspace_mib": options.workspace_mib,
        "optimization_level": options.optimization_level,
        "rebuild": rebuild_command(plan),
    }
    producer = {**plan.manifest.producer, "cfg_export": __version__, "tensorrt": trt_version}
    return replace(plan.manifest, model_file=ENGINE_FILE, precision=plan.route.precision_label,
                   producer=producer, engine=engine)


@dataclass
class TrtexecResult:
    plan: EnginePlan
    argv: list[str]  # the trtexec command line
    fp16: object = None  # cfg_export.fp16.Fp16Result, when the typed route wrote model.fp16.onnx
    assumed: bool = False  # no version was given and none is installed: the default (10) was used


def prepare_trtexec(artifact: "Artifact | str | Path", out_dir: str | Path | None = None,
                    trt_version: str | None = None, options: EngineOptions | None = None, stage: str = "denoiser",
                    sizes: dict[str, tuple[int, int, int]] | None = None) -> TrtexecResult:
    """Returns the trtexec command that builds what build_engine would, for TensorRT
    `trt_version` (default: the installed one, else 10). Needs no TensorRT; on the typed
    FP16 route it writes the FP16-typed ONNX the command reads (model.fp16.onnx)."""
    from cfg_export.build.plan import trtexec_command

    version = trt_version or installed_trt_version()
    plan = plan_engine(artifact, out_dir, version, options, stage, sizes)
    result = TrtexecResult(plan, trtexec_command(plan), assumed=version is None)  # refusals before any write
    if plan.fp16_onnx_path is not None:
        from cfg_export.build.fp16 import write_fp16_model

        result.fp16 = write_fp16_model(plan.onnx_path, plan.fp16_onnx_path, plan.keep_fp32)
    return result
