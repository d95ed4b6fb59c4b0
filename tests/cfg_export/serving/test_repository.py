"""The repository writer: every config parses with Triton's own model_config.proto (the
tensorrt_plan and onnxruntime_onnx configs are only parsed: no Triton backend for them
runs here), the layout, the model files' imports, and the refusals."""
import ast
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.serving.config import check_config
from cfg_export.serving.options import RepositoryOptions
from cfg_export.serving.repository import write_repository

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (cfg-export[serve]) parses configs")


def parsed(repository, name):
    return check_config((repository.directory / name / "config.pbtxt").read_text())


def test_python_repository_configs_and_layout(tiny_artifacts, tmp_path):
    repo = write_repository(tiny_artifacts / "stacked", tmp_path / "repo",
                            RepositoryOptions(sampler_instances=3, threads=2, queue_delay_us=500))
    assert repo.models == ["denoiser", "sampler"]
    denoiser, sampler = parsed(repo, "denoiser"), parsed(repo, "sampler")
    assert denoiser.backend == "python" and denoiser.max_batch_size == 64
    assert [(i.name, list(i.dims), list(i.reshape.shape), i.HasField("reshape")) for i in denoiser.input] == [
        ("sample", [2, 6, 6], [], False), ("timestep", [1], [], True), ("cond", [1], [], True)]
    assert [(o.name, list(o.dims)) for o in denoiser.output] == [("eps", [2, 6, 6])]
    assert denoiser.HasField("dynamic_batching") and denoiser.dynamic_batching.max_queue_delay_microseconds == 500
    assert denoiser.parameters["threads"].string_value == "2"
    assert sampler.max_batch_size == 0 and sampler.instance_group[0].count == 3
    assert sampler.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert {i.name: i.optional for i in sampler.input} == {
        "cond": False, "w": True, "seed": True, "steps": True, "sampler": True, "spacing": True, "scheduler": True,
        "w_schedule": True, "interval": True, "threshold": True, "guidance_rescale": True, "eta": True,
        "negative": True, "noise": True}
    assert list(sampler.output[0].dims) == [-1, 2, 6, 6]
    assert json.loads(sampler.parameters["condition"].string_value) == {"kind": "class", "num_classes": 3,
                                                                        "null": 3}
    assert sampler.parameters["max_steps"].string_value == "100"
    files = {p.relative_to(repo.directory).as_posix() for p in repo.directory.rglob("*") if p.is_file()}
    assert {"denoiser/1/model.py", "denoiser/1/artifact/model.onnx", "denoiser/1/artifact/manifest.json",
            "denoiser/1/runtime/pipeline.py", "sampler/1/model.py", "sampler/1/bls.py", "sampler/1/artifact/manifest.json",
            "sampler/1/runtime/samplers/ddim.py"} <= files
    assert "sampler/1/artifact/model.onnx" not in files and not any("__pycache__" in f for f in files)


def test_without_row_batching_the_denoiser_has_no_dynamic_batcher(tiny_artifacts, tmp_path):
    repo = write_repository(tiny_artifacts / "stacked", tmp_path / "repo", RepositoryOptions(row_batching=False))
    assert not parsed(repo, "denoiser").HasField("dynamic_batching")


def test_onnxruntime_onnx_config_parses(tiny_artifacts, tmp_path):
    """Parsed only: Triton's ONNX Runtime backend is not in the nvidia-pytriton wheel, so it never ran here."""
    repo = write_repository(tiny_artifacts / "stacked", tmp_path / "repo",
                            RepositoryOptions(platform="onnxruntime_onnx", denoiser_instances=2))
    config = parsed(repo, "denoiser")
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].count == 2
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert sorted(p.name for p in (repo.directory / "denoiser" / "1").iterdir()) == ["model.onnx"]
    assert (repo.directory / "denoiser" / "1" / "model.onnx").read_bytes() == \
        (tiny_artifacts / "stacked" / "model.onnx").read_bytes()


