"""Fidelity of cfg-export on diffusers models: tiny UNet2DModel, UNet2DConditionModel and
DiTTransformer2DModel with random weights (built from configs, nothing downloaded),
saved with save_pretrained and exported from their folders.

    python benchmarks/diffusers_fidelity.py      (from the repository root)

Prints, per family and batch size N, the max relative error of the exported graph
(ONNX Runtime CPU) against the diffusers module's own forward on the stacked 2N rows,
and for whole guided sampling runs the max relative difference of the final latents
from diffusers' own loop (DiTPipeline for DiT). Asserts nothing; the tests in
tests/cfg_export/test_diffusers_*.py hold the limits.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfg_export.export.exporter import export_onnx  # noqa: E402
from cfg_export.runtime.guidance import GuidanceOptions  # noqa: E402
from cfg_export.runtime.pipeline import sample_guided  # noqa: E402
from tests import tiny_diffusers  # noqa: E402
from tests.cfg_export import test_diffusers_sampling as loops  # noqa: E402


def forward_errors(folders: dict, artifacts: dict) -> None:
    import onnxruntime as ort
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    modules = {"unet2d": UNet2DModel.from_pretrained(folders["unet2d"] / "unet").eval(),
               "sd": UNet2DConditionModel.from_pretrained(folders["sd"]).eval(),
               "dit": DiTTransformer2DModel.from_pretrained(folders["dit"]).eval()}
    null = np.load(folders["null"])
    for family, module in modules.items():
        session = ort.InferenceSession(str(artifacts[family] / "model.onnx"), providers=["CPUExecutionProvider"])
        for n in (1, 3, 8):
            g = np.random.default_rng(n)
            shape = (4, 8, 8) if family != "unet2d" else (3, 8, 8)
            x = g.standard_normal((2 * n, *shape)).astype(np.float32)
            t = np.tile(g.integers(0, 1000, n), 2).astype(np.int64)
            if family == "sd":
                prompts = g.standard_normal((n, *null.shape)).astype(np.float32)
                cond = np.concatenate([prompts, np.broadcast_to(null, prompts.shape)])
                kwargs = {"encoder_hidden_states": torch.from_numpy(cond)}
            else:
                classes, null_class = (3, 3) if family == "unet2d" else (1000, 1000)
                cond = np.concatenate([g.integers(0, classes, n), np.full(n, null_class)]).astype(np.int64)
                kwargs = {"class_labels": torch.from_numpy(cond)}
            (got,) = session.run(None, {"sample": x, "timestep": t, "cond": cond})
            with torch.no_grad():
                want = module(torch.from_numpy(x), torch.from_numpy(t), **kwargs).sample[:, :shape[0]].numpy()
            print(f"forward  {family:7s} N={n}: max relative error {loops.rel_difference(got, want):.2e}")


def sampling_differences(folders: dict, artifacts: dict) -> None:
    from diffusers import DDIMScheduler

    noise = loops.initial_noise
    for sampler in ("ddim", "dpmpp-2m"):
        ddim = DDIMScheduler.from_pretrained(folders["dit"].parent / "scheduler")
        scheduler = ddim if sampler == "ddim" else loops.dpm_solver(ddim.config)
        theirs = loops.dit_pipeline_latents(folders["dit"].parent, scheduler, [1, 7, 999], 4.0, 0)
        ours = sample_guided(artifacts["dit"], [1, 7, 999], 3.0, steps=loops.STEPS, sampler=sampler,
                             noise=noise((3, 4, 8, 8), 0).numpy(),
                             spacing="leading" if sampler == "ddim" else "trailing").samples
        report(f"DiT vs DiTPipeline, {sampler}, s=4 (w=3)", ours, theirs)
    g = np.random.default_rng(4)
    prompts = g.standard_normal((2, tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM)).astype(np.float32)
    negatives = g.standard_normal(prompts.shape).astype(np.float32)
    null = np.load(folders["null"])
    for name, neg, options in (("null embedding", np.stack([null, null]), None),
                               ("negative embedding", negatives, GuidanceOptions(negative=negatives))):
        theirs = loops.stable_diffusion_loop(folders["sd"].parent, prompts, neg, 7.5, 2)
        ours = sample_guided(artifacts["sd"], prompts, 6.5, steps=loops.STEPS, guidance=options,
                             noise=noise((2, 4, 8, 8), 2).numpy()).samples
        report(f"UNet2DConditionModel vs SD loop, ddim, s=7.5, {name}", ours, theirs)
    theirs = loops.class_unet_loop(folders["unet2d"], [0, 2], 3, 3.0, 1)
    ours = sample_guided(artifacts["unet2d"], [0, 2], 2.0, steps=loops.STEPS, noise=noise((2, 3, 8, 8), 1).numpy())
    report("UNet2DModel vs diffusers loop, ddim, s=3", ours.samples, theirs)


def report(what: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    diff = np.abs(ours - theirs)
    print(f"sampling {what}: max abs difference {diff.max():.2e}, max relative {diff.max() / np.abs(theirs).max():.2e} "
          f"(|latents| up to {np.abs(theirs).max():.2f}, float32 eps {np.finfo(np.float32).eps:.1e})")


def main() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no advice to install accelerate between the figures
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_diffusers.save_pipeline_folder(root / "unet2d", tiny_diffusers.unet2d(), "unet")
        folders = {"unet2d": root / "unet2d",
                   "sd": tiny_diffusers.save_pipeline_folder(root / "sd", tiny_diffusers.unet2d_condition(), "unet"),
                   "dit": tiny_diffusers.save_pipeline_folder(root / "dit", tiny_diffusers.dit(), "transformer"),
                   "null": root / "null.npy"}
        np.save(folders["null"], tiny_diffusers.null_embedding())
        artifacts = {name: root / f"art_{name}" for name in ("unet2d", "sd", "dit")}
        for name in artifacts:
            extra = {"null_embedding": folders["null"]} if name == "sd" else {}
            result = export_onnx(str(folders[name]), artifacts[name], **extra)
            checks = ", ".join(f"N={c.batch} {c.max_rel:.2e}" for c in result.checks)
            print(f"export   {name:7s} self-check (ONNX Runtime vs the wrapped diffusers module): {checks}")
        forward_errors(folders, artifacts)
        sampling_differences(folders, artifacts)


if __name__ == "__main__":
    main()
