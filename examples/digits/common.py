"""Small helpers shared by the two training scripts: seeding and atomic writes."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch


def seed_everything(seed: int, threads: int = 2) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def save_weights(state_dict: dict, path: str) -> None:
    """safetensors.torch.save_file to path + '.tmp', then os.replace (atomic)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_json(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def load_model(config_path: str):
    """Builds the model a config.json describes and loads its weights (eval mode).
    Imports the factory the way the export tool does: code_dir on sys.path (and
    this folder after it, for configs written elsewhere with --out)."""
    import importlib
    import sys

    from safetensors.torch import load_file

    folder = os.path.dirname(os.path.abspath(config_path))
    with open(config_path) as f:
        cfg = json.load(f)
    code_dir = os.path.normpath(os.path.join(folder, cfg["code_dir"]))
    if code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.append(here)
    module_name, fn_name = cfg["factory"].split(":")
    model = getattr(importlib.import_module(module_name), fn_name)(**cfg["args"])
    model.load_state_dict(load_file(os.path.join(folder, cfg["weights"])))
    return model.eval(), cfg
