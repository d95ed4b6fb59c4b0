"""One writer per model stage of the repository (the denoiser, each text encoder, the VAE
decoder): its config and its files.

A writer takes the opened Artifact, the resolved RepositoryOptions and the model's folder
(named after the stage); it writes config.pbtxt and version folder 1, and returns the
config text. Every stage model takes rows along Triton's batch axis and, with row
batching, a dynamic batcher, so the rows of every run in flight share its batches. The
sampler models that call them are written by sampler_models.py.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from cfg_export.runtime.artifact import DENOISER, Artifact
from cfg_export.runtime.engine import ENGINE_MANIFEST, engine_profiles
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import MANIFEST_NAME, Manifest

from .config import Word, config_text, parameters, tensor_config
from .options import RepositoryOptions, spins

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"  # the Python-backend model files
VERSION = "1"
ARTIFACT_DIR = "artifact"  # inside a version folder: the artifact files a Python model opens


def stage_manifest(artifact: Artifact, stage: str, options: RepositoryOptions) -> Manifest:
    """Returns the manifest of the model file the stage's model runs: the engine's for
    tensorrt_plan, else the ONNX model's (its sha256 checked once, here)."""
    return artifact.model_file(stage, engine=options.platform == "tensorrt_plan").manifest


def denoiser_manifest(artifact: Artifact, options: RepositoryOptions) -> Manifest:
    return stage_manifest(artifact, DENOISER, options)


# -- files ----------------------------------------------------------------------------------

def link_or_copy(source: Path, target: Path) -> None:
    """Hard-links `source` at `target` (no copy of a large model), or copies it across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_runtime(version_dir: Path) -> None:
    """Copies the torch-free runtime package beside a Python model, as `runtime/`."""
    import cfg_export.runtime

    source = Path(cfg_export.runtime.__file__).resolve().parent  # runtime/ in a checkout, cfg_export/runtime installed
    shutil.copytree(source, version_dir / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def copy_model_code(name: str, version_dir: Path, *helpers: str) -> None:
    """Copies models/<name>.py as the model's model.py, and the helper modules beside it."""
    shutil.copy2(MODELS_DIR / f"{name}.py", version_dir / "model.py")
    for helper in helpers:
        shutil.copy2(MODELS_DIR / f"{helper}.py", version_dir / f"{helper}.py")


def stage_files(artifact: Artifact, stage: str, with_model: bool, engine: bool) -> list[str]:
    """The names of the files of a stage folder that a copy of it holds: its manifests and
    the denoiser's null embedding; with `with_model`, also the ONNX model and the files
    beside it (external weights), never the engine; `engine` adds engine.json."""
    s = artifact.stage(stage)
    names = set()
    if s.onnx is not None:
        names.add(MANIFEST_NAME)
    if engine and s.engine is not None:
        names.add(ENGINE_MANIFEST)
    facts = s.manifest.facts
    null_files = [c.null_file for c in facts.conditions] if s.manifest.is_denoiser else []
    names |= {name for name in null_files if name}
    if with_model:
        engine_file = s.engine.path.name if s.engine is not None else None
        names |= {p.name for p in s.directory.iterdir()
                  if p.is_file() and p.name not in (ENGINE_MANIFEST, engine_file) and not p.name.startswith(".")}
    return sorted(names)


def copy_artifact(artifact: Artifact, target: Path, with_model: bool, engine: bool, stage: str = DENOISER) -> None:
    """Writes a one-model artifact folder at `target` from one stage (stage_files)."""
    target.mkdir(parents=True)
    for name in stage_files(artifact, stage, with_model, engine):
        link_or_copy(artifact.stage(stage).directory / name, target / name)


# -- stage models ---------------------------------------------------------------------------

def stage_rows(stage: str, manifest: Manifest, options: RepositoryOptions) -> int:
    """Returns the stage model's max_batch_size in rows: --max-rows, or for tensorrt_plan
    the largest profile of the stage's engine; raises CfgExportError when one request of
    max_images images would not fit."""
    needed = manifest.rows_per_image * options.max_images  # 2N for the denoiser and text encoders, N for the VAE
    if options.platform != "tensorrt_plan" or stage == DENOISER:  # the denoiser's was resolved with the options
        return options.max_rows
    largest = max((p.rows[2] for p in engine_profiles(manifest)), default=0)
    if largest < needed:
        raise CfgExportError(f"the {stage} engine takes at most {largest} rows, but --max-images "
                             f"{options.max_images} needs {needed}: rebuild the engines with cfg-export trt "
                             f"--max-batch {options.max_images}, or give --max-images {largest // manifest.rows_per_image}")
    return min(largest, max(options.max_rows, needed))


def stage_config(name: str, manifest: Manifest, options: RepositoryOptions) -> dict:
    """Returns a stage model's config: rows along Triton's batch axis, so the dynamic
    batcher can merge the rows of one request with those of another."""
    if manifest.batch is not None:
        raise CfgExportError(f"the {name} graph is static for N={manifest.batch} images: rows of several requests "
                             f"cannot share its batch; re-export without --batch to serve it")
    max_rows = stage_rows(name, manifest, options)
    config = {"name": name, "max_batch_size": max_rows}
    if options.platform == "python":
        config["backend"] = "python"
    else:
        config["platform"] = options.platform
    config["input"] = [tensor_config(s, batched=True) for s in manifest.inputs]
    config["output"] = [tensor_config(s, batched=True) for s in manifest.outputs]
    if options.row_batching:
        batching = {}
        if options.platform == "tensorrt_plan":
            preferred = sorted({r for p in engine_profiles(manifest) for r in (p.rows[1], p.rows[2])})
            batching["preferred_batch_size"] = [r for r in preferred if r <= max_rows]
        batching["max_queue_delay_microseconds"] = options.queue_delay_us
        config["dynamic_batching"] = batching
    # a Python model places itself (the runtime's backend picks CUDA where it has it); Triton's
    # own backends run on the GPUs
    kind = "KIND_CPU" if options.platform == "python" else "KIND_GPU"
    count = options.denoiser_instances if name == DENOISER else 1
    config["instance_group"] = [{"kind": Word(kind), "count": count}]
    if options.platform == "python":
        values = {"backend": options.backend}
        if options.threads:
            values["threads"] = options.threads
        values["spinning"] = int(spins(options))
        config["parameters"] = parameters(values)
    return config


def write_stage(artifact: Artifact, options: RepositoryOptions, model_dir: Path) -> str:
    """Writes the model of the stage named like `model_dir`: a Python model over the
    runtime's backend (with the stage's files beside it), or the ONNX model / the engine
    for Triton's own backends."""
    stage = model_dir.name
    manifest = stage_manifest(artifact, stage, options)
    text = config_text(stage_config(stage, manifest, options))
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    if options.platform == "python":
        copy_model_code("stage", version_dir)
        copy_runtime(version_dir)
        copy_artifact(artifact, version_dir / ARTIFACT_DIR, with_model=True, engine=False, stage=stage)
    elif options.platform == "onnxruntime_onnx":
        s = artifact.stage(stage)
        engine_file = s.engine.path.name if s.engine is not None else None
        for path in s.directory.iterdir():  # model.onnx and any external weights beside it
            if path.is_file() and path.name not in (MANIFEST_NAME, ENGINE_MANIFEST, engine_file) and \
                    not path.name.endswith(".npy"):
                link_or_copy(path, version_dir / ("model.onnx" if path == s.onnx.path else path.name))
    else:
        link_or_copy(artifact.model_file(stage, engine=True).path, version_dir / "model.plan")
    (model_dir / "config.pbtxt").write_text(text)
    return text
