"""cfg-export quantize: an FP32 artifact + calibration data -> a Q/DQ INT8 artifact."""
from __future__ import annotations

from pathlib import Path

import click

from cfg_export.runtime.cli import CONTEXT, Command, ProgressBar, say, verbosity_options
from cfg_export.runtime.errors import CfgExportError


@click.command("quantize", cls=Command, context_settings=CONTEXT)
@click.argument("directory", type=click.Path())
@click.option("--calib", required=True, metavar="CALIB.npz", help="Calibration file from cfg-export calibrate.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Folder of the INT8 artifact to write (model.onnx with Q/DQ nodes + manifest.json).")
@click.option("--method", default=None, metavar="NAME",
              help="Activation ranges: minmax, entropy, percentile (all steps pooled) or min-mean (ModelOpt's: "
                   "per-step percentiles, min over batches, mean over steps); default percentile.")
@click.option("--percentile", type=float, default=None, help="Percentile of the percentile and min-mean methods "
                                                             "(default 99.999).")
@click.option("--keep-fp32", multiple=True, metavar="PATTERN",
              help="Leave matching nodes in float (repeatable): @norm, @embedding, @first-conv, @last-conv, "
                   "@full-res (convolutions at the sample's resolution), @attention-matmul (MatMuls of two "
                   "activations), an op type, or a node-name glob; 'default' adds the default list (@norm "
                   "@embedding @first-conv @last-conv Softmax @attention-matmul).")
@click.option("--quantize-all", is_flag=True, help="Leave no node in float (every Conv/Gemm/MatMul in INT8).")
@click.option("--select", is_flag=True,
              help="Choose the layers left in float by measured sensitivity (implied-x0 error) against their time "
                   "in float, instead of a keep list.")
@click.option("--budget", type=float, default=None, help="With --select: the implied-x0 error to stay under at "
                                                         "every evaluated step (default 0.04).")
@click.option("--op-types", default=None, metavar="Conv,MatMul,...",
              help="Op types to quantize (default Conv,ConvTranspose,Gemm,MatMul).")
@click.option("--smoothquant", type=float, default=None, metavar="ALPHA",
              help="SmoothQuant the Linear layers (MatMul/Gemm with constant weights) with migration strength "
                   "ALPHA (0.5 in the paper).")
@click.option("--schedule", default=None, metavar="auto|none|LO-HI,...",
              help="Per-step precision: run the timesteps LO..HI in FP32 (the FP32 model goes into OUT/float), "
                   "'auto' for the recorded steps whose implied-x0 error is above 5%; default none.")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--reduce-range", is_flag=True, help="7-bit weights (x86 CPUs without VNNI; ONNX Runtime only).")
@click.option("--activation-type", default=None, metavar="int8|uint8",
              help="int8: symmetric, for TensorRT and ONNX Runtime (default); uint8: asymmetric, ONNX Runtime only.")
@click.option("--no-cpu-fusion", is_flag=True,
              help="Keep onnxruntime's Q/DQ arrangement as it is (by default each quantized layer gets its own "
                   "Q/DQ pair, so that ONNX Runtime's CPU kernels fuse it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--report", is_flag=True, help="Measure and print the quality report against the FP32 model.")
@click.option("--classifier", metavar="FILE.onnx", default=None,
              help="With --report: the classifier of the metrics (default the digits one).")
@click.option("--reference", metavar="FILE.npz", default=None,
              help="With --report: real-data feature statistics of the Frechet distance (default the digits ones).")
@click.option("--no-metrics", is_flag=True, help="With --report: skip the classifier metrics.")
@click.option("--report-n", type=int, default=None, help="With --report: images per class (default 4).")
@click.option("--report-steps", type=int, default=None, help="With --report: sampler steps (default 50).")
@verbosity_options
def quantize_command(directory, calib, out_dir, method, percentile, keep_fp32, quantize_all, select, budget, op_types,
                     smoothquant, schedule, per_tensor, reduce_range, activation_type, no_cpu_fusion, overwrite, report,
                     classifier, reference, no_metrics, report_n, report_steps):
    """Quantize the FP32 artifact DIR to INT8 (explicit Q/DQ, ONNX Runtime's quantization
    tools) with activation ranges from CALIB.npz; write a new artifact to OUT that ONNX
    Runtime runs on the CPU and TensorRT builds as INT8:
    cfg-export trt DIR --int8 --int8-onnx OUT/model.onnx.
    """
    from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact

    if sum(bool(x) for x in (quantize_all, keep_fp32, select)) > 1:
        if select:
            raise CfgExportError("--select chooses the float layers itself: drop --keep-fp32 and --quantize-all")
        raise CfgExportError("--quantize-all and --keep-fp32: give one of the two")
    if budget is not None and not select:
        raise CfgExportError("--budget applies with --select: add it")
    if not report and (classifier or reference or no_metrics or report_n or report_steps):
        raise CfgExportError("--classifier, --reference, --no-metrics, --report-n and --report-steps apply with "
                             "--report: add it")
    for path, option in ((classifier, "--classifier"), (reference, "--reference")):
        if path is not None and not Path(path).is_file():  # before the work, not after it
            raise CfgExportError(f"{option} {path}: no such file; give an existing file, or leave {option} out "
                                 f"for the digits one")
    if schedule is not None and schedule not in ("auto", "none"):
        from cfg_export.calibration.precision import parse_schedule

        schedule = parse_schedule(schedule)
    options = QuantizeOptions(method=method, keep_fp32=() if quantize_all else (keep_fp32 or None),
                              op_types=[t.strip() for t in op_types.split(",")] if op_types is not None else None,
                              per_channel=False if per_tensor else None, reduce_range=reduce_range or None,
                              activation_type=activation_type, percentile=percentile,
                              cpu_fusion=False if no_cpu_fusion else None, smoothquant=smoothquant)
    with ProgressBar("calibrating") as bar:
        result = quantize_artifact(directory, calib, out_dir, options, overwrite=overwrite, select=select,
                                   budget=budget, schedule=schedule, progress=bar)
    for note in result.notes:
        say(f"note: {note}")
    q = result.manifest.producer["quantization"]
    say(f"wrote {result.directory / result.manifest.model_file} and manifest.json ({result.manifest.precision}: "
        f"{len(result.quantized)} layers in INT8, {len(result.kept)} nodes left in float; {q['method']} ranges from "
        f"{q['calibration_steps']} recorded steps) in {result.seconds:.1f} s")
    if report:
        from cfg_export.evaluation.int8 import compare_int8

        with ProgressBar("measuring") as bar:
            quality = compare_int8(directory, out_dir, n=report_n, steps=report_steps, classifier=classifier,
                                   reference=reference, metrics=not no_metrics, progress=bar)
        for line in quality.lines():
            say(line)
