"""The pipeline commands as a user runs them (cfg-export onnx PIPELINE_DIR, cfg-export
sample --prompt, python -m runtime sample without torch), and every bad input as one
clear line, a non-zero exit and nothing half-written."""
import json
import shutil
import sys
import textwrap

import numpy as np
import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.pipeline_sampling import sample_pipeline
from tests.conftest import ROOT, run_cli
from tests import tiny_pipelines


def run_here(*args):
    """Runs the cfg-export command in this process (faster than a subprocess); returns
    an object with returncode, stdout and stderr like subprocess's."""
    from click.testing import CliRunner

    from cfg_export.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    result.returncode = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_sample_cli_writes_images_npy_and_latents(pipeline_artifacts, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\nthe blue sky\n")
    proc = run_cli("sample", pipeline_artifacts["sdxl"], "--prompts", prompts, "--prompt", "a cat", "--w", "6.5",
                   "--steps", "2", "--negative-prompt", "blurry", "-o", tmp_path / "grid.png", "--npy",
                   tmp_path / "images.npy", "--latents", tmp_path / "latents.npy", "--height", "24", "--width", "32")
    assert proc.returncode == 0, proc.stderr
    images, latents = np.load(tmp_path / "images.npy"), np.load(tmp_path / "latents.npy")
    assert images.shape == (3, 24, 32, 3) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1
    assert latents.shape == (3, 4, 12, 16)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] > 32
    assert "model time per stage" in proc.stdout


def test_noise_file_gives_the_same_latents_as_the_library(pipeline_artifacts, tmp_path):
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    proc = run_here("sample", pipeline_artifacts["sd"], "--prompt", "a dog", "--steps", "2", "--w", "3", "--noise",
                   tmp_path / "noise.npy", "--latents", tmp_path / "latents.npy")
    assert proc.returncode == 0, proc.stderr
    ours = sample_pipeline(pipeline_artifacts["sd"], ["a dog"], w=3.0, steps=2, noise=noise).latents
    np.testing.assert_array_equal(np.load(tmp_path / "latents.npy"), ours)


def test_an_open_artifact_reads_its_tokenizers_once(pipeline_artifacts, monkeypatch):
    """A server's sampler keeps one Artifact for every request: tokenizer.json is parsed
    for the first, and the second gives the same latents with the same tokenizer."""
    import tokenizers

    from cfg_export.runtime.artifact import Artifact

    reads = []
    real = tokenizers.Tokenizer.from_file
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", lambda path: (reads.append(path), real(path))[1])
    artifact = Artifact.open(pipeline_artifacts["sd"])
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    first = sample_pipeline(artifact, ["a dog"], w=3.0, steps=2, noise=noise).latents
    second = sample_pipeline(artifact, ["a dog"], w=3.0, steps=2, noise=noise).latents
    assert len(reads) == 1, reads
    np.testing.assert_array_equal(first, second)


def test_dit_classes_by_name_and_index(pipeline_artifacts):
    by_name = sample_pipeline(pipeline_artifacts["dit"], classes=["great white shark", "tench"], steps=2, w=1.0)
    by_index = sample_pipeline(pipeline_artifacts["dit"], classes=[2, 0], steps=2, w=1.0)
    np.testing.assert_array_equal(by_name.latents, by_index.latents)


