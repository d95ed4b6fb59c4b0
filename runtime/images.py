"""Writing samples: image grids (PNG, or the format the extension names) for images,
.npy for anything."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CfgExportError
from .files import staged_file

# the image formats a grid is written in, by extension (Pillow's names)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP"}


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """Returns [N, H, W, C] uint8 from samples [N, C, H, W] in [-1, 1]."""
    return np.clip((samples + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def check_drawable(sample_shape: tuple[int, ...]) -> None:
    """Raises CfgExportError unless one sample [C, H, W] with C = 1 or 3 can be drawn."""
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise CfgExportError(f"cannot draw samples of shape {list(sample_shape)} as images "
                             "(expected [1 or 3, H, W]); write them with --npy (latents of DiT or Stable "
                             "Diffusion: decode them with the model's VAE)")


def save_grid(samples: np.ndarray, rows: int, path: str | Path, min_cell: int = 64) -> Path:
    """Writes samples [N, C, H, W] (C = 1 or 3, values in [-1, 1], clipped) as an image grid
    of `rows` rows, each cell scaled up (nearest) to at least `min_cell` pixels, in the
    format of the path's extension (IMAGE_FORMATS); returns the path."""
    from PIL import Image

    check_drawable(samples.shape[1:])
    n, _, h, w = samples.shape
    cols = -(-n // rows)
    scale = max(1, -(-min_cell // max(h, w)))
    pixels = to_uint8(samples).repeat(scale, axis=1).repeat(scale, axis=2)
    pad = 2
    grid = np.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, pixels.shape[-1]), 255, np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        grid[y:y + h * scale, x:x + w * scale] = img
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    image_format = IMAGE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise CfgExportError(f"{path}: unknown image extension; expected one of {', '.join(IMAGE_FORMATS)}")
    with staged_file(path) as tmp:
        image.save(tmp, format=image_format)
    return path


def save_npy(samples: np.ndarray, path: str | Path) -> Path:
    """Writes samples [N, ...] as float32 .npy, whole or not at all; returns the path."""
    path = Path(path)
    with staged_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, samples.astype(np.float32))
    return path
