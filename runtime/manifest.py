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
STAGE_MANIFEST_KEYS = ("format", "model_file", "layout", "batch", "inputs", "outputs", "precision", "opset",
                       "producer", "engine", "model_sha256", "data_file", "data_sha256", "activation_bytes_per_row",
                       "precision_schedule",
                       "stage")
FACTS_KEYS = ("condition", "conditions", "prediction", "schedule", "sample_shape", "timestep_dtype", "scheduler",
              "patch_size")  # a denoiser's facts: a config's "guidance" block holds these and no others
MANIFEST_KEYS = STAGE_MANIFEST_KEYS + FACTS_KEYS


class Layout(enum.Enum):
    """stacked: one call on [cond rows; null rows], 2N rows, the mix on the host.
    fused: N rows and w as inputs; stacking, null condition and mix inside the graph.
    plain: a pipeline stage outside guidance (a VAE decoder): N rows, one per image."""

    STACKED = "stacked"
    FUSED = "fused"
    PLAIN = "plain"


class Prediction(enum.Enum):
    EPS = "eps"  # the noise (Ho et al. 2020)
    V = "v"  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
    X0 = "x0"  # the clean sample
    FLOW = "flow"  # flow-matching velocity v = eps - x0, x_s = (1 - s) x0 + s eps (Lipman et al. 2023)


class ConditionKind(enum.Enum):
    CLASS = "class"  # int64 labels [B]; null = an extra class index
    EMBEDDING = "embedding"  # float32 [B, *shape]; null = an embedding stored beside the model (or a rule)


class NullRule(enum.Enum):
    """Where the null rows of an embedding condition come from."""

    FILE = "file"  # the values in null_file (Stable Diffusion: the empty prompt's encoding)
    ZEROS = "zeros"  # zeros (SDXL's force_zeros_for_empty_prompt)
    COPY = "copy"  # the image's own conditional row (SDXL's time_ids: the same sizes in both halves)


DEFAULT_CONDITION = "cond"  # the input name of a model's single condition


CONDITION_KEYS = ("kind", "num_classes", "null", "null_file", "shape", "name", "null_rule")


