"""Loading a trained guided model: a model folder (config.json + safetensors) or a
`module:factory` string. Returns the torch module and its guidance facts."""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.manifest import FACTS_KEYS, ModelFacts
from cfg_export.runtime.validation import expect_dict, expect_str, read_json, refuse_unknown, require_keys

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"


@dataclass
class LoadedModel:
    module: Any  # torch.nn.Module, in eval mode
    facts: ModelFacts
    source: str  # what the user named, for the manifest
    null_embedding: Any = None  # numpy [L, D] float32: an embedding condition's null, when not in the source folder
    notes: list = field(default_factory=list)  # facts the user should know (assumed defaults), for the CLI


@contextlib.contextmanager
def _on_sys_path(*folders: Path):
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            sys.path.remove(f)


def quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice while loading; the export
    has its own output: only their errors get through (-v shows our own log instead)."""
    for name in ("diffusers", "transformers"):
        try:
            utils = __import__(f"{name}.utils", fromlist=["logging"]).logging
        except ImportError:
            continue
        utils.set_verbosity_error()
        utils.disable_progress_bar()


def import_factory(spec: str, *folders: Path):
    """Returns the callable named by 'module:factory', importing from `folders` first."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CfgExportError(f"factory {spec!r}: expected 'module:factory', e.g. 'mypackage.nets:build_model'")
    with _on_sys_path(*folders, Path.cwd()):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CfgExportError(
                f"cannot import module {module_name!r} of factory {spec!r}: {exc}; "
                f"it is looked up in {', '.join(str(f) for f in folders) or 'nothing'}, the current folder and sys.path"
            ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CfgExportError(f"factory {spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def _split_factory_result(result, spec: str):
    """A factory returns a module, or (module, facts dict)."""
    torch = require("torch", "export")
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        return result[0], result[1]
    if isinstance(result, torch.nn.Module):
        return result, None
    raise CfgExportError(
        f"factory {spec!r} returned {type(result).__name__}; expected a torch.nn.Module or (module, guidance facts dict)"
    )


def load_state_dict(path: Path) -> dict:
    """Returns the tensors of a weights file, never unpickling: safetensors, or a torch
    file read with weights_only=True."""
    torch = require("torch", "export")
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "export")
        try:
            return safetensors_torch.load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CfgExportError(f"{path}: unreadable safetensors file ({exc})") from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CfgExportError(f"{path}: cannot load with weights_only=True ({str(exc).splitlines()[0]})") from None
    raise CfgExportError(f"{path}: unknown weights format; expected .safetensors (or .pt/.pth/.bin with plain tensors)")


def _load_folder(folder: Path) -> LoadedModel:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CfgExportError(f"{folder}: no {CONFIG_NAME}; a model folder holds config.json and .safetensors weights")
    config = read_config(config_path)
    facts = config["guidance"]
    code_dir = (folder / config["code_dir"]).resolve()
    factory = import_factory(config["factory"], folder.resolve(), code_dir)
    module, _ = _split_factory_result(call_factory(factory, config["factory"], config["args"]), config["factory"])
    weights = folder / config["weights"]
    if not weights.is_file():
        raise CfgExportError(f"{weights}: weights file missing (config.json names it)")
    state = load_state_dict(weights)
    check_finite_weights(state, weights)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise CfgExportError(f"{weights} does not fit the module built by {config['factory']}: "
                             f"{describe_state_mismatch(module, state) or str(exc).splitlines()[0]}") from None
    return LoadedModel(module.eval(), facts, str(folder))


def check_finite_weights(state: dict, source) -> None:
    """Raises CfgExportError naming the first tensor of a weights file that holds NaN or infinity."""
    torch = require("torch", "export")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise CfgExportError(f"{source}: tensor {name!r} holds {bad} NaN or infinite value"
                                     f"{'s' * (bad > 1)}; the weights are broken (a diverged run, or a bad "
                                     f"conversion): export a good checkpoint")


CONFIG_KEYS = ("factory", "code_dir", "args", "weights", "guidance", "description", "training")  # the last two: free notes


def read_config(config_path: Path) -> dict:
    """Returns a model folder's config.json with its defaults filled in and its guidance
    block parsed (ModelFacts); raises CfgExportError naming the first bad field."""
    config = read_json(config_path)
    try:
        config = expect_dict(config, "config.json")
        require_keys(config, ("factory", "guidance"), "config.json")
        refuse_unknown(config, CONFIG_KEYS, "config.json")
        factory = expect_str(config["factory"], "config.json factory")
        args = expect_dict(config.get("args", {}), "config.json args")
        code_dir = expect_str(config.get("code_dir", "."), "config.json code_dir")
        weights = expect_str(config.get("weights", "model.safetensors"), "config.json weights")
        if not weights or Path(weights).is_absolute():
            raise CfgExportError(f"config.json weights: got {weights!r}, expected a file name in the model folder")
        refuse_unknown(expect_dict(config["guidance"], "config.json guidance"), FACTS_KEYS, "config.json guidance")
        facts = ModelFacts.from_dict(config["guidance"], "config.json guidance")
    except CfgExportError as exc:
        raise CfgExportError(f"{config_path}: {exc}") from None
    return {"factory": factory, "args": args, "code_dir": code_dir, "weights": weights, "guidance": facts}


def call_factory(factory, spec: str, args: dict):
    """Calls a user's factory; an exception it raises becomes one line naming it."""
    try:
        return factory(**args)
    except TypeError as exc:
        raise CfgExportError(f"factory {spec!r} does not take the config's args {sorted(args)}: {exc}") from None
    except Exception as exc:  # the user's code: any exception is theirs to fix, shown in one line
        raise CfgExportError(f"factory {spec!r} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             f"; fix the factory (run it in Python to see the traceback)") from None


def describe_state_mismatch(module, state: dict) -> str:
    """Returns which tensors differ between a module and a weights file: missing, unexpected,
    and shape mismatches (a few of each, with counts), or '' when they agree."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, names in (("missing in the file", missing), ("not in the module", unexpected),
                         ("shape file vs module", shapes)):
        if names:
            shown = "; ".join(names[:3]) + (f"; ... ({len(names)} in all)" if len(names) > 3 else "")
            parts.append(f"{label}: {shown}")
    if parts:
        parts.append("is it the weights of another architecture or another config 'args'?")
    return " | ".join(parts)


def load_model(model: str, null_class: int | None = None, null_embedding: str | Path | None = None) -> LoadedModel:
    """Returns the module and guidance facts of MODEL: a model folder (config.json naming
    a 'module:factory', its args, the weights and the guidance facts), a folder saved by
    diffusers (see cfg_export.export.diffusers_models, which takes null_class and
    null_embedding), or a 'module:factory' string whose factory returns (module,
    guidance facts dict)."""
    require("torch", "export")
    path = Path(model)
    if path.is_dir():
        from cfg_export.export import diffusers_models

        if diffusers_models.is_diffusers_folder(path):
            return diffusers_models.load_diffusers(path, null_class, null_embedding)
    if null_class is not None or null_embedding is not None:
        raise CfgExportError("--null-class and --null-embedding apply to diffusers model folders; this model "
                             "states its null condition in its guidance facts (condition.null, condition.null_file)")
    if path.is_dir():
        return _load_folder(path)
    if path.exists():
        raise CfgExportError(f"{model}: a file, not a model folder; MODEL is a folder with config.json or 'module:factory'")
    if ":" not in model:
        raise CfgExportError(f"{model}: no such model folder, and not a 'module:factory' string")
    module, facts = _split_factory_result(call_factory(import_factory(model), model, {}), model)
    if facts is None:
        raise CfgExportError(f"factory {model!r} returned only a module; return (module, guidance facts dict) "
                             "with condition, prediction, schedule, sample_shape")
    return LoadedModel(module.eval(), ModelFacts.from_dict(facts, f"factory {model!r} guidance facts"), model)