def engine_artifact(tiny_artifacts, tmp_path):
    """The tiny artifact with an engine manifest of one profile, N 1..8 (opt 4), beside
    stand-in engine bytes: the repository writer only copies the plan and reads the profiles."""
    from dataclasses import replace

    from cfg_export.runtime.engine import ENGINE_FILE, ENGINE_MANIFEST
    from cfg_export.runtime.files import sha256_file
    from cfg_export.runtime.manifest import read_manifest

    artifact = shutil.copytree(tiny_artifacts / "stacked", tmp_path / "tiny")
    (artifact / ENGINE_FILE).write_bytes(b"a TensorRT plan stands here")
    shapes = {"sample": [[r, 2, 6, 6] for r in (2, 8, 16)], "timestep": [[r] for r in (2, 8, 16)],
              "cond": [[r] for r in (2, 8, 16)]}
    engine = {"tensorrt_version": "10.3.0", "profiles": [{"rows": [2, 8, 16], "shapes": shapes}]}
    manifest = replace(read_manifest(artifact), model_file=ENGINE_FILE, engine=engine,
                       model_sha256=sha256_file(artifact / ENGINE_FILE))
    manifest.write(artifact, ENGINE_MANIFEST)
    return artifact


def test_tensorrt_plan_config_takes_the_engine_profiles(tiny_artifacts, tmp_path):
    """Parsed only: no TensorRT backend and no GPU here, so this config never ran."""
    artifact = engine_artifact(tiny_artifacts, tmp_path)
    repo = write_repository(artifact, tmp_path / "repo", RepositoryOptions(platform="tensorrt_plan"))
    config = parsed(repo, "denoiser")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16  # 2N rows at N = 8
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]  # opt and max rows of the profile
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert (repo.directory / "denoiser" / "1" / "model.plan").read_bytes() == (artifact / "model.engine").read_bytes()
    sampler = parsed(repo, "sampler")
    assert sampler.parameters["engine"].string_value == "1" and sampler.parameters["max_images"].string_value == "8"
    assert (repo.directory / "sampler" / "1" / "artifact" / "engine.json").is_file()
    with pytest.raises(CfgExportError, match="--max-rows: got 32, but the engine's largest profile takes 16 rows"):
        write_repository(artifact, tmp_path / "repo2", RepositoryOptions(platform="tensorrt_plan", max_rows=32))


MODEL_IMPORTS = {"json", "logging", "os", "sys", "threading", "time", "collections", "numpy", "triton_python_backend_utils", "runtime", "bls"}


def check_model_imports(repository, names, tmp_path):
    """Each model's Python files import only the standard library, numpy, Triton's utils
    and what is copied beside them; model.py loads with torch and cfg_export blocked and
    takes the runtime copied beside it."""
    for name in names:
        version = repository / name / "1"
        for source in version.glob("*.py"):
            tree = ast.parse(source.read_text())
            imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for a in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert imported <= MODEL_IMPORTS, (source, imported)
        code = textwrap.dedent(f"""
            import importlib.util, sys, types
            class Block:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in ("torch", "cfg_export"):
                        raise ImportError(name + " is blocked for this test")
            sys.meta_path.insert(0, Block())
            sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
            spec = importlib.util.spec_from_file_location("model", {str(version / "model.py")!r})
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            assert hasattr(module, "TritonPythonModel") and "torch" not in sys.modules
            print(sys.modules["runtime"].__file__)
        """)
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(version / "runtime" / "__init__.py")


def test_model_files_import_the_copied_runtime_without_torch_or_cfg_export(tiny_artifacts, tmp_path):
    repo = write_repository(tiny_artifacts / "stacked", tmp_path / "repo")
    check_model_imports(repo.directory, ("sampler", "denoiser"), tmp_path)


