"""`python -m runtime sample ...`: guided sampling with only numpy, pillow and a backend
installed (argparse, no click). `cfg-export sample` is this same command."""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from .backends import BACKENDS
from .errors import CfgExportError
from .guidance import GuidanceOptions, WSchedule
from .manifest import ConditionKind, Manifest
from .samplers import SAMPLERS
from .schedule import Spacing


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


MAX_DEFAULT_CLASSES = 32  # without --classes, one grid row per class up to this many


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="torch-free classifier-free-guidance sampling")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="sample guided images from an artifact folder",
                       description="Guided sampling from an artifact folder made by `cfg-export onnx`. "
                                   "Class-conditional models take --classes, embedding models (text-style, "
                                   "e.g. a Stable Diffusion UNet) take --cond FILE.npy. Latent models (DiT, "
                                   "Stable Diffusion) give latents: write them with --npy and decode them with "
                                   "the model's VAE. "
                                   "Guidance weight w as in Ho & Salimans 2021: eps = (1 + w) eps_c - w eps_null "
                                   "(diffusers' guidance_scale = 1 + w; w = -1 is unconditional).")
    p.add_argument("artifact", metavar="DIR", help="artifact folder (manifest.json + model.onnx)")
    p.add_argument("--w", type=_floats, default=[0.0],
                   help="guidance weight: one number, or one per image separated by commas (default 0)")
    p.add_argument("--w-schedule", choices=[s.value for s in WSchedule], default=None,
                   help="how w varies over the steps (default constant)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="sampler (default ddim)")
    p.add_argument("--spacing", choices=[s.value for s in Spacing], default=None,
                   help="how the steps are picked from the training timesteps (default leading)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--classes", type=_ints, default=None,
                   help="class labels, one grid row each (default: every class of the model)")
    p.add_argument("--cond", metavar="FILE.npy", default=None,
                   help="embedding model: the condition, [L, D] float32 for all images or [K, L, D] "
                        "(K conditions, one grid row each)")
    p.add_argument("--n", type=int, default=8, help="images per class or condition (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--noise", metavar="FILE.npy", default=None,
                   help="start from this noise [N, *sample shape] instead of drawing it")
    p.add_argument("--negative", metavar="LABELS|FILE.npy", default=None,
                   help="negative condition in the null rows: class labels (one, or one per class), or for "
                        "an embedding model FILE.npy, [L, D] or [K, L, D] (one per condition)")
    p.add_argument("--interval", type=_floats, default=None, metavar="LO,HI",
                   help="guide only at noise levels sigma in [LO, HI]; other steps run only the "
                        "conditional rows (Kynkäänniemi et al. 2024)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="dynamic thresholding at percentile P, e.g. 0.995 (Saharia et al. 2022)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default auto: tensorrt for a folder holding only an engine, else CUDA if available; "
                        "tensorrt runs model.engine (cfg-export trt)")
    p.add_argument("-o", "--out", metavar="FILE.png", default=None, help="PNG grid, one row per class")
    p.add_argument("--npy", metavar="FILE.npy", default=None,
                   help="raw samples [N, ...] as float32; for latent models (DiT, Stable Diffusion) these are "
                        "latents: decoding them is the job of the model's VAE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return parser


class Progress:
    """A progress bar on stderr, without dependencies."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.start = total, quiet, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, i: int, t: int, x) -> None:
        done = i + 1
        if self.quiet or not (self.tty or done == self.total or done % max(1, self.total // 4) == 0):
            return
        bar = "#" * (30 * done // self.total)
        rate = done / (time.perf_counter() - self.start)
        end = "\n" if done == self.total or not self.tty else ""
        sys.stderr.write(f"\rsampling [{bar:<30}] {done}/{self.total} t={t:<4d} {rate:.1f} steps/s{end}")
        sys.stderr.flush()


def _load_npy(path: str, option: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CfgExportError(f"{option} {path}: cannot read it as .npy ({exc})") from None


def _conditions(args, manifest: Manifest) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Returns (cond, negative or None, rows): the conditions from --classes or --cond and
    the negative ones, each repeated --n times, and the number of conditions (grid rows)."""
    from .conditions import check_embeddings

    negatives = None
    if manifest.facts.condition.kind is ConditionKind.EMBEDDING:
        shape = list(manifest.facts.condition.shape or [])
        if args.classes is not None:
            raise CfgExportError(f"--classes: this model takes embeddings {shape}; give --cond FILE.npy")
        if args.cond is None:
            raise CfgExportError(f"this model takes embedding conditions {shape}: give --cond FILE.npy "
                                 f"({shape} for all images, or [K, {', '.join(map(str, shape))}])")
        conds = check_embeddings(_load_npy(args.cond, "--cond"), manifest, f"--cond {args.cond}")
        if args.negative is not None:
            negatives = check_embeddings(_load_npy(args.negative, "--negative"), manifest,
                                         f"--negative {args.negative}")
    else:
        if args.cond is not None:
            raise CfgExportError("--cond: this model takes class labels; use --classes")
        classes = args.classes
        if classes is None:
            num_classes = manifest.facts.condition.num_classes
            if num_classes > MAX_DEFAULT_CLASSES:
                raise CfgExportError(f"this model has {num_classes} classes: pick the grid rows with --classes, "
                                     "e.g. --classes 207,360,387")
            classes = list(range(num_classes))
        conds = np.asarray(classes, dtype=np.int64)
        if args.negative is not None:
            try:
                negatives = np.asarray(_ints(args.negative), dtype=np.int64)
            except argparse.ArgumentTypeError as exc:
                raise CfgExportError(f"--negative: {exc} (class labels for this model)") from None
    rows = len(conds)
    if negatives is not None:
        if len(negatives) not in (1, rows):
            raise CfgExportError(f"--negative: got {len(negatives)} negative conditions, expected 1 or one per "
                                 f"condition ({rows})")
        negatives = np.repeat(np.broadcast_to(negatives, (rows, *negatives.shape[1:])), args.n, axis=0)
    return np.repeat(conds, args.n, axis=0), negatives, rows


def run_sample(args) -> int:
    from .images import check_drawable, save_grid, save_npy
    from .pipeline import DEFAULT_STEPS, open_artifact, sample_guided

    if args.out is None and args.npy is None:
        raise CfgExportError("nothing to write: give -o FILE.png and/or --npy FILE.npy")
    if args.n < 1:
        raise CfgExportError(f"--n: got {args.n}, expected at least 1 image per class")
    manifest = open_artifact(args.artifact, args.backend)
    if args.out:
        check_drawable(manifest.facts.sample_shape)
    cond, negative, rows = _conditions(args, manifest)
    noise = None
    if args.noise:
        try:
            noise = np.load(args.noise)
        except (OSError, ValueError) as exc:
            raise CfgExportError(f"--noise {args.noise}: cannot read it as .npy ({exc})") from None
    if args.interval is not None and len(args.interval) != 2:
        raise CfgExportError(f"--interval: got {args.interval}, expected two noise levels LO,HI")
    w = args.w[0] if len(args.w) == 1 else np.repeat(args.w, args.n) if len(args.w) == rows else args.w
    guidance = GuidanceOptions(w_schedule=args.w_schedule or WSchedule.CONSTANT,
                               interval=tuple(args.interval) if args.interval else None,
                               negative=negative, threshold=args.threshold)
    progress = Progress(args.steps or DEFAULT_STEPS, args.quiet)
    result = sample_guided(args.artifact, cond, w, steps=args.steps, sampler=args.sampler, spacing=args.spacing,
                           seed=args.seed, noise=noise, eta=args.eta, guidance=guidance, backend=args.backend,
                           callback=progress)
    if args.out:
        save_grid(result.samples, rows=rows, path=args.out)
        print(f"wrote {args.out} ({len(cond)} images, one row per condition)")
    if args.npy:
        save_npy(result.samples, args.npy)
        print(f"wrote {args.npy} {list(result.samples.shape)} float32")
    if not args.quiet:
        steps = len(result.step_seconds)
        total = sum(result.step_seconds)
        model = result.model_seconds
        print(f"{steps} steps on {result.backend}: {1e3 * total / steps:.2f} ms/step "
              f"(model {1e3 * model / steps:.2f} ms, host {1e3 * (total - model) / steps:.2f} ms = "
              f"{100 * result.host_share:.1f}%), total {total:.2f} s")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m runtime") -> int:
    """Runs the command line; returns the exit code (1 with one 'Error:' line for bad input)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_sample(args)
    except CfgExportError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
