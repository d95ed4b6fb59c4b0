"""One writer per Triton model of the repository: its config and its files.

A writer takes the opened Artifact, the resolved RepositoryOptions and the model's
folder; it writes config.pbtxt and version folder 1, and returns the config text. The
repository writer (repository.py) runs the writers of the stages an artifact has:
`denoiser` and `sampler` for every artifact; a pipeline's `text_encoder` and
`vae_decoder` are further writers of the same shape.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from cfg_export.runtime.artifact import DENOISER, Artifact
from cfg_export.runtime.engine import ENGINE_MANIFEST, engine_profiles
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import MANIFEST_NAME, ConditionKind, Manifest, TensorSpec

from .config import Word, config_text, parameters, tensor_config, triton_dtype
from .options import RepositoryOptions

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"  # the Python-backend model files
VERSION = "1"
ARTIFACT_DIR = "artifact"  # inside a version folder: the artifact files a Python model opens
SAMPLES = "samples"  # the sampler's output


def denoiser_manifest(artifact: Artifact, options: RepositoryOptions) -> Manifest:
    """Returns the manifest of the model file the denoiser model runs: the engine's for
    tensorrt_plan, else the ONNX model's (its sha256 checked once, here)."""
    return artifact.model_file(DENOISER, engine=options.platform == "tensorrt_plan").manifest


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


def copy_model_code(name: str, version_dir: Path) -> None:
    shutil.copy2(MODELS_DIR / f"{name}.py", version_dir / "model.py")


def copy_artifact(artifact: Artifact, target: Path, with_model: bool, engine: bool) -> None:
    """Writes a one-model artifact folder at `target` from the denoiser stage: its
    manifests and the null embedding; with `with_model`, also the ONNX model and the files
    beside it (external weights), never the engine; `engine` adds engine.json."""
    stage = artifact.stage(DENOISER)
    target.mkdir(parents=True)
    names = set()
    if stage.onnx is not None:
        names.add(MANIFEST_NAME)
    if engine and stage.engine is not None:
        names.add(ENGINE_MANIFEST)
    null_file = stage.manifest.facts.condition.null_file
    if null_file:
        names.add(null_file)
    if with_model:
        engine_file = stage.engine.path.name if stage.engine is not None else None
        names |= {p.name for p in stage.directory.iterdir()
                  if p.is_file() and p.name not in (ENGINE_MANIFEST, engine_file) and not p.name.startswith(".")}
    for name in sorted(names):
        link_or_copy(stage.directory / name, target / name)


# -- denoiser -------------------------------------------------------------------------------

def denoiser_config(manifest: Manifest, options: RepositoryOptions) -> dict:
    """Returns the denoiser's config: rows along Triton's batch axis, so the dynamic
    batcher can merge the 2N rows of one request with the 2M rows of another."""
    if manifest.batch is not None:
        raise CfgExportError(f"the graph is static for N={manifest.batch} images: rows of several requests cannot "
                             f"share its batch; re-export without --batch to serve it")
    config = {"name": DENOISER, "max_batch_size": options.max_rows}
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
            batching["preferred_batch_size"] = [r for r in preferred if r <= options.max_rows]
        batching["max_queue_delay_microseconds"] = options.queue_delay_us
        config["dynamic_batching"] = batching
    # a Python model places itself (the runtime's backend picks CUDA where it has it); Triton's
    # own backends run on the GPUs
    kind = "KIND_CPU" if options.platform == "python" else "KIND_GPU"
    config["instance_group"] = [{"kind": Word(kind), "count": options.denoiser_instances}]
    if options.platform == "python":
        values = {"backend": options.backend}
        if options.threads:
            values["threads"] = options.threads
        if options.spinning is not None:
            values["spinning"] = int(options.spinning)
        config["parameters"] = parameters(values)
    return config


