"""The `cfg-export` command: one click group, one module per verb, each a thin layer
that parses options, calls one public library function and prints what it returns.

Options left unset are passed as None so that the library owns every default. Heavy
modules (torch, onnx, onnxruntime, tensorrt) are imported inside the commands. The
shared layer (errors as one line, -v/-q on every verb, the progress bar) and the
`sample` command come from the runtime's CLI, so `cfg-export sample` and
`python -m runtime sample` are the same command.
"""
from __future__ import annotations

import click

from cfg_export import __version__
from cfg_export.cli import bench, calibrate, engine, evaluate, export, quantize, serve
from cfg_export.runtime.cli import CONTEXT, Group, sample, verbosity_options


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cfg-export")
@verbosity_options
def main() -> None:
    """Classifier-free-guidance diffusion models from PyTorch to ONNX Runtime and TensorRT.

    \b
    Guidance weight w follows Ho & Salimans 2021 (eq. 6):
        eps = (1 + w) * eps(z, c) - w * eps(z, null)
    diffusers' guidance_scale s is 1 + w.
    """


for command in (export.onnx_command, engine.trt_command, sample, calibrate.calibrate_command,
                quantize.quantize_command, bench.bench_command, evaluate.eval_command, serve.triton_command,
                serve.serve_command, serve.request_command):
    main.add_command(command)
