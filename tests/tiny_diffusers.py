"""Tiny diffusers models with random weights, saved with save_pretrained as a user's
training run would leave them: model folders beside a scheduler/ folder (pipeline
layout). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULER = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "linear", "beta_start": 1e-4,
             "beta_end": 0.02, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
             "prediction_type": "epsilon"}
EMBED_LEN, EMBED_DIM = 5, 16  # text-style condition [L, D] of the UNet2DConditionModel


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises some output layers, which
    would make the model's output trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def unet2d():
    """Class-conditional UNet2DModel: 3 classes + the null class (row 3)."""
    from diffusers import UNet2DModel

    return _randomize(UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, attention_head_dim=8, num_class_embeds=4), seed=1)


def unet2d_condition():
    """Text-style UNet2DConditionModel: encoder_hidden_states [B, L, 16], 4 latent channels."""
    from diffusers import UNet2DConditionModel

    return _randomize(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=EMBED_DIM, attention_head_dim=2), seed=2)


def dit():
    """Class-conditional DiT with learned sigma (8 output channels for 4 latent ones),
    1000 classes and the null class 1000, as DiT-XL-2 on ImageNet."""
    from diffusers import DiTTransformer2DModel

    return _randomize(DiTTransformer2DModel(
        num_layers=1, attention_head_dim=8, num_attention_heads=2, sample_size=8, patch_size=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_num_groups=2), seed=3)


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER)


def save_pipeline_folder(root: Path, model: torch.nn.Module, subfolder: str, with_scheduler: bool = True) -> Path:
    """Writes root/<subfolder>/ (the model) and root/scheduler/; returns the model folder."""
    model.save_pretrained(root / subfolder, safe_serialization=True)
    if with_scheduler:
        ddim_scheduler().save_pretrained(root / "scheduler")
    return root / subfolder


def null_embedding(seed: int = 7) -> np.ndarray:
    """A stand-in for the empty prompt's encoding: [L, D] float32."""
    return np.random.default_rng(seed).standard_normal((EMBED_LEN, EMBED_DIM)).astype(np.float32)
