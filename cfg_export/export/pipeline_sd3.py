"""The stages of a StableDiffusion3Pipeline export (Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis"): three tokenizers and text
encoders (two CLIPTextModelWithProjection: penultimate hidden states and pooled
projection each; one T5EncoderModel: its last hidden state), the SD3 transformer (joint
attention over the image tokens and the text context; velocity output, timestep
sigma x 1000; any image size its position embedding covers) and the VAE decoder (with
its shift_factor).

The prompt is assembled at run time as StableDiffusion3Pipeline.encode_prompt does: the
CLIP hidden states concatenated on the feature axis, zero-padded to T5's width, joined
with T5's along the sequence -> encoder_hidden_states [2N, L_clip + L_t5, D_t5]; the
pooled projections concatenated -> pooled_projections [2N, P1 + P2]. The null rows are
the empty prompt's encoding (the pipeline's negative prompt ""), stored at export.

Imports torch at the top: only the export path imports this module.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cfg_export.export.pipeline_modules import SD3Denoiser
from cfg_export.export.pipeline_parts import (SIZE_RANGE, ExportOptions, StageWriter, _schedule, encode_empty,
                                              export_denoiser, export_text_encoder, export_vae_decoder, image_sizes,
                                              load_model, load_tokenizer, read_scheduler_config)
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import Condition, ModelFacts

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 256  # T5 tokens: StableDiffusion3Pipeline.__call__'s max_sequence_length default
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def _check_config(folder: Path, config, widths: tuple[int, int, int], pooled: tuple[int, int]) -> None:
    """Refuses a transformer whose context or pooled widths differ from the encoders'."""
    clip, t5 = widths[0] + widths[1], widths[2]
    if clip > t5:
        raise CfgExportError(f"{folder}: the CLIP hidden states are {widths[0]} + {widths[1]} wide, wider than T5's "
                             f"{t5}; StableDiffusion3Pipeline pads them to T5's width")
    if int(config.joint_attention_dim) != t5:
        raise CfgExportError(f"{folder / 'transformer'}: joint_attention_dim {config.joint_attention_dim}, but "
                             f"text_encoder_3 (T5) is {t5} wide")
    if int(config.pooled_projection_dim) != sum(pooled):
        raise CfgExportError(f"{folder / 'transformer'}: pooled_projection_dim {config.pooled_projection_dim}, but "
                             f"the two CLIP projections are {pooled[0]} + {pooled[1]} wide")


def _image_sizes(folder: Path, own: int, multiple: int, pos_embed_max_size: int | None,
                 options: ExportOptions) -> dict:
    """The image sizes the denoiser and VAE graphs take: by default half to twice the
    model's own size, at most what the transformer's position embedding covers
    (pos_embed_max_size patches a side; SD3 crops its embedding to the image). Without
    pos_embed_max_size the embedding is fixed: the own size only."""
    if pos_embed_max_size is None:
        return image_sizes((own, own), multiple, False, options)
    limit = int(pos_embed_max_size) * multiple
    if options.max_size is None:
        options = replace(options, max_size=min(own * SIZE_RANGE, limit))
    sizes = image_sizes((own, own), multiple, True, options)
    if max(sizes["max"]) > limit:
        raise CfgExportError(f"--max-size: got {sizes['max'][0]}x{sizes['max'][1]}, beyond the {limit}x{limit} pixels "
                             f"the transformer's position embedding covers (pos_embed_max_size {pos_embed_max_size} "
                             f"patches of {multiple} pixels, {folder / 'transformer'}); give at most {limit}")
    return sizes


def assemble(clip: list[torch.Tensor], t5: torch.Tensor) -> torch.Tensor:
    """The CLIP hidden states [B, L, D1], [B, L, D2] and T5's [B, L3, D3] as the pipeline
    joins them: [B, L + L3, D3]."""
    hidden = torch.cat(clip, dim=-1)
    hidden = torch.nn.functional.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1]))
    return torch.cat([hidden, t5], dim=-2)


