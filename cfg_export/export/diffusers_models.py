"""diffusers model folders: a UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel
saved by `save_pretrained`, seen as `forward(sample, timestep, cond) -> eps` with the
guidance facts read from its config and the scheduler folder beside it.

Only the export path imports this module (it imports torch at the top); diffusers is
imported when a folder is loaded. Nothing is ever downloaded: from_pretrained runs
with local_files_only.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfg_export.export.loading import CONFIG_NAME, LoadedModel, quiet_libraries
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.manifest import ModelFacts
from cfg_export.runtime.schedule import BETA_KINDS
from cfg_export.runtime.validation import read_json

log = logging.getLogger(__name__)

SUPPORTED = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")
PIPELINE_INDEX = "model_index.json"
MODEL_SUBFOLDERS = ("unet", "transformer")  # where a pipeline folder keeps its denoiser
SCHEDULER_CONFIG = "scheduler_config.json"
NULL_EMBEDDING_FILE = "null_embedding.npy"  # the null condition's name inside the artifact
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers prediction_type -> ours
# diffusers' DDPMScheduler defaults: the schedule assumed when no scheduler folder is found
DEFAULT_SCHEDULER = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                     "num_train_timesteps": 1000, "prediction_type": "epsilon"}


@dataclass(frozen=True)
class _Family:
    keyword: str  # the diffusers forward argument that takes `cond`
    condition: str  # "class" or "embedding"


FAMILIES = {
    "UNet2DModel": _Family("class_labels", "class"),
    "UNet2DConditionModel": _Family("encoder_hidden_states", "embedding"),
    "DiTTransformer2DModel": _Family("class_labels", "class"),
}
assert tuple(FAMILIES) == SUPPORTED


class DiffusersDenoiser(torch.nn.Module):
    """sample [B, C, H, W], timestep [B], cond -> the diffusers model's output [B, C', H, W].

    cond is class labels [B] int64 (UNet2DModel, DiT: `class_labels=`) or text-style
    embeddings [B, L, D] float32 (UNet2DConditionModel: `encoder_hidden_states=`).
    """

    def __init__(self, model: torch.nn.Module, keyword: str):
        super().__init__()
        self.model = model
        self.keyword = keyword

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, **{self.keyword: cond}, return_dict=False)[0]


def _read_json(path: Path) -> dict:
    return read_json(path)


def _is_diffusers_config(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False  # the cfg-export loader reports it
    return isinstance(d, dict) and "_class_name" in d and "factory" not in d


def is_diffusers_folder(folder: Path) -> bool:
    """True for a folder saved by diffusers: a model folder whose config.json has
    `_class_name` and no cfg-export `factory`, or a pipeline folder (model_index.json,
    or unet/ or transformer/ holding such a model folder)."""
    if (folder / CONFIG_NAME).is_file():
        return _is_diffusers_config(folder / CONFIG_NAME)
    return (folder / PIPELINE_INDEX).is_file() or any(
        _is_diffusers_config(folder / name / CONFIG_NAME) for name in MODEL_SUBFOLDERS)


def _model_dir(folder: Path) -> Path:
    """Returns the folder holding the denoiser's config.json: `folder` itself, or its
    unet/ or transformer/ subfolder when `folder` is a pipeline folder."""
    if (folder / CONFIG_NAME).is_file():
        return folder
    for name in MODEL_SUBFOLDERS:
        if (folder / name / CONFIG_NAME).is_file():
            return folder / name
    raise CfgExportError(f"{folder}: a diffusers pipeline folder without a model: expected "
                         f"{' or '.join(n + '/' + CONFIG_NAME for n in MODEL_SUBFOLDERS)}")


def _class_name(config: dict, config_path: Path) -> str:
    """Returns the supported class a config describes; DiT checkpoints saved as the
    generic Transformer2DModel (facebook/DiT-XL-2-*) count as DiTTransformer2DModel."""
    name = config.get("_class_name")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero" and config.get("patch_size"):
        return "DiTTransformer2DModel"
    if name not in SUPPORTED:
        raise CfgExportError(f"{config_path}: diffusers class {name} is not supported; "
                             f"supported: {', '.join(SUPPORTED)}")
    return name


def _find_scheduler(model_dir: Path) -> Path | None:
    """Returns the scheduler config beside the model: pipeline/scheduler/ next to
    pipeline/unet/, model/scheduler/, or a scheduler_config.json in the model folder."""
    for candidate in (model_dir.parent / "scheduler", model_dir / "scheduler", model_dir):
        if (candidate / SCHEDULER_CONFIG).is_file():
            return candidate / SCHEDULER_CONFIG
    return None


def _schedule_facts(model_dir: Path, notes: list[str]) -> tuple[dict, str, dict | None]:
    """Returns (schedule dict, prediction, scheduler config) from the scheduler folder:
    the training schedule and prediction type its config states, and the config itself,
    whole, as the sampler to use by default. Without a scheduler folder: diffusers'
    DDPMScheduler defaults (with a note) and no config."""
    path = _find_scheduler(model_dir)
    if path is None:
        notes.append(f"no scheduler folder beside {model_dir}: assumed diffusers' defaults (linear betas "
                     "1e-4..0.02, 1000 timesteps, epsilon prediction)")
        recorded = None
        config = {}
    else:
        config = _read_json(path)
        recorded = config if isinstance(config.get("_class_name"), str) else None
        if recorded is None:
            notes.append(f"{path} names no scheduler class (_class_name): the runtime samples with DDIM")
        log.info("training schedule and scheduler from %s", path)
    if config.get("_class_name", "").startswith("FlowMatch"):
        return {"kind": "flow_match", "num_train_timesteps": int(config.get("num_train_timesteps", 1000))}, \
            "flow", recorded
    config = {**DEFAULT_SCHEDULER, **{k: v for k, v in config.items() if v is not None}}
    kind = config["beta_schedule"]
    if kind not in BETA_KINDS:
        raise CfgExportError(f"{path}: beta_schedule {kind!r} is not supported; expected one of "
                             f"{', '.join(BETA_KINDS)}")
    prediction = config["prediction_type"]
    if prediction not in PREDICTIONS:
        raise CfgExportError(f"{path}: prediction_type {prediction!r} is not supported; expected one of "
                             f"{', '.join(PREDICTIONS)}")
    schedule = {"kind": kind, "num_train_timesteps": int(config["num_train_timesteps"]),
                "beta_start": float(config["beta_start"]), "beta_end": float(config["beta_end"])}
    if config.get("trained_betas") is not None:
        schedule["trained_betas"] = [float(b) for b in config["trained_betas"]]
    if config.get("rescale_betas_zero_snr"):
        schedule["rescale_betas_zero_snr"] = True
    if recorded is not None:
        _check_scheduler(recorded, path, notes)
    return schedule, PREDICTIONS[prediction], recorded


def _check_scheduler(config: dict, path: Path, notes: list[str]) -> None:
    """Notes a scheduler config that the runtime cannot sample as it is (it still exports:
    `cfg-export sample --sampler NAME` picks another)."""
    from cfg_export.runtime.samplers import resolve_scheduler

    try:
        resolve_scheduler(config)
    except CfgExportError as exc:
        notes.append(f"{path}: {exc}; sample this model with --sampler NAME")


def _sample_shape(config: dict, config_path: Path) -> list[int]:
    size = config.get("sample_size")
    if isinstance(size, int):
        size = [size, size]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        raise CfgExportError(f"{config_path}: sample_size {size!r}: expected an int or [height, width]")
    return [int(config["in_channels"]), *size]


def _class_condition(name: str, config: dict, config_path: Path, null_class: int | None) -> dict:
    """Returns the class condition: num_classes and the null class index, checked against
    the model's embedding table."""
    if name == "DiTTransformer2DModel":
        rows = int(config["num_embeds_ada_norm"]) + 1  # LabelEmbedding adds the null row at the end
    else:
        if config.get("class_embed_type") is not None or config.get("num_class_embeds") is None:
            raise CfgExportError(
                f"{config_path}: UNet2DModel without a class embedding table (class_embed_type "
                f"{config.get('class_embed_type')!r}, num_class_embeds {config.get('num_class_embeds')!r}); "
                "guidance needs class_embed_type None and num_class_embeds (classes + the null class)")
        rows = int(config["num_class_embeds"])
    null = rows - 1 if null_class is None else int(null_class)
    if not 0 <= null < rows:
        raise CfgExportError(f"--null-class: got {null}, expected a class index 0..{rows - 1} "
                             f"(the model has {rows} class embeddings)")
    if null != rows - 1:
        raise CfgExportError(f"--null-class: got {null}, a row inside the class table 0..{rows - 1}; cfg-export takes "
                             f"the classes as 0..K-1 and the null class as the last row ({rows - 1}), so class {null} "
                             f"would be both a class and the null (its guidance would do nothing); retrain or remap "
                             f"the table so the null class is the last row")
    return {"kind": "class", "num_classes": rows - 1, "null": null}


