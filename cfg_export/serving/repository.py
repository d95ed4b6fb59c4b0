"""write_repository: an artifact in, a Triton model repository out (`cfg-export triton`).

    REPO/denoiser/config.pbtxt   the stacked model, rows along the batch axis, dynamic batching
    REPO/denoiser/1/             python: model.py + runtime/ + artifact/ (the ONNX model);
                                 onnxruntime_onnx: model.onnx; tensorrt_plan: model.plan
    REPO/sampler/config.pbtxt    one request = one sampling run (Python backend, BLS)
    REPO/sampler/1/              model.py + bls.py + runtime/ + artifact/ (manifests, null
                                 embedding; for a pipeline also pipeline.json and the tokenizers)

A pipeline artifact adds one model per further stage, laid out like the denoiser:
REPO/text_encoder/, REPO/text_encoder_2/ (SDXL), REPO/vae_decoder/.

The runtime travels inside the repository: the server needs numpy and, for the python
platform, onnxruntime; never torch or cfg_export. The repository is written whole or
not at all.
"""
from __future__ import annotations

import json

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cfg_export.runtime.artifact import DENOISER, Artifact, as_artifact
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.files import check_export_target, staged_dir

from .options import RepositoryOptions, resolve_options
from .sampler_models import pipeline_model_stages, write_pipeline_sampler, write_sampler
from .stages import denoiser_manifest, write_stage

log = logging.getLogger(__name__)

# writer(artifact, options, model folder named after the model) -> config text
Writer = Callable[[Artifact, RepositoryOptions, Path], str]


@dataclass
class Repository:
    """A written model repository: its folder, the options it was written with, and each
    model's config text by name."""

    directory: Path
    options: RepositoryOptions
    configs: dict[str, str] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.configs)


def repository_models(artifact: Artifact) -> dict[str, Writer]:
    """Returns the models a repository of this artifact holds, each with its writer, in
    the order written: the denoiser and the sampler; for a pipeline, every model stage
    (text encoders, denoiser, VAE decoder) and the pipeline sampler."""
    if not artifact.is_pipeline:
        return {DENOISER: write_stage, "sampler": write_sampler}
    stages = pipeline_model_stages(artifact)
    missing = [name for name in stages if name not in artifact.stages]
    if missing:
        raise CfgExportError(f"{artifact.directory}: pipeline.json names stages {', '.join(missing)} that it does not "
                             f"list; re-export the pipeline")
    unknown = [name for name, s in artifact.stages.items() if name not in stages and s.onnx is not None]
    if unknown:
        raise CfgExportError(f"{artifact.directory}: stages {', '.join(unknown)} have no place in a served "
                             f"pipeline; expected text encoders, denoiser and vae_decoder")
    return {**{name: write_stage for name in stages}, "sampler": write_pipeline_sampler}


REPOSITORY_MARKER = "cfg-export.json"
REPOSITORY_FORMAT = "cfg-export-triton-repository/1"


def write_repository(artifact: "Artifact | str | Path", out: str | Path, options: RepositoryOptions | None = None,
                     overwrite: bool = False) -> Repository:
    """Returns the Repository written at `out` for the artifact (an Artifact or a folder):
    one model folder per stage (see the module docstring). options: RepositoryOptions
    (None: every default). Refuses a non-empty `out` unless `overwrite`."""
    artifact = as_artifact(artifact)
    check_export_target(artifact.directory, out, overwrite)  # before any work; never the artifact itself
    models = repository_models(artifact)
    resolved = resolve_options(options, denoiser_manifest(artifact, options or RepositoryOptions()))
    repository = Repository(Path(out), resolved)
    with staged_dir(out, overwrite=overwrite) as tmp:
        for name, writer in models.items():
            repository.configs[name] = writer(artifact, resolved, tmp / name)
        # the mark of a folder cfg-export wrote (so --overwrite may replace it); Triton skips plain files
        (tmp / REPOSITORY_MARKER).write_text(json.dumps({"format": REPOSITORY_FORMAT, "models": list(models),
                                                         "artifact": str(artifact.directory)}, indent=2) + "\n")
    log.info("wrote the Triton repository %s: %s", out, ", ".join(models))
    return repository
