"""The repository of a pipeline artifact: a model per stage (text encoders, denoiser,
VAE decoder) with rows on Triton's batch axis and a dynamic batcher, and the pipeline
sampler; every config parses with Triton's own model_config.proto (the tensorrt_plan and
onnxruntime_onnx configs are only parsed: no Triton backend for them runs here)."""
import json
import shutil

import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.serving.options import RepositoryOptions
from cfg_export.serving.repository import write_repository
from tests.cfg_export.serving.test_repository import check_model_imports, parsed
from tests.cfg_export.test_trt_fake import fake  # noqa: F401 (the fixture)

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (cfg-export[serve]) parses configs")


def shapes(tensors):
    return {t.name: (list(t.dims), t.HasField("reshape")) for t in tensors}


def test_sdxl_repository_has_a_batched_model_per_stage(served_pipelines, tmp_path):
    repo = write_repository(served_pipelines["sdxl"], tmp_path / "repo", RepositoryOptions(queue_delay_us=300))
    assert repo.models == ["text_encoder", "text_encoder_2", "denoiser", "vae_decoder", "sampler"]
    for name in ("text_encoder", "text_encoder_2", "denoiser", "vae_decoder"):
        config = parsed(repo, name)
        assert config.backend == "python" and config.max_batch_size == 64, name
        assert config.dynamic_batching.max_queue_delay_microseconds == 300, name
    assert shapes(parsed(repo, "text_encoder_2").input) == {"input_ids": ([16], False)}
    assert shapes(parsed(repo, "text_encoder_2").output) == {"hidden": ([16, 32], False), "pooled": ([16], False)}
    assert shapes(parsed(repo, "denoiser").input) == {
        "sample": ([4, -1, -1], False), "timestep": ([1], True), "encoder_hidden_states": ([16, 64], False),
        "text_embeds": ([16], False), "time_ids": ([6], False)}
    assert shapes(parsed(repo, "vae_decoder").input) == {"latents": ([4, -1, -1], False)}
    assert shapes(parsed(repo, "vae_decoder").output) == {"images": ([3, -1, -1], False)}
    sampler = parsed(repo, "sampler")
    assert sampler.max_batch_size == 0 and sampler.instance_group[0].count == 2
    assert sampler.parameters["runs"].string_value == "8" and sampler.parameters["merge"].string_value == "1"
    assert json.loads(sampler.parameters["model_rows"].string_value) == {
        name: 64 for name in ("text_encoder", "text_encoder_2", "denoiser", "vae_decoder")}
    assert {i.name for i in sampler.input} == {
        "prompt", "negative_prompt", "w", "seed", "steps", "sampler", "spacing", "scheduler", "w_schedule", "interval",
        "threshold", "guidance_rescale", "height", "width", "noise"}
    assert all(i.optional for i in sampler.input)
    assert shapes(sampler.output) == {"images": ([-1, -1, -1, 3], False), "latents": ([-1, 4, -1, -1], False),
                                      "warnings": ([-1], False)}
    assert json.loads(sampler.parameters["stage_models"].string_value) == {
        name: name for name in ("text_encoder", "text_encoder_2", "denoiser", "vae_decoder")}
    assert sampler.parameters["kind"].string_value == "pipeline" and sampler.parameters["text"].string_value == "1"
    files = {p.relative_to(repo.directory).as_posix() for p in repo.directory.rglob("*") if p.is_file()}
    assert {"text_encoder_2/1/artifact/model.onnx", "vae_decoder/1/artifact/model.onnx", "sampler/1/bls.py",
            "sampler/1/artifact/pipeline.json", "sampler/1/artifact/tokenizer_2/tokenizer.json",
            "sampler/1/artifact/denoiser/manifest.json", "sampler/1/artifact/vae_decoder/manifest.json"} <= files
    assert not any(f.startswith("sampler/") and f.endswith(".onnx") for f in files)  # the sampler runs no model
    check_model_imports(repo.directory, repo.models, tmp_path)


@pytest.mark.parametrize("options, spinning", [
    ({}, {"text_encoder": "0", "denoiser": "0", "vae_decoder": "0"}),  # none by default
    ({"denoiser_instances": 2}, {"text_encoder": "0", "denoiser": "0", "vae_decoder": "0"}),
    ({"threads": 1}, {"text_encoder": "0", "denoiser": "0", "vae_decoder": "0"}),
    ({"spinning": True}, {"text_encoder": "1", "denoiser": "1", "vae_decoder": "1"}),
    ({"spinning": False}, {"text_encoder": "0", "denoiser": "0", "vae_decoder": "0"}),
])
def test_which_stage_models_spin(served_pipelines, tmp_path, options, spinning):
    repo = write_repository(served_pipelines["sd"], tmp_path / "repo", RepositoryOptions(**options))
    assert {name: parsed(repo, name).parameters["spinning"].string_value for name in spinning} == spinning


