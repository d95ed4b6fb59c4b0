"""Quick sanity check of the trained pair, in torch: DDIM (eta = 0) sampling with
classifier-free guidance, scored by the classifier.

    python -m examples.digits.sanity_check [--steps 50] [--per-class 10] [--w 0 3] [--png /tmp/digits.png]

For each guidance weight w it draws per-class samples of every digit 0..9 from
the same seeded initial noise, with
    eps = (1 + w) * eps(x_t, t, c) - w * eps(x_t, t, null),
and "leading" DDIM timesteps (980, 960, ..., 0 for 50 steps; final alpha 1),
no clipping of the predicted x0. It prints the fraction of samples that the
classifier labels as the requested digit, and can write a PNG grid (one row per
digit, one block of columns per w; pixels clipped to [-1, 1] for display only).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from examples.digits.common import load_model

HERE = os.path.dirname(os.path.abspath(__file__))


def ddim_timesteps(num_train: int, steps: int) -> list[int]:
    ratio = num_train // steps
    return [int(t) for t in (np.arange(steps) * ratio)[::-1]]


@torch.no_grad()
def ddim_sample_cfg(model, noise, cond, w: float, abar: torch.Tensor, steps: int, null: int) -> torch.Tensor:
    abar = abar.to(torch.float64)
    x = noise.to(torch.float64)
    ts = ddim_timesteps(abar.shape[0], steps)
    B = x.shape[0]
    null_c = torch.full_like(cond, null)
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        tt = torch.full((2 * B,), t, dtype=torch.int64)
        eps_c, eps_u = model(torch.cat([x, x]).float(), tt, torch.cat([cond, null_c])).double().chunk(2)
        eps = (1 + w) * eps_c - w * eps_u
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.float()


def save_grid(blocks: list[np.ndarray], path: str, scale: int = 4, gap: int = 8) -> None:
    """blocks: one [10 rows, n cols, 16, 16] array in [-1,1] per w; written side by side."""
    from PIL import Image

    rows, cols = blocks[0].shape[:2]
    H = rows * 17 + 1
    W = len(blocks) * (cols * 17 + 1) + gap * (len(blocks) - 1)
    canvas = np.full((H, W), 128, dtype=np.uint8)
    x_off = 0
    for b in blocks:
        img = ((np.clip(b, -1, 1) + 1) * 127.5).round().astype(np.uint8)
        for r in range(rows):
            for c in range(cols):
                canvas[1 + r * 17:1 + r * 17 + 16, x_off + 1 + c * 17:x_off + 1 + c * 17 + 16] = img[r, c]
        x_off += cols * 17 + 1 + gap
    Image.fromarray(canvas).resize((W * scale, H * scale), Image.NEAREST).save(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--denoiser", default=os.path.join(HERE, "denoiser", "config.json"))
    p.add_argument("--classifier", default=os.path.join(HERE, "classifier", "config.json"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 3.0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--png", default=None, help="write a sample grid here (e.g. /tmp/digits.png)")
    a = p.parse_args(argv)

    torch.set_num_threads(2)
    den, dcfg = load_model(a.denoiser)
    clf, _ = load_model(a.classifier)
    g = dcfg["guidance"]
    s = g["schedule"]
    betas = np.linspace(s["beta_start"], s["beta_end"], s["num_train_timesteps"], dtype=np.float64)
    abar = torch.from_numpy(np.cumprod(1 - betas))
    K, null = g["condition"]["num_classes"], g["condition"]["null"]

    cond = torch.arange(K).repeat_interleave(a.per_class)
    noise = torch.randn((len(cond), *g["sample_shape"]), generator=torch.Generator().manual_seed(a.seed))
    results, blocks = {}, []
    for w in a.w:
        t0 = time.time()
        x = ddim_sample_cfg(den, noise, cond, w, abar, a.steps, null)
        with torch.no_grad():
            probs = torch.softmax(clf(x.clamp(-1, 1)), dim=1)
        pred = probs.argmax(1)
        acc = float((pred == cond).float().mean())
        per_class = [float((pred[cond == k] == k).float().mean()) for k in range(K)]
        conf = float(probs[torch.arange(len(cond)), cond].mean())
        results[w] = {"accuracy": acc, "mean_p_requested": conf, "per_class": per_class}
        print(f"w={w:g}: classifier accuracy {acc:.3f} ({int((pred == cond).sum())}/{len(cond)}), "
              f"mean p(requested) {conf:.3f}, pixel range [{x.min():.2f}, {x.max():.2f}], "
              f"{time.time() - t0:.1f}s")
        print("   per class: " + " ".join(f"{k}:{v:.1f}" for k, v in enumerate(per_class)))
        blocks.append(x.view(K, a.per_class, 16, 16).numpy())
    if a.png:
        save_grid(blocks, a.png)
        print(f"wrote {a.png} (rows: digits 0..9; column blocks: w = {', '.join(f'{w:g}' for w in a.w)})")
    return results


if __name__ == "__main__":
    main()
