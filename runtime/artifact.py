"""The Artifact: an exported folder, opened once and handed around as an object.

An artifact is a table of named stages. The artifact of one model (`cfg-export onnx
MODEL`) has one stage, `denoiser`, whose files sit in the folder itself:
`manifest.json` + `model.onnx`, and after `cfg-export trt` also `engine.json` +
`model.engine`. A pipeline artifact (text encoders, denoiser, VAE decoder) lists its
stages in `pipeline.json`, each stage in a subfolder of its own with the same files.

Opening reads every manifest once. A model file is hashed the first time it is asked
for, once, and checked against its manifest's sha256; nothing re-reads or re-hashes
a file the Artifact already holds. Backends are opened from an Artifact's model files
(runtime.backends.open_backend), never from paths.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine import ENGINE_MANIFEST
from .errors import CfgExportError
from .files import sha256_file
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .validation import read_json

log = logging.getLogger(__name__)

PIPELINE_NAME = "pipeline.json"
PIPELINE_FORMAT = "cfg-export-pipeline/1"
DENOISER = "denoiser"


@dataclass
class ModelFile:
    """One model file of a stage (an ONNX model or a TensorRT engine) and its manifest.
    `path` is checked against the manifest's sha256 the first time it is used."""

    manifest: Manifest
    path: Path
    verified: bool = False

    @property
    def is_engine(self) -> bool:
        return self.manifest.engine is not None


@dataclass
class Stage:
    """A named stage of an artifact: its folder and its model files (ONNX, engine or both)."""

    name: str
    directory: Path
    onnx: ModelFile | None = None
    engine: ModelFile | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def manifest(self) -> Manifest:
        """The ONNX manifest, or the engine's in a folder that holds only an engine."""
        return (self.onnx or self.engine).manifest