def write_denoiser(artifact: Artifact, options: RepositoryOptions, model_dir: Path) -> str:
    """Writes the denoiser model: a Python model over the runtime's backend (with the
    artifact beside it), or the ONNX model / the engine for Triton's own backends."""
    manifest = denoiser_manifest(artifact, options)
    text = config_text(denoiser_config(manifest, options))
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    if options.platform == "python":
        copy_model_code("denoiser", version_dir)
        copy_runtime(version_dir)
        copy_artifact(artifact, version_dir / ARTIFACT_DIR, with_model=True, engine=False)
    elif options.platform == "onnxruntime_onnx":
        stage = artifact.stage(DENOISER)
        for path in stage.directory.iterdir():  # model.onnx and any external weights beside it
            engine_file = stage.engine.path.name if stage.engine is not None else None
            if path.is_file() and path.name not in (MANIFEST_NAME, ENGINE_MANIFEST, engine_file):
                link_or_copy(path, version_dir / ("model.onnx" if path == stage.onnx.path else path.name))
    else:
        link_or_copy(artifact.model_file(DENOISER, engine=True).path, version_dir / "model.plan")
    (model_dir / "config.pbtxt").write_text(text)
    return text


# -- sampler --------------------------------------------------------------------------------

def sampler_inputs(manifest: Manifest) -> list[dict]:
    """Returns the sampler's inputs: the condition of each image, and the options of
    `cfg-export sample`, all optional but `cond`. Numbers are float64 like the CLI's."""
    condition = manifest.facts.condition
    if condition.kind is ConditionKind.EMBEDDING:
        cond = {"data_type": triton_dtype("float32"), "dims": [-1, *condition.shape]}
    else:
        cond = {"data_type": triton_dtype("int64"), "dims": [-1]}
    f64, text = triton_dtype("float64"), triton_dtype("bytes")
    entries = [
        ("cond", cond, False),
        ("w", {"data_type": f64, "dims": [-1]}, True),  # one number, or one per image
        ("seed", {"data_type": triton_dtype("int64"), "dims": [1]}, True),
        ("steps", {"data_type": triton_dtype("int64"), "dims": [1]}, True),
        ("sampler", {"data_type": text, "dims": [1]}, True),
        ("spacing", {"data_type": text, "dims": [1]}, True),
        ("eta", {"data_type": f64, "dims": [1]}, True),
        ("negative", dict(cond), True),  # labels or embeddings for the null rows
        ("w_schedule", {"data_type": text, "dims": [1]}, True),
        ("interval", {"data_type": f64, "dims": [2]}, True),
        ("threshold", {"data_type": f64, "dims": [1]}, True),
    ]
    return [{"name": name, **entry, **({"optional": True} if optional else {})} for name, entry, optional in entries]


def sampler_config(manifest: Manifest, options: RepositoryOptions) -> dict:
    """Returns the sampler's config: no batching of its own (one request is one run),
    `sampler_instances` runs in flight, at most `max_queue` requests waiting."""
    output = TensorSpec(SAMPLES, ("N", *manifest.facts.sample_shape), "float32")
    return {
        "name": "sampler",
        "backend": "python",
        "max_batch_size": 0,
        "input": sampler_inputs(manifest),
        "output": [tensor_config(output, batched=False)],
        # no batching here: the queue policy bounds the requests waiting for an instance
        "dynamic_batching": {"default_queue_policy": {"max_queue_size": options.max_queue}},
        "instance_group": [{"kind": Word("KIND_CPU"), "count": options.sampler_instances}],
        "parameters": parameters({
            "denoiser_model": DENOISER,
            "engine": int(options.platform == "tensorrt_plan"),
            "max_images": options.max_images,
            "max_steps": options.max_steps,
            "condition": json.dumps(manifest.facts.condition.to_dict()),
            "sample_shape": json.dumps(list(manifest.facts.sample_shape)),
        }),
    }


def write_sampler(artifact: Artifact, options: RepositoryOptions, model_dir: Path) -> str:
    """Writes the sampler model: the model file, the runtime, and the artifact's manifests."""
    text = config_text(sampler_config(denoiser_manifest(artifact, options), options))
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    copy_model_code("sampler", version_dir)
    copy_runtime(version_dir)
    copy_artifact(artifact, version_dir / ARTIFACT_DIR, with_model=False, engine=options.platform == "tensorrt_plan")
    (model_dir / "config.pbtxt").write_text(text)
    return text
