"""Models for the TensorRT-path tests, built by 'tests.trt_models:NAME' factories."""
import torch

from examples.digits.nets import build_denoiser
from tests.models import facts


def digits_unet():
    """The digits reference UNet (examples/digits/nets.py, default architecture) with random
    weights; its zero-initialized output convolutions get random weights too, so the
    output is not trivially zero."""
    torch.manual_seed(0)
    net = build_denoiser()
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    return net, facts([1, 16, 16], num_classes=10)