def test_dit_repository_takes_classes_and_sd_keeps_its_null_embedding(served_pipelines, tmp_path):
    dit = write_repository(served_pipelines["dit"], tmp_path / "dit", RepositoryOptions(row_batching=False))
    assert dit.models == ["denoiser", "vae_decoder", "sampler"]
    assert {i.name for i in parsed(dit, "sampler").input} >= {"classes", "w", "seed"}
    assert "prompt" not in {i.name for i in parsed(dit, "sampler").input}
    assert not parsed(dit, "denoiser").HasField("dynamic_batching")
    assert not parsed(dit, "vae_decoder").HasField("dynamic_batching")
    assert parsed(dit, "sampler").parameters["merge"].string_value == "0"
    sd = write_repository(served_pipelines["sd"], tmp_path / "sd")
    assert sd.models == ["text_encoder", "denoiser", "vae_decoder", "sampler"]
    assert (sd.directory / "sampler" / "1" / "artifact" / "denoiser" / "null_embedding.npy").is_file()
    assert (sd.directory / "denoiser" / "1" / "artifact" / "null_embedding.npy").is_file()


def test_onnxruntime_onnx_pipeline_configs_parse(served_pipelines, tmp_path):
    """Parsed only: Triton's ONNX Runtime backend is not in the nvidia-pytriton wheel, so it never ran here."""
    repo = write_repository(served_pipelines["sd"], tmp_path / "repo", RepositoryOptions(platform="onnxruntime_onnx"))
    for name in ("text_encoder", "denoiser", "vae_decoder"):
        config = parsed(repo, name)
        assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        assert sorted(p.name for p in (repo.directory / name / "1").iterdir()) == ["model.onnx"]
        assert (repo.directory / name / "1" / "model.onnx").read_bytes() == \
            (served_pipelines["sd"] / name / "model.onnx").read_bytes()


def test_tensorrt_plan_pipeline_configs_take_each_stage_engines_profiles(served_pipelines, fake, tmp_path):  # noqa: F811
    """Per-stage engines from the TensorRT stand-in (tests/fake_tensorrt.py); parsed only:
    no TensorRT backend and no GPU here, so these configs never ran."""
    from cfg_export.build.pipeline_engines import build_pipeline_engines
    from cfg_export.build.plan import EngineOptions

    fake()
    artifact = shutil.copytree(served_pipelines["sdxl"], tmp_path / "sdxl")
    build_pipeline_engines(artifact, EngineOptions(max_batch=4))
    repo = write_repository(artifact, tmp_path / "repo", RepositoryOptions(platform="tensorrt_plan"))
    rows = {name: (parsed(repo, name).max_batch_size, list(parsed(repo, name).dynamic_batching.preferred_batch_size))
            for name in ("text_encoder", "text_encoder_2", "denoiser", "vae_decoder")}
    assert rows == {"text_encoder": (8, [8]), "text_encoder_2": (8, [8]), "denoiser": (8, [8]), "vae_decoder": (4, [4])}
    for name in rows:
        assert (repo.directory / name / "1" / "model.plan").read_bytes() == (artifact / name / "model.engine").read_bytes()
    sampler = parsed(repo, "sampler")
    assert sampler.parameters["engine"].string_value == "1" and sampler.parameters["max_images"].string_value == "4"
    assert json.loads(sampler.parameters["model_rows"].string_value) == {name: r for name, (r, _) in rows.items()}
    assert (repo.directory / "sampler" / "1" / "artifact" / "vae_decoder" / "engine.json").is_file()
    vae = json.loads((artifact / "vae_decoder" / "engine.json").read_text())  # a VAE engine for 2 images only
    vae["engine"]["profiles"][0]["rows"] = [1, 2, 2]
    (artifact / "vae_decoder" / "engine.json").write_text(json.dumps(vae))
    with pytest.raises(CfgExportError, match=r"the vae_decoder engine takes at most 2 rows, but --max-images 4 needs "
                                             r"4: rebuild the engines with cfg-export trt --max-batch 4, or give "
                                             r"--max-images 2"):
        write_repository(artifact, tmp_path / "repo2", RepositoryOptions(platform="tensorrt_plan"))
    assert not (tmp_path / "repo2").exists()
