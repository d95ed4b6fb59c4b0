"""The artifact's manifest: what a model file is, and everything needed to sample it.

An artifact directory holds `model.onnx` (later also `model.engine`) and
`manifest.json`. The manifest records the tensors' names, shapes and dtypes, the
graph layout, the condition (class label or embedding) and its null value, the
prediction type, the training noise schedule, the sample shape, the precision and
the sha256 of the model file it describes. The same facts, less the sha256, are
stored in the ONNX metadata under METADATA_KEY.
"""
from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import CfgExportError
from .files import sha256_file, staged_file
from .schedule import NoiseSchedule, parse_enum
from .validation import (expect_dict, expect_file_name, expect_int, expect_list, expect_str, refuse_unknown,
                         require_keys)

FORMAT = "cfg-export/1"
MANIFEST_NAME = "manifest.json"
METADATA_KEY = "cfg_export.manifest"
DTYPES = ("float32", "float16", "int64", "int32")
MAX_SAMPLE_ELEMENTS = 1 << 28  # values in one sample: refuses shapes no device holds
MANIFEST_KEYS = ("format", "model_file", "layout", "batch", "inputs", "outputs", "condition", "prediction", "schedule",
                 "sample_shape", "timestep_dtype", "precision", "opset", "producer", "engine", "model_sha256",
                 "activation_bytes_per_row")


class Layout(enum.Enum):
    """stacked: one call on [cond rows; null rows], 2N rows, the mix on the host.
    fused: N rows and w as inputs; stacking, null condition and mix inside the graph."""

    STACKED = "stacked"
    FUSED = "fused"


class Prediction(enum.Enum):
    EPS = "eps"  # the noise (Ho et al. 2020)
    V = "v"  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
    X0 = "x0"  # the clean sample


class ConditionKind(enum.Enum):
    CLASS = "class"  # int64 labels [B]; null = an extra class index
    EMBEDDING = "embedding"  # float32 [B, L, D]; null = an embedding stored beside the model


CONDITION_KEYS = ("kind", "num_classes", "null", "null_file", "shape")


