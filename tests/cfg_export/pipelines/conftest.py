"""Tiny diffusers pipelines, their artifacts and the reference pipelines, built once per session."""
from pathlib import Path

import pytest

from tests import tiny_pipelines

SAVERS = {
    "sd": lambda f: tiny_pipelines.save_sd(f),
    "sd_v": lambda f: tiny_pipelines.save_sd(f, prediction_type="v_prediction"),
    "sdxl": lambda f: tiny_pipelines.save_sdxl(f),
    "dit": lambda f: tiny_pipelines.save_dit(f),
}


@pytest.fixture(scope="session")
def pipeline_folders(tmp_path_factory) -> dict[str, Path]:
    """Pipeline folders saved by diffusers: sd (eps), sd_v (v-prediction, as SD 2.x), sdxl, dit."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("pipelines")
    return {name: save(root / name) for name, save in SAVERS.items()}


@pytest.fixture(scope="session")
def pipeline_artifacts(pipeline_folders, tmp_path_factory) -> dict[str, Path]:
    """Each pipeline exported by cfg-export onnx."""
    pytest.importorskip("tokenizers")
    from cfg_export.export.pipelines import export_pipeline

    root = tmp_path_factory.mktemp("pipeline_artifacts")
    for name, folder in pipeline_folders.items():
        export_pipeline(folder, root / name)
    return {name: root / name for name in pipeline_folders}


@pytest.fixture(scope="session")
def pipeline_references(pipeline_folders) -> dict:
    """The same folders loaded back by diffusers (the reference pipelines)."""
    return {name: tiny_pipelines.load_pipeline(folder) for name, folder in pipeline_folders.items()}
