"""The digits data: scikit-learn's bundled 8x8 handwritten digits (UCI ML optical
recognition of handwritten digits; 1,797 images, 10 classes, no download).

Images are scaled from 0..16 to [-1, 1] (x / 8 - 1) and upsampled 8x8 -> 16x16
with *bilinear* interpolation (half-pixel centres, edges clamped; identical to
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``),
so each result is a smooth 16x16 image still in [-1, 1].

The split is fixed: 80 % train / 20 % held-out, stratified by label,
``sklearn.model_selection.train_test_split(random_state=0)``: 1,437 train and
360 held-out images. Both training scripts use the train split only; the
held-out split is for scoring (classifier accuracy, Frechet distance).

Needs only numpy and scikit-learn (no torch), so evaluation can use it too.
"""
from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
DESCRIPTION = (
    "sklearn.datasets.load_digits (1,797 8x8 images), 0..16 scaled to [-1,1], "
    "bilinear 2x upsample to 16x16 (align_corners=False), "
    "stratified 80/20 train/held-out split with random_state=0"
)


def upsample2x_bilinear(images: np.ndarray) -> np.ndarray:
    """[..., H, W] -> [..., 2H, 2W], bilinear with half-pixel centres (align_corners=False)."""
    def along(x: np.ndarray, axis: int) -> np.ndarray:
        x = np.moveaxis(x, axis, -1)
        prev = np.concatenate([x[..., :1], x[..., :-1]], axis=-1)  # x[k-1], clamped
        nxt = np.concatenate([x[..., 1:], x[..., -1:]], axis=-1)  # x[k+1], clamped
        out = np.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        out[..., 0::2] = 0.75 * x + 0.25 * prev
        out[..., 1::2] = 0.75 * x + 0.25 * nxt
        return np.moveaxis(out, -1, axis)

    return along(along(images, -1), -2)


def load_digits_16(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Returns (images float32 [N, 1, 16, 16] in [-1, 1], labels int64 [N]).

    split: "train" (1,437 images), "heldout" (360 images) or "all" (1,797, in
    sklearn's order).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float64) / 8.0 - 1.0  # [N, 8, 8], 0..16 -> [-1, 1]
    x = upsample2x_bilinear(x).astype(np.float32)[:, None]  # [N, 1, 16, 16]
    y = digits.target.astype(np.int64)
    if split == "all":
        return x, y
    idx_train, idx_heldout = train_test_split(
        np.arange(len(y)), test_size=HELDOUT_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    if split == "train":
        idx = idx_train
    elif split in ("heldout", "test"):
        idx = idx_heldout
    else:
        raise ValueError(f"split: got {split!r}, expected 'train', 'heldout' or 'all'")
    return np.ascontiguousarray(x[idx]), y[idx]