def _embedding_width(config: dict, config_path: Path) -> int:
    """Returns D of encoder_hidden_states [B, L, D] for a UNet2DConditionModel; refuses
    models that need conditions beyond the text embedding."""
    extras = {k: config.get(k) for k in ("class_embed_type", "num_class_embeds", "addition_embed_type")}
    extras = {k: v for k, v in extras.items() if v is not None}
    if extras:
        found = ", ".join(f"{k}={v!r}" for k, v in extras.items())
        raise CfgExportError(f"{config_path}: UNet2DConditionModel with {found} needs conditions beyond "
                             "encoder_hidden_states, which cfg-export does not support")
    hid_type = config.get("encoder_hid_dim_type")
    if config.get("encoder_hid_dim") is not None and hid_type in (None, "text_proj"):
        return int(config["encoder_hid_dim"])
    if hid_type is not None:
        raise CfgExportError(f"{config_path}: encoder_hid_dim_type {hid_type!r} is not supported")
    dims = config.get("cross_attention_dim")
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if len(set(dims)) != 1 or not isinstance(dims[0], int):
        raise CfgExportError(f"{config_path}: cross_attention_dim {config.get('cross_attention_dim')!r}: "
                             "expected one width D for every block")
    return dims[0]


def read_null_embedding(path: str | Path | None, width: int, config_path: Path) -> np.ndarray:
    """Returns the null embedding [L, D] float32 from a .npy file of shape [L, D] or [1, L, D]
    (for Stable Diffusion: the text encoder's output for the empty prompt)."""
    if path is None:
        raise CfgExportError(f"{config_path}: a text-conditioned UNet2DConditionModel needs the null condition: "
                             f"pass --null-embedding FILE.npy, an [L, {width}] embedding (for Stable Diffusion, "
                             "the text encoder's output for the empty prompt)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CfgExportError(f"--null-embedding {path}: cannot read it as .npy ({exc})") from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[1] != width or not np.issubdtype(array.dtype, np.floating):
        raise CfgExportError(f"--null-embedding {path}: got {array.dtype} of shape {list(array.shape)}, expected a "
                             f"float array [L, {width}] (or [1, L, {width}]): D = the model's cross_attention_dim")
    if not np.all(np.isfinite(array)):
        raise CfgExportError(f"--null-embedding {path}: contains NaN or infinity")
    return array.astype(np.float32)


def load_diffusers(folder: str | Path, null_class: int | None = None,
                   null_embedding: str | Path | None = None) -> LoadedModel:
    """Returns the diffusers model saved in `folder` (a model folder, or a pipeline folder
    with unet/ or transformer/) wrapped as forward(sample, timestep, cond), and its
    guidance facts: condition from the model class, prediction and schedule from the
    scheduler folder beside it.

    null_class: the null class of a class-conditional model (default: the last row of
    its class embedding table, num_classes for DiT). null_embedding: a .npy file [L, D],
    the null condition of a UNet2DConditionModel (required for it).
    """
    folder = Path(folder)
    model_dir = _model_dir(folder)
    config_path = model_dir / CONFIG_NAME
    config = _read_json(config_path)
    name = _class_name(config, config_path)
    family = FAMILIES[name]
    if family.condition == "class" and null_embedding is not None:
        raise CfgExportError(f"--null-embedding: {name} takes class labels; use --null-class for its null class")
    if family.condition == "embedding" and null_class is not None:
        raise CfgExportError(f"--null-class: {name} takes embeddings; use --null-embedding FILE.npy")
    notes: list[str] = []
    schedule, prediction, scheduler = _schedule_facts(model_dir, notes)
    null_array = None
    if family.condition == "class":
        condition = _class_condition(name, config, config_path, null_class)
    else:
        null_array = read_null_embedding(null_embedding, _embedding_width(config, config_path), config_path)
        condition = {"kind": "embedding", "null_file": NULL_EMBEDDING_FILE, "shape": list(null_array.shape)}
    facts = ModelFacts.from_dict({"condition": condition, "prediction": prediction, "schedule": schedule,
                                  "sample_shape": _sample_shape(config, config_path), "timestep_dtype": "int64",
                                  "scheduler": scheduler})
    diffusers = require("diffusers", "diffusers")
    quiet_libraries()
    try:
        model = getattr(diffusers, name).from_pretrained(str(model_dir), local_files_only=True, low_cpu_mem_usage=False,
                                                         torch_dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CfgExportError(f"{model_dir}: diffusers cannot load the {name} ({str(exc).splitlines()[0]})") from None
    log.info("loaded %s from %s: %s condition, %s prediction", name, model_dir, condition["kind"], prediction)
    return LoadedModel(DiffusersDenoiser(model, family.keyword).eval(), facts, str(folder),
                       null_embedding=null_array, notes=notes)