class Artifact:
    """An artifact folder: its stages, their manifests and model files, read once.

    Open it with Artifact.open(path); pass it to sample_guided, record_calibration,
    evaluate_guidance, run_bench, build_engine or open_backend instead of a path.
    """

    def __init__(self, directory: Path, stages: dict[str, Stage], pipeline: dict | None = None):
        self.directory = directory
        self.stages = stages
        self.pipeline = pipeline  # the pipeline.json contents, None for a one-model artifact
        self.hashes = 0  # files hashed so far (each at most once)
        self._verified: set = set()  # files beside the models checked so far

    def __repr__(self) -> str:
        return f"Artifact({str(self.directory)!r}, stages={list(self.stages)})"

    @classmethod
    def open(cls, path: str | Path) -> "Artifact":
        """Returns the artifact in folder `path` after reading its manifests (once);
        raises CfgExportError naming what is missing or malformed."""
        directory = Path(path)
        if not directory.is_dir():
            if directory.exists():
                raise CfgExportError(f"{directory}: a file, not an artifact folder; give the folder made by "
                                     f"cfg-export onnx")
            raise CfgExportError(f"{directory}: no such artifact folder; make one with: cfg-export onnx MODEL "
                                 f"-o {directory}")
        if (directory / PIPELINE_NAME).is_file():
            return cls._open_pipeline(directory)
        return cls(directory, {DENOISER: _read_stage(DENOISER, directory)})

    @classmethod
    def _open_pipeline(cls, directory: Path) -> "Artifact":
        path = directory / PIPELINE_NAME
        pipeline = read_json(path, f"{path} (re-export the pipeline)")
        if not isinstance(pipeline, dict) or pipeline.get("format") != PIPELINE_FORMAT:
            raise CfgExportError(f"{path}: format {pipeline.get('format') if isinstance(pipeline, dict) else None!r}"
                                 f", expected {PIPELINE_FORMAT!r}; re-export the pipeline")
        table = pipeline.get("stages")
        if not isinstance(table, dict) or not table:
            raise CfgExportError(f"{path}: no 'stages' table; re-export the pipeline")
        stages = {}
        for name, entry in table.items():
            folder = entry.get("folder") if isinstance(entry, dict) else None
            if not isinstance(folder, str) or Path(folder).is_absolute() or ".." in Path(folder).parts:
                raise CfgExportError(f"{path}: stage {name!r} has no valid 'folder'; re-export the pipeline")
            if entry.get("model", True):
                stages[name] = _read_stage(name, directory / folder)
            else:  # a stage without a model file (a tokenizer): its files are read by its user
                stages[name] = Stage(name, directory / folder)
        return cls(directory, stages, pipeline)

    # -- stages and model files ---------------------------------------------------------------

    def stage(self, name: str = DENOISER) -> Stage:
        try:
            return self.stages[name]
        except KeyError:
            raise CfgExportError(f"{self.directory}: no stage {name!r}; it has {', '.join(self.stages)}") from None

    @property
    def manifest(self) -> Manifest:
        """The denoiser's manifest (ONNX, or the engine's in an engine-only folder)."""
        return self.stage(DENOISER).manifest

    def model_file(self, stage: str = DENOISER, engine: bool | None = None) -> ModelFile:
        """Returns the stage's model file, checked against its sha256 (once per file).
        engine True: the TensorRT engine; False: the ONNX model; None: the ONNX model,
        or the engine in a folder that holds only an engine."""
        s = self.stage(stage)
        if engine is None:
            chosen = s.onnx or s.engine
        elif engine:
            chosen = s.engine
            if chosen is None:
                raise CfgExportError(f"{s.directory}: no {ENGINE_MANIFEST} in it; build an engine with: "
                                     f"cfg-export trt {self.directory}")
        else:
            chosen = s.onnx
            if chosen is None and s.engine is None:
                raise CfgExportError(f"{s.directory}: stage {stage!r} holds no model (neither an ONNX model nor a "
                                     f"TensorRT engine)")
            if chosen is None:
                raise CfgExportError(f"{s.directory} holds a TensorRT engine, not an ONNX model; use --backend "
                                     f"tensorrt, or point at the folder made by cfg-export onnx")
        self.verify(chosen)
        return chosen

    def verify(self, model: ModelFile) -> None:
        """Checks the model file's sha256 against its manifest, the first time only."""
        if model.verified:
            return
        if not model.path.is_file():
            raise CfgExportError(f"{model.path}: missing (its manifest names it); re-export the model")
        actual = sha256_file(model.path)
        self.hashes += 1
        if actual != model.manifest.model_sha256:
            raise CfgExportError(
                f"{model.path} does not match its manifest: sha256 {actual[:12]}..., manifest says "
                f"{model.manifest.model_sha256[:12]}...; the file was changed after export: re-export it")
        if model.manifest.data_file is not None:  # ONNX external data beside the model
            self.verify_file(model.path.parent / model.manifest.data_file, model.manifest.data_sha256)
        model.verified = True

    def verify_file(self, path: Path, sha256: str) -> Path:
        """Returns `path` after checking it against the sha256 its manifest gives (once per file)."""
        key = ("verified", str(path))
        if key in self._verified:
            return path
        if not path.is_file():
            raise CfgExportError(f"{path}: missing (its manifest names it); re-export the pipeline")
        actual = sha256_file(path)
        self.hashes += 1
        if actual != sha256:
            raise CfgExportError(f"{path} does not match its manifest: sha256 {actual[:12]}..., manifest says "
                                 f"{sha256[:12]}...; the file was changed after export: re-export it")
        self._verified.add(key)
        return path

    @property
    def is_pipeline(self) -> bool:
        return self.pipeline is not None

    def stage_entry(self, name: str) -> dict:
        """The stage's entry of pipeline.json (folder, model, and a tokenizer's facts)."""
        if self.pipeline is None:
            raise CfgExportError(f"{self.directory}: a one-model artifact, not a pipeline (no {PIPELINE_NAME})")
        self.stage(name)
        return self.pipeline["stages"][name]

    # -- files beside the model -----------------------------------------------------------

    def null_embedding(self, stage: str = DENOISER) -> np.ndarray:
        """Returns the stage's null embedding [L, D] float32 (condition.null_file), read once."""
        s = self.stage(stage)
        if "null_embedding" not in s._cache:
            from .conditions import read_null_embedding

            s._cache["null_embedding"] = read_null_embedding(s.manifest, s.directory)
        return s._cache["null_embedding"]


    def prompt_tokenizer(self, stage: str):
        """Returns the tokenizer stage's PromptTokenizer (its tokenizer.json parsed once per
        open Artifact: a server's sampler keeps one Artifact for every request)."""
        s = self.stage(stage)
        if "tokenizer" not in s._cache:
            from .prompts import PromptTokenizer

            s._cache["tokenizer"] = PromptTokenizer(self, stage)
        return s._cache["tokenizer"]


def _read_stage(name: str, directory: Path) -> Stage:
    """Reads the manifests of one stage folder: manifest.json (ONNX) and engine.json (engine)."""
    stage = Stage(name, directory)
    has_onnx, has_engine = (directory / MANIFEST_NAME).is_file(), (directory / ENGINE_MANIFEST).is_file()
    if not has_onnx and not has_engine:
        if directory.is_dir():
            raise CfgExportError(f"{directory}: no {MANIFEST_NAME} in it; is it an artifact folder made by "
                                 f"cfg-export onnx?")
        raise CfgExportError(f"{directory}: missing (stage {name!r}); re-export the model")
    if has_onnx:
        manifest = read_manifest(directory)
        stage.onnx = ModelFile(manifest, directory / manifest.model_file)
    if has_engine:
        manifest = read_manifest(directory, ENGINE_MANIFEST)
        if manifest.engine is None:
            raise CfgExportError(f"{directory / ENGINE_MANIFEST}: has no 'engine' block; rebuild it with "
                                 f"cfg-export trt")
        stage.engine = ModelFile(manifest, directory / manifest.model_file)
    return stage


def as_artifact(artifact: "Artifact | str | Path") -> "Artifact":
    """Returns `artifact` itself, or the Artifact opened from a folder path."""
    return artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
