"""The repository's `sampler` model: one request is one sampling run, in a Python-backend
model that calls the stage models through BLS.

write_sampler writes it for a one-denoiser artifact (conditions in, samples out;
runtime.pipeline.sample_guided); write_pipeline_sampler for a pipeline artifact (prompts,
or DiT's class labels and names, in; images and latents out;
runtime.pipeline_sampling.sample_pipeline, the tokenizers running in the sampler).
Both take the options of `cfg-export sample`, all optional but the conditions, with the
same defaults (the runtime's own).
"""
from __future__ import annotations

import json
from pathlib import Path

from cfg_export.runtime.artifact import DENOISER, PIPELINE_NAME, Artifact
from cfg_export.runtime.manifest import ConditionKind, Manifest, TensorSpec

from .config import Word, config_text, parameters, tensor_config, triton_dtype
from .options import RepositoryOptions
from .stages import (ARTIFACT_DIR, VERSION, copy_artifact, copy_model_code, copy_runtime, denoiser_manifest,
                     link_or_copy, stage_files, stage_manifest, stage_rows)

SAMPLES = "samples"  # the one-denoiser sampler's output
F64, I64, TEXT = triton_dtype("float64"), triton_dtype("int64"), triton_dtype("bytes")


def _entries(entries: list[tuple[str, dict, bool]]) -> list[dict]:
    return [{"name": name, **entry, **({"optional": True} if optional else {})} for name, entry, optional in entries]


def _common_inputs() -> list[tuple[str, dict, bool]]:
    """The options both samplers take: those of `cfg-export sample`."""
    return [
        ("w", {"data_type": F64, "dims": [-1]}, True),  # one number, or one per image
        ("seed", {"data_type": I64, "dims": [1]}, True),
        ("steps", {"data_type": I64, "dims": [1]}, True),
        ("sampler", {"data_type": TEXT, "dims": [1]}, True),
        ("spacing", {"data_type": TEXT, "dims": [1]}, True),
        ("scheduler", {"data_type": TEXT, "dims": [1]}, True),  # config fields (--set, --karras), one JSON object
        ("w_schedule", {"data_type": TEXT, "dims": [1]}, True),
        ("interval", {"data_type": F64, "dims": [2]}, True),
        ("threshold", {"data_type": F64, "dims": [1]}, True),
        ("guidance_rescale", {"data_type": F64, "dims": [1]}, True),
    ]


def _sampler_config(inputs: list[dict], outputs: list[dict], options: RepositoryOptions, values: dict,
                    model_rows: dict[str, int]) -> dict:
    """No batching of its own (one request is one run), `sampler_instances` processes of
    `runs_per_sampler` runs in flight each, at most `max_queue` requests waiting.
    model_rows: the max_batch_size of each model the sampler calls (its merged calls stay within)."""
    return {
        "name": "sampler",
        "backend": "python",
        "max_batch_size": 0,
        "input": inputs,
        "output": outputs,
        # no batching here: the queue policy bounds the requests waiting for an instance
        "dynamic_batching": {"default_queue_policy": {"max_queue_size": options.max_queue}},
        "instance_group": [{"kind": Word("KIND_CPU"), "count": options.sampler_instances}],
        "parameters": parameters({"engine": int(options.platform == "tensorrt_plan"),
                                  "max_images": options.max_images, "max_steps": options.max_steps,
                                  "runs": options.runs_per_sampler, "merge": int(options.row_batching),
                                  "model_rows": json.dumps(model_rows), **values}),
    }


# -- one denoiser ---------------------------------------------------------------------------

def sampler_inputs(manifest: Manifest) -> list[dict]:
    """Returns the one-denoiser sampler's inputs: the condition of each image, and the
    options of `cfg-export sample`, all optional but `cond`. Numbers are float64 like the CLI's."""
    condition = manifest.facts.condition
    if condition.kind is ConditionKind.EMBEDDING:
        cond = {"data_type": triton_dtype("float32"), "dims": [-1, *condition.shape]}
    else:
        cond = {"data_type": I64, "dims": [-1]}
    noise = {"data_type": triton_dtype("float32"), "dims": [-1, *manifest.facts.sample_shape]}
    return _entries([("cond", cond, False), *_common_inputs(), ("eta", {"data_type": F64, "dims": [1]}, True),
                     ("negative", dict(cond), True),  # labels or embeddings for the null rows
                     ("noise", noise, True)])