@pytest.mark.parametrize("folder, options, message", [
    ("static2", None, "the denoiser graph is static for N=2 images: rows of several requests cannot share its batch; "
                      "re-export without --batch to serve it"),
    ("stacked", RepositoryOptions(platform="tensorrt_plan"), "no engine.json in it; build an engine with: "
                                                             "cfg-export trt"),
    ("stacked", RepositoryOptions(max_steps=101), "--max-steps: got 101, but the model has 100 training timesteps"),
    ("stacked", RepositoryOptions(max_images=20, max_rows=32), "--max-images 20 needs 40 rows per call, more than "
                                                               "--max-rows 32: raise --max-rows or lower --max-images"),
    ("stacked", RepositoryOptions(max_images=2**31 - 1), "rows per call, more than a Triton batch holds"),
])
def test_refusals_write_nothing(tiny_artifacts, tmp_path, folder, options, message):
    with pytest.raises(CfgExportError) as info:
        write_repository(tiny_artifacts / folder, tmp_path / "repo", options)
    assert message in str(info.value)
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo*"))


def test_option_errors():
    with pytest.raises(CfgExportError, match="platform: got 'tensorrt', expected one of python, onnxruntime_onnx, "
                                             "tensorrt_plan"):
        RepositoryOptions(platform="tensorrt")
    with pytest.raises(CfgExportError, match="sampler-instances: got 0, expected an integer >= 1"):
        RepositoryOptions(sampler_instances=0)
    with pytest.raises(CfgExportError, match=r"queue-delay-us: got -1, expected microseconds in 0\.\.10000000"):
        RepositoryOptions(queue_delay_us=-1)
    # beyond what one machine runs or Triton's int32 config fields hold: the config was written before
    with pytest.raises(CfgExportError, match=r"sampler-instances: got 100000000000000000000, expected at most 256"):
        RepositoryOptions(sampler_instances=10**20)
    with pytest.raises(CfgExportError, match=r"max-rows: got 2147483648, expected at most 2147483647"):
        RepositoryOptions(max_rows=2**31)
    with pytest.raises(CfgExportError, match=r"queue-delay-us: got 10000001, expected microseconds in"):
        RepositoryOptions(queue_delay_us=10_000_001)
    with pytest.raises(CfgExportError, match=r"--threads applies to the python platform \(the runtime's backend "
                                             r"inside Triton\), not onnxruntime_onnx: drop --threads"):
        RepositoryOptions(platform="onnxruntime_onnx", threads=2)


def test_an_existing_repository_is_kept_without_overwrite(tiny_artifacts, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "mine.txt").write_text("keep")
    with pytest.raises(CfgExportError, match="already exists and is not empty; pass --overwrite"):
        write_repository(tiny_artifacts / "stacked", tmp_path / "repo")
    assert (tmp_path / "repo" / "mine.txt").read_text() == "keep"
    with pytest.raises(CfgExportError, match="not a folder written by cfg-export"):  # a user's folder: never
        write_repository(tiny_artifacts / "stacked", tmp_path / "repo", overwrite=True)
    assert (tmp_path / "repo" / "mine.txt").read_text() == "keep"
    write_repository(tiny_artifacts / "stacked", tmp_path / "ours")
    write_repository(tiny_artifacts / "stacked", tmp_path / "ours", overwrite=True)  # a repository of ours: replaced
    assert json.loads((tmp_path / "ours" / "cfg-export.json").read_text())["format"].startswith("cfg-export")


def test_a_pipeline_without_its_vae_decoder_is_refused(tiny_artifacts, tmp_path):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_artifacts / "stacked", pipeline / "unet")
    (pipeline / "pipeline.json").write_text(json.dumps({"format": "cfg-export-pipeline/1", "stages": {
        "denoiser": {"folder": "unet"}}}))
    with pytest.raises(CfgExportError, match=r"pipeline.json names stages vae_decoder that it does not list; "
                                             r"re-export the pipeline"):
        write_repository(pipeline, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_check_config_names_a_misspelt_field():
    with pytest.raises(CfgExportError, match="model config refused by Triton's model_config.proto: .*max_batch_sise"):
        check_config('name: "denoiser"\nmax_batch_sise: 4\n')
