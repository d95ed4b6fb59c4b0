"""The backend interface (after Polygraphy's runners): cheap constructor, `with` to
open and close, a public `infer` that validates and a private `_infer` that runs."""
from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import CfgExportError
from ..manifest import Manifest, TensorSpec

log = logging.getLogger(__name__)


def describe_differences(declared: tuple[TensorSpec, ...], actual: list[TensorSpec], what: str) -> list[str]:
    """Returns how the model's own inputs/outputs differ from the manifest's (empty if equal).
    Dynamic sizes compare by position only: any name matches any name."""
    if [s.name for s in declared] != [s.name for s in actual]:
        return [f"{what} names: model has {[s.name for s in actual]}, manifest says {[s.name for s in declared]}"]
    diffs = []
    for want, got in zip(declared, actual):
        if want.dtype != got.dtype:
            diffs.append(f"{what} {want.name!r}: model dtype {got.dtype}, manifest says {want.dtype}")
        same = len(want.shape) == len(got.shape) and all(
            isinstance(a, str) == isinstance(b, str) and (isinstance(a, str) or a == b)
            for a, b in zip(want.shape, got.shape))
        if not same:
            diffs.append(f"{what} {want.name!r}: model shape {list(got.shape)}, manifest says {list(want.shape)}")
    return diffs


class Backend:
    """Runs one model file of an artifact. Subclasses implement activate, deactivate, _infer."""

    name = "backend"

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.is_open = False
        self.last_seconds = 0.0  # wall time of the last _infer call

    def __enter__(self) -> "Backend":
        self.activate()
        self.is_open = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.is_open = False
        self.deactivate()

    def activate(self) -> None:
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Raises CfgExportError unless the feeds have the manifest's names, dtypes and shapes."""
        declared = self.manifest.inputs
        if set(feeds) != {s.name for s in declared}:
            raise CfgExportError(f"inputs: got {sorted(feeds)}, expected {[s.name for s in declared]}")
        rows = {}
        for spec in declared:
            value = feeds[spec.name]
            if value.dtype != np.dtype(spec.dtype):
                raise CfgExportError(f"input {spec.name!r}: got dtype {value.dtype}, expected {spec.dtype}")
            ok = value.ndim == len(spec.shape)
            for size, want in zip(value.shape, spec.shape):
                if isinstance(want, str):
                    ok = ok and rows.setdefault(want, size) == size
                else:
                    ok = ok and size == want
            if not ok:
                hint = ""
                if self.manifest.batch is not None:
                    hint = (f"; the graph is static for N={self.manifest.batch} images: "
                            "sample that many, or re-export without --batch")
                raise CfgExportError(f"input {spec.name!r}: got shape {list(value.shape)}, "
                                     f"expected {list(spec.shape)}{hint}")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Returns the outputs by name for feeds by name, after validating the feeds."""
        if not self.is_open:
            raise CfgExportError(f"{self.name} backend is not open: use it inside `with backend:`")
        self.check_feeds(feeds)
        start = time.perf_counter()
        outputs = self._infer(feeds)
        self.last_seconds = time.perf_counter() - start
        return outputs
