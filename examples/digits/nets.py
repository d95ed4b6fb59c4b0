"""Torch modules for the digits reference model: a small class-conditional UNet
denoiser (for classifier-free guidance) and a small CNN digit classifier.

Factories and modules only: importing this file trains nothing. It uses no
relative imports, so it imports both as ``examples.digits.nets`` and as plain
``nets`` (with examples/digits on sys.path, as the export tool's config does).

Every op used here exports with ``torch.onnx.export(..., dynamo=False,
opset_version=17)`` with a dynamic batch axis: Conv2d, GroupNorm, SiLU, Linear,
Embedding, nearest interpolate, and a sinusoidal timestep embedding computed
from the timestep tensor with plain torch ops.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017 / DDPM): [B] (any int or float dtype)
    -> [B, dim] float32, first half cos, second half sin."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    )
    args = timestep.to(torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 with the (time + class) embedding added after the
    first convolution, and a 1x1 skip when the channel count changes."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb)).unsqueeze(-1).unsqueeze(-1)
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DigitsUNet(nn.Module):
    """A small UNet for [B, in_channels, 16, 16] samples.

    forward(sample [B,C,H,W] float32, timestep [B] int64, cond [B] int64) -> eps [B,C,H,W].
    ``cond`` is a class index 0..num_classes-1, or ``num_classes`` for the null
    (unconditional) class used by classifier-free guidance.

    Resolutions: one per entry of ``channel_mult`` (16, 8, 4 for the default
    (1, 2, 2)), ``num_res_blocks`` residual blocks at each on the way down,
    ``num_res_blocks + 1`` on the way up (each eating one skip connection,
    as in the DDPM UNet), and two blocks in the middle.

    Output parameterisation (``param``, default "v", as the shipped model;
    configs name it explicitly). The output is always eps. With
    ``param="eps"`` the UNet's last convolution is eps. With ``param="v"`` the
    UNet predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)
    and forward returns the exactly equivalent
        eps = sqrt(1 - abar_t) * sample + sqrt(abar_t) * v,
    with abar_t (alphas_cumprod) rebuilt from the beta schedule arguments and
    gathered at ``timestep`` (which must lie in 0..T-1). Why: at high noise eps is
    almost the input itself, to within ~sqrt(abar_t) (about 0.007 at t = 980),
    and x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) amplifies any error
    by 1 / sqrt(abar_t); a GroupNorm network learns the input's *average* scale
    only, so initial noises whose norm is above average were left with visible
    residual noise. The skip term carries the input's exact scale.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: tuple = (1, 2, 2),
        num_res_blocks: int = 1,
        num_classes: int = 10,
        emb_dim: int = 128,
        dropout: float = 0.0,
        param: str = "v",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
    ):
        super().__init__()
        if param not in ("eps", "v"):
            raise ValueError(f"param: got {param!r}, expected 'eps' or 'v'")
        self.param = param
        # linear beta schedule (Ho et al. 2020), as np.linspace / diffusers "linear"
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1.0 - abar).sqrt().float(), persistent=False)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # index num_classes = null
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        chans = [base_channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        skip_ch = [base_channels]
        ch = base_channels
        for level, out_ch in enumerate(chans):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, out_ch, emb_dim, dropout))
                ch = out_ch
                skip_ch.append(ch)
            if level != len(chans) - 1:
                self.down.append(Downsample(ch))
                skip_ch.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(chans))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), out_ch, emb_dim, dropout))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch))
        assert not skip_ch

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(timestep, self.base_channels))
        emb = emb + self.class_emb(cond)

        h = self.conv_in(sample)
        skips = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            skips.append(h)
        for m in self.mid:
            h = m(h, emb)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = m(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.param == "eps":
            return out
        # a Gather with the int64 timesteps, like the class embedding's lookup
        c_skip = self.sqrt_one_minus_abar[timestep].view(-1, 1, 1, 1)
        c_out = self.sqrt_abar[timestep].view(-1, 1, 1, 1)
        return c_skip * sample + c_out * out


def build_denoiser(
    in_channels: int = 1,
    base_channels: int = 32,
    channel_mult=(1, 2, 2),
    num_res_blocks: int = 1,
    num_classes: int = 10,
    emb_dim: int = 128,
    dropout: float = 0.0,
    param: str = "v",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> nn.Module:
    """The CFG denoiser; keyword arguments are those stored under "args" in config.json.
    Whatever ``param``, forward returns eps; the schedule arguments must match the
    training schedule (config "guidance.schedule") when ``param="v"``."""
    return DigitsUNet(
        in_channels=in_channels,
        base_channels=base_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        num_classes=num_classes,
        emb_dim=emb_dim,
        dropout=dropout,
        param=param,
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
    )


class DigitsClassifier(nn.Module):
    """A small CNN for [B,1,16,16] images in [-1, 1].

    forward(x) -> logits [B, num_classes]; features(x) -> penultimate
    activations [B, feature_dim] (after ReLU), for a Frechet distance.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Linear(2 * w * 16, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(torch.flatten(self.body(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


class ClassifierWithFeatures(nn.Module):
    """Export wrapper: forward(image) -> (logits, features)."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor):
        f = self.classifier.features(image)
        return self.classifier.head(f), f


def build_classifier(width: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3) -> nn.Module:
    """The digit classifier; keyword arguments are those stored under "args" in config.json."""
    return DigitsClassifier(width=width, feature_dim=feature_dim, num_classes=num_classes, dropout=dropout)