def export_sd3(folder: Path, index: dict, writer: StageWriter) -> dict:
    """StableDiffusion3Pipeline: writes every stage; returns the pipeline facts."""
    scheduler = read_scheduler_config(folder)
    if scheduler.get("_class_name") not in FLOW_SCHEDULERS:
        raise CfgExportError(f"{folder / 'scheduler'}: StableDiffusion3Pipeline with {scheduler.get('_class_name')!r}; "
                             f"its transformer is a flow-matching model: expected {', '.join(FLOW_SCHEDULERS)}")
    transformer = load_model(folder, "transformer", "diffusers", index["transformer"][1])
    vae = load_model(folder, "vae", "diffusers", index["vae"][1])
    config = transformer.config
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    patch = int(config.patch_size)
    if int(vae.config.latent_channels) != int(config.in_channels):
        raise CfgExportError(f"{folder}: the VAE has {vae.config.latent_channels} latent channels, the transformer "
                             f"takes {config.in_channels}")
    size = int(config.sample_size)
    sizes = _image_sizes(folder, size * vae_scale, patch * vae_scale, config.pos_embed_max_size,
                         writer.options)

    clip_length = load_tokenizer(folder, "tokenizer", index["tokenizer"][1]).model_max_length
    encoders = [("tokenizer", "text_encoder", "penultimate", True, "clip", clip_length),
                ("tokenizer_2", "text_encoder_2", "penultimate", True, "clip", clip_length),
                ("tokenizer_3", "text_encoder_3", "last", False, "t5", MAX_SEQUENCE_LENGTH)]
    empty, widths, prompt_encoders = [], [], []
    for tok_key, enc_key, layer, pooled, family, length in encoders:
        tokenizer = load_tokenizer(folder, tok_key, index[tok_key][1])
        tok_facts = writer.tokenizer(tok_key, tokenizer, length)
        model = load_model(folder, enc_key, "transformers", index[enc_key][1])
        module, manifest = export_text_encoder(writer, enc_key, model, tok_facts, layer, pooled, family)
        empty.append(encode_empty(module, tokenizer, length))
        widths.append(manifest.facts.width)
        prompt_encoders.append({"stage": enc_key, "tokenizer": tok_key})
    pooled_widths = (int(empty[0][1].shape[-1]), int(empty[1][1].shape[-1]))
    _check_config(folder, config, tuple(widths), pooled_widths)

    null_hidden = assemble([empty[0][0], empty[1][0]], empty[2])[0].numpy()
    null_pooled = torch.cat([empty[0][1], empty[1][1]], dim=-1)[0].numpy()
    conditions = [Condition("embedding", name="encoder_hidden_states", shape=null_hidden.shape,
                            null_file="null_encoder_hidden_states.npy"),
                  Condition("embedding", name="pooled_projections", shape=null_pooled.shape,
                            null_file="null_pooled_projections.npy")]
    writer.save_array("denoiser", "null_encoder_hidden_states.npy", null_hidden)
    writer.save_array("denoiser", "null_pooled_projections.npy", null_pooled)
    schedule, prediction = _schedule(folder, folder / "transformer", writer.result.notes)
    facts = ModelFacts(condition=conditions[0], extra_conditions=(conditions[1],), prediction=prediction,
                       schedule=schedule, sample_shape=(int(config.in_channels), size, size),
                       timestep_dtype="float32", scheduler=scheduler, patch_size=patch)
    rng = np.random.default_rng(5)

    def condition_feeds(rows: int) -> dict:
        return {c.name: rng.standard_normal((rows, *c.shape)).astype(np.float32) for c in conditions}

    export_denoiser(writer, SD3Denoiser(transformer).eval(), facts, sizes, vae_scale, condition_feeds)
    export_vae_decoder(writer, vae, sizes)
    prompt = {"encoders": prompt_encoders, "force_zeros_for_empty_prompt": False, "pooled": "pooled_projections"}
    return {"image_size": sizes, "prompt": prompt}
