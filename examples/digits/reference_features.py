"""Writes the classifier-feature statistics of the real digits, the reference side of
the Frechet distance in `cfg-export eval`.

    python -m examples.digits.reference_features

Runs the shipped classifier.onnx (ONNX Runtime, no torch) on all 1,797 real digits
(16x16, [-1, 1], as in data.py) and writes classifier/real_features.npz with the
feature mean [F] and covariance [F, F] (float64).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from examples.digits.data import DESCRIPTION, load_digits_16

HERE = Path(__file__).resolve().parent


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classifier", default=str(HERE / "classifier" / "classifier.onnx"))
    parser.add_argument("--out", default=str(HERE / "classifier" / "real_features.npz"))
    args = parser.parse_args()
    images, _ = load_digits_16("all")
    session = ort.InferenceSession(args.classifier, providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], {"image": images})
    features = features.astype(np.float64)
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, mean=features.mean(0), cov=np.cov(features, rowvar=False), count=len(features),
             description=DESCRIPTION + "; all 1,797 images")
    Path(tmp).replace(args.out)
    print(f"wrote {args.out}: {len(features)} images, {features.shape[1]} features")


if __name__ == "__main__":
    main()
