"""Trains the class-conditional digits denoiser with classifier-free guidance.

    python -m examples.digits.train_denoiser [--epochs E] [--seed S] [--out DIR]

DDPM training (Ho et al. 2020) with eps prediction and the linear beta schedule
(T = 1000, beta 1e-4 .. 0.02) on the train split of data.load_digits_16; the
class label is replaced by the null class 10 with probability p_uncond = 0.1, so
one network learns both eps(x_t, t, c) and eps(x_t, t, null) (Ho & Salimans
2021, "Classifier-Free Diffusion Guidance"). The loss is the plain eps-MSE;
the network returns eps, computed internally from a v-prediction (see
nets.DigitsUNet, param="v"). AdamW with linear warm-up and
cosine decay; an exponential moving average (EMA) of the weights is kept, and
it is the EMA weights that are written to DIR/model.safetensors, with
DIR/config.json describing the model for the export tool.

Everything is seeded and runs on 2 CPU threads (a few minutes); timings vary
with the machine.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from examples.digits.common import save_json, save_weights, seed_everything
from examples.digits.data import DESCRIPTION, load_digits_16
from examples.digits.nets import build_denoiser

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
NULL_CLASS = 10
SCHEDULE = {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}
ARGS = {
    "in_channels": 1,
    "base_channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "num_classes": NUM_CLASSES,
    "emb_dim": 128,
    "dropout": 0.0,
    "param": "v",  # the UNet predicts v; forward still returns eps (see nets.DigitsUNet)
    "num_train_timesteps": SCHEDULE["num_train_timesteps"],
    "beta_start": SCHEDULE["beta_start"],
    "beta_end": SCHEDULE["beta_end"],
}


def alphas_cumprod(schedule: dict = SCHEDULE) -> torch.Tensor:
    """float64 [T], computed as diffusers / runtime.schedule do (np.linspace betas)."""
    assert schedule["kind"] == "linear"
    betas = np.linspace(schedule["beta_start"], schedule["beta_end"], schedule["num_train_timesteps"],
                        dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


def diffusion_loss(model, x0, t, cond, noise, abar):
    a = abar[t].to(torch.float32).view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    xt = xt.contiguous(memory_format=torch.channels_last)
    return F.mse_loss(model(xt, t, cond), noise)


@torch.no_grad()
def heldout_loss(model, x, y, abar, seed: int, repeats: int = 4) -> float:
    """Conditional eps-MSE on held-out images with fixed (seeded) t and noise."""
    g = torch.Generator().manual_seed(seed + 12345)
    T = abar.shape[0]
    total = 0.0
    for _ in range(repeats):
        t = torch.randint(0, T, (len(x),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        total += float(diffusion_loss(model, x, t, y, noise, abar))
    return total / repeats


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay")
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--out", default=os.path.join(HERE, "denoiser"))
    a = p.parse_args(argv)

    t0 = time.time()
    c0 = time.process_time()
    seed_everything(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    x_np, y_np = load_digits_16("train")
    xh_np, yh_np = load_digits_16("heldout")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    xh, yh = torch.from_numpy(xh_np), torch.from_numpy(yh_np)
    abar = alphas_cumprod()
    T = abar.shape[0]

    model = build_denoiser(**ARGS).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    for q in ema.parameters():
        q.requires_grad_(False)
    n_params = sum(q.numel() for q in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(x) / a.batch_size)
    total_steps = a.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        frac = (step - a.warmup) / max(1, total_steps - a.warmup)
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    print(f"denoiser: {n_params:,} parameters; {len(x)} train images; {a.epochs} epochs x "
          f"{steps_per_epoch} steps (batch {a.batch_size}); p_uncond {a.p_uncond}", flush=True)

    step = 0
    epoch_loss = float("nan")
    for epoch in range(1, a.epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x), a.batch_size):
            idx = perm[i:i + a.batch_size]
            x0, c = x[idx], y[idx].clone()
            c[torch.rand(len(idx), generator=gen) < a.p_uncond] = NULL_CLASS
            t = torch.randint(0, T, (len(idx),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = diffusion_loss(model, x0, t, c, noise, abar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            d = min(a.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
            total += loss.item() * len(idx)
            n += len(idx)
        epoch_loss = total / n
        if epoch % 10 == 0 or epoch == 1 or epoch == a.epochs:
            print(f"epoch {epoch:4d}  step {step:5d}  loss {epoch_loss:.4f}  lr {lr_at(step - 1):.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)

    train_wall = time.time() - t0
    train_cpu = time.process_time() - c0
    ema = ema.to(memory_format=torch.contiguous_format)
    h_loss = heldout_loss(ema, xh, yh, abar, a.seed)
    print(f"final: train loss (last epoch mean) {epoch_loss:.4f}  held-out eps-MSE (EMA) {h_loss:.4f}  "
          f"wall {train_wall:.1f}s (process CPU time {train_cpu:.1f}s on {torch.get_num_threads()} threads)",
          flush=True)

    os.makedirs(a.out, exist_ok=True)
    save_weights(ema.state_dict(), os.path.join(a.out, "model.safetensors"))
    config = {
        "factory": "nets:build_denoiser",
        "code_dir": "..",
        "args": ARGS,
        "weights": "model.safetensors",
        "guidance": {
            "condition": {"kind": "class", "num_classes": NUM_CLASSES, "null": NULL_CLASS},
            "prediction": "eps",
            "schedule": SCHEDULE,
            "sample_shape": [1, 16, 16],
            "timestep_dtype": "int64",
        },
        "training": {
            "data": DESCRIPTION + "; train split only (1,437 images)",
            "p_uncond": a.p_uncond,
            "seed": a.seed,
            "epochs": a.epochs,
            "steps": step,
            "batch_size": a.batch_size,
            "optimizer": f"AdamW lr {a.lr} (warm-up {a.warmup} steps, cosine to 5%), weight_decay 0, "
                         f"grad clip 1.0",
            "loss": "mean squared error of eps, uniform t in 0..999",
            "ema_decay": a.ema,
            "weights_are_ema": True,
            "parameters": n_params,
            "final_loss": round(epoch_loss, 5),
            "final_loss_means": "mean eps-MSE over the last epoch (training weights, conditions dropped at p_uncond)",
            "heldout_loss_ema": round(h_loss, 5),
            "wall_seconds": round(train_wall, 1),
            "cpu_seconds": round(train_cpu, 1),
            "threads": torch.get_num_threads(),
        },
    }
    save_json(config, os.path.join(a.out, "config.json"))
    print(f"wrote {a.out}/config.json and model.safetensors  (total {time.time() - t0:.1f}s)")
    return config


if __name__ == "__main__":
    main()