@dataclass(frozen=True)
class Condition:
    """What a condition input holds and what its null value is. A model has one (named
    `cond`) or several named ones (SDXL: encoder_hidden_states, text_embeds, time_ids)."""

    kind: ConditionKind = ConditionKind.CLASS
    num_classes: int | None = None  # for CLASS: labels 0..num_classes-1 are real classes
    null: int | None = None  # for CLASS: the null class index
    null_file: str | None = None  # for EMBEDDING: .npy beside the model, shape `shape`
    shape: tuple[int, ...] | None = None  # for EMBEDDING: one row without the batch, [L, D] or [D]
    name: str = DEFAULT_CONDITION  # the graph input that takes it
    null_rule: NullRule | None = None  # for EMBEDDING: file (default when null_file is set), zeros or copy

    def __post_init__(self):
        object.__setattr__(self, "kind", parse_enum(ConditionKind, self.kind, "condition kind"))
        if self.null_rule is not None:
            object.__setattr__(self, "null_rule", parse_enum(NullRule, self.null_rule, "condition null_rule"))
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
        expect_str(self.name, "condition name")
        if self.null_rule is NullRule.FILE and self.null_file is None:
            raise CfgExportError(f"condition {self.name!r}: null_rule 'file' needs a null_file")

    @classmethod
    def from_dict(cls, d) -> "Condition":
        d = expect_dict(d, "condition")
        refuse_unknown(d, CONDITION_KEYS, "condition")
        return cls(**d)

    @property
    def rule(self) -> NullRule | None:
        """The null rule of an embedding condition (file when only null_file is given)."""
        if self.null_rule is not None:
            return self.null_rule
        return NullRule.FILE if self.null_file is not None else None

    def to_dict(self) -> dict:
        d = {"kind": self.kind.value}
        if self.name != DEFAULT_CONDITION:
            d = {"name": self.name, **d}
        for name in ("num_classes", "null", "null_file"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.null_rule is not None:
            d["null_rule"] = self.null_rule.value
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
    extra_conditions: tuple[Condition, ...] = ()  # further named condition inputs, after `condition`
    scheduler: dict | None = None  # the scheduler config the model shipped with, as diffusers saves it
    patch_size: int | None = None  # a transformer's patch size: image tokens (H / p) (W / p), for flow shifting

    @property
    def conditions(self) -> tuple[Condition, ...]:
        """Every condition input, in the graph's input order."""
        return (self.condition, *self.extra_conditions)

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
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names) or {"sample", "timestep", "w"} & set(names):
            raise CfgExportError(f"condition names: got {names}, expected distinct names other than sample, "
                                 f"timestep, w")
        if self.scheduler is not None and not (isinstance(self.scheduler, dict) and
                                               isinstance(self.scheduler.get("_class_name"), str)):
            raise CfgExportError("scheduler: expected a diffusers scheduler config with its _class_name")
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", expect_int(self.patch_size, "patch_size", lo=1))

    @classmethod
    def from_dict(cls, d: dict, what: str = "guidance facts") -> "ModelFacts":
        """Returns the facts of a config's "guidance" block (or a manifest's); raises
        CfgExportError naming a missing key or a value of the wrong type or range. One
        condition is given as "condition", several named ones as the list "conditions"."""
        d = expect_dict(d, what)
        require_keys(d, ("prediction", "schedule", "sample_shape"), what)
        if "conditions" in d:
            conditions = [Condition.from_dict(c) for c in expect_list(d["conditions"], f"{what} conditions")]
            if not conditions:
                raise CfgExportError(f"{what}: 'conditions' is empty, expected at least one condition")
        else:
            require_keys(d, ("condition",), what)
            conditions = [Condition.from_dict(d["condition"])]
        return cls(
            condition=conditions[0],
            prediction=d["prediction"],
            schedule=NoiseSchedule.from_dict(d["schedule"]),
            sample_shape=d["sample_shape"],
            timestep_dtype=d.get("timestep_dtype", "int64"),
            extra_conditions=tuple(conditions[1:]),
            scheduler=d.get("scheduler"),
            patch_size=d.get("patch_size"),
        )

    def to_dict(self) -> dict:
        if self.extra_conditions or self.condition.name != DEFAULT_CONDITION:
            conditions = {"conditions": [c.to_dict() for c in self.conditions]}
        else:
            conditions = {"condition": self.condition.to_dict()}
        d = {
            **conditions,
            "prediction": self.prediction.value,
            "schedule": self.schedule.to_dict(),
            "sample_shape": list(self.sample_shape),
            "timestep_dtype": self.timestep_dtype,
        }
        if self.scheduler is not None:
            d["scheduler"] = self.scheduler
        if self.patch_size is not None:
            d["patch_size"] = self.patch_size
        return d


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
    """Everything the runtime needs to know about one model file of an artifact. `facts`
    are a denoiser's ModelFacts, or a pipeline stage's (runtime.stage_facts)."""

    facts: ModelFacts  # or TextEncoderFacts, VaeDecoderFacts
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
    data_file: str | None = None  # ONNX external data beside the model (models over 2 GB)
    data_sha256: str = ""
    activation_bytes_per_row: int | None = None  # peak activation memory per batch row, estimated at export
    precision_schedule: dict | None = None  # steps run by another model file (backends.scheduled)

    def __post_init__(self):
        object.__setattr__(self, "layout", parse_enum(Layout, self.layout, "layout"))

    @property
    def is_denoiser(self) -> bool:
        return isinstance(self.facts, ModelFacts)

    @property
    def rows_per_image(self) -> int:
        """Rows the graph computes per image: 2 for stacked, 1 for fused and plain."""
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
        if self.data_file is not None:
            d["data_file"] = self.data_file
        if self.activation_bytes_per_row is not None:
            d["activation_bytes_per_row"] = self.activation_bytes_per_row
        if self.precision_schedule is not None:
            d["precision_schedule"] = self.precision_schedule
        if with_sha:
            d["model_sha256"] = self.model_sha256
            if self.data_file is not None:
                d["data_sha256"] = self.data_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """Returns the manifest of a parsed manifest.json / engine.json; raises CfgExportError
        naming the first field that is missing, unknown, or of the wrong type or range."""
        d = expect_dict(d, "manifest")
        if d.get("format") != FORMAT:
            raise CfgExportError(f"manifest format: got {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("stage", "denoiser") == "denoiser":
            refuse_unknown(d, MANIFEST_KEYS, "manifest")
            facts = ModelFacts.from_dict(d, "manifest")
        else:
            from .stage_facts import read_stage_facts

            refuse_unknown(d, STAGE_MANIFEST_KEYS + (str(d.get("stage")),), "manifest")
            facts = read_stage_facts(d)
        require_keys(d, ("layout", "inputs", "outputs", "model_file"), "manifest")
        if not isinstance(d["layout"], Layout):
            expect_str(d["layout"], "manifest layout")
        batch, opset = d.get("batch"), d.get("opset")
        shas = {}
        for key in ("model_sha256", "data_sha256"):
            sha = expect_str(d.get(key, ""), f"manifest {key}")
            if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
                raise CfgExportError(f"manifest {key}: got {sha[:20]!r}..., expected 64 hex digits")
            shas[key] = sha
        engine, data_file = d.get("engine"), d.get("data_file")
        return cls(
            facts=facts,
            layout=d["layout"],
            inputs=tuple(TensorSpec.from_dict(s, "manifest input") for s in expect_list(d["inputs"], "manifest inputs")),
            outputs=tuple(TensorSpec.from_dict(s, "manifest output")
                          for s in expect_list(d["outputs"], "manifest outputs")),
            model_file=expect_file_name(d["model_file"], "manifest model_file"),
            model_sha256=shas["model_sha256"],
            precision=expect_str(d.get("precision", "fp32"), "manifest precision"),
            batch=None if batch is None else expect_int(batch, "manifest batch", lo=1),
            opset=None if opset is None else expect_int(opset, "manifest opset", lo=1),
            producer=expect_dict(d.get("producer", {}), "manifest producer"),
            engine=None if engine is None else expect_dict(engine, "manifest engine"),
            data_file=None if data_file is None else expect_file_name(data_file, "manifest data_file"),
            data_sha256=shas["data_sha256"],
            activation_bytes_per_row=None if d.get("activation_bytes_per_row") is None else expect_int(
                d["activation_bytes_per_row"], "manifest activation_bytes_per_row", lo=0),
            precision_schedule=None if d.get("precision_schedule") is None else expect_dict(
                d["precision_schedule"], "manifest precision_schedule"),
        )

    def with_sha(self, directory: str | Path) -> "Manifest":
        """Returns a copy whose model_sha256 (and data_sha256) are those of the files in `directory`."""
        data = sha256_file(Path(directory) / self.data_file) if self.data_file else ""
        return replace(self, model_sha256=sha256_file(Path(directory) / self.model_file), data_sha256=data)

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
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:100]
        raise CfgExportError(f"{path}: corrupt manifest ({reason}); re-export the model") from None
    try:
        return Manifest.from_dict(d)
    except CfgExportError as exc:
        raise CfgExportError(f"{path}: {exc}; re-export the model") from None


def compare_metadata(manifest: Manifest, metadata: dict[str, str]) -> list[str]:
    """Returns the differences between the manifest and the facts stored in the model's
    metadata (empty when they agree), as 'key: file says X, manifest says Y' lines."""
    if METADATA_KEY not in metadata:
        return [f"the model file has no {METADATA_KEY} metadata"]
    try:
        stored = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError):
        return [f"the model file's {METADATA_KEY} metadata is not valid JSON"]
    if not isinstance(stored, dict):
        return [f"the model file's {METADATA_KEY} metadata is not a JSON object"]
    expected = manifest.to_dict(with_sha=False)
    return [
        f"{key}: model file says {stored.get(key)!r}, manifest says {expected.get(key)!r}"
        for key in sorted(set(stored) | set(expected))
        if key != "engine" and stored.get(key) != expected.get(key)
    ]
