"""The facts of the pipeline stages that are not denoisers: text encoders and VAE
decoders. A stage manifest holds them under its "stage" kind, where a denoiser's
manifest holds ModelFacts (condition, prediction, schedule, sample shape).
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from .errors import CfgExportError


class StageKind(enum.Enum):
    DENOISER = "denoiser"
    TEXT_ENCODER = "text_encoder"
    VAE_DECODER = "vae_decoder"


class HiddenLayer(enum.Enum):
    """Which hidden states of a text encoder the pipeline takes."""

    LAST = "last"  # the final layer's output after the final layer norm (SD 1.x/2.x, T5)
    PENULTIMATE = "penultimate"  # hidden_states[-2], before the final layer norm (SDXL, SD3's CLIPs)


@dataclass(frozen=True)
class TextEncoderFacts:
    """A text encoder stage: input_ids [B, max_length] int64 -> hidden [B, max_length, width]
    (and pooled [B, pooled_width] for encoders with a pooled projection)."""

    tokenizer: str  # the pipeline stage holding its tokenizer.json
    max_length: int  # tokens per prompt, padded and truncated
    width: int  # D of the hidden states
    hidden_layer: HiddenLayer = HiddenLayer.LAST
    pooled_width: int | None = None  # the pooled (projected) output's width, None when there is none
    family: str = "clip"  # clip or t5

    kind = StageKind.TEXT_ENCODER

    def __post_init__(self):
        from .schedule import parse_enum

        object.__setattr__(self, "hidden_layer", parse_enum(HiddenLayer, self.hidden_layer, "hidden_layer"))
        if int(self.max_length) < 1 or int(self.width) < 1:
            raise CfgExportError(f"text encoder facts: max_length {self.max_length}, width {self.width}: expected "
                                 f"positive sizes")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_layer"] = self.hidden_layer.value
        return {"stage": self.kind.value, self.kind.value: d}

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderFacts":
        return cls(**d)


@dataclass(frozen=True)
class VaeDecoderFacts:
    """A VAE decoder stage: latents [N, C, h, w] -> images [N, 3, h * scale, w * scale] in
    [-1, 1]. The host feeds latents / scaling_factor + shift_factor (or, with latents_mean
    and latents_std, latents * std / scaling_factor + mean), as diffusers' pipelines do."""

    latent_channels: int
    scale: int  # pixels per latent along each side (2 ** (len(block_out_channels) - 1))
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = False  # keep the VAE in FP32 in FP16 builds (SDXL's VAE overflows in FP16)

    kind = StageKind.VAE_DECODER

    def __post_init__(self):
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if (self.latents_mean is None) != (self.latents_std is None):
            raise CfgExportError("VAE facts: latents_mean and latents_std come together")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("latents_mean", "latents_std"):
            if d[name] is not None:
                d[name] = list(d[name])
        return {"stage": self.kind.value, self.kind.value: d}

    @classmethod
    def from_dict(cls, d: dict) -> "VaeDecoderFacts":
        return cls(**d)


STAGE_FACTS = {StageKind.TEXT_ENCODER.value: TextEncoderFacts, StageKind.VAE_DECODER.value: VaeDecoderFacts}


def read_stage_facts(d: dict):
    """Returns the stage facts of a manifest dict with a 'stage' key other than denoiser."""
    kind = d.get("stage")
    if kind not in STAGE_FACTS:
        raise CfgExportError(f"manifest stage: got {kind!r}, expected one of denoiser, {', '.join(STAGE_FACTS)}")
    if not isinstance(d.get(kind), dict):
        raise CfgExportError(f"manifest of a {kind} stage has no {kind!r} block; re-export the pipeline")
    try:
        return STAGE_FACTS[kind].from_dict(d[kind])
    except (TypeError, ValueError) as exc:
        raise CfgExportError(f"manifest {kind!r} block: {exc}; re-export the pipeline") from None
