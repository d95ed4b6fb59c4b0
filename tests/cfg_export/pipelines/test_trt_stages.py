"""Per-stage TensorRT engines of a pipeline artifact, against the stand-in
(tests/fake_tensorrt.py, which runs the source ONNX on ONNX Runtime): profiles per
stage (text encoders 2N rows, denoiser 2N, VAE N, the exported spatial range), the
FP32 VAE of force_upcast, one trtexec line per stage, and sampling through the tensorrt
backend. Not verified on a GPU here: TensorRT itself is not installed."""
import json
import shutil

import numpy as np

from cfg_export.build.plan import EngineOptions
from cfg_export.build.pipeline_engines import build_pipeline_engines
from cfg_export.runtime.pipeline_sampling import sample_pipeline
from tests.cfg_export.test_trt_fake import fake  # noqa: F401 (the fixture)
from tests.cfg_export.pipelines.test_cli_and_errors import run_here


def trtexec_lines(proc) -> list[str]:
    """The trtexec lines of a successful `cfg-export trt --print-trtexec`."""
    assert proc.returncode == 0, proc.output
    return [line for line in proc.output.splitlines() if line.startswith("trtexec ")]


def stage_of(line: str) -> str:
    """The stage folder of one trtexec line's --onnx path."""
    return line.split("--onnx=")[1].split("/model.onnx")[0].rsplit("/", 1)[1]


def assert_engines_sample_like_onnxruntime(artifact, latent_channels: int) -> None:
    """Two prompts with a negative, 2 steps at 12x16 pixels: the tensorrt backend (the
    stand-in) gives ONNX Runtime's images."""
    noise = np.random.default_rng(0).standard_normal((2, latent_channels, 6, 8)).astype(np.float32)
    kwargs = dict(prompts=["a red car", "a cat"], negative_prompts=["blurry"], w=3.0, steps=2, noise=noise,
                  height=12, width=16)
    trt = sample_pipeline(artifact, backend="tensorrt", **kwargs)
    ort = sample_pipeline(artifact, backend="onnxruntime-cpu", **kwargs)
    assert trt.backend == "tensorrt"
    np.testing.assert_allclose(trt.images, ort.images, atol=1e-6)


def test_print_trtexec_one_line_per_stage(pipeline_artifacts):
    proc = run_here("trt", pipeline_artifacts["sdxl"], "--fp16", "--print-trtexec", "--max-batch", "4")
    lines = trtexec_lines(proc)
    assert [stage_of(line) for line in lines] == \
        ["text_encoder", "text_encoder_2", "denoiser", "vae_decoder"]
    text, _, denoiser, vae = lines
    assert "--minShapes=input_ids:2x16 " in text and "--maxShapes=input_ids:8x16 " in text
    assert "--minShapes=sample:2x4x4x4," in denoiser and "--maxShapes=sample:8x4x16x16," in denoiser
    assert "--minShapes=latents:1x4x4x4 " in vae + " " and "--fp16" not in vae and "--fp16" in denoiser
    assert "force_upcast" in proc.output


def test_engines_per_stage_sample_like_onnxruntime(pipeline_artifacts, fake, tmp_path):  # noqa: F811
    fake()
    artifact = shutil.copytree(pipeline_artifacts["sdxl"], tmp_path / "sdxl")
    results = build_pipeline_engines(artifact, EngineOptions(fp16=True, max_batch=4))
    assert [r.plan.engine_path.parent.name for r in results] == ["text_encoder", "text_encoder_2", "denoiser",
                                                                  "vae_decoder"]
    vae = json.loads((artifact / "vae_decoder" / "engine.json").read_text())
    assert vae["precision"] == "fp32" and vae["engine"]["profiles"][0]["rows"] == [1, 4, 4]
    denoiser = json.loads((artifact / "denoiser" / "engine.json").read_text())
    assert denoiser["engine"]["profiles"][0]["shapes"]["sample"] == [[2, 4, 4, 4], [8, 4, 8, 8], [8, 4, 16, 16]]
    assert_engines_sample_like_onnxruntime(artifact, latent_channels=4)


def test_sd3_print_trtexec_five_stages(pipeline_artifacts):
    """SD3: three text encoders (T5 at 256 tokens, FP32 in an FP16 build), the transformer
    over the exported size range with its joint context, the VAE (force_upcast: FP32)."""
    proc = run_here("trt", pipeline_artifacts["sd3"], "--fp16", "--print-trtexec", "--max-batch", "4")
    lines = trtexec_lines(proc)
    assert [stage_of(line) for line in lines] == \
        ["text_encoder", "text_encoder_2", "text_encoder_3", "denoiser", "vae_decoder"]
    clip, _, t5, denoiser, vae = lines
    assert "--minShapes=input_ids:2x16 " in clip and "--fp16" in clip
    assert "--minShapes=input_ids:2x256 " in t5 and "--maxShapes=input_ids:8x256 " in t5 + " " and "--fp16" not in t5
    assert "--minShapes=sample:2x16x4x4," in denoiser and "--maxShapes=sample:8x16x16x16," in denoiser
    assert "encoder_hidden_states:8x272x64" in denoiser and "pooled_projections:8x24" in denoiser
    assert "--fp16" in denoiser and "--fp16" not in vae
    assert "text_encoder_3 stays FP32: T5 encoders overflow FP16" in proc.output


def test_sd3_engines_per_stage_sample_like_onnxruntime(pipeline_artifacts, fake, tmp_path):  # noqa: F811
    fake()
    artifact = shutil.copytree(pipeline_artifacts["sd3"], tmp_path / "sd3")
    results = build_pipeline_engines(artifact, EngineOptions(fp16=True, max_batch=4))
    assert [r.plan.engine_path.parent.name for r in results] == ["text_encoder", "text_encoder_2", "text_encoder_3",
                                                                  "denoiser", "vae_decoder"]
    t5 = json.loads((artifact / "text_encoder_3" / "engine.json").read_text())
    assert t5["precision"] == "fp32" and t5["engine"]["profiles"][0]["rows"] == [2, 8, 8]
    denoiser = json.loads((artifact / "denoiser" / "engine.json").read_text())
    assert denoiser["precision"] == "fp16"
    assert_engines_sample_like_onnxruntime(artifact, latent_channels=16)
