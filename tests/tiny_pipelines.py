"""Tiny diffusers pipelines with seeded random weights, saved with save_pretrained as
a user's folder would be, each beside the scheduler config its family ships: Stable
Diffusion 1.x (eps, PNDM) and 2.x (v-prediction, DDIM), SDXL (two text encoders,
text_time conditions, Euler), SD3 (two CLIPs with projection and a T5 encoder, the joint
transformer, flow-matching Euler), DiT (class labels, id2label, DDIM). The CLIP
tokenizers are built from a vocab.json and a merges.txt written here, the T5 tokenizer
from a small unigram vocabulary (tokenizer.json, no sentencepiece); nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_LENGTH = 16  # tokens the tiny text encoders take (77 in Stable Diffusion)
WORDS = ["a", "red", "car", "blue", "sky", "cat", "dog", "photo", "of", "the", "blurry", "ugly", "green", "tree",
         "on", "in", "house"]
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
             "timestep_spacing": "leading"}
LATENT = 8  # latent height and width; the tiny VAEs upsample by 2
T5_LENGTH = 256  # tokens the T5 encoder takes: StableDiffusion3Pipeline's max_sequence_length default

# the scheduler configs the families ship (stable-diffusion-v1-5, stable-diffusion-2-1,
# stable-diffusion-xl-base-1.0, stable-diffusion-3-medium), as their scheduler_config.json hold them
SD15_PNDM = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD21_DDIM = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None}
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
              "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
              "use_karras_sigmas": False}
SD3_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2, CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_vocab(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of
    a CLIP tokenizer whose merges spell WORDS (as the tokenizer folders of Stable
    Diffusion on the hub hold them); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    merges = list(dict.fromkeys(merges))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_vocab(folder, pad_token)))


def _clip_config(tokenizer, hidden: int, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                          projection_dim=projection or hidden, hidden_act="gelu",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def clip_text(tokenizer, hidden: int, seed: int, projection: int | None = None):
    """CLIPTextModel, or CLIPTextModelWithProjection when `projection` is given."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = _clip_config(tokenizer, hidden, projection)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return _randomize(model, seed, 0.1)


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises some output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def vae(seed: int = 11, **config):
    """AutoencoderKL with 4 latent channels (unless config says otherwise) and a scale factor of 2 (two blocks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          norm_num_groups=4, layers_per_block=1, sample_size=2 * LATENT,
                          **{"latent_channels": 4, "scaling_factor": 0.5, **config})
    return _randomize(model, seed, 0.2)


def sd_unet(cross_attention_dim: int, seed: int = 12, **extra):
    from diffusers import UNet2DConditionModel

    return _randomize(UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=cross_attention_dim, attention_head_dim=2, **extra), seed, 0.15)


def ddim(prediction_type: str = "epsilon", **overrides):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SCHEDULER, "prediction_type": prediction_type, **overrides})


def scheduler_from(config: dict):
    """The diffusers scheduler of a shipped config (its _class_name made from_config)."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def _replace_tokenizer_files(folder: Path, name: str, pad_token: str = "<|endoftext|>") -> None:
    """Leaves `folder/name` as the hub's SD folders hold it: vocab.json + merges.txt, no tokenizer.json."""
    target = folder / name
    for f in target.iterdir():
        f.unlink()
    write_clip_vocab(target, pad_token)


