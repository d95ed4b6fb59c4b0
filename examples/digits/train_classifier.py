"""Trains the small digit classifier used to score generated samples.

    python -m examples.digits.train_classifier [--epochs E] [--seed S] [--out DIR]

Trains on the train split of data.load_digits_16 with light augmentation
(random +-1 pixel shifts, random Gaussian pixel noise with sigma up to 0.2 and
random blur), so it scores diffusion samples robustly; reports held-out accuracy;
writes DIR/config.json, DIR/model.safetensors and DIR/classifier.onnx (input
"image" [B,1,16,16] float32 in [-1,1]; outputs "logits" [B,10] and
"features" [B,F]), and checks the ONNX model against torch in onnxruntime.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from examples.digits.common import save_json, save_weights, seed_everything
from examples.digits.data import DESCRIPTION, load_digits_16
from examples.digits.nets import ClassifierWithFeatures, build_classifier

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = {"width": 32, "feature_dim": 128, "num_classes": 10, "dropout": 0.3}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    B = x.shape[0]
    # random shift by -1..1 pixels in each direction (background -1 fills in)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (B,), generator=gen)
    dy = torch.randint(0, 3, (B,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16] for i in range(B)])
    # random blur on a quarter of the batch
    blur = torch.rand(B, generator=gen) < 0.25
    if blur.any():
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
        blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3))
        out = torch.where(blur.view(B, 1, 1, 1), blurred, out)
    # Gaussian noise with a per-image sigma in [0, 0.2]
    sigma = 0.2 * torch.rand(B, 1, 1, 1, generator=gen)
    return out + sigma * torch.randn(out.shape, generator=gen)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def export_onnx(model, path: str, example: torch.Tensor) -> None:
    wrapper = ClassifierWithFeatures(model).eval()
    tmp = path + ".tmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is asked for
        torch.onnx.export(
            wrapper,
            (example,),
            tmp,
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits", "features"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        )
    os.replace(tmp, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default=os.path.join(HERE, "classifier"))
    a = p.parse_args(argv)

    t0 = time.time()
    c0 = time.process_time()
    seed_everything(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    x_np, y_np = load_digits_16("train")
    xh_np, yh_np = load_digits_16("heldout")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    xh, yh = torch.from_numpy(xh_np), torch.from_numpy(yh_np)

    model = build_classifier(**ARGS)
    n_params = sum(q.numel() for q in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x) + a.batch_size - 1) // a.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * steps_per_epoch)
    print(f"classifier: {n_params:,} parameters; {len(x)} train / {len(xh)} held-out images")

    for epoch in range(1, a.epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x), a.batch_size):
            idx = perm[i:i + a.batch_size]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        if epoch % 5 == 0 or epoch == a.epochs:
            print(f"epoch {epoch:3d}  loss {total / n:.4f}  held-out acc {accuracy(model, xh, yh):.4f}  "
                  f"{time.time() - t0:.1f}s", flush=True)

    model.eval()
    heldout_acc = accuracy(model, xh, yh)
    train_acc = accuracy(model, x, y)
    wall = time.time() - t0
    cpu = time.process_time() - c0
    print(f"final: train acc {train_acc:.4f}  held-out acc {heldout_acc:.4f}  "
          f"({int(round(heldout_acc * len(yh)))}/{len(yh)})  wall {wall:.1f}s (process CPU time {cpu:.1f}s)")

    os.makedirs(a.out, exist_ok=True)
    save_weights(model.state_dict(), os.path.join(a.out, "model.safetensors"))
    onnx_path = os.path.join(a.out, "classifier.onnx")
    export_onnx(model, onnx_path, xh[:2])

    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits_o, feats_o = sess.run(["logits", "features"], {"image": xh_np})
    with torch.no_grad():
        logits_t, feats_t = ClassifierWithFeatures(model)(xh)
    err_l = float(np.abs(logits_o - logits_t.numpy()).max())
    err_f = float(np.abs(feats_o - feats_t.numpy()).max())
    onnx_acc = float((logits_o.argmax(1) == yh_np).mean())
    print(f"onnx vs torch on {len(xh)} held-out images: max abs err logits {err_l:.2e}, "
          f"features {err_f:.2e}; onnx held-out acc {onnx_acc:.4f}")
    assert err_l < 1e-3 and err_f < 1e-3, "ONNX export does not match torch"

    config = {
        "factory": "nets:build_classifier",
        "code_dir": "..",
        "args": ARGS,
        "weights": "model.safetensors",
        "onnx": {
            "file": "classifier.onnx",
            "opset": 17,
            "inputs": {"image": [-1, 1, 16, 16]},
            "outputs": {"logits": [-1, ARGS["num_classes"]], "features": [-1, ARGS["feature_dim"]]},
            "max_abs_err_vs_torch": {"logits": err_l, "features": err_f},
        },
        "training": {
            "data": DESCRIPTION + "; train split only",
            "augmentation": "random +-1 px shift, blur on 25% of batches' images, Gaussian noise sigma~U(0,0.2)",
            "seed": a.seed,
            "epochs": a.epochs,
            "batch_size": a.batch_size,
            "optimizer": f"AdamW, one-cycle lr max {a.lr}, weight_decay 1e-4, label smoothing 0.05",
            "parameters": n_params,
            "train_accuracy": round(train_acc, 4),
            "heldout_accuracy": round(heldout_acc, 4),
            "heldout_size": len(yh),
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
        },
    }
    save_json(config, os.path.join(a.out, "config.json"))
    print(f"wrote {a.out}/config.json, model.safetensors, classifier.onnx")
    return config


if __name__ == "__main__":
    main()
