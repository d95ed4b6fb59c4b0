"""cfg-export trt: an artifact's ONNX -> a TensorRT engine, or the equivalent trtexec line."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, say, verbosity_options
from cfg_export.runtime.errors import CfgExportError


@click.command("trt", cls=Command, context_settings=CONTEXT)
@click.argument("directory", type=click.Path())
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for model.engine and engine.json (default: DIR).")
@click.option("--fp16", is_flag=True, help="FP16 (TensorRT 10: builder flag; 11: an FP16-typed ONNX made here).")
@click.option("--int8", is_flag=True, help="INT8 from --int8-onnx (Q/DQ) or --calibration-data (TensorRT 10 only).")
@click.option("--int8-onnx", metavar="MODEL.onnx", default=None,
              help="Q/DQ model from cfg-export quantize (its model.onnx).")
@click.option("--calibration-data", metavar="FILE.npz", default=None,
              help="Recorded inputs (one array per input, rows first) for TensorRT 10's implicit calibrator.")
@click.option("--keep-fp32", multiple=True, metavar="PATTERN",
              help="With --fp16: keep matching nodes in FP32 (repeatable): @norm, @embedding, @first-conv, "
                   "@last-conv, an op type, or a node-name glob; 'default' adds the default list "
                   "(@norm Softmax @embedding @first-conv @last-conv), 'none' keeps nothing.")
@click.option("--strongly-typed", is_flag=True, default=None,
              help="On TensorRT 10 too, take FP16 from an FP16-typed ONNX (always so on 11).")
@click.option("--min-batch", type=int, default=None, help="Profile: fewest images N (default 1).")
@click.option("--opt-batch", type=int, default=None, help="Profile: images N to tune for (default 4).")
@click.option("--max-batch", type=int, default=None, help="Profile: most images N (default 16).")
@click.option("--interval-profile", is_flag=True, help="A second profile for the calls of fewer than 2N rows "
              "(stacked layout): steps outside a guidance interval (N rows) and adaptive or cached guidance "
              "(N to 2N rows); with it every row count from N_min to 2 N_max has a profile.")
@click.option("--workspace", "workspace_mib", type=int, default=None, help="Workspace limit in MiB.")
@click.option("--opt-level", "optimization_level", type=int, default=None,
              help="Builder optimization level 0..5 (TensorRT's default 3).")
@click.option("--timing-cache", metavar="FILE", default=None, help="Timing cache to read and update.")
@click.option("--dla-core", type=int, default=None, help="Jetson: build for this DLA core (GPU fallback on).")
@click.option("--no-gpu-fallback", is_flag=True, help="With --dla-core: fail on layers the DLA cannot run.")
@click.option("--hardware-compat", type=click.Choice(["none", "ampere+", "same-cc"]), default=None,
              help="Engine for other GPUs too: ampere+ (compute capability >= 8.0) or same-cc.")
@click.option("--version-compatible", is_flag=True, help="Engine for later TensorRT versions too.")
@click.option("--print-trtexec", is_flag=True, help="Print the equivalent trtexec command instead (no TensorRT "
              "needed); on the strongly typed route it writes the FP16-typed ONNX it reads.")
@click.option("--trt-version", default=None, help="With --print-trtexec: the device's TensorRT version "
              "(default: the installed one, else 10).")
@verbosity_options
def trt_command(directory, out_dir, print_trtexec, trt_version, no_gpu_fallback, keep_fp32, **options):
    """Build a TensorRT engine from the artifact DIR (made by cfg-export onnx).

    \b
    Profiles are in images N: the engine's batch is 2N rows for the stacked
    layout, N for the fused one. Writes model.engine and engine.json (TensorRT
    version, GPU, compute capability, profiles, precision, source ONNX sha256).
    """
    from cfg_export.build.builder import build_engine, prepare_trtexec
    from cfg_export.build.plan import EngineOptions, format_command

    engine_options = EngineOptions(keep_fp32=keep_fp32 or None, gpu_fallback=False if no_gpu_fallback else None,
                                   **options)
    from cfg_export.runtime.artifact import Artifact

    artifact = Artifact.open(directory)
    if trt_version is not None and not print_trtexec:
        raise CfgExportError(f"--trt-version {trt_version}: applies to --print-trtexec; a build uses the "
                             f"installed TensorRT")
    if artifact.is_pipeline:
        _pipeline_engines(artifact, out_dir, print_trtexec, trt_version, engine_options)
        return
    if print_trtexec:
        result = prepare_trtexec(directory, out_dir, trt_version, engine_options)
        if result.fp16 is not None:
            click.echo(f"# wrote {result.plan.fp16_onnx_path} ({len(result.fp16.kept)} nodes kept in FP32)")
        assumed = " (assumed: none installed; choose with --trt-version)" if result.assumed else ""
        click.echo(f"# TensorRT {result.plan.route.version}{assumed}: {result.plan.route.name}")
        click.echo(format_command(result.argv))
        return
    result = build_engine(directory, out_dir, engine_options)
    for note in result.notes:
        say(f"note: {note}")
    engine, plan = result.manifest.engine, result.plan
    rows = ", ".join(f"{p.rows[0]}..{p.rows[2]} (opt {p.rows[1]})" for p in plan.profiles) or "static"
    say(f"wrote {plan.engine_path} and {plan.manifest_path.name} ({plan.route.name}, TensorRT {engine['tensorrt']} "
        f"on {engine['gpu']}, compute capability {engine['compute_capability']}, rows {rows}) "
        f"in {result.seconds:.1f} s")


def _pipeline_engines(artifact, out_dir, print_trtexec, trt_version, engine_options) -> None:
    """`trt` on a pipeline artifact: one engine per stage (or one trtexec line per stage)."""
    from cfg_export.build.pipeline_engines import build_pipeline_engines, prepare_pipeline_trtexec
    from cfg_export.build.plan import format_command

    if out_dir is not None:
        raise CfgExportError("-o: a pipeline's engines are written in their stage folders; drop -o")
    if print_trtexec:
        for stage, result, note in prepare_pipeline_trtexec(artifact, trt_version, engine_options):
            if note:
                click.echo(f"# {note}")
            if result.fp16 is not None:
                click.echo(f"# wrote {result.plan.fp16_onnx_path} ({len(result.fp16.kept)} nodes kept in FP32)")
            click.echo(f"# {stage}: TensorRT {result.plan.route.version}: {result.plan.route.name}")
            click.echo(format_command(result.argv))
        return
    for result in build_pipeline_engines(artifact, engine_options):
        for note in result.notes:
            say(f"note: {note}")
        plan = result.plan
        rows = ", ".join(f"{p.rows[0]}..{p.rows[2]} (opt {p.rows[1]})" for p in plan.profiles) or "static"
        say(f"wrote {plan.engine_path} ({plan.route.name}, rows {rows}) in {result.seconds:.1f} s")
