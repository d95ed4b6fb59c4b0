"""export_pipeline: a diffusers pipeline folder (saved by save_pretrained, with
model_index.json) -> a pipeline artifact, one stage per model:

    OUT/pipeline.json          the stage table, the scheduler config (whole), image sizes,
                               the prompt facts, class names (DiT)
    OUT/tokenizer/             tokenizer.json (read on the device by the `tokenizers` package)
    OUT/text_encoder/          input_ids [2N, L] -> the hidden states the pipeline uses
                               (tokenizer_2, text_encoder_2: SDXL, SD3; tokenizer_3, text_encoder_3: SD3's T5)
    OUT/denoiser/              the stacked 2N graph, every condition input with its null
    OUT/vae_decoder/           latents [N, C, h, w] -> images [N, 3, H, W]

Supported: StableDiffusionPipeline (1.x, 2.x; eps or v), StableDiffusionXLPipeline,
StableDiffusion3Pipeline (flow matching), DiTPipeline. Everything is loaded from the
folder with local_files_only: nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from cfg_export import __version__
from cfg_export.export.stage_onnx import StageCheck
from cfg_export.runtime.artifact import PIPELINE_FORMAT, PIPELINE_NAME
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.validation import read_json
from cfg_export.runtime.files import check_export_target, staged_dir

log = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                       "DiTPipeline")
DEFAULT_TOLERANCE = 1e-4  # max relative error of ONNX Runtime against PyTorch, per stage

# the components each pipeline class needs: (model_index key, what it is)
COMPONENTS = {
    "StableDiffusionPipeline": ("tokenizer", "text_encoder", "unet", "vae", "scheduler"),
    "StableDiffusionXLPipeline": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae",
                                  "scheduler"),
    "StableDiffusion3Pipeline": ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2",
                                 "text_encoder_3", "transformer", "vae", "scheduler"),
    "DiTPipeline": ("transformer", "vae", "scheduler"),
}
# what a component is, for messages about one that is missing
COMPONENT_NAMES = {"text_encoder_2": "its second text encoder", "text_encoder_3": "its T5 text encoder",
                   "tokenizer_3": "its T5 tokenizer"}


TOKENIZER_SOURCES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("spiece.model",))
MODEL_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")


@dataclass
class PipelineExportResult:
    directory: Path
    pipeline: str  # the diffusers class
    stages: dict[str, str] = field(default_factory=dict)  # stage -> what was written
    checks: list[StageCheck] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def is_pipeline_folder(path: str | Path) -> bool:
    """True for a folder saved by a diffusers pipeline's save_pretrained (it has model_index.json)."""
    return (Path(path) / PIPELINE_INDEX).is_file()


def check_component_files(folder: Path, key: str, class_name: str) -> None:
    """Raises CfgExportError when a component's folder or its files are missing."""
    sub = folder / key
    if not sub.is_dir():
        raise CfgExportError(f"{folder}: model_index.json names {key} ({class_name}) but {sub} is missing; "
                             f"save the whole pipeline with save_pretrained")
    if key.startswith("tokenizer"):
        if not any(all((sub / f).is_file() for f in files) for files in TOKENIZER_SOURCES):
            raise CfgExportError(f"{sub}: no tokenizer files (expected tokenizer.json, or vocab.json and merges.txt, "
                                 f"or spiece.model); save the pipeline's tokenizer with save_pretrained")
    elif key == "scheduler":
        if not (sub / "scheduler_config.json").is_file():
            raise CfgExportError(f"{sub}: no scheduler_config.json; save the pipeline's scheduler with "
                                 f"save_pretrained")
    elif not (sub / "config.json").is_file() or not any((sub / f).is_file() for f in MODEL_WEIGHTS):
        raise CfgExportError(f"{sub}: no config.json and weights ({' or '.join(MODEL_WEIGHTS[:2])}); save the "
                             f"pipeline with save_pretrained")


def read_model_index(folder: Path) -> tuple[str, dict]:
    """Returns (pipeline class, model_index dict); refuses unsupported classes and missing components."""
    path = folder / PIPELINE_INDEX
    index = read_json(path, f"{path} (expected the model_index.json of save_pretrained)")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in SUPPORTED_PIPELINES:
        raise CfgExportError(f"{path}: pipeline class {name!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_PIPELINES)}")
    for key in COMPONENTS[name]:
        entry = index.get(key)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            what = COMPONENT_NAMES.get(key, key)
            raise CfgExportError(f"{folder}: {name} without {key} ({what} is null or absent in {PIPELINE_INDEX}); "
                                 f"cfg-export needs every stage: {', '.join(COMPONENTS[name])}")
        check_component_files(folder, key, entry[1])
    return name, index


def export_pipeline(folder: str | Path, out_dir: str | Path, *, min_size: int | tuple[int, int] | None = None,
                    max_size: int | tuple[int, int] | None = None, opset: int | None = None, check: bool = True,
                    tolerance: float | None = None, overwrite: bool = False,
                    external_data_bytes: int | None = None) -> PipelineExportResult:
    """Returns what was written: a pipeline artifact in out_dir (see the module doc) for the
    diffusers pipeline folder `folder`.

    min_size, max_size: the image sizes in pixels (one number: square) the UNet graphs
    take, default half and twice the model's own size (SD3: at most what its position
    embedding covers); DiT is exported at its own size. Every stage is checked against PyTorch (ONNX Runtime on
    the CPU, relative error at most `tolerance`, default 1e-4) unless check is False.
    Weights over external_data_bytes (default just under 2 GiB) go to ONNX external
    data. Nothing is left in out_dir on failure.
    """
    require("torch", "export")
    from cfg_export.export import pipeline_parts as parts
    from cfg_export.export.exporter import check_tolerance, export_opset

    start = time.perf_counter()
    folder = Path(folder)
    tolerance = check_tolerance(tolerance)
    check_export_target(folder, out_dir, overwrite)
    name, index = read_model_index(folder)
    options = parts.ExportOptions(opset=export_opset(opset), check=check,
                                  tolerance=tolerance,
                                  external_data_bytes=external_data_bytes, min_size=min_size, max_size=max_size)
    result = PipelineExportResult(Path(out_dir), name)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        writer = parts.StageWriter(tmp, options, result)
        if name == "DiTPipeline":
            facts = parts.export_dit(folder, index, writer)
        elif name == "StableDiffusion3Pipeline":
            from cfg_export.export.pipeline_sd3 import export_sd3

            facts = export_sd3(folder, index, writer)
        else:
            facts = parts.export_stable_diffusion(folder, name, writer)
        worst = max((c.max_rel for c in result.checks), default=0.0)
        if worst > options.tolerance:
            bad = max(result.checks, key=lambda c: c.max_rel)
            raise CfgExportError(f"ONNX Runtime differs from PyTorch in stage {bad.stage} ({bad.what}): max relative "
                                 f"error {worst:.2e} > tolerance {options.tolerance:.0e}; nothing written (pass "
                                 f"--tolerance or --no-check)")
        pipeline = {"format": PIPELINE_FORMAT, "pipeline": name, "stages": writer.table, **facts,
                    "scheduler": parts.read_scheduler_config(folder),
                    "producer": {"cfg_export": __version__, "source": str(folder), **writer.versions()}}
        (tmp / PIPELINE_NAME).write_text(json.dumps(pipeline, indent=2) + "\n")
    result.seconds = time.perf_counter() - start
    return result

