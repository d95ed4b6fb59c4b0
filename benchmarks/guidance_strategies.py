"""Model rows and wall time per image of each guidance strategy against full guidance,
side by side in one process, on ONNX Runtime CPU.

    python benchmarks/guidance_strategies.py out/digits --n 16
    python benchmarks/guidance_strategies.py --tiny dit --n 8
    python benchmarks/guidance_strategies.py --tiny sd --n 8
    python benchmarks/guidance_strategies.py --tiny sd-pipeline --n 8

`--tiny dit|sd` builds the tiny random-weight diffusers models of tests/tiny_diffusers.py
(a DiTTransformer2DModel, class labels; a UNet2DConditionModel, text-style embeddings
[N, 5, 16] with a stand-in null embedding) and exports them with cfg-export (stacked
layout, dynamic batch); the SD figure is that single denoiser. `--tiny sd-pipeline` exports
the tiny Stable Diffusion pipeline of tests/tiny_pipelines.py (tokenizer, CLIP text
encoder, UNet, VAE; prompts, its shipped PNDM scheduler) and times its denoising steps
(the text encoder and VAE run once per image whatever the strategy).
Random weights: the rows adaptive guidance saves there say how the row accounting and the
shrinking batch behave, not what a trained model would save; quality is measured by
`cfg-export eval` on the reference model only. Each strategy runs `--repeats` times,
interleaved with the others (full first, then each strategy, again and again), and the
median time is reported. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.backends import open_backend
from cfg_export.runtime.guidance import GuidanceOptions
from cfg_export.runtime.pipeline import sample_guided
from cfg_export.runtime.pipeline_sampling import sample_pipeline
from cfg_export.runtime.strategies import parse_strategy

PROMPTS = ["a red car", "a photo of a cat", "the blue sky", "a green tree on the house"]
DEFAULT_STRATEGIES = "full,adaptive,cache:2,cache:3,adaptive+cache:2,interval:0..5"


def tiny_artifact(kind: str, root: Path) -> tuple[Path, Path | None]:
    """Exports the tiny random DiT or SD UNet into root; returns (artifact, null embedding .npy or None)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cfg_export.export.exporter import export_onnx
    from tests import tiny_diffusers

    if kind == "sd-pipeline":
        from cfg_export.export.pipelines import export_pipeline
        from tests import tiny_pipelines

        tiny_pipelines.save_sd(root / "sd-pipeline")
        export_pipeline(root / "sd-pipeline", root / "sd-pipeline-artifact")
        return root / "sd-pipeline-artifact", None
    if kind == "dit":
        folder = tiny_diffusers.save_pipeline_folder(root / "dit", tiny_diffusers.dit(), "transformer")
        export_onnx(str(folder), root / "dit-artifact")
        return root / "dit-artifact", None
    folder = tiny_diffusers.save_pipeline_folder(root / "sd", tiny_diffusers.unet2d_condition(), "unet")
    null = root / "null.npy"
    np.save(null, tiny_diffusers.null_embedding())
    export_onnx(str(folder), root / "sd-artifact", null_embedding=null)
    return root / "sd-artifact", null


def conditions(artifact: Artifact, n: int) -> np.ndarray:
    """n conditions: labels spread over the classes, or seeded embeddings [n, L, D]."""
    condition = artifact.manifest.facts.condition
    if condition.num_classes is not None:
        return (np.arange(n) * max(1, condition.num_classes // n)) % condition.num_classes
    return np.random.default_rng(1).standard_normal((n, *condition.shape)).astype(np.float32)


def measure(artifact: Artifact, strategies: list[str], n: int, w: float, steps: int, repeats: int) -> list[dict]:
    """Returns per strategy: rows per image, median seconds per image, and both against full."""
    cond = None if artifact.is_pipeline else conditions(artifact, n)
    plans = [parse_strategy(s) for s in strategies]
    times: dict[str, list[float]] = {p.name: [] for p in plans}
    rows: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if artifact.is_pipeline:  # one open backend per stage, reused by every run
            backend = {name: stack.enter_context(open_backend(artifact, "onnxruntime-cpu", stage=name))
                       for name in artifact.pipeline["stages"] if not name.startswith("tokenizer")}
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

            def run(guidance, run_steps):
                result = sample_pipeline(artifact, prompts, w=w, steps=run_steps, seed=0, backend=backend,
                                         guidance=guidance)
                return result.step_seconds, result.rows["denoiser"]
        else:
            backend = stack.enter_context(open_backend(artifact, "onnxruntime-cpu"))

            def run(guidance, run_steps):
                result = sample_guided(artifact, cond, w, steps=run_steps, seed=0, backend=backend,
                                       guidance=guidance)
                return result.step_seconds, result.rows

        run(GuidanceOptions(), 2)  # warm-up, untimed
        for _ in range(repeats):
            for plan in plans:
                step_seconds, model_rows = run(plan.apply(GuidanceOptions()), steps)
                times[plan.name].append(sum(step_seconds) / n)
                rows[plan.name] = model_rows / n
    full = "full" if "full" in rows else None
    table = []
    for plan in plans:
        seconds = statistics.median(times[plan.name])
        entry = {"strategy": plan.name, "rows_per_image": rows[plan.name], "seconds_per_image": seconds}
        if full:
            entry["rows_ratio"] = rows[plan.name] / rows[full]
            entry["seconds_ratio"] = seconds / statistics.median(times[full])
        table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", nargs="?", help="an artifact folder (or give --tiny)")
    parser.add_argument("--tiny", choices=["dit", "sd", "sd-pipeline"],
                        help="build and export a tiny random diffusers model (or the tiny SD pipeline)")
    parser.add_argument("--strategy", default=DEFAULT_STRATEGIES, help=f"default {DEFAULT_STRATEGIES}")
    parser.add_argument("--n", type=int, default=8, help="images")
    parser.add_argument("--w", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if (args.artifact is None) == (args.tiny is None):
        parser.error("give an artifact folder or --tiny dit|sd|sd-pipeline")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.artifact) if args.artifact else tiny_artifact(args.tiny, Path(tmp))[0]
        artifact = Artifact.open(path)
        table = measure(artifact, args.strategy.split(","), args.n, args.w, args.steps, args.repeats)
    what = f"tiny random {args.tiny}" if args.tiny else str(path)
    print(f"{what}: N={args.n}, w={args.w:g}, {args.steps} steps (DDIM; the pipeline: its own scheduler), ONNX Runtime CPU, median of {args.repeats} "
          f"interleaved runs")
    print(f"{'strategy':<28} {'rows/img':>8} {'ratio':>6} {'ms/img':>8} {'ratio':>6}")
    for e in table:
        print(f"{e['strategy']:<28} {e['rows_per_image']:>8.1f} {e.get('rows_ratio', float('nan')):>5.2f}x "
              f"{1e3 * e['seconds_per_image']:>8.2f} {e.get('seconds_ratio', float('nan')):>5.2f}x")


if __name__ == "__main__":
    main()
