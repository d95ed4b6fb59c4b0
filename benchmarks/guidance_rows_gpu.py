"""What a call of fewer rows saves on a GPU: the time of one denoiser call of N, 1.5 N and
2 N rows (the rows of an adaptive or cached step sit between N and 2N), in PyTorch on CUDA.

    python benchmarks/guidance_rows_gpu.py --json rows_gpu.json

Models: the reference digits UNet (its shipped weights, FP32), and two DiT shapes with
random weights in FP16 (Peebles & Xie 2023: DiT-S/2 and DiT-XL/2 on 32x32x4 latents,
i.e. 256x256 images; a plain adaLN-Zero transformer written here, timing only). Each
row count is timed with CUDA events over `--iters` calls after warm-up, eagerly and, for
the digits UNet, also replayed as a CUDA graph (no launch overhead: what a TensorRT
engine with CUDA graphs approaches). This is PyTorch, not the TensorRT engine that
cfg-export builds: it shows how time follows rows on the GPU, not the engine's times.
PyTorch's default math settings (cuDNN may use TF32 in the FP32 convolutions).
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention and MLP, each shifted, scaled and gated by the condition."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=2)
        h = self.norm1(x) * (1 + g1) + s1
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + a1 * self.proj(h)
        return x + a2 * self.mlp(self.norm2(x) * (1 + g2) + s2)


class DiT(nn.Module):
    """forward(latents [B, 4, S, S], timestep [B], label [B]) -> [B, 8, S, S] (eps and sigma)."""

    def __init__(self, dim: int, depth: int, heads: int, size: int = 32, patch: int = 2, classes: int = 1000):
        super().__init__()
        self.patch, self.size = patch, size
        self.embed = nn.Conv2d(4, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, patch * patch * 8)

    def forward(self, x, t, y):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, device=x.device, dtype=torch.float32) / 128)
        args = t.float()[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([torch.cos(args), torch.sin(args)], 1).to(x.dtype)) + self.y_embed(y)
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, c)
        g, p = self.size // self.patch, self.patch
        return self.out(h).view(-1, g, g, p, p, 8).permute(0, 5, 1, 3, 2, 4).reshape(-1, 8, self.size, self.size)


def digits_unet():
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from common import load_model

    model, _ = load_model(str(ROOT / "examples" / "digits" / "denoiser" / "config.json"))
    return model, (1, 16, 16), 10


def time_call(model, shape, classes, rows, device, dtype, iters, graph):
    """Median milliseconds of one call of `rows` rows."""
    x = torch.randn(rows, *shape, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (rows,), device=device)
    y = torch.randint(0, classes, (rows,), device=device)
    with torch.no_grad():
        for _ in range(3):
            model(x, t, y)
        call = lambda: model(x, t, y)  # noqa: E731
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(x, t, y)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                model(x, t, y)
            call = g.replay
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                call()
                times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="1,4,16,64,256,1024", help="images N")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--models", default="digits,dit-s2,dit-xl2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ns = [int(v) for v in args.n.split(",")]
    results = []
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"{'model':<10} {'mode':<6} {'N':>5} {'N rows ms':>10} {'1.5N ms':>9} {'2N ms':>9} "
          f"{'N/2N':>6} {'1.5N/2N':>8}")
    for name in args.models.split(","):
        if name == "digits":
            model, shape, classes = digits_unet()
            dtype, modes = torch.float32, ["eager", "graph"] if device == "cuda" else ["eager"]
        else:
            dim, depth, heads = {"dit-s2": (384, 12, 6), "dit-xl2": (1152, 28, 16)}[name]
            torch.manual_seed(0)
            model, shape, classes = DiT(dim, depth, heads), (4, 32, 32), 1000
            dtype, modes = (torch.float16 if device == "cuda" else torch.float32), ["eager"]
        model = model.to(device=device, dtype=dtype).eval()
        for mode in modes:
            for n in ns:
                ms = {rows: time_call(model, shape, classes, rows, device, dtype, args.iters, mode == "graph")
                      for rows in (n, n + n // 2, 2 * n)}
                r = {"model": name, "mode": mode, "n": n, "ms_n": ms[n], "ms_1_5n": ms[n + n // 2], "ms_2n": ms[2 * n],
                     "dtype": str(dtype).replace("torch.", "")}
                results.append(r)
                print(f"{name:<10} {mode:<6} {n:>5} {ms[n]:>10.3f} {ms[n + n // 2]:>9.3f} {ms[2 * n]:>9.3f} "
                      f"{ms[n] / ms[2 * n]:>6.2f} {ms[n + n // 2] / ms[2 * n]:>8.2f}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                               "torch": torch.__version__, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
