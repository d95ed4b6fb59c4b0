"""Tiny diffusers models saved as folders, and their artifacts, built once per session."""
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_diffusers


@pytest.fixture(scope="session")
def diffusers_folders(tmp_path_factory) -> dict[str, Path]:
    """Three families saved with save_pretrained beside a scheduler/ folder, plus the null
    embedding file of the text-conditioned UNet. Keys: unet2d (the pipeline folder,
    holding unet/ and scheduler/), sd (its unet/ folder), dit (its transformer/ folder),
    null (the .npy)."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("diffusers")
    tiny_diffusers.save_pipeline_folder(root / "unet2d", tiny_diffusers.unet2d(), "unet")
    folders = {
        "unet2d": root / "unet2d",
        "sd": tiny_diffusers.save_pipeline_folder(root / "sd", tiny_diffusers.unet2d_condition(), "unet"),
        "dit": tiny_diffusers.save_pipeline_folder(root / "dit", tiny_diffusers.dit(), "transformer"),
        "null": root / "null_embedding.npy",
    }
    np.save(folders["null"], tiny_diffusers.null_embedding())
    return folders


@pytest.fixture(scope="session")
def diffusers_artifacts(diffusers_folders, tmp_path_factory) -> dict[str, Path]:
    """Each family exported by cfg-export (stacked layout, dynamic batch)."""
    from cfg_export.export.exporter import export_onnx

    root = tmp_path_factory.mktemp("diffusers_artifacts")
    artifacts = {name: root / name for name in ("unet2d", "sd", "dit")}
    export_onnx(str(diffusers_folders["unet2d"]), artifacts["unet2d"])
    export_onnx(str(diffusers_folders["sd"]), artifacts["sd"], null_embedding=diffusers_folders["null"])
    export_onnx(str(diffusers_folders["dit"]), artifacts["dit"])
    return artifacts