def test_long_prompt_is_truncated_with_a_warning_naming_the_dropped_words(pipeline_artifacts, pipeline_folders,
                                                                         tmp_path):
    """The dropped words are those diffusers names: tokenizer.batch_decode(untruncated_ids[:, L - 1:-1])."""
    from transformers import CLIPTokenizer

    words = "a red car on the blue sky in the green tree house of a cat dog photo ugly blurry"
    reference = CLIPTokenizer.from_pretrained(str(pipeline_folders["sd"] / "tokenizer"))
    ids = reference(words).input_ids
    dropped = reference.batch_decode([ids[reference.model_max_length - 1:-1]])[0]
    assert len(dropped.split()) >= 3
    proc = run_here("sample", pipeline_artifacts["sd"], "--prompt", words, "--steps", "1",
                   "--latents", tmp_path / "l.npy")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and f"dropped: {dropped!r}" in warning[0], proc.stderr


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_runtime_samples_without_torch_diffusers_or_transformers(pipeline_artifacts, tmp_path, name):
    """python -m runtime sample with torch, diffusers, transformers and sentencepiece
    blocked: the runtime copied alone (numpy, pillow, click, onnxruntime, tokenizers);
    SD3's T5 tokenizer is read from tokenizer.json."""
    shutil.copytree(ROOT / "runtime", tmp_path / "runtime")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers", "cfg_export", "sentencepiece"):
                    raise ImportError(name + " is blocked for this test")
        sys.meta_path.insert(0, Block())
        sys.argv = ["runtime", "sample", {str(pipeline_artifacts[name])!r}, "--prompt", "a red car",
                    "--steps", "2", "--w", "5", "-o", {str(tmp_path / 'car.png')!r}]
        import runpy
        runpy.run_module("runtime", run_name="__main__")
    """)
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "car.png").is_file()


# -- bad input: one clear line each ------------------------------------------------------------

def _copy(folder, tmp_path, name="broken"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("case, expected", [
    ("missing_stage", "model_index.json names vae (AutoencoderKL) but"),
    ("missing_tokenizer_files", "no tokenizer files (expected tokenizer.json, or vocab.json and merges.txt"),
    ("unsupported_class", "pipeline class 'KandinskyPipeline' is not supported; supported: StableDiffusionPipeline, "
                          "StableDiffusionXLPipeline, StableDiffusion3Pipeline, DiTPipeline"),
    ("sdxl_without_text_encoder_2", "StableDiffusionXLPipeline without text_encoder_2 (its second text encoder"),
    ("sd3_without_text_encoder_3", "StableDiffusion3Pipeline without text_encoder_3 (its T5 text encoder is null or "
                                   "absent in model_index.json); cfg-export needs every stage"),
    ("sd3_without_t5_tokenizer_files", "tokenizer_3: no tokenizer files (expected tokenizer.json"),
    ("sd3_missing_transformer", "model_index.json names transformer (SD3Transformer2DModel) but"),
    ("sd3_with_a_vp_scheduler", "StableDiffusion3Pipeline with 'DDIMScheduler'; its transformer is a flow-matching "
                                "model: expected FlowMatchEulerDiscreteScheduler"),
])
def test_export_refuses_broken_folders(pipeline_folders, tmp_path, case, expected):
    source = pipeline_folders[case.split("_")[0] if case.startswith(("sdxl_", "sd3_")) else "sd"]
    folder = _copy(source, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    if case == "missing_stage":
        shutil.rmtree(folder / "vae")
    elif case == "missing_tokenizer_files":
        (folder / "tokenizer" / "merges.txt").unlink()
    elif case == "unsupported_class":
        index["_class_name"] = "KandinskyPipeline"
    elif case == "sd3_without_text_encoder_3":
        index["text_encoder_3"] = [None, None]
    elif case == "sd3_without_t5_tokenizer_files":
        (folder / "tokenizer_3" / "tokenizer.json").unlink()
    elif case == "sd3_missing_transformer":
        shutil.rmtree(folder / "transformer")
    elif case == "sd3_with_a_vp_scheduler":
        config = dict(tiny_pipelines.SD21_DDIM)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    else:
        index["text_encoder_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    line = one_error_line(run_here("onnx", folder, "-o", out))
    assert expected in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("name, args, expected", [
    ("dit", ["--prompt", "a cat"], "--prompt: this pipeline is class-conditional (DiT); give --classes"),
    ("sd", ["--classes", "1"], "--classes: this pipeline takes prompts (--prompt), not class labels"),
    ("sd", ["--prompt", "a", "--height", "18"], "--height: got 18, expected a multiple of 4 pixels"),
    ("sd", ["--prompt", "a", "--width", "64"], "--width: got 64, outside the exported range 8..32"),
    ("sd", [], "no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE"),
    ("sd", ["--prompts", "EMPTY"], "holds no prompt; expected one prompt per line"),
    ("dit", ["--classes", "zebra"], "--classes: got 'zebra', expected a class index or a class name"),
    ("dit", ["--classes", "1", "--height", "32"], "--height: got 32, outside the exported range 16..16"),
    ("sd", ["--prompt", "a", "--negative-prompt", "b", "--negative-prompt", "c", "--negative-prompt", "d"],
     "--negative-prompt: got 3, expected one for all prompts or one per prompt (1)"),
    ("sd", ["--prompt", "a", "--noise", "NOISE"], "--noise: got shape [1, 4, 2, 2], expected [1, 4, 8, 8]"),
    ("sd3", ["--prompt", "a", "--noise", "NOISE"], "--noise: got shape [1, 4, 2, 2], expected [1, 16, 8, 8]"),
    ("sd3", ["--prompt", "a", "--height", "64"], "--height: got 64, outside the exported range 8..32"),
    ("sd3", ["--prompt", "a", "--width", "18"], "--width: got 18, expected a multiple of 4 pixels"),
    ("sd3", ["--classes", "1"], "--classes: this pipeline takes prompts (--prompt), not class labels"),
])
def test_sample_refuses_bad_input(pipeline_artifacts, tmp_path, name, args, expected):
    (tmp_path / "empty.txt").write_text("\n  \n")
    np.save(tmp_path / "noise.npy", np.zeros((1, 4, 2, 2), np.float32))
    args = [{"EMPTY": tmp_path / "empty.txt", "NOISE": tmp_path / "noise.npy"}.get(a, a) for a in args]
    out = tmp_path / "x.png"
    line = one_error_line(run_here("sample", pipeline_artifacts[name], *args, "--steps", "1", "-o", out))
    assert expected in line
    assert not out.exists() and not list(tmp_path.glob(".x.png*"))


def test_prompt_on_a_one_model_artifact_is_refused(tiny_artifacts, tmp_path):
    line = one_error_line(run_here("sample", tiny_artifacts / "stacked", "--prompt", "a cat", "-o",
                                   tmp_path / "x.png"))
    assert "--prompt: applies to pipeline artifacts" in line


def test_export_refuses_size_options_on_a_transformer(pipeline_folders, tmp_path):
    with pytest.raises(CfgExportError, match="takes only its own size 16x16"):
        from cfg_export.export.pipelines import export_pipeline

        export_pipeline(pipeline_folders["dit"], tmp_path / "out", max_size=32)
    assert not (tmp_path / "out").exists()


def test_sd3_export_refuses_sizes_beyond_its_position_embedding(pipeline_folders, tmp_path):
    """SD3 crops its position embedding (pos_embed_max_size patches a side) to the image:
    larger images than it covers are refused at export, naming the limit."""
    from cfg_export.export.pipelines import export_pipeline

    with pytest.raises(CfgExportError, match=r"--max-size: got 64x64, beyond the 32x32 pixels the transformer's "
                                             r"position embedding covers \(pos_embed_max_size 8 patches"):
        export_pipeline(pipeline_folders["sd3"], tmp_path / "out", max_size=64)
    assert not (tmp_path / "out").exists()


def test_tampered_tokenizer_is_refused(pipeline_artifacts, tmp_path):
    artifact = _copy(pipeline_artifacts["sd"], tmp_path)
    (artifact / "tokenizer" / "tokenizer.json").write_text("{}")
    line = one_error_line(run_here("sample", artifact, "--prompt", "a", "-o", tmp_path / "x.png"))
    assert "tokenizer.json does not match its manifest" in line


def test_external_data_for_large_models(pipeline_folders, tmp_path):
    """Weights over the threshold go to model.onnx.data (here a threshold of 0 bytes for a
    tiny model; 2 GB by default): the artifact samples the same, and both files are hashed."""
    from cfg_export.export.pipelines import export_pipeline

    out = tmp_path / "external"
    export_pipeline(pipeline_folders["dit"], out, external_data_bytes=0, check=False)
    assert (out / "denoiser" / "model.onnx.data").is_file() and (out / "vae_decoder" / "model.onnx.data").is_file()
    manifest = json.loads((out / "denoiser" / "manifest.json").read_text())
    assert manifest["data_file"] == "model.onnx.data" and len(manifest["data_sha256"]) == 64
    reference = tmp_path / "inline"
    export_pipeline(pipeline_folders["dit"], reference, check=False)
    data = (out / "denoiser" / "model.onnx.data").stat().st_size
    assert (out / "denoiser" / "model.onnx").stat().st_size < (reference / "denoiser" / "model.onnx").stat().st_size - 0.9 * data
    a = sample_pipeline(out, classes=[1, 2], steps=2, w=1.0)
    b = sample_pipeline(reference, classes=[1, 2], steps=2, w=1.0)
    np.testing.assert_array_equal(a.images, b.images)
    with open(out / "denoiser" / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CfgExportError, match="model.onnx.data does not match its manifest"):
        sample_pipeline(out, classes=[1], steps=1)


def test_tiny_vocab_spells_its_words(tmp_path):
    """The tiny tokenizer merges each of its words into one token (so prompts are words, not bytes)."""
    tokenizer = tiny_pipelines.clip_tokenizer(tmp_path / "vocab")
    ids = tokenizer("a red car")["input_ids"]
    assert len(ids) == 5  # start, three words, end
