"""Tiny diffusers pipelines, their artifacts and the reference pipelines, built once per session."""
from pathlib import Path

import pytest

from tests import tiny_pipelines

# each pipeline with the scheduler config its family ships
SAVERS = {
    "sd": lambda f: tiny_pipelines.save_sd(f, scheduler=tiny_pipelines.SD15_PNDM),
    "sd_v": lambda f: tiny_pipelines.save_sd(f, prediction_type="v_prediction", scheduler=tiny_pipelines.SD21_DDIM),
    "sdxl": lambda f: tiny_pipelines.save_sdxl(f, scheduler=tiny_pipelines.SDXL_EULER),
    "sd3": lambda f: tiny_pipelines.save_sd3(f),
    "dit": lambda f: tiny_pipelines.save_dit(f),
}


@pytest.fixture(scope="session")
def pipeline_folders(tmp_path_factory) -> dict[str, Path]:
    """Pipeline folders saved by diffusers, each with its family's shipped scheduler: sd
    (SD 1.5's PNDM, eps), sd_v (SD 2.1's DDIM, v-prediction), sdxl (SDXL's Euler), sd3
    (flow-matching Euler), dit (DDIM)."""
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
