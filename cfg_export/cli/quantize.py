"""cfg-export quantize: an FP32 artifact + calibration data -> a Q/DQ INT8 artifact."""
from __future__ import annotations

from pathlib import Path

import click

from cfg_export.runtime.cli import CONTEXT, Command, ProgressBar, parse_list, say, verbosity_options
from cfg_export.runtime.errors import CfgExportError


@click.command("quantize", cls=Command, context_settings=CONTEXT)
@click.argument("directory", type=click.Path())
@click.option("--calib", required=True, metavar="CALIB.npz", help="Calibration file from cfg-export calibrate.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Folder of the INT8 artifact to write (model.onnx with Q/DQ nodes + manifest.json).")
@click.option("--method", default=None, metavar="NAME",
              help="Activation calibration: minmax, entropy or percentile (default percentile).")
@click.option("--keep-fp32", multiple=True, metavar="PATTERN",
              help="Leave matching nodes in float (repeatable): @norm, @embedding, @first-conv, @last-conv, "
                   "@full-res (convolutions at the sample's resolution), an op type, or a node-name glob; "
                   "'default' adds the default list (@norm @embedding @first-conv @last-conv Softmax).")
@click.option("--quantize-all", is_flag=True, help="Leave no node in float (every Conv/Gemm/MatMul in INT8).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--reduce-range", is_flag=True, help="7-bit weights (x86 CPUs without VNNI; ONNX Runtime only).")
@click.option("--activation-type", default=None, metavar="int8|uint8",
              help="int8: symmetric, for TensorRT and ONNX Runtime (default); uint8: asymmetric, ONNX Runtime only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--report", is_flag=True, help="Measure and print the quality report against the FP32 model.")
@click.option("--classifier", metavar="FILE.onnx", default=None,
              help="With --report: score both sample sets with this classifier (samples in, logits out).")
@click.option("--report-n", type=int, default=None, help="With --report: images per class (default 4).")
@click.option("--report-steps", type=int, default=None, help="With --report: sampler steps (default 50).")
@verbosity_options
def quantize_command(directory, calib, out_dir, method, keep_fp32, quantize_all, per_tensor, reduce_range,
                     activation_type, overwrite, report, classifier, report_n, report_steps):
    """Quantize the FP32 artifact DIR to INT8 (explicit Q/DQ, ONNX Runtime's quantization
    tools) with activation ranges from CALIB.npz; write a new artifact to OUT that ONNX
    Runtime runs on the CPU and TensorRT builds as INT8:
    cfg-export trt DIR --int8 --int8-onnx OUT/model.onnx.
    """
    from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact

    if quantize_all and keep_fp32:
        raise CfgExportError("--quantize-all and --keep-fp32: give one of the two")
    if not report and (classifier or report_n or report_steps):
        raise CfgExportError("--classifier, --report-n and --report-steps apply with --report: add it")
    if classifier is not None and not Path(classifier).is_file():  # before the work, not after it
        raise CfgExportError(f"--classifier {classifier}: no such file; expected an ONNX classifier taking the samples")
    options = QuantizeOptions(method=method, keep_fp32=() if quantize_all else (keep_fp32 or None),
                              per_channel=False if per_tensor else None, reduce_range=reduce_range or None,
                              activation_type=activation_type)
    with ProgressBar("calibrating") as bar:
        result = quantize_artifact(directory, calib, out_dir, options, overwrite=overwrite, progress=bar)
    for note in result.notes:
        say(f"note: {note}")
    q = result.manifest.producer["quantization"]
    say(f"wrote {result.directory / result.manifest.model_file} and manifest.json ({result.manifest.precision}: "
        f"{len(result.quantized)} layers in INT8, {len(result.kept)} nodes left in float; {q['method']} ranges from "
        f"{q['calibration_steps']} recorded steps) in {result.seconds:.1f} s")
    if report:
        from cfg_export.calibration.report import measure_quality

        with ProgressBar("measuring") as bar:
            quality = measure_quality(directory, out_dir, n=report_n, steps=report_steps, classifier=classifier,
                                      progress=bar)
        for line in quality.lines():
            say(line)
