"""Tiny guided denoisers for tests, each built by a 'tests.models:NAME' factory that
returns (module, guidance facts), as `cfg-export onnx module:factory` expects."""
import torch
from torch import nn

SCHEDULE = {"kind": "linear", "num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}


def facts(sample_shape, prediction="eps", num_classes=3):
    return {"condition": {"kind": "class", "num_classes": num_classes, "null": num_classes},
            "prediction": prediction, "schedule": SCHEDULE, "sample_shape": list(sample_shape)}


class TinyConv(nn.Module):
    """Conv net with time and class embeddings; dims=1 for [C, L] samples, 2 for [C, H, W]."""

    def __init__(self, channels=2, out_channels=None, dims=2, num_classes=3, width=8):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.dims = dims
        self.inp = conv(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, width)
        self.norm = nn.GroupNorm(2, width)
        self.out = conv(width, out_channels or channels, 3, padding=1)

    def forward(self, sample, timestep, cond):
        emb = self.time(timestep.float()[:, None] / 100) + self.label(cond)
        h = self.inp(sample) + emb.reshape(emb.shape + (1,) * self.dims)
        return self.out(torch.nn.functional.silu(self.norm(h)))


def conv2d():
    torch.manual_seed(0)
    return TinyConv(), facts([2, 6, 6])


def conv1d():
    torch.manual_seed(0)
    return TinyConv(channels=3, dims=1), facts([3, 10])


def learned_variance():
    torch.manual_seed(0)
    return TinyConv(out_channels=4), facts([2, 6, 6])


def v_prediction():
    torch.manual_seed(0)
    return TinyConv(), facts([2, 6, 6], prediction="v")


class TwoArgs(nn.Module):
    def forward(self, x, t):
        return x


def wrong_signature():
    return TwoArgs(), facts([2, 6, 6])


class Bessel(TinyConv):
    def forward(self, sample, timestep, cond):
        return torch.special.i0(super().forward(sample, timestep, cond))


def unsupported_op():
    torch.manual_seed(0)
    return Bessel(), facts([2, 6, 6])


def only_module():
    return TinyConv()


def many_classes():
    torch.manual_seed(0)
    return TinyConv(num_classes=40), facts([2, 6, 6], num_classes=40)


class NanAtLowNoise(TinyConv):
    """NaN at timesteps below 10: a model that fails at some noise levels."""

    def forward(self, sample, timestep, cond):
        out = super().forward(sample, timestep, cond)
        low = (timestep < 10).reshape(-1, *([1] * (out.dim() - 1)))
        return torch.where(low, torch.full_like(out, float("nan")), out)


def nan_at_low_noise():
    torch.manual_seed(0)
    return NanAtLowNoise(), facts([2, 6, 6])


class NanForClass2(TinyConv):
    """NaN in the rows of class 2 (export it without the self-check)."""

    def forward(self, sample, timestep, cond):
        out = super().forward(sample, timestep, cond)
        bad = (cond == 2).reshape(-1, *([1] * (out.dim() - 1)))
        return torch.where(bad, torch.full_like(out, float("nan")), out)


def nan_for_class_2():
    torch.manual_seed(0)
    return NanForClass2(), facts([2, 6, 6])


def null_beyond_table():
    """3 classes and the null class 3 in the table, but the facts name null class 9."""
    torch.manual_seed(0)
    f = facts([2, 6, 6])
    f["condition"] = {"kind": "class", "num_classes": 3, "null": 9}
    return TinyConv(), f
