"""INT8 against FP32 on ONNX Runtime CPU: the before/after table of the INT8 recipe on the
reference model, the activation-range methods, and INT8 on attention models (a tiny DiT
and a tiny Stable Diffusion UNet with random weights).

    cfg-export onnx examples/digits/denoiser -o out/digits
    python benchmarks/int8_cpu.py out/digits --work out/int8-bench --threads 1 [--select] [--methods] [--attention]

Calibrates once (cfg-export calibrate's defaults: 2 images per class, DDIM 50 steps, w=3,
every step recorded), quantizes the variants, and prints the tables; asserts nothing.

Speed is per image, end to end through the runtime (sample_guided, DDIM, --speed-steps
steps, w=3), each variant with its own open session (--threads intra-op threads, spinning
off), the variants taking turns call by call in every round (the order rotating), so a
machine's changing load hits all alike. Printed: the median over the rounds of wall time
and of process CPU time per image (CPU time is what other jobs on the machine disturb
least; wall time is what a user waits), the 25-75% spread, and the speed-up: the ratio
of the FP32 median to the variant's, with the min-max of the per-round ratios.

Quality (--report-n images per class, DDIM 50 steps, w=3, seed 1234, trajectories the
calibration did not see): the quality report of cfg-export quantize --report: the largest
implied-x0 error over the steps, the guided-eps error at t=0, the relative distance of the
final images, class accuracy and Frechet distance with their 95% bootstrap intervals.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.tiny_diffusers for the attention models (after the installed package)

from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact  # noqa: E402
from cfg_export.calibration.record import record_calibration  # noqa: E402
from cfg_export.calibration.report import measure_quality  # noqa: E402
from cfg_export.evaluation.int8 import compare_int8  # noqa: E402
from cfg_export.runtime.artifact import Artifact  # noqa: E402
from cfg_export.runtime.backends import BackendOptions, open_backend  # noqa: E402
from cfg_export.runtime.pipeline import sample_guided  # noqa: E402

W = 3.0
VARIANTS = {  # name -> (options, quantize_artifact keywords)
    "INT8 before (shared Q/DQ pairs)": (QuantizeOptions(cpu_fusion=False, simplify=False), {}),
    "INT8 after (default recipe)": (QuantizeOptions(), {}),
}
METHODS = ("minmax", "entropy", "percentile", "min-mean")


def say(text: str = "") -> None:
    print(text, flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def quantized(fp32: Path, calib: Path, out: Path, options: QuantizeOptions, **keywords) -> Path:
    """The artifact of this recipe in `out`, reused when its recipe file matches."""
    from cfg_export.runtime.files import sha256_file

    recipe = json.dumps({"options": {k: v for k, v in options.__dict__.items()},
                         "keywords": keywords, "source": Artifact.open(fp32).manifest.model_sha256,
                         "calib": sha256_file(calib)}, sort_keys=True, default=str)
    stamp = out.parent / f"{out.name}.recipe.json"
    if (out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return out
    start = time.perf_counter()
    result = quantize_artifact(fp32, calib, out, options, overwrite=True, **keywords)
    stamp.write_text(recipe)
    say(f"  {out.name}: {len(result.quantized)} layers in INT8, {len(result.kept)} nodes float, "
        f"{time.perf_counter() - start:.0f} s" + "".join(f"; {n}" for n in result.notes))
    return out


def preprocessed_fp32(fp32: Path, out: Path) -> Path:
    """The FP32 artifact after the INT8 recipe's exact graph pre-processing (a control: how
    much of the speed-up the pre-processing alone gives FP32)."""
    import onnx

    from cfg_export.calibration.simplify import simplify_graph
    from cfg_export.runtime.manifest import METADATA_KEY

    source = Artifact.open(fp32).manifest
    if (out / "manifest.json").is_file() and Artifact.open(out).manifest.producer.get("preprocessed_from") == \
            source.model_sha256:
        return out
    from dataclasses import replace

    model = onnx.load(str(fp32 / source.model_file))
    simplify_graph(model)
    manifest = replace(source, producer={**source.producer, "preprocessed_from": source.model_sha256})
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest.to_dict(with_sha=False), sort_keys=True)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / manifest.model_file))
    manifest.with_sha(out).write(out)
    return out


def time_variants(dirs: dict[str, Path], cond: np.ndarray, steps: int, rounds: int, threads: int | None) -> dict:
    """name -> {"wall": [s per image per round], "cpu": [...]}: end-to-end sampling, the
    variants in turns in every round (order rotated)."""
    from contextlib import ExitStack

    options = BackendOptions(threads=threads, spinning=False)
    times = {name: {"wall": [], "cpu": []} for name in dirs}
    n = len(cond)
    with ExitStack() as stack:
        artifacts = {name: Artifact.open(d) for name, d in dirs.items()}
        backends = {name: stack.enter_context(open_backend(a, "onnxruntime-cpu", options))
                    for name, a in artifacts.items()}
        names = list(dirs)
        for name in names:  # warm-up
            sample_guided(artifacts[name], cond, W, steps=3, backend=backends[name])
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                wall, cpu = time.perf_counter(), time.process_time()
                sample_guided(artifacts[name], cond, W, steps=steps, seed=r, backend=backends[name])
                times[name]["wall"].append((time.perf_counter() - wall) / n)
                times[name]["cpu"].append((time.process_time() - cpu) / n)
    return times


def speed_columns(times: dict, reference: str) -> dict[str, str]:
    """name -> 'wall ms [q25-q75] (x speed-up, min-max) | cpu ms (x speed-up)'."""
    out = {}
    for name, t in times.items():
        cells = []
        for kind in ("wall", "cpu"):
            values, ref = np.array(t[kind]), np.array(times[reference][kind])
            ratios = ref / values  # paired by round
            q25, q75 = np.percentile(values, [25, 75])
            cells.append(f"{1e3 * np.median(values):.2f} ms [{1e3 * q25:.2f}-{1e3 * q75:.2f}] "
                         f"{np.median(ref) / np.median(values):.2f}x ({ratios.min():.2f}-{ratios.max():.2f})")
        out[name] = cells
    return out


def quality_row(report) -> list[str]:
    q8, worst = report.quality.get("int8"), max(report.step_errors, key=lambda e: e.x0)
    last = report.step_errors[-1]
    cells = [f"{100 * worst.x0:.2f}% (t={worst.timestep})", f"{len(report.steps_over)}",
             f"{100 * last.guided:.1f}%", f"{100 * report.relative_distances.mean():.2f}%"]
    if q8 is not None:
        cells += [f"{100 * q8.accuracy.value:.1f} [{100 * q8.accuracy.low:.1f}, {100 * q8.accuracy.high:.1f}]",
                  f"{q8.frechet_distance:.2f}"]
    return cells


def fused_counts(directory: Path) -> str:
    import onnx

    from cfg_export.calibration.qdq import fused_kernels

    k = fused_kernels(onnx.load(str(directory / "model.onnx")))
    integer = sum(v for op, v in k.items() if op.startswith("QLinear") and op != "QLinearSoftmax" or op == "QGemm")
    return f"{integer} integer, {k.get('Conv', 0) + k.get('MatMul', 0) + k.get('Gemm', 0)} float"


def reference_model(args, calib: Path) -> None:
    dirs = {"FP32": args.fp32, "FP32 pre-processed (control)": preprocessed_fp32(args.fp32, args.work / "fp32-pre")}
    variants = dict(VARIANTS)
    if args.select:
        variants["INT8 after, --select"] = (QuantizeOptions(), {"select": True})
    for name, (options, keywords) in variants.items():
        dirs[name] = quantized(args.fp32, calib, args.work / slug(name), options, **keywords)
    num_classes = Artifact.open(args.fp32).manifest.facts.condition.num_classes
    speed = {}
    for n in args.n:
        say(f"timing N={n} ({args.rounds} rounds of {args.speed_steps} steps, {len(dirs)} variants in turns)...")
        speed[n] = speed_columns(time_variants(dirs, np.arange(n) % num_classes, args.speed_steps, args.rounds,
                                               args.threads), "FP32")
    reports = {}
    if not args.no_report:
        for name, d in dirs.items():
            if name.startswith("INT8"):
                say(f"quality report: {name}...")
                reports[name] = compare_int8(args.fp32, d, n=args.report_n, steps=50, w=W, threads=args.threads)
    threads = f"{args.threads} thread(s)" if args.threads else "ONNX Runtime's default threads"
    say(f"\n## Reference model, ONNX Runtime CPU ({threads}, spinning off)\n")
    head = ["variant", "layers INT8 / fused"]
    for n in args.n:
        head += [f"N={n} wall per image (speed-up, per-round range)", f"N={n} CPU per image"]
    if reports:
        head += ["max x0 error (t)", "steps > 5%", "guided eps t=0", "images rel. L2", "accuracy % [CI]", "FD"]
    say("| " + " | ".join(head) + " |")
    say("|" + "---|" * len(head))
    fp32_quality = next((r.quality.get("fp32") for r in reports.values()), None)
    for name, d in dirs.items():
        layers = "-" if not name.startswith("INT8") else fused_counts(d)
        cells = [name, layers]
        for n in args.n:
            cells += speed[n][name]
        if name in reports:
            cells += quality_row(reports[name])
        elif name == "FP32" and fp32_quality is not None:
            q = fp32_quality
            cells += ["-", "-", "-", "-", f"{100 * q.accuracy.value:.1f} [{100 * q.accuracy.low:.1f}, "
                      f"{100 * q.accuracy.high:.1f}]", f"{q.frechet_distance:.2f}"]
        say("| " + " | ".join(cells) + " |")
    for name, report in reports.items():
        say(f"\nquality report: {name}")
        say("\n".join("  " + line for line in report.lines(every=5)))


def range_methods(args, calib: Path) -> None:
    say("\n## Activation ranges (default recipe otherwise)\n")
    say("| method | max x0 error (t) | steps > 5% | guided eps t=0 | images rel. L2 | median range spread over steps |")
    say("|---|---|---|---|---|---|")
    for method in METHODS:
        d = quantized(args.fp32, calib, args.work / f"method-{method}", QuantizeOptions(method=method))
        report = measure_quality(args.fp32, d, n=args.methods_n, steps=50, w=W, threads=args.threads)
        spread = Artifact.open(d).manifest.producer["quantization"].get("median_range_spread_over_steps")
        cells = quality_row(report)[:4] + [f"{spread:.2f}x" if spread else "-"]
        say(f"| {method} | " + " | ".join(cells) + " |")


def attention_models(args) -> None:
    """Tiny DiT and SD UNet (random weights, a little larger than the tests' so that timing
    means something): export, calibrate, quantize (Linear layers and convolutions; the
    attention MatMuls stay float), with and without SmoothQuant, and with the per-step
    schedule the report asks for."""
    import torch  # noqa: F401  (the export needs it)

    from cfg_export.export.exporter import export_onnx
    from tests import tiny_diffusers as td

    def dit():
        from diffusers import DiTTransformer2DModel

        return td._randomize(DiTTransformer2DModel(
            num_layers=4, attention_head_dim=32, num_attention_heads=4, sample_size=16, patch_size=2, in_channels=4,
            out_channels=8, num_embeds_ada_norm=1000, norm_num_groups=32), seed=3)

    def unet():
        from diffusers import UNet2DConditionModel

        return td._randomize(UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1, cross_attention_dim=32, attention_head_dim=8), seed=2)

    root = args.work / "attention"
    g = np.random.default_rng(1)
    models = {"tiny DiT (4 blocks, 64 tokens)": ("dit", dit, "transformer", np.arange(8), np.arange(100, 108)),
              "tiny SD UNet (cross-attention)": ("sd", unet, "unet", g.standard_normal((8, 8, 32)).astype(np.float32),
                                                 g.standard_normal((8, 8, 32)).astype(np.float32))}
    say("\n## Attention models (random weights), ONNX Runtime CPU\n")
    say("| model | variant | layers INT8 / fused | max x0 error (t) | steps > 5% | N=1 wall (CPU) speed-up | "
        "N=8 wall (CPU) speed-up |")
    say("|---|---|---|---|---|---|---|")
    for title, (key, build, sub, calib_cond, test_cond) in models.items():
        art = root / key
        if not (art / "manifest.json").is_file():
            folder = td.save_pipeline_folder(root / f"{key}-src", build(), sub)
            extra = {}
            if key == "sd":
                np.save(root / "null.npy", np.zeros((8, 32), np.float32))
                extra["null_embedding"] = root / "null.npy"
            # weights N(0, 0.2) make activations large: float32 rounding alone reaches ~1e-4 relative
            export_onnx(str(folder), art, overwrite=True, tolerance=1e-3, **extra)
        calib = root / f"{key}-calib.npz"
        if not calib.is_file():
            record_calibration(art, calib, cond=calib_cond, w=W, steps=50)
        variants = {"INT8": (QuantizeOptions(), {}), "INT8 + SmoothQuant 0.5": (QuantizeOptions(smoothquant=0.5), {}),
                    "INT8 + schedule auto": (QuantizeOptions(), {"schedule": "auto"})}
        dirs = {"FP32": art}
        for name, (options, keywords) in variants.items():
            dirs[name] = quantized(art, calib, root / f"{key}-{slug(name)}", options, **keywords)
        speeds = {n: speed_columns(time_variants(dirs, test_cond[:n], args.speed_steps, args.rounds, args.threads),
                                   "FP32") for n in (1, 8)}
        for name, d in dirs.items():
            if name == "FP32":
                continue
            report = measure_quality(art, d, cond=test_cond, steps=50, w=W, threads=args.threads)
            worst = max(report.step_errors, key=lambda e: e.x0)
            schedule = Artifact.open(d).manifest.precision_schedule
            label = name + (f" (float at t in {schedule['float_timesteps']})" if schedule else "")
            cells = [title, label, fused_counts(d), f"{100 * worst.x0:.2f}% (t={worst.timestep})",
                     str(len(report.steps_over))]
            cells += [" / ".join(c.split(" (")[0].split("] ")[-1] for c in speeds[n][name]) for n in (1, 8)]
            say("| " + " | ".join(cells) + " |")
            say("    x0 per step: " + " ".join(f"{100 * e.x0:.1f}" for e in report.step_errors[::5]) + " ... "
                + f"{100 * report.step_errors[-1].x0:.1f} (%, every 5th step from t=980)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path, help="FP32 stacked artifact of the reference model (cfg-export onnx)")
    parser.add_argument("--work", type=Path, default=Path("out/int8-bench"), help="calibration file and variants")
    parser.add_argument("--n", default="1,16", help="images N of the timings (2N rows)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (variants in turns in each)")
    parser.add_argument("--speed-steps", type=int, default=50, help="sampler steps of each timed run")
    parser.add_argument("--report-n", type=int, default=10, help="images per class of the quality reports")
    parser.add_argument("--no-report", action="store_true", help="timings only")
    parser.add_argument("--select", action="store_true", help="add the --select variant (sensitivity vs cost)")
    parser.add_argument("--methods", action="store_true", help="compare the activation-range methods")
    parser.add_argument("--methods-n", type=int, default=4, help="images per class of the methods table")
    parser.add_argument("--attention", action="store_true", help="the tiny DiT and SD UNet table")
    parser.add_argument("--skip-reference", action="store_true", help="no reference-model table (with --attention)")
    args = parser.parse_args()
    args.n = [int(v) for v in args.n.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort

    say(f"ONNX Runtime {ort.__version__} CPU; CPU flags: {cpu_flags()}; threads {args.threads}")
    calib = args.work / "calib.npz"
    if not calib.is_file():
        result = record_calibration(args.fp32, calib)
        say(f"calibration: {calib}, {len(result.manifest.rows)} steps x {result.manifest.rows[0]} rows")
    if not args.skip_reference:
        reference_model(args, calib)
    if args.methods:
        range_methods(args, calib)
    if args.attention:
        attention_models(args)


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none"


if __name__ == "__main__":
    main()
