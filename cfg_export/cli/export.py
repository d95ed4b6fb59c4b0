"""cfg-export onnx: a trained guided model (or a diffusers folder) -> an artifact folder."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, say, verbosity_options
from cfg_export.runtime.errors import CfgExportError


@click.command("onnx", cls=Command, context_settings=CONTEXT)
@click.argument("model")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Artifact folder to write (model.onnx + manifest.json).")
@click.option("--fuse-guidance", is_flag=True,
              help="Fused layout: inputs sample/timestep/cond/w [N]; stacking and the w mix in the graph.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Static graph for N images (2N rows when stacked; N at most 1024). Default: dynamic batch.")
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
@click.option("--min-size", default=None, metavar="PX|HxW",
              help="Pipeline folder: the smallest image size the UNet graphs take (default half the model's size).")
@click.option("--max-size", default=None, metavar="PX|HxW",
              help="Pipeline folder: the largest image size (default twice the model's size).")
@verbosity_options
def onnx_command(model, out_dir, fuse_guidance, batch, opset, no_check, tolerance, overwrite, null_class,
                 null_embedding, min_size, max_size):
    """Export MODEL (a model folder with config.json, a folder saved by diffusers'
    save_pretrained, or 'module:factory') to ONNX.

    \b
    A diffusers pipeline folder (with model_index.json: StableDiffusionPipeline,
    StableDiffusionXLPipeline, StableDiffusion3Pipeline, DiTPipeline) exports whole:
    tokenizers, text encoders, the stacked denoiser and the VAE decoder, one stage
    each; then `cfg-export sample OUT --prompt TEXT`.
    A model folder alone: UNet2DModel and DiTTransformer2DModel (class labels),
    UNet2DConditionModel (embeddings [L, D], needs --null-embedding),
    SD3Transformer2DModel; the scheduler/ folder beside it gives the training
    schedule and prediction type.

    \b
    Stacked layout (default): one graph computes the conditional and the null
    passes together: sample [2N, ...], timestep [2N], cond [2N] -> eps [2N, ...],
    first N rows conditional, last N null.
    """
    from cfg_export.export.pipelines import is_pipeline_folder

    if is_pipeline_folder(model):
        _export_pipeline(model, out_dir, fuse_guidance, batch, opset, no_check, tolerance, overwrite, null_class,
                         null_embedding, min_size, max_size)
        return
    if min_size is not None or max_size is not None:
        raise CfgExportError("--min-size/--max-size: apply to diffusers pipeline folders (with model_index.json)")
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


def parse_size(text: str | None, flag: str):
    """Returns pixels from '512' or '512x768' (height x width), None when not given."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise CfgExportError(f"{flag}: got {text!r}, expected pixels like 512 or 512x768 (height x width)")
    return values[0] if len(values) == 1 else tuple(values)


def _export_pipeline(model, out_dir, fuse_guidance, batch, opset, no_check, tolerance, overwrite, null_class,
                     null_embedding, min_size, max_size) -> None:
    """`onnx` on a diffusers pipeline folder: one stage per model."""
    from cfg_export.export.pipelines import export_pipeline

    for flag, value in (("--fuse-guidance", fuse_guidance), ("--batch", batch), ("--null-class", null_class),
                        ("--null-embedding", null_embedding)):
        if value not in (None, False):
            raise CfgExportError(f"{flag}: not an option of a pipeline export (the pipeline states its null "
                                 f"conditions; the denoiser is stacked with a dynamic batch)")
    result = export_pipeline(model, out_dir, min_size=parse_size(min_size, "--min-size"),
                             max_size=parse_size(max_size, "--max-size"), opset=opset, check=not no_check,
                             tolerance=tolerance, overwrite=overwrite)
    for note in result.notes:
        say(f"note: {note}")
    for c in result.checks:
        say(f"check {c.stage} {c.what}: ONNX Runtime vs PyTorch max abs error {c.max_abs:.3e}, "
            f"max relative error {c.max_rel:.3e}")
    for stage, what in result.stages.items():
        seconds = result.stage_seconds.get(stage)
        say(f"stage {stage}: {what}" + (f" in {seconds:.1f} s" if seconds is not None else ""))
    say(f"wrote {result.directory} ({result.pipeline}, {len(result.stages)} stages) in {result.seconds:.1f} s")
