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
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import CfgExportError
from .files import sha256_file, staged_file
from .schedule import NoiseSchedule, parse_enum

FORMAT = "cfg-export/1"
MANIFEST_NAME = "manifest.json"
METADATA_KEY = "cfg_export.manifest"
DTYPES = ("float32", "float16", "int64", "int32")


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
            if not 0 <= int(self.null) <= int(self.num_classes) + 1000:
                raise CfgExportError(f"condition null: got {self.null}, expected a class index >= 0")
        elif self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

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
        object.__setattr__(self, "prediction", parse_enum(Prediction, self.prediction, "prediction type"))
        shape = tuple(int(s) for s in self.sample_shape)
        if not shape or any(s < 1 for s in shape):
            raise CfgExportError(f"sample_shape: got {list(self.sample_shape)}, expected positive sizes like [C, H, W]")
        object.__setattr__(self, "sample_shape", shape)
        if self.timestep_dtype not in ("int64", "float32"):
            raise CfgExportError(f"timestep_dtype: got {self.timestep_dtype!r}, expected one of int64, float32")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFacts":
        """Returns the facts of a config's "guidance" block; raises CfgExportError naming a missing key."""
        required = ("condition", "prediction", "schedule", "sample_shape")
        missing = [k for k in required if k not in d]
        if missing:
            raise CfgExportError(f"guidance facts: missing {', '.join(missing)} (expected keys: {', '.join(required)})")
        cond = dict(d["condition"])
        return cls(
            condition=Condition(**cond),
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
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


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
    precision_schedule: dict | None = None  # steps run by another model file (backends.scheduled)

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
        if self.precision_schedule is not None:
            d["precision_schedule"] = self.precision_schedule
        if with_sha:
            d["model_sha256"] = self.model_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT:
            raise CfgExportError(f"manifest format: got {d.get('format')!r}, expected {FORMAT!r}")
        try:
            return cls(
                facts=ModelFacts.from_dict(d),
                layout=d["layout"],
                inputs=tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(s) for s in d["outputs"]),
                model_file=d["model_file"],
                model_sha256=d.get("model_sha256", ""),
                precision=d.get("precision", "fp32"),
                batch=d.get("batch"),
                opset=d.get("opset"),
                producer=d.get("producer", {}),
                engine=d.get("engine"),
                precision_schedule=d.get("precision_schedule"),
            )
        except (KeyError, TypeError) as exc:
            raise CfgExportError(f"manifest is incomplete: {exc!r}; re-export the model with cfg-export onnx") from None

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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CfgExportError(f"{path}: corrupt manifest ({exc}); re-export the model") from None
    return Manifest.from_dict(d)


def verify_model_file(manifest: Manifest, directory: str | Path) -> Path:
    """Returns the path of the manifest's model file after checking its sha256;
    raises CfgExportError if it is missing or is not the file the manifest describes."""
    path = Path(directory) / manifest.model_file
    if not path.is_file():
        raise CfgExportError(f"{path}: missing (the manifest names it); re-export the model")
    actual = sha256_file(path)
    if actual != manifest.model_sha256:
        raise CfgExportError(
            f"{path} does not match its manifest: sha256 {actual[:12]}..., manifest says "
            f"{manifest.model_sha256[:12]}...; the file was changed after export: re-export it"
        )
    return path


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
