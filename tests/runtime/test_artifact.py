"""The Artifact: opened once, each manifest read once, each model file hashed once; one
backend session reused across calls; stages; the errors of a folder that is not one."""
import builtins
import io
import json
import shutil

import numpy as np
import pytest

from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.backends import BackendOptions, open_backend
from cfg_export.runtime.backends.onnxrt import OnnxRuntimeBackend
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.pipeline import sample_guided


@pytest.fixture
def opened_files(monkeypatch):
    """Counts the files Python opens, by name (ONNX Runtime reads model.onnx in C++: not counted)."""
    counts = {}
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        name = getattr(file, "name", None) or str(file).rsplit("/", 1)[-1]
        counts[name] = counts.get(name, 0) + 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return counts


def test_sampling_from_a_path_reads_each_manifest_once_and_hashes_once(tiny_artifacts, opened_files):
    sample_guided(tiny_artifacts / "stacked", [0, 1], 2.0, steps=3)
    assert opened_files.get("manifest.json") == 1
    assert opened_files.get("model.onnx") == 1  # the sha256, once; ONNX Runtime loads it itself


def test_an_artifact_hashes_once_across_many_samplings(tiny_artifacts, opened_files):
    artifact = Artifact.open(tiny_artifacts / "stacked")
    with open_backend(artifact) as backend:
        for w in (0.0, 1.0, 3.0):
            for n in (1, 3):
                sample_guided(artifact, list(range(n)), w, steps=2, backend=backend)
    assert artifact.hashes == 1 and opened_files.get("model.onnx") == 1
    assert opened_files.get("manifest.json") == 1


def test_eval_over_nine_w_opens_one_session(digits_artifact, monkeypatch):
    from cfg_export.evaluation.evaluate import evaluate_guidance

    opened = []
    activate = OnnxRuntimeBackend.activate
    monkeypatch.setattr(OnnxRuntimeBackend, "activate", lambda self: (opened.append(self.path), activate(self)))
    rows = evaluate_guidance(digits_artifact, [0, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 4], per_class=2, steps=2, resamples=10)
    assert len(rows) == 9 and len(opened) == 1


def test_a_given_backend_must_belong_to_the_artifact(tiny_artifacts):
    with open_backend(tiny_artifacts / "fused") as other:
        with pytest.raises(CfgExportError, match="runs another model than"):
            sample_guided(tiny_artifacts / "stacked", [0], 1.0, steps=2, backend=other)
    closed = open_backend(tiny_artifacts / "stacked")
    with pytest.raises(CfgExportError, match="backend is not open"):
        sample_guided(tiny_artifacts / "stacked", [0], 1.0, steps=2, backend=closed)


def test_one_session_gives_what_fresh_sessions_give(tiny_artifacts):
    artifact = Artifact.open(tiny_artifacts / "stacked")
    fresh = [sample_guided(artifact, [0, 2], w, steps=4, seed=1).samples for w in (0.5, 2.0)]
    with open_backend(artifact) as backend:
        reused = [sample_guided(artifact, [0, 2], w, steps=4, seed=1, backend=backend).samples for w in (0.5, 2.0)]
    for a, b in zip(fresh, reused):
        np.testing.assert_array_equal(a, b)


def test_backend_options_reach_the_session(tiny_artifacts):
    backend = open_backend(tiny_artifacts / "stacked", "onnxruntime-cpu", BackendOptions(threads=1, spinning=False))
    with backend:
        config = backend.session.get_session_options()
        assert config.intra_op_num_threads == 1
        assert config.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("name,options,message", [
    ("onnxruntime-cpu", BackendOptions(cuda_graph=True), "--cuda-graph applies to the tensorrt backend"),
    ("onnxruntime-cpu", BackendOptions(trt_cache="x"), "--trt-cache applies to the onnxruntime-tensorrt backend"),
    ("onnxruntime-cpu", BackendOptions(device=1), "--device applies to the onnxruntime-cuda"),
])
def test_options_a_backend_would_ignore_are_refused(tiny_artifacts, name, options, message):
    with pytest.raises(CfgExportError, match=message):
        open_backend(tiny_artifacts / "stacked", name, options)


def test_bad_backend_options():
    with pytest.raises(CfgExportError, match="threads: got 0, expected an integer >= 1"):
        BackendOptions(threads=0)


def test_folders_that_are_not_artifacts(tmp_path, tiny_artifacts):
    with pytest.raises(CfgExportError, match="no such artifact folder; make one with: cfg-export onnx"):
        Artifact.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CfgExportError, match="a file, not an artifact folder"):
        Artifact.open(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CfgExportError, match="no manifest.json in it"):
        Artifact.open(tmp_path / "empty")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts / "stacked", copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(CfgExportError, match="model.onnx: missing"):
        Artifact.open(copy).model_file()


def test_pipeline_table_of_stages(tmp_path, tiny_artifacts):
    """A pipeline.json lists stages in subfolders; each opens like a one-model artifact."""
    root = tmp_path / "pipe"
    shutil.copytree(tiny_artifacts / "stacked", root / "denoiser")
    (root / "tokenizer").mkdir()
    (root / "pipeline.json").write_text(json.dumps({
        "format": "cfg-export-pipeline/1",
        "stages": {"tokenizer": {"folder": "tokenizer", "model": False}, "denoiser": {"folder": "denoiser"}}}))
    artifact = Artifact.open(root)
    assert list(artifact.stages) == ["tokenizer", "denoiser"] and artifact.manifest.layout.value == "stacked"
    assert artifact.stage("tokenizer").onnx is None
    assert sample_guided(artifact, [0], 1.0, steps=2).samples.shape == (1, 2, 6, 6)
    with pytest.raises(CfgExportError, match="no stage 'vae_decoder'; it has tokenizer, denoiser"):
        artifact.stage("vae_decoder")
    (root / "pipeline.json").write_text(json.dumps({"format": "cfg-export-pipeline/1",
                                                    "stages": {"denoiser": {"folder": "../elsewhere"}}}))
    with pytest.raises(CfgExportError, match="stage 'denoiser' has no valid 'folder'"):
        Artifact.open(root)
