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