@dataclass(frozen=True)
class Condition:
    """What `cond` holds and what the null condition is."""

    kind: ConditionKind = ConditionKind.CLASS
    num_classes: int | None = None  # for CLASS: labels 0..num_classes-1 are real classes
    null: int | None = None  # for CLASS: the null class index
    null_file: str | None = None  # for EMBEDDING: .npy beside the model, shape `shape`
    shape: tuple[int, ...] | None = None  # for EMBEDDING: [L, D]

    def __post_init__(self):
        object.__setattr__(self, "kind", parse_enum(ConditionKind, self.kind, "condition kind"))
        if self.kind is ConditionKind.CLASS:
            if self.num_classes is None or self.null is None:
                raise CfgExportError("condition kind 'class' needs 'num_classes' and 'null' (the null class index)")
            num_classes = expect_int(self.num_classes, "condition num_classes", lo=1)
            null = expect_int(self.null, "condition null", lo=0)
            if null < num_classes:
                raise CfgExportError(f"condition null: got {null}, which is one of the real classes 0.."
                                     f"{num_classes - 1}; the null class must be its own index (usually "
                                     f"num_classes = {num_classes}), or guidance toward class {null} does nothing")
            object.__setattr__(self, "num_classes", num_classes)
            object.__setattr__(self, "null", null)
        else:
            if self.shape is not None:
                shape = expect_list(self.shape, "condition shape")
                if len(shape) < 1:
                    raise CfgExportError("condition shape: got [], expected the embedding shape like [L, D]")
                object.__setattr__(self, "shape", tuple(expect_int(s, "condition shape", lo=1) for s in shape))
            if self.null_file is not None:
                expect_file_name(self.null_file, "condition null_file")

    @classmethod
    def from_dict(cls, d) -> "Condition":
        d = expect_dict(d, "condition")
        refuse_unknown(d, CONDITION_KEYS, "condition")
        return cls(**d)

    def to_dict(self) -> dict:
        d = {"kind": self.kind.value}
        for name in ("num_classes", "null", "null_file"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.shape is not None:
            d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class ModelFacts:
    """The guidance facts of a trained model, as its config states them."""

    condition: Condition
    prediction: Prediction
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]  # one sample, without the batch: [C, H, W], [C, L], [L, D], ...
    timestep_dtype: str = "int64"

    def __post_init__(self):
        if not isinstance(self.prediction, Prediction):
            expect_str(self.prediction, "prediction")
        object.__setattr__(self, "prediction", parse_enum(Prediction, self.prediction, "prediction type"))
        shape = expect_list(self.sample_shape, "sample_shape")
        shape = tuple(expect_int(s, "sample_shape", lo=1) for s in shape)
        if not shape:
            raise CfgExportError("sample_shape: got [], expected positive sizes like [C, H, W]")
        if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise CfgExportError(f"sample_shape: got {list(shape)} ({math.prod(shape)} values per sample), expected "
                                 f"at most {MAX_SAMPLE_ELEMENTS}")
        object.__setattr__(self, "sample_shape", shape)
        expect_str(self.timestep_dtype, "timestep_dtype", ("int64", "float32"))

    @classmethod
    def from_dict(cls, d: dict, what: str = "guidance facts") -> "ModelFacts":
        """Returns the facts of a config's "guidance" block (or a manifest's); raises
        CfgExportError naming a missing key or a value of the wrong type or range."""
        d = expect_dict(d, what)
        require_keys(d, ("condition", "prediction", "schedule", "sample_shape"), what)
        return cls(
            condition=Condition.from_dict(d["condition"]),
            prediction=d["prediction"],
            schedule=NoiseSchedule.from_dict(d["schedule"]),
            sample_shape=d["sample_shape"],
            timestep_dtype=d.get("timestep_dtype", "int64"),
        )

    def to_dict(self) -> dict:
        return {
            "condition": self.condition.to_dict(),
            "prediction": self.prediction.value,
            "schedule": self.schedule.to_dict(),
            "sample_shape": list(self.sample_shape),
            "timestep_dtype": self.timestep_dtype,
        }


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output. Dynamic sizes are named by strings ("2N", "N")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict, what: str = "tensor") -> "TensorSpec":
        d = expect_dict(d, what)
        require_keys(d, ("name", "shape", "dtype"), what)
        refuse_unknown(d, ("name", "shape", "dtype"), what)
        name = expect_str(d["name"], f"{what} name")
        shape = []
        for size in expect_list(d["shape"], f"{what} {name!r} shape"):
            shape.append(size if isinstance(size, str) else expect_int(size, f"{what} {name!r} shape", lo=1))
        return cls(name, tuple(shape), expect_str(d["dtype"], f"{what} {name!r} dtype", DTYPES))


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about one model file of an artifact."""

    facts: ModelFacts
    layout: Layout
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_file: str = "model.onnx"
    model_sha256: str = ""
    precision: str = "fp32"
    batch: int | None = None  # images N of a static graph; None when the batch is dynamic
    opset: int | None = None
    producer: dict = field(default_factory=dict)
    engine: dict | None = None  # TensorRT facts, for engine manifests
    activation_bytes_per_row: int | None = None  # peak activation memory per batch row, estimated at export

    def __post_init__(self):
        object.__setattr__(self, "layout", parse_enum(Layout, self.layout, "layout"))

    @property
    def rows_per_image(self) -> int:
        """Rows the graph computes per image: 2 for stacked, 1 for fused."""
        return 2 if self.layout is Layout.STACKED else 1

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise CfgExportError(f"manifest has no input {name!r}; inputs: {', '.join(s.name for s in self.inputs)}")

    def to_dict(self, with_sha: bool = True) -> dict:
        d = {
            "format": FORMAT,
            "model_file": self.model_file,
            "layout": self.layout.value,
            "batch": self.batch,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            **self.facts.to_dict(),
            "precision": self.precision,
            "opset": self.opset,
            "producer": self.producer,
        }
        if self.engine is not None:
            d["engine"] = self.engine
        if self.activation_bytes_per_row is not None:
            d["activation_bytes_per_row"] = self.activation_bytes_per_row
        if with_sha:
            d["model_sha256"] = self.model_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """Returns the manifest of a parsed manifest.json / engine.json; raises CfgExportError
        naming the first field that is missing, unknown, or of the wrong type or range."""
        d = expect_dict(d, "manifest")
        if d.get("format") != FORMAT:
            raise CfgExportError(f"manifest format: got {d.get('format')!r}, expected {FORMAT!r}")
        refuse_unknown(d, MANIFEST_KEYS, "manifest")
        require_keys(d, ("layout", "inputs", "outputs", "model_file"), "manifest")
        if not isinstance(d["layout"], Layout):
            expect_str(d["layout"], "manifest layout")
        batch, opset = d.get("batch"), d.get("opset")
        sha = expect_str(d.get("model_sha256", ""), "manifest model_sha256")
        if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise CfgExportError(f"manifest model_sha256: got {sha[:20]!r}..., expected 64 hex digits")
        engine = d.get("engine")
        return cls(
            facts=ModelFacts.from_dict(d, "manifest"),
            layout=d["layout"],
            inputs=tuple(TensorSpec.from_dict(s, "manifest input") for s in expect_list(d["inputs"], "manifest inputs")),
            outputs=tuple(TensorSpec.from_dict(s, "manifest output")
                          for s in expect_list(d["outputs"], "manifest outputs")),
            model_file=expect_file_name(d["model_file"], "manifest model_file"),
            model_sha256=sha,
            precision=expect_str(d.get("precision", "fp32"), "manifest precision"),
            batch=None if batch is None else expect_int(batch, "manifest batch", lo=1),
            opset=None if opset is None else expect_int(opset, "manifest opset", lo=1),
            producer=expect_dict(d.get("producer", {}), "manifest producer"),
            engine=None if engine is None else expect_dict(engine, "manifest engine"),
            activation_bytes_per_row=None if d.get("activation_bytes_per_row") is None else expect_int(
                d["activation_bytes_per_row"], "manifest activation_bytes_per_row", lo=0),
        )

    def with_sha(self, directory: str | Path) -> "Manifest":
        """Returns a copy whose model_sha256 is that of the model file in `directory`."""
        return replace(self, model_sha256=sha256_file(Path(directory) / self.model_file))

    def write(self, directory: str | Path, name: str = MANIFEST_NAME) -> Path:
        """Writes the manifest as JSON into `directory` (whole or not at all); returns its path."""
        path = Path(directory) / name
        with staged_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_manifest(directory: str | Path, name: str = MANIFEST_NAME) -> Manifest:
    """Returns the manifest of an artifact directory, or raises CfgExportError saying what is wrong."""
    directory = Path(directory)
    path = directory / name
    if not directory.is_dir():
        raise CfgExportError(f"{directory}: no such artifact folder; make one with: cfg-export onnx MODEL -o {directory}")
    if not path.is_file():
        raise CfgExportError(f"{directory}: no {name} in it; is it an artifact folder made by cfg-export onnx?")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CfgExportError(f"{path}: corrupt manifest ({str(exc)[:100]}); re-export the model") from None
    try:
        return Manifest.from_dict(d)
    except CfgExportError as exc:
        raise CfgExportError(f"{path}: {exc}; re-export the model") from None


def compare_metadata(manifest: Manifest, metadata: dict[str, str]) -> list[str]:
    """Returns the differences between the manifest and the facts stored in the model's
    metadata (empty when they agree), as 'key: file says X, manifest says Y' lines."""
    if METADATA_KEY not in metadata:
        return [f"the model file has no {METADATA_KEY} metadata"]
    stored = json.loads(metadata[METADATA_KEY])
    expected = manifest.to_dict(with_sha=False)
    return [
        f"{key}: model file says {stored.get(key)!r}, manifest says {expected.get(key)!r}"
        for key in sorted(set(stored) | set(expected))
        if key != "engine" and stored.get(key) != expected.get(key)
    ]
