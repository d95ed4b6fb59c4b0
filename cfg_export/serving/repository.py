"""write_repository: an artifact in, a Triton model repository out (`cfg-export triton`).

    REPO/denoiser/config.pbtxt   the stacked model, rows along the batch axis, dynamic batching
    REPO/denoiser/1/             python: model.py + runtime/ + artifact/ (the ONNX model);
                                 onnxruntime_onnx: model.onnx; tensorrt_plan: model.plan
    REPO/sampler/config.pbtxt    one request = one guided sampling run (Python backend, BLS)
    REPO/sampler/1/              model.py + runtime/ + artifact/ (manifests, null embedding)

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
from .stages import denoiser_manifest, write_denoiser, write_sampler

log = logging.getLogger(__name__)

# model name -> writer(artifact, options, model folder) -> config text; in the order written
Writer = Callable[[Artifact, RepositoryOptions, Path], str]
WRITERS: dict[str, Writer] = {"denoiser": write_denoiser, "sampler": write_sampler}
# pipeline stages with no writer yet, and what serving them needs
PROMPT_STAGES = ("tokenizer", "text_encoder", "vae_decoder")


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


def repository_models(artifact: Artifact) -> list[str]:
    """Returns the models a repository of this artifact holds; refuses stages not served yet."""
    extra = [name for name in artifact.stages if name != DENOISER]
    if extra:
        raise CfgExportError(f"{artifact.directory}: stages {', '.join(extra)} (a prompt pipeline) are not served "
                             f"yet; serve the denoiser's artifact with class or embedding conditions")
    return list(WRITERS)


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
        for name in models:
            repository.configs[name] = WRITERS[name](artifact, resolved, tmp / name)
        # the mark of a folder cfg-export wrote (so --overwrite may replace it); Triton skips plain files
        (tmp / REPOSITORY_MARKER).write_text(json.dumps({"format": REPOSITORY_FORMAT, "models": list(models),
                                                         "artifact": str(artifact.directory)}, indent=2) + "\n")
    log.info("wrote the Triton repository %s: %s", out, ", ".join(models))
    return repository
