"""Error of the FP16-typed ONNX (TensorRT 11's FP16 route) against the FP32 model, on
ONNX Runtime CPU, with the default keep-FP32 list and with nothing kept.

    python benchmarks/fp16_error.py out/digits [more artifact folders] --n 8

ONNX Runtime's CPU provider runs FP16 nodes by casting to FP32 and back, so this measures
FP16 storage (weights, and activations between nodes where the casts survive), not FP16
arithmetic inside kernels: a lower bound of what a GPU engine shows. Prints figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from cfg_export.export.exporter import example_inputs
from cfg_export.build.fp16 import convert_fp16
from cfg_export.runtime.artifact import Artifact


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=8, help="images N (default 8)")
    parser.add_argument("--seeds", type=int, default=5, help="random batches (default 5)")
    args = parser.parse_args()
    for directory in args.artifacts:
        manifest = Artifact.open(directory).model_file().manifest
        source = onnx.load(str(directory / manifest.model_file))
        variants = {"default keep list": convert_fp16(source), "nothing kept": convert_fp16(source, ["none"])}
        worst = {name: 0.0 for name in variants}
        for seed in range(args.seeds):
            feeds = example_inputs(manifest, manifest.batch or args.n, seed=seed)
            want = run(source, feeds)
            for name, result in variants.items():
                got = run(result.model, feeds)
                worst[name] = max(worst[name], float(np.abs(got - want).max() / np.abs(want).max()))
        kept = len(variants["default keep list"].kept)
        print(f"{directory}: {len(source.graph.node)} nodes, {kept} kept in FP32 by default")
        for name, error in worst.items():
            print(f"  {name:18s} max |fp16 - fp32| / max |fp32| = {error:.2e} over {args.seeds} batches of "
                  f"N={manifest.batch or args.n}")


if __name__ == "__main__":
    main()
