"""cfg-export onnx: a trained guided model (or a diffusers folder) -> an artifact folder."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, say, verbosity_options


@click.command("onnx", cls=Command, context_settings=CONTEXT)
@click.argument("model")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Artifact folder to write (model.onnx + manifest.json).")
@click.option("--fuse-guidance", is_flag=True,
              help="Fused layout: inputs sample/timestep/cond/w [N]; stacking and the w mix in the graph.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Static graph for N images (2N rows when stacked). Default: dynamic batch.")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset (default 17, parsed by TensorRT 10).")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker and the ONNX Runtime vs PyTorch comparison.")
@click.option("--tolerance", type=float, default=None, help="Max relative error of the check (default 1e-4).")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact folder (only one made by cfg-export).")
@click.option("--null-class", type=click.IntRange(min=0), default=None,
              help="diffusers class-conditional model: the null class index (default: the last row of the "
                   "class embedding table; num_classes for DiT).")
@click.option("--null-embedding", metavar="FILE.npy", default=None,
              help="diffusers UNet2DConditionModel: the null condition [L, D] (for Stable Diffusion, the empty "
                   "prompt's encoding); stored in the artifact.")
@verbosity_options
def onnx_command(model, out_dir, fuse_guidance, batch, opset, no_check, tolerance, overwrite, null_class,
                 null_embedding):
    """Export MODEL (a model folder with config.json, a folder saved by diffusers'
    save_pretrained, or 'module:factory') to ONNX.

    \b
    diffusers folders: UNet2DModel and DiTTransformer2DModel (class labels),
    UNet2DConditionModel (embeddings [L, D], needs --null-embedding); a pipeline
    folder with unet/ or transformer/; the scheduler/ folder beside the model gives
    the training schedule and prediction type.

    \b
    Stacked layout (default): one graph computes the conditional and the null
    passes together: sample [2N, ...], timestep [2N], cond [2N] -> eps [2N, ...],
    first N rows conditional, last N null.
    """
    from cfg_export.export.exporter import export_onnx

    result = export_onnx(model, out_dir, layout="fused" if fuse_guidance else None, batch=batch,
                         opset=opset, check=not no_check, tolerance=tolerance, overwrite=overwrite,
                         null_class=null_class, null_embedding=null_embedding)
    for note in result.notes:
        say(f"note: {note}")
    for c in result.checks:
        say(f"check N={c.batch}: ONNX Runtime vs PyTorch max abs error {c.max_abs:.3e}, "
            f"max relative error {c.max_rel:.3e}")
    m = result.manifest
    say(f"wrote {result.directory / m.model_file} and manifest.json ({m.layout.value} layout, "
        f"opset {m.opset}, {'batch N=' + str(m.batch) if m.batch else 'dynamic batch'}) "
        f"in {result.seconds:.1f} s")
