"""One TensorRT engine per stage of a pipeline artifact, each with its own profiles:
text encoders 2N rows, the denoiser 2N rows, the VAE decoder N rows, and the spatial
range of the export (image_size in pipeline.json, in latents for the denoiser and the
VAE). A VAE whose config says force_upcast (SDXL's: it overflows in FP16) and a T5 text
encoder (SD3's) stay FP32 in an FP16 build. Each engine is written in its stage folder
(model.engine + engine.json).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from cfg_export.build.plan import EngineOptions
from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    stage: str
    options: EngineOptions
    sizes: dict[str, tuple[int, int, int]] | None
    note: str | None = None


def model_stages(artifact: Artifact) -> list[str]:
    return [name for name, entry in artifact.pipeline["stages"].items() if entry.get("model", True)]


def plan_stages(artifact: "Artifact | str | Path", options: EngineOptions | None = None) -> list[StagePlan]:
    """Returns each model stage with the options and spatial sizes of its engine."""
    artifact = as_artifact(artifact)
    if not artifact.is_pipeline:
        raise CfgExportError(f"{artifact.directory}: not a pipeline artifact (no pipeline.json)")
    options = options or EngineOptions()
    image = artifact.pipeline["image_size"]
    plans = []
    for stage in model_stages(artifact):
        manifest = artifact.model_file(stage, engine=False).manifest
        names = {size for spec in manifest.inputs for size in spec.shape[1:] if isinstance(size, str)}
        sizes, note, stage_options = None, None, options
        if names:
            scale = artifact.model_file("vae_decoder", engine=False).manifest.facts.scale
            sizes = {name: tuple(image[k][axis] // scale for k in ("min", "opt", "max"))
                     for name, axis in (("H", 0), ("W", 1)) if name in names}
        if stage == "vae_decoder" and options.fp16 and manifest.facts.force_upcast:
            stage_options = replace(options, fp16=False, keep_fp32=None)
            note = "vae_decoder stays FP32: its config says force_upcast (it overflows in FP16)"
        elif options.fp16 and getattr(manifest.facts, "family", None) == "t5":
            stage_options = replace(options, fp16=False, keep_fp32=None)
            note = (f"{stage} stays FP32: T5 encoders overflow FP16 (transformers clamps their activations only "
                    f"when PyTorch runs them in FP16; the exported graph has no clamps)")
        plans.append(StagePlan(stage, stage_options, sizes, note))
    return plans


def build_pipeline_engines(artifact: "Artifact | str | Path", options: EngineOptions | None = None) -> list:
    """Returns one cfg_export.build.builder.EngineResult per model stage, each engine built
    into its stage folder; raises CfgExportError (no partial engine file) like build_engine."""
    from cfg_export.build.builder import build_engine

    artifact = as_artifact(artifact)
    results = []
    for plan in plan_stages(artifact, options):
        log.info("building the %s engine", plan.stage)
        result = build_engine(artifact, None, plan.options, plan.stage, plan.sizes)
        if plan.note:
            result.notes.append(plan.note)
        results.append(result)
    return results


def prepare_pipeline_trtexec(artifact: "Artifact | str | Path", trt_version: str | None = None,
                             options: EngineOptions | None = None) -> list:
    """Returns (stage, TrtexecResult, note) per model stage: the trtexec line that builds
    what build_pipeline_engines would. Needs no TensorRT."""
    from cfg_export.build.builder import prepare_trtexec

    artifact = as_artifact(artifact)
    return [(plan.stage, prepare_trtexec(artifact, None, trt_version, plan.options, plan.stage, plan.sizes),
             plan.note) for plan in plan_stages(artifact, options)]