def sampler_config(manifest: Manifest, options: RepositoryOptions) -> dict:
    """Returns the one-denoiser sampler's config."""
    output = TensorSpec(SAMPLES, ("N", *manifest.facts.sample_shape), "float32")
    return _sampler_config(sampler_inputs(manifest), [tensor_config(output, batched=False)], options, {
        "kind": "denoiser",
        "denoiser_model": DENOISER,
        "condition": json.dumps(manifest.facts.condition.to_dict()),
        "sample_shape": json.dumps(list(manifest.facts.sample_shape)),
    }, {DENOISER: stage_rows(DENOISER, manifest, options)})


def write_sampler(artifact: Artifact, options: RepositoryOptions, model_dir: Path) -> str:
    """Writes the one-denoiser sampler: the model file, the runtime, and the artifact's manifests."""
    text = config_text(sampler_config(denoiser_manifest(artifact, options), options))
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    copy_model_code("sampler", version_dir, "bls")
    copy_runtime(version_dir)
    copy_artifact(artifact, version_dir / ARTIFACT_DIR, with_model=False, engine=options.platform == "tensorrt_plan")
    (model_dir / "config.pbtxt").write_text(text)
    return text


# -- pipelines ------------------------------------------------------------------------------

def pipeline_model_stages(artifact: Artifact) -> list[str]:
    """The pipeline's model stages in the order a run calls them: text encoders, denoiser, VAE decoder."""
    encoders = [e["stage"] for e in (artifact.pipeline.get("prompt") or {}).get("encoders", [])]
    return [*encoders, DENOISER, "vae_decoder"]


def pipeline_sampler_config(artifact: Artifact, options: RepositoryOptions) -> dict:
    """Returns the pipeline sampler's config: prompt and negative_prompt (a text pipeline)
    or classes (indices or names, DiT) as strings, one image each, and the options of
    `cfg-export sample` on a pipeline artifact; out come the decoded images [N, H, W, 3]
    in [0, 1], the final latents [N, C, h, w] and the warnings (truncated prompts)."""
    pipeline = artifact.pipeline
    text = "prompt" in pipeline
    channels = artifact.manifest.facts.sample_shape[0]
    conditions = [("prompt", {"data_type": TEXT, "dims": [-1]}, True),
                  ("negative_prompt", {"data_type": TEXT, "dims": [-1]}, True)] if text else \
        [("classes", {"data_type": TEXT, "dims": [-1]}, True)]
    inputs = _entries([*conditions, *_common_inputs(),
                       ("height", {"data_type": I64, "dims": [1]}, True),
                       ("width", {"data_type": I64, "dims": [1]}, True),
                       ("noise", {"data_type": triton_dtype("float32"), "dims": [-1, channels, -1, -1]}, True)])
    f32 = triton_dtype("float32")
    outputs = [{"name": "images", "data_type": f32, "dims": [-1, -1, -1, 3]},
               {"name": "latents", "data_type": f32, "dims": [-1, channels, -1, -1]},
               {"name": "warnings", "data_type": TEXT, "dims": [-1]}]
    return _sampler_config(inputs, outputs, options, {
        "kind": "pipeline",
        "pipeline": pipeline.get("pipeline", ""),
        "text": int(text),
        "stage_models": json.dumps({stage: stage for stage in pipeline_model_stages(artifact)}),
        "image_size": json.dumps(pipeline["image_size"]),
    }, {stage: stage_rows(stage, stage_manifest(artifact, stage, options), options)
        for stage in pipeline_model_stages(artifact)})


def copy_pipeline(artifact: Artifact, target: Path, engine: bool) -> None:
    """Writes at `target` the pipeline artifact without its model files: pipeline.json,
    the tokenizers, every stage's manifests and the denoiser's null values."""
    target.mkdir(parents=True)
    link_or_copy(artifact.directory / PIPELINE_NAME, target / PIPELINE_NAME)
    for name, entry in artifact.pipeline["stages"].items():
        stage = artifact.stage(name)
        folder = target / entry["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        names = stage_files(artifact, name, with_model=False, engine=engine) if entry.get("model", True) \
            else [entry["file"]]
        for file_name in names:
            link_or_copy(stage.directory / file_name, folder / file_name)


def write_pipeline_sampler(artifact: Artifact, options: RepositoryOptions, model_dir: Path) -> str:
    """Writes the pipeline sampler: the model file, the runtime, and the pipeline without its model files."""
    text = config_text(pipeline_sampler_config(artifact, options))
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    copy_model_code("pipeline_sampler", version_dir, "bls")
    copy_runtime(version_dir)
    copy_pipeline(artifact, version_dir / ARTIFACT_DIR, engine=options.platform == "tensorrt_plan")
    (model_dir / "config.pbtxt").write_text(text)
    return text


