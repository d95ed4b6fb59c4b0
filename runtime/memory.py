"""Refusing batches that cannot fit: the activation estimate the export recorded (bytes
per row of the batch axis) against the memory this machine has available."""
from __future__ import annotations

import logging
import os

from .errors import CfgExportError

log = logging.getLogger(__name__)

HEADROOM = 0.8  # use at most this share of the available memory for activations
GIB = 1 << 30


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free pages; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


HOST_COPIES = 8  # float64 arrays of the sample the sampler loop holds per image (x, x0, eps, history, ...)


def check_rows_fit(bytes_per_row: int | None, rows: int, images: int, what: str = "this call",
                   sample_values: int = 0) -> None:
    """Raises CfgExportError when `rows` rows of activations (the export's estimate per row)
    and the sampler's host arrays (sample_values per image) exceed HEADROOM of the available
    memory, with the estimate and the largest batch that fits."""
    available = available_bytes()
    if available is None or not (bytes_per_row or sample_values):
        return
    bytes_per_row = bytes_per_row or 0
    need = bytes_per_row * rows + HOST_COPIES * 8 * sample_values * images
    budget = HEADROOM * available
    if need > budget:
        per_image = need / max(images, 1)
        fits = int(budget // per_image)
        raise CfgExportError(f"{what}: {images} images need about {need / GIB:.1f} GiB ({rows} rows x "
                             f"{bytes_per_row / (1 << 20):.2f} MiB of activations, estimated at export, and the "
                             f"sampler's arrays), and this machine has {available / GIB:.1f} GiB available: ask "
                             f"for at most {max(fits, 0)} images at a time")
