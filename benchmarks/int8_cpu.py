"""INT8 (Q/DQ) against FP32 on ONNX Runtime CPU for a stacked class-conditional artifact
(the reference model): speed per step and end to end, the quality report, the accuracy
of each variant at each ONNX Runtime graph optimization level, and optionally which
layers lose the accuracy.

    cfg-export onnx examples/digits/denoiser -o out/digits
    python benchmarks/int8_cpu.py out/digits --work out/int8-bench [--sensitivity]

Calibrates once (cfg-export calibrate defaults: 2 images per class, DDIM 50 steps, w=3,
every step recorded), quantizes the variants below, and prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np

from cfg_export.calibration.data import read_calibration
from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact
from cfg_export.calibration.record import record_calibration
from cfg_export.calibration.report import measure_quality
from cfg_export.runtime.backends.onnxrt import OnnxRuntimeBackend
from cfg_export.runtime.guidance import mix
from cfg_export.runtime.pipeline import open_artifact, sample_guided

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "examples" / "digits" / "classifier" / "classifier.onnx"
VARIANTS = {
    "int8": QuantizeOptions(),
    "int8-minmax": QuantizeOptions(method="minmax"),
    "int8-entropy": QuantizeOptions(method="entropy"),
    "int8-reduce-range": QuantizeOptions(reduce_range=True),
    "uint8 (ORT only)": QuantizeOptions(activation_type="uint8"),
    "int8 +full-res float": QuantizeOptions(keep_fp32=("default", "@full-res")),  # the layers ranked worst
    # the reference model's 8x8 blocks too (node names of examples/digits/nets.py): only the 4x4 blocks in INT8
    "int8 4x4 blocks only": QuantizeOptions(keep_fp32=("default", "@full-res", "/model/down.2/*", "/model/up.3/*",
                                                       "/model/up.4/*")),
}


def time_models(dirs: dict[str, Path], n: int, threads: int | None, repeats: int) -> dict[str, float]:
    """Median seconds of one model call on the stacked 2N rows of a mid-trajectory step, per
    artifact; the artifacts take turns call by call, so a machine's changing load hits all alike."""
    from contextlib import ExitStack

    first = open_artifact(next(iter(dirs.values())))
    labels = np.arange(n) % first.facts.condition.num_classes
    feeds = []
    sample_guided(next(iter(dirs.values())), labels, 3.0, steps=4, seed=0, record=feeds.append)
    times = {name: [] for name in dirs}
    with ExitStack() as stack:
        backends = {}
        for name, directory in dirs.items():
            manifest = open_artifact(directory)
            backends[name] = stack.enter_context(
                OnnxRuntimeBackend(directory / manifest.model_file, manifest, threads=threads))
        for backend in backends.values():
            for _ in range(3):
                backend.infer(feeds[1])
        for _ in range(repeats):
            for name, backend in backends.items():
                start = time.perf_counter()
                backend.infer(feeds[1])
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_sampling(dirs: dict[str, Path], n: int, steps: int, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """(median seconds per step, seconds end to end) of guided sampling through the runtime
    (its default ONNX Runtime session), best of `rounds` runs taken in turns."""
    labels = np.arange(n) % open_artifact(next(iter(dirs.values()))).facts.condition.num_classes
    runs = {name: [] for name in dirs}
    for directory in dirs.values():
        sample_guided(directory, labels, 3.0, steps=3)  # warm-up
    for i in range(rounds):
        for name, directory in dirs.items():
            runs[name].append(sample_guided(directory, labels, 3.0, steps=steps, seed=i))
    best = {name: min(r, key=lambda x: sum(x.step_seconds)) for name, r in runs.items()}
    return {name: (statistics.median(b.step_seconds), sum(b.step_seconds)) for name, b in best.items()}


def accuracy_by_level(fp32: Path, variant: Path, calib: Path) -> dict[str, float]:
    """Max relative error of the guided eps over the recorded steps, per graph optimization level."""
    import onnxruntime as ort

    data = read_calibration(calib, open_artifact(fp32))
    w = data.manifest.w
    feeds = list(data.batches(list(range(0, data.steps, max(1, data.steps // 10)))))
    reference = ort.InferenceSession(str(fp32 / "model.onnx"), providers=["CPUExecutionProvider"])
    want = [reference.run(None, f)[0].astype(np.float64) for f in feeds]
    out = {}
    for name in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, name)
        session = ort.InferenceSession(str(variant / "model.onnx"), options, providers=["CPUExecutionProvider"])
        errors = []
        for f, a in zip(feeds, want):
            b = session.run(None, f)[0].astype(np.float64)
            n = len(b) // 2
            ga, gb = mix(a[:n], a[n:], np.full(n, w)), mix(b[:n], b[n:], np.full(n, w))
            errors.append(np.linalg.norm(gb - ga) / np.linalg.norm(ga))
        out[name] = max(errors)
    return out


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path, help="FP32 stacked artifact (cfg-export onnx)")
    parser.add_argument("--work", type=Path, default=Path("out/int8-bench"), help="calibration file and variants")
    parser.add_argument("--n", default="1,8", help="images N for the timings (2N rows)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads of the timings")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--variants", default=None, help=f"comma list of: {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--report-n", type=int, default=4, help="images per class of the quality report")
    parser.add_argument("--sensitivity", action="store_true", help="rank the layers by the error each adds alone")
    parser.add_argument("--no-report", action="store_true", help="skip the quality reports (timings only)")
    args = parser.parse_args()

    import onnxruntime as ort

    print(f"ONNX Runtime {ort.__version__} CPU; CPU flags: {cpu_flags()}")
    calib = args.work / "calib.npz"
    if not calib.is_file():
        result = record_calibration(args.fp32, calib)
        print(f"calibration: {calib}, {len(result.manifest.rows)} steps x {result.manifest.rows[0]} rows, "
              f"{result.seconds:.1f} s")
    names = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    dirs = {"fp32": args.fp32}
    for name in names:
        out = args.work / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        dirs[name] = out
        if (out / "manifest.json").is_file() and \
                open_artifact(out).producer.get("quantized_from") == open_artifact(args.fp32).model_sha256:
            print(f"{name}: reusing {out}")
            continue
        result = quantize_artifact(args.fp32, calib, out, VARIANTS[name], overwrite=True)
        print(f"{name}: {len(result.quantized)} layers in INT8, {len(result.kept)} nodes kept in float, "
              f"quantized in {result.seconds:.1f} s")

    threads = f"{args.threads} thread(s)" if args.threads else "ONNX Runtime's default threads"
    print(f"\nspeed: model = median of one call on the stacked 2N rows ({threads}); step and end to end = "
          f"the runtime's sample_guided (default session), best of 5 runs:")
    for n in (int(v) for v in args.n.split(",")):
        models = time_models(dirs, n, args.threads, args.repeats)
        sampling = time_sampling(dirs, n, args.steps)
        for name in dirs:
            model, (step, total) = models[name], sampling[name]
            print(f"  N={n:<3d} {name:22s} model {1e3 * model:7.2f} ms ({models['fp32'] / model:4.2f}x)   "
                  f"step {1e3 * step:7.2f} ms   {args.steps} steps end to end {total:6.2f} s "
                  f"({sampling['fp32'][1] / total:4.2f}x)")

    print("\nmax guided-eps error over 10 recorded steps, by ONNX Runtime graph optimization level:")
    for name, directory in dirs.items():
        if name != "fp32" and not args.no_report:
            levels = accuracy_by_level(args.fp32, directory, calib)
            print(f"  {name:22s} " + "  ".join(f"{k[4:]} {100 * v:.2f}%" for k, v in levels.items()))

    for name, directory in dirs.items():
        if name == "fp32" or args.no_report:
            continue
        print(f"\nquality report: {name}")
        report = measure_quality(args.fp32, directory, n=args.report_n, steps=args.steps, classifier=CLASSIFIER)
        print("\n".join("  " + line for line in report.lines(every=5)))

    if args.sensitivity:
        from cfg_export.calibration.sensitivity import layer_sensitivity

        print("\nlayer sensitivity (default recipe's INT8 layers, one at a time):")
        print("\n".join("  " + line for line in layer_sensitivity(args.fp32, calib).lines(top=12)))


if __name__ == "__main__":
    main()
