"""The `cfg-export` command: a thin click layer over the library.

Each command parses options, calls one public function and prints what it returns.
Options left unset are passed as None so that the library owns every default.
Heavy modules (torch, onnx, onnxruntime) are imported inside the commands.
"""
from __future__ import annotations

import logging

import click

from cfg_export import __version__
from runtime.errors import CfgExportError


class _Group(click.Group):
    """Turns CfgExportError into one 'Error: ...' line and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CfgExportError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cfg-export")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(verbose: int, quiet: bool) -> None:
    """Classifier-free-guidance diffusion models from PyTorch to ONNX Runtime and TensorRT.

    \b
    Guidance weight w follows Ho & Salimans 2021 (eq. 6):
        eps = (1 + w) * eps(z, c) - w * eps(z, null)
    diffusers' guidance_scale s is 1 + w.
    """
    click.get_current_context().obj = {"quiet": quiet}
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def say(message: str) -> None:
    """Prints a result line unless -q was given."""
    if not click.get_current_context().find_root().obj.get("quiet"):
        click.echo(message)


@main.command("onnx")
@click.argument("model")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder to write (model.onnx + manifest.json).")
@click.option("--fuse-guidance", is_flag=True,
              help="Fused layout: inputs sample/timestep/cond/w [N]; stacking and the w mix in the graph.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Static graph for N images (2N rows when stacked). Default: dynamic batch.")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset (default 17, parsed by TensorRT 10).")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker and the ONNX Runtime vs PyTorch comparison.")
@click.option("--tolerance", type=float, default=None, help="Max relative error of the check (default 1e-4).")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact folder.")
def onnx_command(model, out_dir, fuse_guidance, batch, opset, no_check, tolerance, overwrite):
    """Export MODEL (a model folder with config.json, or 'module:factory') to ONNX.

    \b
    Stacked layout (default): one graph computes the conditional and the null
    passes together: sample [2N, ...], timestep [2N], cond [2N] -> eps [2N, ...],
    first N rows conditional, last N null.
    """
    from cfg_export.export import export_onnx

    result = export_onnx(model, out_dir, layout="fused" if fuse_guidance else "stacked", batch=batch,
                         opset=opset, check=not no_check, tolerance=tolerance, overwrite=overwrite)
    for note in result.notes:
        say(f"note: {note}")
    for c in result.checks:
        say(f"check N={c.batch}: ONNX Runtime vs PyTorch max abs error {c.max_abs:.3e}, "
                   f"max relative error {c.max_rel:.3e}")
    m = result.manifest
    say(f"wrote {result.directory / m.model_file} and manifest.json ({m.layout.value} layout, "
               f"opset {m.opset}, {'batch N=' + str(m.batch) if m.batch else 'dynamic batch'}) "
               f"in {result.seconds:.1f} s")


@main.command("sample", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def sample_command(ctx):
    """Guided sampling from an artifact (same as `python -m runtime sample`; --help for options)."""
    from runtime.cli import main as runtime_main

    ctx.exit(runtime_main(["sample", *ctx.args], prog="cfg-export"))
