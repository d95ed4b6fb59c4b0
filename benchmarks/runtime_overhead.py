"""Host work per step and the stacked call against two half calls, on ONNX Runtime CPU.

    python benchmarks/runtime_overhead.py out/digits --n 16 --steps 50

Prints figures; asserts nothing (speed targets live here, not in tests).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.backends import open_backend
from cfg_export.runtime.pipeline import sample_guided


def time_calls(backend, feeds_list, repeats: int) -> float:
    """Median seconds of running every feed dict in feeds_list once."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for feeds in feeds_list:
            backend.infer(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--n", type=int, default=16, help="images")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    artifact = Artifact.open(args.artifact)
    manifest = artifact.manifest
    labels = np.arange(args.n) % manifest.facts.condition.num_classes
    sample_guided(artifact, labels, 3.0, steps=5)  # warm-up
    runs = [sample_guided(artifact, labels, 3.0, steps=args.steps, seed=i) for i in range(3)]
    per_step = [s for r in runs for s in r.step_seconds[1:]]  # the first step includes session warm-up
    model = sum(r.model_seconds for r in runs) / sum(len(r.step_seconds) for r in runs)
    step = statistics.mean(per_step)
    print(f"sampling N={args.n}, {args.steps} DDIM steps, w=3, stacked, {runs[0].backend}")
    print(f"  step {1e3 * step:.3f} ms, model call {1e3 * model:.3f} ms, host {1e3 * (step - model):.3f} ms "
          f"= {100 * (step - model) / step:.2f}% of the step")
    print(f"  host share over whole runs (first step included): "
          f"{100 * statistics.mean(r.host_share for r in runs):.2f}%")

    rng = np.random.default_rng(0)
    shape = manifest.facts.sample_shape
    n = args.n
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    t = np.full(n, 500, dtype=manifest.facts.timestep_dtype)
    cond = labels.astype(np.int64)
    null = np.full(n, manifest.facts.condition.null, np.int64)
    stacked = [{"sample": np.concatenate([x, x]), "timestep": np.concatenate([t, t]), "cond": np.concatenate([cond, null])}]
    two_pass = [{"sample": x, "timestep": t, "cond": cond}, {"sample": x, "timestep": t, "cond": null}]
    with open_backend(artifact, "onnxruntime-cpu") as backend:
        time_calls(backend, stacked + two_pass, 3)
        one = time_calls(backend, stacked, args.repeats)
        two = time_calls(backend, two_pass, args.repeats)
        single = time_calls(backend, two_pass[:1], args.repeats)
    print(f"model calls at N={n}: stacked 2N call {1e3 * one:.3f} ms, two N calls {1e3 * two:.3f} ms "
          f"(ratio two/stacked {two / one:.2f}), one unguided N call {1e3 * single:.3f} ms")


if __name__ == "__main__":
    main()