def save_sd(folder: Path, prediction_type: str = "epsilon", scheduler: dict | None = None) -> Path:
    """StableDiffusionPipeline (1.x layout; v-prediction as 2.x) saved in `folder` with the
    scheduler of `scheduler` (a shipped config; default DDIM of SCHEDULER)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    chosen = ddim(prediction_type) if scheduler is None else scheduler_from(scheduler)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_text(tokenizer, 32, seed=21), tokenizer=tokenizer,
                                   unet=sd_unet(32), scheduler=chosen, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _replace_tokenizer_files(folder, "tokenizer")
    return folder


def save_sdxl(folder: Path, force_zeros: bool = True, scheduler: dict | None = None) -> Path:
    """StableDiffusionXLPipeline: CLIPTextModel (32) + CLIPTextModelWithProjection (32,
    projection 16), UNet with addition_embed_type text_time; tokenizer_2 pads with '!';
    the scheduler of `scheduler` (a shipped config; default DDIM)."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    tokenizer_2 = clip_tokenizer(folder.parent / f"{folder.name}-vocab2", pad_token="!")
    unet = sd_unet(64, seed=13, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 16, transformer_layers_per_block=1)
    pipe = StableDiffusionXLPipeline(vae=vae(force_upcast=True), text_encoder=clip_text(tokenizer, 32, seed=22),
                                     text_encoder_2=clip_text(tokenizer_2, 32, seed=23, projection=16),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=ddim() if scheduler is None else scheduler_from(scheduler),
                                     force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _replace_tokenizer_files(folder, "tokenizer")
    _replace_tokenizer_files(folder, "tokenizer_2", pad_token="!")
    return folder


def t5_tokenizer(folder: Path):
    """A T5 tokenizer (transformers' T5TokenizerFast: unigram, Metaspace, '</s>' appended,
    pad id 0) whose vocabulary holds WORDS whole and the letters; saved in `folder` as
    save_pretrained writes it (tokenizer.json, no spiece.model) and loaded back from there."""
    from transformers import T5TokenizerFast

    letters = sorted({c for word in WORDS for c in word})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0 - 0.01 * i) for i, word in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in letters] + [("\u2581" + c, -5.5) for c in letters]
    vocab = [(piece, score) for i, (piece, score) in enumerate(vocab)
             if piece not in {p for p, _ in vocab[:i]}]  # one entry per piece ('a' is a word and a letter)
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def t5_encoder(tokenizer, width: int, seed: int):
    """T5EncoderModel (gated-gelu feed forward, as T5 v1.1 / SD3's T5-XXL), 2 layers."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return _randomize(T5EncoderModel(config), seed, 0.1)


def sd3_transformer(seed: int = 14, **extra):
    """SD3Transformer2DModel: 16 latent channels, patch 2, joint attention over the
    context of width 64 (the T5 width; the CLIPs' 32 + 24 are padded to it), pooled
    projections of 16 + 8; qk RMS norm and one dual-attention layer as SD 3.5 has them."""
    from diffusers import SD3Transformer2DModel

    config = {"sample_size": LATENT, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
              "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 64,
              "caption_projection_dim": 16, "pooled_projection_dim": 24, "pos_embed_max_size": 8,
              "qk_norm": "rms_norm", "dual_attention_layers": (0,), **extra}
    return _randomize(SD3Transformer2DModel(**config), seed, 0.15)


def save_sd3(folder: Path, scheduler: dict | None = None) -> Path:
    """StableDiffusion3Pipeline: CLIPTextModelWithProjection (32, projection 16) and
    (24, projection 8; its tokenizer pads with '!'), T5EncoderModel (64), the SD3
    transformer, a 16-channel VAE with a shift_factor (SD3's 1.5305 and 0.0609), SD3's
    flow-matching Euler scheduler config (or `scheduler`)."""
    from diffusers import StableDiffusion3Pipeline

    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    tokenizer_2 = clip_tokenizer(folder.parent / f"{folder.name}-vocab2", pad_token="!")
    tokenizer_3 = t5_tokenizer(folder.parent / f"{folder.name}-t5")
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=scheduler_from(scheduler or SD3_FLOW),
        vae=vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
        text_encoder=clip_text(tokenizer, 32, seed=24, projection=16), tokenizer=tokenizer,
        text_encoder_2=clip_text(tokenizer_2, 24, seed=25, projection=8), tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3, 64, seed=26), tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder, safe_serialization=True)
    _replace_tokenizer_files(folder, "tokenizer")
    _replace_tokenizer_files(folder, "tokenizer_2", pad_token="!")
    return folder


ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "great white shark, white shark", "7": "cock"}


def save_dit(folder: Path) -> Path:
    """DiTPipeline (learned sigma, 1000 classes + null) with id2label in model_index.json,
    as the hub's DiT folders hold it."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    transformer = _randomize(DiTTransformer2DModel(
        num_layers=1, attention_head_dim=8, num_attention_heads=2, sample_size=LATENT, patch_size=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_num_groups=2), 31)
    pipe = DiTPipeline(transformer=transformer, vae=vae(), scheduler=ddim())
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": ID2LABEL}, indent=2))
    return folder


def load_pipeline(folder: Path):
    """The saved pipeline loaded back by diffusers (the reference)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
