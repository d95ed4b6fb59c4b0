"""The torch modules each pipeline stage is exported as: plain tensors in, the tensors
the pipeline really uses out. Imports torch at the top: only the export path imports it.
"""
from __future__ import annotations

import torch


class TextEncoder(torch.nn.Module):
    """input_ids [B, L] int64 -> hidden [B, L, D] (and pooled [B, P]).

    layer 'last': the model's last_hidden_state (after the final layer norm: SD 1.x/2.x,
    T5); 'penultimate': hidden_states[-2] (SDXL, SD3's CLIP encoders). pooled: the
    projected pooled output (text_embeds) of a CLIPTextModelWithProjection."""

    def __init__(self, model: torch.nn.Module, layer: str, pooled: bool):
        super().__init__()
        self.model = model
        self.layer = layer
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, output_hidden_states=self.layer == "penultimate", return_dict=True)
        hidden = out.hidden_states[-2] if self.layer == "penultimate" else out.last_hidden_state
        if self.pooled:
            return hidden, out.text_embeds
        return hidden


class UNetDenoiser(torch.nn.Module):
    """sample [B, C, H, W], timestep [B] float32, encoder_hidden_states [B, L, D]
    (SDXL also text_embeds [B, P], time_ids [B, 6]) -> the UNet's output [B, C, H, W]."""

    def __init__(self, unet: torch.nn.Module, added: bool):
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.added else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


class DiTDenoiser(torch.nn.Module):
    """sample [B, C, H, W], timestep [B] float32, cond [B] int64 class labels -> eps
    [B, C, H, W] (learned-sigma channels dropped, as DiTPipeline drops them)."""

    def __init__(self, transformer: torch.nn.Module, channels: int):
        super().__init__()
        self.transformer = transformer
        self.channels = channels

    def forward(self, sample, timestep, cond):
        out = self.transformer(sample, timestep=timestep, class_labels=cond, return_dict=False)[0]
        return out[:, : self.channels]


class SD3Denoiser(torch.nn.Module):
    """sample [B, C, H, W], timestep [B] float32 (sigma x 1000), encoder_hidden_states
    [B, L, D], pooled_projections [B, P] -> the flow velocity [B, C, H, W] of an
    SD3Transformer2DModel."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """latents [N, C, h, w] (already divided by the scaling factor) -> images [N, 3, H, W] in about [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]
